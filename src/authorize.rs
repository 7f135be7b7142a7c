//! First authorization without curl: `tokend authorize NAME`.
//!
//! Authorization code (RFC 6749 §4.1) with a random `state` and, where the provider supports it,
//! PKCE S256 (RFC 7636). The redirect arrives on a loopback listener (RFC 8252 §7.3: the
//! `redirect_uri` is `http://127.0.0.1:<port>/callback`), or — headless, or when the registered
//! redirect is not loopback — the user pastes the full redirect URL. The code is exchanged in the
//! provider's own shape and the answer stored exactly as `tokend import` stores it.
//! Also the resource-owner password grant (Wild Apricot, `oauth2`), with the password read from
//! the terminal (never the command line, never stored), and API-key credentials, which simply
//! obtain their first token. And its undoing: `tokend revoke NAME` (RFC 7009).

use crate::clock::now_secs;
use crate::config::{Config, Credential};
use crate::provider::{self, FirstGrant, GrantKind, HttpClient, TokenAnswer};
use crate::redact::{Secret, clean_text};
use crate::refresh::{self, Outcome};
use crate::schedule::issue_time;
use crate::store::{AnyStore, StoreError, TokenState};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use url::Url;

/// The callback request head is a few hundred bytes; more is not a browser redirect.
const MAX_CALLBACK_HEAD: usize = 16 * 1024;
/// One connection to the redirect listener gets this long to send its request and take the
/// answer: any local user can connect, and an idle connection must not hold up the browser's.
const CALLBACK_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones are closed until some finish.
const MAX_CALLBACK_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("{0}")]
    Refused(String),
    #[error("no redirect arrived within {0:?}; run `tokend authorize` again (or --paste the redirect URL)")]
    TimedOut(Duration),
    #[error("the provider did not issue a token: {0}")]
    Provider(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Boxed: a refresh error carries a whole token (a commit that failed) and would make every
    /// result of this module that large.
    #[error(transparent)]
    Refresh(#[from] Box<refresh::RefreshError>),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The HTTP client could not be built (a bad proxy URL, no TLS roots).
    #[error("{0}")]
    Http(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AuthorizeError {
    let context = context.into();
    move |source| AuthorizeError::Io { context, source }
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Read the redirect URL from stdin instead of listening.
    pub paste: bool,
    /// Use the resource-owner password grant.
    pub password: bool,
    pub timeout: Duration,
}

/// A random URL-safe string of `bytes` random bytes (state, PKCE verifier).
fn random_token(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    URL_SAFE_NO_PAD.encode(raw)
}

/// RFC 7636 §4.2: `BASE64URL(SHA256(verifier))`.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

pub async fn authorize(
    config: &Config,
    credential: &Credential,
    options: Options,
) -> Result<TokenState, AuthorizeError> {
    let http = HttpClient::new(config.daemon.http, config.daemon.proxy.as_ref()).map_err(AuthorizeError::Http)?;
    if let GrantKind::ApiKey(_) = credential.endpoint.grant {
        return api_key(config, credential, &http).await;
    }
    let (request, sent_at) = if options.password {
        let (username, password) = read_credentials(&credential.name)?;
        let request = provider::first_request(
            &credential.endpoint,
            FirstGrant::Password { username: &username, password: &password },
        )
        .map_err(AuthorizeError::Refused)?;
        (request, now_secs())
    } else {
        let code = code_flow(credential, options).await?;
        let request = provider::first_request(
            &credential.endpoint,
            FirstGrant::Code { code: code.code.expose(), verifier: code.verifier.as_deref() },
        )
        .map_err(AuthorizeError::Refused)?;
        (request, now_secs())
    };
    // The scrubber knows every secret of the request: client secret, code, PKCE verifier, password.
    let answer = http.send(&request).await.and_then(|raw| provider::interpret(&raw, now_secs(), &request.scrubber()));
    let answer = answer.map_err(|f| AuthorizeError::Provider(f.reason().to_string()))?;
    store_answer(config, credential, &answer, sent_at)
}

fn store_answer(
    config: &Config,
    credential: &Credential,
    answer: &TokenAnswer,
    sent_at: i64,
) -> Result<TokenState, AuthorizeError> {
    let token = refresh::new_token(
        answer,
        issue_time(answer.created_at, sent_at),
        &credential.name,
        &credential.endpoint.extra_fields,
    );
    let state = AnyStore::open(config)?.import(&credential.name, credential.provider().as_str(), &token, now_secs())?;
    crate::daemon::publish_imported(&config.daemon.database, credential, &state);
    Ok(state)
}

async fn api_key(config: &Config, credential: &Credential, http: &HttpClient) -> Result<TokenState, AuthorizeError> {
    let store = AnyStore::open(config)?.refresh_store()?;
    let sinks = crate::sink::SinkWriter::start().map_err(io_error("cannot start the sink writer"))?;
    let outcome = refresh::refresh(&store, http, &sinks, credential, None, http.limits().total_timeout)
        .await
        .map_err(Box::new)?;
    match outcome {
        Outcome::Refreshed { state, .. } | Outcome::AlreadyRefreshed(state) => {
            crate::daemon::notify_store_changed(&config.daemon.database);
            Ok(state)
        }
        Outcome::Failed { failure, .. } => Err(AuthorizeError::Provider(failure.reason().to_string())),
        Outcome::Skipped { reason, .. } => Err(AuthorizeError::Refused(reason.text().to_string())),
    }
}

/// What `tokend revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The provider revoked the token; the local state is marked revoked and the sinks removed.
    AtProvider,
    /// No revocation endpoint: only the local token and the sinks were removed (`--forget`).
    ForgottenLocally,
    /// The provider's revocation failed (the reason is given); with `--forget` the local token
    /// and the sinks were removed anyway.
    ForgottenAfterFailure(String),
}

/// Revokes the credential's refresh token (or its access token when it has none) at the
/// provider, then marks it revoked locally and removes its sinks. A provider without a
/// revocation endpoint, or whose revocation fails, is refused unless `forget` is set, which then
/// forgets locally (and says the provider was not told).
pub async fn revoke(config: &Config, credential: &Credential, forget: bool) -> Result<Revoked, AuthorizeError> {
    let mut store = AnyStore::open(config)?;
    let name = &credential.name;
    let state = store.get(name)?.ok_or_else(|| AuthorizeError::Refused(format!("no token stored for {name}")))?;
    let (token, hint) = match &state.refresh_token {
        Some(t) => (t.expose(), "refresh_token"),
        None => (state.access_token.expose(), "access_token"),
    };
    let Some(request) = provider::revocation_request(&credential.endpoint, token, hint) else {
        if !forget {
            return Err(AuthorizeError::Refused(format!(
                "{} has no revocation endpoint{}; run with --forget to remove the local token and sinks only (the provider keeps the grant until it expires or is revoked in its own settings)",
                credential.provider(),
                if credential.provider().preset().configured_by_urls { " configured (revocation_url)" } else { "" }
            )));
        }
        store.remove(name)?;
        crate::sink::remove_all(credential, "forgotten (tokend revoke --forget)");
        crate::daemon::notify_store_changed(&config.daemon.database);
        return Ok(Revoked::ForgottenLocally);
    };
    let http = HttpClient::new(config.daemon.http, config.daemon.proxy.as_ref()).map_err(AuthorizeError::Http)?;
    let refused = match http.send(&request).await {
        // RFC 7009 §2.2: 200 for success, including for a token that was already invalid.
        Ok(raw) if (200..300).contains(&raw.status) => None,
        Ok(raw) => {
            // Scrubbed whole (token and client secret, every encoding) before it is cut.
            let body = request.scrubber().clean(&String::from_utf8_lossy(&raw.body), 200);
            Some(format!("revocation refused (HTTP {}): {body}", raw.status))
        }
        Err(f) => Some(format!("revocation failed: {}", f.reason())),
    };
    if let Some(reason) = refused {
        if !forget {
            return Err(AuthorizeError::Provider(format!(
                "{reason}; run with --forget to remove the local token and sinks anyway"
            )));
        }
        store.remove(name)?;
        crate::sink::remove_all(credential, "forgotten (tokend revoke --forget) after a failed revocation");
        crate::daemon::notify_store_changed(&config.daemon.database);
        return Ok(Revoked::ForgottenAfterFailure(reason));
    }
    store.mark_revoked(name, now_secs())?;
    crate::sink::remove_all(credential, "revoked");
    crate::daemon::notify_store_changed(&config.daemon.database);
    Ok(Revoked::AtProvider)
}

struct Code {
    code: Secret,
    verifier: Option<String>,
}

async fn code_flow(credential: &Credential, options: Options) -> Result<Code, AuthorizeError> {
    let endpoint = &credential.endpoint;
    let state = random_token(24);
    let verifier = endpoint.authorization.pkce.then(|| random_token(48));
    let challenge = verifier.as_deref().map(pkce_challenge);
    let url = provider::authorization_url(endpoint, &state, challenge.as_deref()).map_err(AuthorizeError::Refused)?;
    let redirect = &endpoint.authorization.redirect_uri;
    let listen = !options.paste && redirect.scheme() == "http" && provider::is_loopback_host(redirect);

    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Open this URL in a browser and authorize tokend for \"{}\":\n\n{url}\n", credential.name);
    if listen {
        let _ = writeln!(out, "Waiting for the redirect to {redirect} (at most {}s)…", options.timeout.as_secs());
    } else {
        let _ = writeln!(out, "Then paste the full URL the browser was redirected to (it starts with {redirect}):");
    }
    let _ = out.flush();
    drop(out);

    let params = if listen {
        tokio::time::timeout(options.timeout, receive_redirect(redirect, &state))
            .await
            .map_err(|_| AuthorizeError::TimedOut(options.timeout))??
    } else {
        let line = tokio::time::timeout(options.timeout, tokio::task::spawn_blocking(read_line))
            .await
            .map_err(|_| AuthorizeError::TimedOut(options.timeout))?
            .map_err(|e| io_error("the paste reader failed")(std::io::Error::other(e)))??;
        let pasted =
            Url::parse(line.trim()).map_err(|e| AuthorizeError::Refused(format!("that is not a URL ({e})")))?;
        pasted.query_pairs().into_owned().collect()
    };
    let code = check_redirect(&params, &state)?;
    Ok(Code { code, verifier })
}

/// Validates the redirect's parameters: `state` must match, `error=` is reported as such.
fn check_redirect(params: &HashMap<String, String>, state: &str) -> Result<Secret, AuthorizeError> {
    if let Some(error) = params.get("error") {
        let description = params.get("error_description").map(|d| format!(": {d}")).unwrap_or_default();
        let (error, description) = (clean_text(error, 64), clean_text(&description, 300));
        let what = if error == "access_denied" {
            "access was denied at the provider"
        } else {
            "the provider refused the authorization"
        };
        return Err(AuthorizeError::Refused(format!("{what} ({error}{description})")));
    }
    match params.get("state") {
        None => {
            return Err(AuthorizeError::Refused("the redirect carries no state; refusing it (possible CSRF)".into()));
        }
        Some(s) if s != state => {
            return Err(AuthorizeError::Refused(
                "the redirect's state does not match this authorization request; refusing it (possible CSRF, or an old browser tab)".into(),
            ));
        }
        Some(_) => {}
    }
    match params.get("code").filter(|c| !c.is_empty()) {
        Some(code) => Ok(Secret::new(code.clone())),
        None => Err(AuthorizeError::Refused("the redirect carries no code".into())),
    }
}

/// Serves the loopback redirect until a request carrying this authorization's `state` arrives,
/// and returns its query parameters. Any local user can connect to the port: connections are
/// served concurrently, each with a timeout, and a request without the right `state` — an
/// `error=` one included — is answered, logged and ignored, so it can neither jam nor abort the
/// flow.
async fn receive_redirect(redirect: &Url, state: &str) -> Result<HashMap<String, String>, AuthorizeError> {
    let host = redirect.host_str().unwrap_or("127.0.0.1").trim_start_matches('[').trim_end_matches(']');
    let port = redirect.port_or_known_default().unwrap_or(80);
    let listener = TcpListener::bind((host, port))
        .await
        .map_err(io_error(format!("cannot listen on {host}:{port} for the redirect")))?;
    let (found_tx, mut found) = tokio::sync::mpsc::channel(1);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(params) = found.recv() => return Ok(params),
            accepted = listener.accept() => {
                let (stream, peer) = accepted.map_err(io_error("the redirect listener failed"))?;
                while connections.try_join_next().is_some() {}
                if connections.len() >= MAX_CALLBACK_CONNECTIONS {
                    tracing::warn!(%peer, "too many connections to the redirect listener; closing this one");
                    continue;
                }
                let (redirect, state, found_tx) = (redirect.clone(), state.to_string(), found_tx.clone());
                connections.spawn(async move {
                    let served = tokio::time::timeout(
                        CALLBACK_CONNECTION_TIMEOUT,
                        serve_callback(stream, &redirect, &state),
                    );
                    match served.await {
                        Ok(Some(params)) => {
                            let _ = found_tx.send(params).await;
                        }
                        Ok(None) => {}
                        Err(_) => tracing::debug!(%peer, "redirect listener: connection timed out"),
                    }
                });
            }
        }
    }
}

