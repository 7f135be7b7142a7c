//! One refresh, top to bottom. This is where tokend's one invariant lives:
//!
//! **A rotated refresh token is never lost.** Providers such as NationBuilder revoke the refresh
//! token they were given as soon as they answer with a new one, so for every refresh:
//!
//! 1. take the credential's lease (one refresher per credential, across tasks and processes);
//! 2. record the attempt — which refresh token is being spent, when — durably (1 and 2 are one
//!    transaction, [`RefreshStore::begin_refresh`]);
//! 3. POST to the token endpoint;
//! 4. commit the answer — new access token, new refresh token, lifetime, generation + 1 — in one
//!    transaction ([`RefreshStore::commit_rotation`]; on SQLite group-committed with the commits
//!    that arrive at the same time by [`crate::committer::Committer`]). Between the answer's last
//!    byte and this commit nothing else happens: the parsed answer goes straight to the store,
//!    and the task only waits for its report. The crash window is the parse plus one fsync'd transaction;
//! 5. only then write sinks, log, and release the lease.
//!
//! If the commit itself fails (disk full, read-only file system), the answer is written as a
//! rescue file next to the database (or in the temp dir) — the same JSON `tokend import` reads —
//! and the failure is logged loudly with its path. The daemon also keeps the token in memory and
//! retries the commit with backoff until the disk recovers; the CLI tells the operator to import
//! the rescue file.

use crate::clock::{now_ms, now_secs};
use crate::config::Credential;
use crate::provider::{self, Failure, HttpClient, TokenAnswer};
use crate::redact::fingerprint;
use crate::schedule::{IssueTime, issue_time};
use crate::sink::SinkWriter;
use crate::store::{Begin, LeaseHolder, NewToken, RefreshStore, StoreError, TokenState};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

/// How often a waiter polls for a busy lease.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// How one refresh ended.
#[derive(Debug)]
pub enum Outcome {
    /// A new token is committed (and sinks written).
    Refreshed { state: TokenState, rate_limited_for: Option<Duration> },
    /// Another holder refreshed this credential while we waited for the lease; nothing was sent.
    AlreadyRefreshed(TokenState),
    /// The provider did not give a token; the stored state is unchanged except `last_error`, and
    /// the status when `needs_reauth` (a [`Failure::Permanent`] not explained by a rotation
    /// elsewhere).
    Failed { failure: Failure, needs_reauth: bool },
    /// Nothing was sent: the credential cannot be refreshed as it stands.
    Skipped { reason: SkipReason, state: Option<TokenState> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// No token stored: `tokend import` first.
    NoToken,
    /// Marked `needs_reauth`: a human must authorize again.
    NeedsReauth,
    /// No refresh token and no API key (e.g. NationBuilder V1 tokens).
    NotRefreshable,
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("credential {name} is being refreshed by process {pid}; gave up waiting")]
    Busy { name: String, pid: u32, lease_left_ms: i64 },
    /// Too much of the lease was gone before the request could leave; nothing was sent.
    #[error(
        "credential {name}: {waited_ms} ms passed between taking the lease and sending, more than lease_margin; nothing was sent"
    )]
    LeaseRanOut { name: String, waited_ms: u128 },
    #[error(
        "credential {name}: the provider issued a new token but it could not be stored ({source}); \
         the answer was saved to {rescue} — run `tokend import {name} < {rescue}` once the database is writable"
    )]
    CommitFailed { name: String, source: StoreError, rescue: String, token: Box<NewToken> },
    /// The refresh task panicked: a bug, counted as an error and retried with backoff. If the
    /// panic came after the provider answered, the attempt stays open and the next start reports
    /// it like a crash.
    #[error("credential {name}: the refresh task died: {message}")]
    TaskDied { name: String, message: String },
}

