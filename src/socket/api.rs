//! The HTTP/1.1 API on `[daemon] socket` (README "Tokens on demand"):
//!
//! - `GET /v1/credentials` — what this caller may read;
//! - `GET /v1/credentials/NAME/token[?min_valid=SECONDS]` — the current token, replaced first if
//!   it has less than `min_valid` seconds left;
//! - `POST /v1/credentials/NAME/refresh` `{"rejected": "<token>"}` — replace the token if that is
//!   still it, else answer with the current one at once.
//!
//! Errors are `{"error": code, "message": text}`; neither ever holds a token, nor does a log line.

use super::listen::accept_bounded;
use super::peer::Peer;
use super::{Ask, Lookup, Refusal, Shared};
use crate::clock::{now_secs, rfc3339};
use crate::config::Credential;
use crate::store::{Status, TokenState};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::oneshot;

/// Request headers beyond this count are refused (431) by hyper.
const MAX_HEADERS: usize = 32;
/// The request head (line and headers) must fit in this many bytes: hyper's smallest buffer.
const MAX_HEAD_BYTES: usize = 8192;
/// A request head must arrive within this; an idle keep-alive connection is closed after it too.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A request body must arrive within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// `{"rejected": "<token>"}`: room for a large JWT, nothing more.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// The longest credential name (as in the configuration).
const MAX_NAME_LEN: usize = 64;

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    accept_bounded(listener, "token API", move |stream, permit| {
        let shared = shared.clone();
        async move {
            let _permit = permit;
            let peer = match Peer::of(&stream) {
                Ok(peer) => Arc::new(peer),
                Err(e) => {
                    tracing::warn!("token API: cannot read the caller's credentials ({e}); closing");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| {
                let (shared, peer) = (shared.clone(), peer.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(&shared, &peer, request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_headers(MAX_HEADERS)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("token API: connection ended: {e}");
            }
        }
    })
    .await;
}

type Answer = Result<Response<Full<Bytes>>, Refusal>;

async fn answer(shared: &Arc<Shared>, peer: &Peer, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let result = route(shared, peer, request).await;
    result.unwrap_or_else(|refusal| {
        tracing::debug!(uid = peer.uid, pid = peer.pid, %method, status = refusal.status, error = refusal.code, "token API: refused");
        refused(&refusal)
    })
}

async fn route(shared: &Arc<Shared>, peer: &Peer, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/v1/credentials") else {
        return Err(Refusal::new(404, "not_found", "no such endpoint; the API lives under /v1/credentials"));
    };
    let segments: Vec<&str> = match rest.strip_prefix('/') {
        Some(rest) => rest.split('/').collect(),
        None if rest.is_empty() => Vec::new(),
        None => return Err(Refusal::new(404, "not_found", "no such endpoint; the API lives under /v1/credentials")),
    };
    match (request.method(), segments.as_slice()) {
        (&Method::GET, []) => list(shared, peer).await,
        (&Method::GET, [name, "token"]) => {
            let min_valid = min_valid(request.uri().query())?;
            token(shared, peer, name, min_valid).await
        }
        (&Method::POST, [name, "refresh"]) => {
            let name = name.to_string();
            let rejected = rejected_token(request.into_body()).await?;
            refresh(shared, peer, &name, &rejected).await
        }
        (_, [] | [_, "token" | "refresh"]) => {
            Err(Refusal::new(405, "method_not_allowed", "GET …/token, POST …/refresh and GET /v1/credentials"))
        }
        _ => Err(Refusal::new(404, "not_found", "no such endpoint; see README \"Tokens on demand\"")),
    }
}

fn min_valid(query: Option<&str>) -> Result<Option<i64>, Refusal> {
    let Some(query) = query.filter(|q| !q.is_empty()) else { return Ok(None) };
    let mut found = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("min_valid", value)) if found.is_none() => match value.parse::<i64>() {
                Ok(seconds) if seconds >= 0 => found = Some(seconds),
                _ => return Err(Refusal::new(400, "bad_request", "min_valid must be a number of seconds")),
            },
            _ => return Err(Refusal::new(400, "bad_request", "the only query parameter is min_valid=SECONDS, once")),
        }
    }
    Ok(found)
}

