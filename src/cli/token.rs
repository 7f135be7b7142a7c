//! `tokend token NAME [--min-valid 5m] [--json]`: the token a script needs, valid for as long as
//! it says. Asked of the running daemon over `[daemon] socket` when there is one, so that many
//! scripts asking at once share one refresh; else read from the store and refreshed under the
//! lease as `tokend refresh` does.

use super::{CliError, credential, exit, open_store};
use crate::clock::{now_secs, rfc3339};
use crate::config;
use crate::provider::HttpClient;
use crate::refresh::{self, Outcome};
use crate::sink;
use crate::socket::client::{self, ClientError};
use crate::store::TokenState;
use std::path::Path;
use std::time::Duration;

pub async fn run(path: &Path, name: &str, min_valid: Option<&str>, json: bool) -> Result<(), CliError> {
    let need = match min_valid {
        None => None,
        Some(text) => Some(parse_seconds(text).ok_or_else(|| {
            CliError::new(exit::USAGE, format!("--min-valid \"{text}\" is not a duration like \"300\" or \"5m\""))
        })?),
    };
    let config = config::load_without_secrets(path)?;
    credential(&config, name)?;
    if let Some(socket) = &config.daemon.socket {
        let query = need.map(|s| format!("?min_valid={s}")).unwrap_or_default();
        let wait = config.daemon.http.total_timeout + Duration::from_secs(20);
        match client::get(socket, &format!("/v1/credentials/{name}/token{query}"), wait).await {
            Ok((200, body)) => return print_answer(&body, json),
            Ok((status, body)) => return Err(refused(status, &body)),
            Err(ClientError::NoDaemon) => {
                tracing::debug!(socket = %socket.display(), "no daemon serves the socket; reading the store");
            }
            Err(ClientError::Failed(message)) => return Err(CliError::new(exit::FAILURE, message)),
        }
    }
    let state = from_store(path, name, need.unwrap_or(0)).await?;
    if json {
        let mut value = serde_json::json!({
            "name": state.name,
            "access_token": state.access_token.expose(),
            "token_type": state.token_type,
            "expires_at": state.expires_at.map(rfc3339),
            "expires_in": state.expires_at.map(|at| at - now_secs()),
            "scope": state.scope,
            "generation": state.generation,
        });
        if let Some(extra) = sink::extra_value(&state) {
            value["extra"] = extra;
        }
        println!("{value}");
    } else {
        println!("{}", state.access_token.expose());
    }
    Ok(())
}

/// "300" (seconds) or a humantime duration ("5m").
fn parse_seconds(text: &str) -> Option<i64> {
    match text.parse::<i64>() {
        Ok(n) if n >= 0 => Some(n),
        Ok(_) => None,
        Err(_) => humantime::parse_duration(text).ok().and_then(|d| i64::try_from(d.as_secs()).ok()),
    }
}

fn print_answer(body: &[u8], json: bool) -> Result<(), CliError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| CliError::new(exit::FAILURE, "the daemon's answer is not JSON".to_string()))?;
    if json {
        println!("{value}");
        return Ok(());
    }
    let token = value["access_token"]
        .as_str()
        .ok_or_else(|| CliError::new(exit::FAILURE, "the daemon's answer has no access_token".to_string()))?;
    println!("{token}");
    Ok(())
}

fn refused(status: u16, body: &[u8]) -> CliError {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = value["message"].as_str().unwrap_or("no message").to_string();
    let code = match status {
        400 => exit::USAGE,
        404 => exit::UNKNOWN,
        409 => exit::NEEDS_REAUTH,
        408 | 429 | 503 => exit::TEMPORARY,
        _ => exit::FAILURE,
    };
    CliError::new(code, format!("the daemon refused ({status} {}): {message}", value["error"].as_str().unwrap_or("?")))
}

/// No daemon: the stored token, refreshed first under the lease if it has less than `need`
/// seconds left (at least one).
async fn from_store(path: &Path, name: &str, need: i64) -> Result<TokenState, CliError> {
    let config = config::load_without_secrets(path)?;
    let stored = open_store(&config)?.get(name)?.ok_or_else(|| {
        CliError::new(exit::UNKNOWN, format!("no token stored for {name}; run `tokend import {name}` first"))
    })?;
    if stored.status.is_dead() {
        return Err(CliError::new(exit::NEEDS_REAUTH, format!("{name} needs re-authorization")));
    }
    if let Some(life) = stored.expires_at.map(|at| at - stored.created_at).filter(|life| need >= *life) {
        return Err(CliError::new(
            exit::USAGE,
            format!("--min-valid {need} s is not less than the {life} s this provider's tokens live"),
        ));
    }
    let remaining = |s: &TokenState| s.expires_at.map_or(i64::MAX, |at| at - now_secs());
    if remaining(&stored) >= need.max(1) {
        return Ok(stored);
    }
    // The secrets are read only now: a token that is still good needs none.
    let config = config::load(path)?;
    let cred = credential(&config, name)?;
    let http = HttpClient::new(config.daemon.http, config.daemon.proxy.as_ref())
        .map_err(|e| CliError::new(exit::FAILURE, e))?;
    let store = crate::committer::Committer::open(&config.daemon.database)?;
    let sinks = sink::SinkWriter::start()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot start the sink writer: {e}")))?;
    let lease_wait = config.daemon.http.lease_length() + Duration::from_secs(5);
    let outcome = refresh::refresh(&store, &http, &sinks, cred, Some(stored.generation), lease_wait).await;
    crate::daemon::notify_store_changed(&config.daemon.database);
    let state = match outcome? {
        Outcome::Refreshed { state, .. } | Outcome::AlreadyRefreshed(state) => state,
        Outcome::Failed { failure, needs_reauth } => {
            let code = if needs_reauth { exit::NEEDS_REAUTH } else { exit::TEMPORARY };
            return Err(CliError::new(code, format!("{name}: refresh failed: {}", failure.reason())));
        }
        Outcome::Skipped { reason, .. } => {
            return Err(CliError::new(exit::FAILURE, format!("{name}: not refreshed: {}", reason.text())));
        }
    };
    if remaining(&state) < need.max(1) {
        return Err(CliError::new(
            exit::TEMPORARY,
            format!("{name}: the new token has {} s left, less than --min-valid {need} s", remaining(&state)),
        ));
    }
    Ok(state)
}