/// Refreshes `credential` now. `expected_generation` is the generation the caller decided to
/// refresh: if the stored one differs once the lease is ours, someone else already did it and
/// nothing is sent. A busy lease is waited for up to `lease_wait`.
pub async fn refresh(
    store: &impl RefreshStore,
    http: &HttpClient,
    sinks: &SinkWriter,
    credential: &Credential,
    expected_generation: Option<i64>,
    lease_wait: Duration,
) -> Result<Outcome, RefreshError> {
    let name = &*credential.name;
    let holder = LeaseHolder::new();
    let lease_ttl = http.limits().lease_length();

    // Steps 1 + 2: lease and attempt record, one durable transaction.
    let give_up = tokio::time::Instant::now() + lease_wait;
    let (state, attempt_id, asked_for_lease) = loop {
        // Before the store is asked: the lease's deadline is counted from a later moment, so the
        // lease ends no earlier than `asked_for_lease + lease_ttl`, on a clock that keeps running
        // while the process is stopped.
        let asked_for_lease = std::time::Instant::now();
        // A fleet node planned this refresh from a generation another node may have spent
        // already (a catch-up raced by every node): then the store answers with the stored
        // token before any lease or attempt is kept. The lease decides in every other case.
        let begin = store.begin_refresh_planned(name, &holder, lease_ttl, now_ms(), expected_generation).await?;
        match begin {
            Begin::Leased { state, attempt_id } => break (state, attempt_id, asked_for_lease),
            Begin::MovedOn(state) => return Ok(Outcome::AlreadyRefreshed(state)),
            Begin::Busy { pid, lease_left_ms } if tokio::time::Instant::now() >= give_up => {
                return Err(RefreshError::Busy { name: name.to_string(), pid, lease_left_ms });
            }
            Begin::Busy { .. } => tokio::time::sleep(LEASE_POLL).await,
        }
    };

    let generation = state.as_ref().map_or(0, |s| s.generation);
    let spent = state.as_ref().and_then(|s| s.refresh_token.clone());
    let request = match (&state, expected_generation) {
        (Some(s), Some(g)) if s.generation != g => Err(None),
        (Some(s), _) if s.status.is_dead() => Err(Some(SkipReason::NeedsReauth)),
        (None, _) if credential.endpoint.grant == provider::GrantKind::RefreshToken => Err(Some(SkipReason::NoToken)),
        _ => provider::token_request(&credential.endpoint, spent.as_ref().map(|t| t.expose()))
            .ok_or(Some(SkipReason::NotRefreshable)),
    };
    let request = match request {
        Ok(request) => request,
        Err(skipped) => {
            let why = skipped.map_or("already refreshed by another holder", SkipReason::text);
            store.cancel_attempt(attempt_id, why, now_ms()).await?;
            store.release_lease(name, &holder).await?;
            return Ok(match (skipped, state) {
                (None, Some(state)) => Outcome::AlreadyRefreshed(state),
                (reason, state) => Outcome::Skipped { reason: reason.unwrap_or(SkipReason::NoToken), state },
            });
        }
    };

    // Debug builds only: the tests' way to be stopped exactly between taking the lease and
    // sending, for as long as they like (they send SIGCONT); once per process.
    #[cfg(debug_assertions)]
    if std::env::var_os("TOKEND_TEST_STOP_AFTER_LEASE").is_some_and(|n| n == name) {
        static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !STOPPED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
    }
    // A holder stopped (SIGSTOP, a frozen VM) or starved between taking the lease and this line
    // may have lost its lease to another node, which then spent this very refresh token: sending
    // it again would present a spent token. The request, bounded by `total_timeout`, must end
    // inside the lease. Nothing was sent, so the attempt is simply cancelled.
    if asked_for_lease.elapsed() >= http.limits().send_within() {
        let waited = asked_for_lease.elapsed();
        tracing::warn!(
            credential = name,
            "not sending: {:.1} s passed between asking for the lease and sending, so too little of the lease is left for the request (the process was paused or starved?); refreshing again",
            waited.as_secs_f64()
        );
        store.cancel_attempt(attempt_id, "the lease ran out before the request was sent", now_ms()).await?;
        let _ = store.release_lease(name, &holder).await;
        return Err(RefreshError::LeaseRanOut { name: name.to_string(), waited_ms: waited.as_millis() });
    }

    // Step 3: the request. The lease is released whatever happens below, even if the commit fails.
    let scrubber = request.scrubber();
    let sent_at = now_secs();
    let sent = http.send(&request).await;
    let interpreted = sent.and_then(|raw| {
        let rate_limited_for = provider::rate_limit_reset_in_if_exhausted(&raw, now_secs());
        provider::interpret(&raw, now_secs(), &scrubber).map(|answer| (answer, rate_limited_for))
    });

    let outcome = match interpreted {
        Ok((answer, rate_limited_for)) => {
            // Debug builds only: the tests' way to die exactly in the crash window, after the
            // provider answered and before the commit.
            #[cfg(debug_assertions)]
            if std::env::var_os("TOKEND_TEST_ABORT_BEFORE_COMMIT").is_some_and(|n| n == name) {
                std::process::abort();
            }
            // Step 4: commit before anything else happens. The only await here is for the
            // committer's report; the commit itself proceeds whatever this task does.
            let token =
                new_token(&answer, issue_time(answer.created_at, sent_at), name, &credential.endpoint.extra_fields);
            let committed = store
                .commit_rotation(name, credential.provider().as_str(), attempt_id, generation, &token, now_ms())
                .await;
            let new_state = match committed {
                Ok(s) => s,
                // Fleet: the generation moved on while we refreshed (an import, or a holder whose
                // lease we outlived). The answer is kept by the store and must not be committed
                // over the newer token; the stored one is what the sinks get.
                Err(superseded @ StoreError::Superseded { .. }) => {
                    let rescue = write_rescue(store.path(), &store.sealer(), name, &token);
                    tracing::error!(
                        credential = name,
                        refresh_token = token.refresh_token.as_ref().map(|t| t.fingerprint()),
                        rescue = %rescue,
                        "{superseded}; also saved to the rescue file"
                    );
                    let current = store.get(name).await;
                    store.release_lease(name, &holder).await?;
                    return match current? {
                        Some(state) => Ok(Outcome::AlreadyRefreshed(state)),
                        None => Err(RefreshError::Store(superseded)),
                    };
                }
                Err(source) => {
                    let rescue = write_rescue(store.path(), &store.sealer(), name, &token);
                    tracing::error!(
                        credential = name,
                        refresh_token = token.refresh_token.as_ref().map(|t| t.fingerprint()),
                        rescue = %rescue,
                        "ROTATED TOKEN NOT STORED: {source}"
                    );
                    let _ = store.release_lease(name, &holder).await;
                    return Err(RefreshError::CommitFailed {
                        name: name.to_string(),
                        source,
                        rescue,
                        token: Box::new(token),
                    });
                }
            };
            // Step 5: after the commit.
            tracing::info!(
                credential = name,
                generation = new_state.generation,
                expires_at = new_state.expires_at.map(crate::clock::rfc3339),
                access_token = %fingerprint(new_state.access_token.expose()),
                "refreshed"
            );
            // Sink files of concurrent refreshes are written together, one file-system sync for
            // the batch, off the async runtime.
            for result in sinks.write(&credential.sinks, &new_state).await {
                if let Err(e) = result {
                    tracing::error!(credential = name, "{e}");
                }
            }
            Outcome::Refreshed { state: new_state, rate_limited_for }
        }
        Err(failure) => {
            let permanent = matches!(failure, Failure::Permanent { .. });
            // Re-read before declaring the credential dead: if the stored refresh token is no
            // longer the one we spent, someone else rotated it and this rejection is expected.
            let current = store.get(name).await?;
            let rotated_elsewhere = current.as_ref().is_some_and(|c| c.refresh_token != spent);
            let needs_reauth = store
                .record_failure(name, attempt_id, failure.reason(), permanent && !rotated_elsewhere, now_ms())
                .await?;
            if needs_reauth {
                tracing::error!(
                    credential = name,
                    reason = failure.reason(),
                    "refresh rejected: credential needs re-authorization (tokend import)"
                );
            } else {
                tracing::warn!(credential = name, reason = failure.reason(), "refresh failed; stored token kept");
            }
            Outcome::Failed { failure, needs_reauth }
        }
    };
    store.release_lease(name, &holder).await?;
    Ok(outcome)
}