/// Reads `{"rejected": "<token>"}`, bounded in size and time. Parse errors say where, never what
/// was there (it may be a token).
async fn rejected_token(body: Incoming) -> Result<String, Refusal> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        rejected: String,
    }
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect()).await;
    let bytes = match collected {
        Err(_) => {
            return Err(Refusal::new(
                408,
                "request_timeout",
                format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Refusal::new(413, "body_too_large", format!("the body is larger than {MAX_BODY_BYTES} bytes")));
        }
        Ok(Err(_)) => return Err(Refusal::new(400, "bad_request", "the body could not be read")),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    serde_json::from_slice::<Body>(&bytes).map(|b| b.rejected).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "not of the form",
            _ => "not JSON, expected",
        };
        Refusal::new(
            400,
            "invalid_json",
            format!(
                "the body is {what} {{\"rejected\": \"<access token>\"}} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// The credential `name` if this caller may read it; a refusal is logged with who asked.
fn readable(shared: &Shared, peer: &Peer, name: &str) -> Result<Arc<Credential>, Refusal> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Refusal::new(400, "invalid_name", "credential names are 1 to 64 letters, digits, '-' and '_'"));
    }
    let policy = shared.policy();
    let Some((credential, access)) = policy.credentials.get(name) else {
        return Err(Refusal::new(404, "not_found", format!("no credential \"{name}\" is configured")));
    };
    if !peer.may_read(access, shared.socket_gid, shared.daemon_uid) {
        tracing::warn!(
            uid = peer.uid,
            gid = peer.gid,
            pid = peer.pid,
            credential = name,
            "token API: caller may not read this credential"
        );
        return Err(Refusal::new(403, "forbidden", format!("uid {} may not read \"{name}\" (readers)", peer.uid)));
    }
    Ok(credential.clone())
}

/// The stored token of `name`, if it is one that can be handed out: from the snapshot, or read
/// from the store (and kept) when the daemon forgot it since.
async fn current(shared: &Shared, name: &str) -> Result<Arc<TokenState>, Refusal> {
    let key: Arc<str> = Arc::from(name);
    let state = match shared.snapshot.lookup(&key) {
        Lookup::Known(state) => Some(state),
        Lookup::Unknown(ticket) => {
            let read = key.clone();
            let state = shared.stores.read(move |store| store.get(&read)).await.map_err(|e| {
                tracing::error!(credential = name, "token API: {e}");
                Refusal::new(503, "store_unavailable", "the token store cannot be read; see the daemon's log")
                    .retry_after(5)
            })?;
            state.map(|state| shared.snapshot.fill(&key, ticket, state))
        }
    };
    let Some(state) = state else {
        return Err(Refusal::new(404, "no_token", format!("no token is stored for \"{name}\" yet (tokend import)")));
    };
    match state.status {
        Status::Active => Ok(state),
        Status::NeedsReauth => Err(Refusal::new(
            409,
            "needs_reauth",
            format!("\"{name}\" needs re-authorization: {}", state.last_error.as_deref().unwrap_or("grant rejected")),
        )),
        Status::Revoked => {
            Err(Refusal::new(409, "needs_reauth", format!("\"{name}\" was revoked; authorize it again")))
        }
    }
}

/// Asks the daemon to replace generation `state.generation`, waits (bounded) for it, and returns
/// the new stored state.
async fn replace(shared: &Shared, state: &TokenState) -> Result<Arc<TokenState>, Refusal> {
    let (reply, answer) = oneshot::channel();
    let ask = Ask { name: Arc::from(state.name.as_str()), generation: state.generation, reply };
    if shared.asks.try_send(ask).is_err() {
        return Err(
            Refusal::new(503, "busy", "the daemon has too many refreshes asked of it; try again").retry_after(1)
        );
    }
    let waited = shared.refresh_wait.as_secs();
    match tokio::time::timeout(shared.refresh_wait, answer).await {
        Err(_) => {
            Err(Refusal::new(503, "timeout", format!("no new token within {waited} s; try again")).retry_after(5))
        }
        Ok(Err(_)) => Err(Refusal::new(503, "shutting_down", "the daemon is stopping").retry_after(5)),
        Ok(Ok(Err(refusal))) => Err(refusal),
        Ok(Ok(Ok(_))) => current(shared, &state.name).await,
    }
}

async fn token(shared: &Shared, peer: &Peer, name: &str, min_valid: Option<i64>) -> Answer {
    readable(shared, peer, name)?;
    let mut state = current(shared, name).await?;
    let need = min_valid.unwrap_or(0);
    let lifetime = state.expires_at.map(|at| at - state.created_at);
    if let Some(life) = lifetime.filter(|life| need >= *life) {
        return Err(Refusal::new(
            400,
            "min_valid_too_long",
            format!("min_valid {need} s is not less than the {life} s this provider's tokens live"),
        ));
    }
    let remaining = |s: &TokenState| s.expires_at.map_or(i64::MAX, |at| at - now_secs());
    // An expired token is never handed out: at least one second must be left.
    if remaining(&state) < need.max(1) {
        state = replace(shared, &state).await?;
        if remaining(&state) < need.max(1) {
            return Err(Refusal::new(
                503,
                "too_short",
                format!("the new token has {} s left, less than min_valid {need} s", remaining(&state)),
            )
            .retry_after(1));
        }
    }
    Ok(token_answer(&state))
}