/// Reads one request; answers it; returns its parameters if it carries `state`.
async fn serve_callback(
    mut stream: tokio::net::TcpStream,
    redirect: &Url,
    state: &str,
) -> Option<HashMap<String, String>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_CALLBACK_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let url = redirect.join(target).ok()?;
    if url.path() != redirect.path() {
        let _ = respond(&mut stream, 404, "Not the tokend callback.").await;
        return None;
    }
    let params: HashMap<String, String> = url.query_pairs().into_owned().collect();
    if params.get("state").map(String::as_str) != Some(state) {
        tracing::warn!(
            error = params.get("error").map(|e| clean_text(e, 64)),
            "ignored a request to the redirect listener without this authorization's state (an old browser tab, or someone else)"
        );
        let _ = respond(&mut stream, 400, "This redirect does not belong to the authorization tokend is waiting for.")
            .await;
        return None;
    }
    let page = if params.contains_key("code") {
        "tokend received the authorization. You can close this tab."
    } else {
        "tokend received the redirect, without a code. See the terminal."
    };
    let _ = respond(&mut stream, 200, page).await;
    Some(params)
}

async fn respond(stream: &mut tokio::net::TcpStream, status: u16, text: &str) -> std::io::Result<()> {
    let body = format!("<!doctype html><meta charset=utf-8><title>tokend</title><p>{text}</p>\n");
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        match status {
            200 => "OK",
            400 => "Bad Request",
            _ => "Not Found",
        },
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn read_line() -> Result<String, AuthorizeError> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(io_error("cannot read stdin"))?;
    if line.trim().is_empty() {
        return Err(AuthorizeError::Refused("nothing was pasted".into()));
    }
    Ok(line)
}