/// The token to store from an answer issued at `issued` (see [`crate::schedule::issue_time`]),
/// with the answer fields named in `keep` (the credential's `Endpoint::extra_fields`).
pub fn new_token(answer: &TokenAnswer, issued: IssueTime, name: &str, keep: &[String]) -> NewToken {
    if let Some(skew) = issued.distrusted_skew {
        tracing::warn!(
            credential = name,
            skew_secs = skew,
            "provider created_at is far from local time; using the local send time instead"
        );
    }
    NewToken {
        access_token: answer.access_token.clone(),
        refresh_token: answer.refresh_token.clone(),
        token_type: answer.token_type.clone(),
        scope: answer.scope.clone(),
        expires_in: answer.expires_in,
        created_at: issued.created_at,
        // Extras never stand between a rotated token and the store: too large, they are dropped
        // (the stored ones kept) with a warning.
        extra: provider::select_extras(answer, keep).unwrap_or_else(|e| {
            tracing::warn!(credential = name, "answer extras not kept: {e}");
            None
        }),
        refresh_token_expires_at: answer.refresh_token_expires_in.map(|s| issued.created_at.saturating_add(s)),
    }
}

impl SkipReason {
    pub fn text(self) -> &'static str {
        match self {
            SkipReason::NoToken => "no token stored",
            SkipReason::NeedsReauth => "credential needs re-authorization",
            SkipReason::NotRefreshable => "no refresh token or API key to renew with",
        }
    }
}

/// Last resort when the rotation commit fails: keep the answer as importable JSON beside the
/// database (mode 0600), then in the system temp dir. Returns where it went.
/// With a key configured the file holds the JSON sealed like a stored value (bound to the
/// credential's name), which `tokend import` opens with the same key.
fn write_rescue(db: &std::path::Path, sealer: &crate::seal::Sealer, name: &str, token: &NewToken) -> String {
    let json = token.answer_json();
    let text = match sealer.seal(name, crate::seal::Column::Rescue, 0, &json.to_string()) {
        Ok(text) => text,
        // Cannot happen with a working cipher; the token must not be lost either way.
        Err(e) => {
            tracing::error!(credential = name, "{e}; the rescue file is written in plaintext");
            json.to_string()
        }
    };
    let file_name = format!("tokend-rescue-{name}-{}.json", now_ms());
    let beside = db.parent().map(|p| p.join(&file_name)).unwrap_or_else(|| PathBuf::from(&file_name));
    for path in [beside, std::env::temp_dir().join(&file_name)] {
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(crate::untrusted::HOSTILE_OPEN_FLAGS)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
        if written.is_ok() {
            return path.display().to_string();
        }
    }
    "nowhere (no writable location; see the error above)".to_string()
}