async fn refresh(shared: &Shared, peer: &Peer, name: &str, rejected: &str) -> Answer {
    readable(shared, peer, name)?;
    let state = current(shared, name).await?;
    let expired = state.expires_at.is_some_and(|at| at <= now_secs());
    if state.access_token.expose() != rejected && !expired {
        // Already replaced (or never the token): the current one, with no provider request.
        return Ok(token_answer(&state));
    }
    tracing::info!(
        uid = peer.uid,
        pid = peer.pid,
        credential = name,
        generation = state.generation,
        "token API: the current token was reported rejected"
    );
    let replaced = replace(shared, &state).await?;
    Ok(token_answer(&replaced))
}

async fn list(shared: &Shared, peer: &Peer) -> Answer {
    let policy = shared.policy();
    let states = shared.stores.read(|store| store.list()).await.map_err(|e| {
        tracing::error!("token API: {e}");
        Refusal::new(503, "store_unavailable", "the token store cannot be read; see the daemon's log").retry_after(5)
    })?;
    let now = now_secs();
    let mut by_name: std::collections::BTreeMap<&str, serde_json::Value> = std::collections::BTreeMap::new();
    for (name, (credential, access)) in &policy.credentials {
        if !peer.may_read(access, shared.socket_gid, shared.daemon_uid) {
            continue;
        }
        let row = match states.iter().find(|s| *s.name == **name) {
            None => {
                serde_json::json!({ "name": &**name, "provider": credential.provider().as_str(), "status": "no_token" })
            }
            Some(state) => {
                let status = match (state.status, state.expires_at) {
                    (Status::Active, Some(at)) if at <= now => "expired",
                    (status, _) => status.as_str(),
                };
                serde_json::json!({
                    "name": &**name,
                    "provider": credential.provider().as_str(),
                    "status": status,
                    "expires_at": state.expires_at.map(rfc3339),
                    "expires_in": state.expires_at.map(|at| at - now),
                    "next_refresh_at": crate::cli::next_refresh_ms(Some(credential), state).map(|ms| rfc3339(ms.div_euclid(1000))),
                    "generation": state.generation,
                })
            }
        };
        by_name.insert(name, row);
    }
    Ok(json(StatusCode::OK, &serde_json::json!({ "credentials": by_name.into_values().collect::<Vec<_>>() })))
}

/// The token answer, serialized straight from the state (no intermediate JSON tree: this is the
/// answer asked for most).
#[derive(serde::Serialize)]
struct TokenAnswer<'a> {
    name: &'a str,
    access_token: &'a str,
    token_type: &'a str,
    expires_at: Option<String>,
    expires_in: Option<i64>,
    scope: Option<&'a str>,
    generation: i64,
    /// The provider's extras kept with the token (Wild Apricot's account ids, oauth2
    /// `extra_fields`), as the json sink and `tokend show --json` give them.
    #[serde(skip_serializing_if = "Option::is_none")]
    extra: Option<serde_json::Value>,
}

fn token_answer(state: &TokenState) -> Response<Full<Bytes>> {
    let answer = TokenAnswer {
        name: &state.name,
        access_token: state.access_token.expose(),
        token_type: &state.token_type,
        expires_at: state.expires_at.map(rfc3339),
        expires_in: state.expires_at.map(|at| at - now_secs()),
        scope: state.scope.as_deref(),
        generation: state.generation,
        extra: crate::sink::extra_value(state),
    };
    json(StatusCode::OK, &answer)
}

fn refused(refusal: &Refusal) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json(status, &serde_json::json!({ "error": refusal.code, "message": refusal.message }));
    if let Some(seconds) = refusal.retry_after {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut bytes = Vec::with_capacity(512);
    // Serializing plain values and strings into memory cannot fail.
    let _ = serde_json::to_writer(&mut bytes, value);
    bytes.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::min_valid;

    #[test]
    fn min_valid_query() {
        assert_eq!(min_valid(None), Ok(None));
        assert_eq!(min_valid(Some("min_valid=300")), Ok(Some(300)));
        for bad in ["min_valid=-1", "min_valid=5m", "min_valid=1&min_valid=2", "other=1", "min_valid"] {
            assert_eq!(min_valid(Some(bad)).unwrap_err().status, 400, "{bad}");
        }
    }
}