/// Username and password: from the terminal (password without echo), or two lines on stdin when
/// it is not a terminal (scripts, tests). Never from the command line.
fn read_credentials(name: &str) -> Result<(String, Secret), AuthorizeError> {
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprint!("Username for {name}: ");
        let _ = std::io::stderr().flush();
    }
    let username = read_line()?.trim().to_string();
    if interactive {
        eprint!("Password for {name} (not shown, not stored): ");
        let _ = std::io::stderr().flush();
    }
    let password = if interactive { read_password_no_echo()? } else { read_line()? };
    if interactive {
        eprintln!();
    }
    Ok((username, Secret::new(password.trim_end_matches(['\n', '\r']))))
}

fn read_password_no_echo() -> Result<String, AuthorizeError> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let original =
        tcgetattr(&stdin).map_err(|e| io_error("cannot read the terminal settings")(std::io::Error::from(e)))?;
    let mut silent = original.clone();
    silent.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &silent)
        .map_err(|e| io_error("cannot turn echo off")(std::io::Error::from(e)))?;
    let line = read_line();
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &original);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn redirect_checks() {
        let p = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>()
        };
        assert_eq!(check_redirect(&p(&[("code", "c1"), ("state", "s")]), "s").unwrap().expose(), "c1");
        let err = |params| check_redirect(&params, "s").unwrap_err().to_string();
        assert!(err(p(&[("code", "c1"), ("state", "x")])).contains("state does not match"));
        assert!(err(p(&[("code", "c1")])).contains("no state"));
        assert!(
            err(p(&[("error", "access_denied"), ("state", "s")]))
                .contains("access was denied at the provider (access_denied)")
        );
        assert!(err(p(&[("state", "s")])).contains("no code"));
    }
}
