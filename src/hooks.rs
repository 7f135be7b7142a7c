//! Hooks: the commands a credential runs after a refresh (`on_refresh`) or a failure
//! (`on_failure`). argv, never a shell string, so no quoting surprises. They run in their own
//! task with a timeout and are killed past it; refreshing never waits for them.
//!
//! `on_refresh` gets `refreshed`; `on_failure` — the alerting hook — gets everything a human may
//! act on: `failed`, `needs_reauth` (repeated until someone re-authorizes), `expired`,
//! `reauth_soon`, and `recovered` (healthy again after failures or a rate-limit pause).
//!
//! Environment given to a hook: `TOKEND_EVENT`, `TOKEND_CREDENTIAL`, `TOKEND_PROVIDER`,
//! `TOKEND_SINKS` (sink paths joined by ':'), `TOKEND_EXPIRES_AT` (RFC 3339, when known),
//! `TOKEND_GENERATION`, `TOKEND_ERROR` (failures), `TOKEND_REAUTH_DEADLINE` (RFC 3339, when
//! known), `TOKEND_EXTRA` (the kept answer extras as JSON) and the variables the provider derives
//! from them (Wild Apricot: `TOKEND_ACCOUNT_IDS`, `TOKEND_ACCOUNT_ID`), and
//! `TOKEND_ACCESS_TOKEN` only when the credential sets `hook_token = true`. Nothing else of
//! tokend's environment reaches a hook — a client secret given through `client_secret_env`,
//! `CREDENTIALS_DIRECTORY`, systemd's sockets — except a `PATH` ([`DEFAULT_HOOK_PATH`] unless
//! tokend's own is allowed) and the variables the credential names in `hook_env`.
//!
//! A hook runs as tokend's own user, in its sandbox: it can read what tokend can read, the
//! database included. A hook that needs less should hand its work to another service (README,
//! "Hooks").

use crate::clock::rfc3339;
use crate::config::Credential;
use crate::store::TokenState;
use std::process::Stdio;

/// The search path hooks get unless `hook_env` passes tokend's own `PATH`.
pub const DEFAULT_HOOK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// tokend's own hook variables, without the `TOKEND_` prefix.
const OWN_VARIABLES: &[&str] = &[
    "EVENT",
    "CREDENTIAL",
    "PROVIDER",
    "SINKS",
    "EXPIRES_AT",
    "GENERATION",
    "ERROR",
    "EXTRA",
    "ACCESS_TOKEN",
    "REAUTH_DEADLINE",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Refreshed,
    Failed,
    NeedsReauth,
    Expired,
    /// The re-authorization deadline is within the credential's `reauth_warn`.
    ReauthSoon,
    /// Healthy again after failures or a rate-limit pause.
    Recovered,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Refreshed => "refreshed",
            Event::Failed => "failed",
            Event::NeedsReauth => "needs_reauth",
            Event::Expired => "expired",
            Event::ReauthSoon => "reauth_soon",
            Event::Recovered => "recovered",
        }
    }
}

/// Starts the hook for `event`, if the credential has one, and returns at once.
pub fn spawn(credential: &Credential, event: Event, state: Option<&TokenState>, error: Option<&str>) {
    spawn_with(credential, event, state, error, None);
}

/// [`spawn`], telling the hook the re-authorization deadline (unix seconds).
pub fn spawn_with(
    credential: &Credential,
    event: Event,
    state: Option<&TokenState>,
    error: Option<&str>,
    reauth_deadline: Option<i64>,
) {
    let argv = match event {
        Event::Refreshed => credential.hooks.on_refresh.as_ref(),
        _ => credential.hooks.on_failure.as_ref(),
    };
    let Some(argv) = argv.cloned() else { return };
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().env("PATH", DEFAULT_HOOK_PATH);
    for name in &credential.hooks.pass_env {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.env("TOKEND_EVENT", event.as_str())
        .env("TOKEND_CREDENTIAL", &*credential.name)
        .env("TOKEND_PROVIDER", credential.provider().as_str())
        .env(
            "TOKEND_SINKS",
            credential.sinks.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(":"),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(state) = state {
        cmd.env("TOKEND_GENERATION", state.generation.to_string());
        if let Some(t) = state.expires_at {
            cmd.env("TOKEND_EXPIRES_AT", rfc3339(t));
        }
        if credential.hooks.pass_token {
            cmd.env("TOKEND_ACCESS_TOKEN", state.access_token.expose());
        }
        if let Some(extra) = &state.extra {
            cmd.env("TOKEND_EXTRA", extra);
            for (name, value) in crate::sink::extra_env(state) {
                // An answer field named like one of tokend's own variables does not replace it.
                if !OWN_VARIABLES.contains(&name.as_str()) {
                    cmd.env(format!("TOKEND_{name}"), value);
                }
            }
        }
    }
    if let Some(deadline) = reauth_deadline {
        cmd.env("TOKEND_REAUTH_DEADLINE", rfc3339(deadline));
    }
    if let Some(e) = error {
        // Provider text is cleaned where it enters; this keeps a NUL from ever stopping the
        // hook from starting.
        cmd.env("TOKEND_ERROR", crate::redact::clean_text(e, 1000));
    }
    let name = credential.name.clone();
    let timeout = credential.hooks.timeout;
    tokio::spawn(async move {
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(credential = %name, hook = %argv[0], "cannot start hook: {e}");
                return;
            }
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => {
                tracing::debug!(credential = %name, hook = %argv[0], event = event.as_str(), "hook done");
            }
            Ok(Ok(status)) => tracing::warn!(credential = %name, hook = %argv[0], %status, "hook failed"),
            Ok(Err(e)) => tracing::warn!(credential = %name, hook = %argv[0], "hook: {e}"),
            Err(_) => {
                let _ = child.kill().await;
                tracing::warn!(credential = %name, hook = %argv[0], timeout = ?timeout, "hook timed out and was killed");
            }
        }
    });
}
