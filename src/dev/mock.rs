//! A loopback OAuth 2.0 token endpoint: the demo provider of `tokend dev` and the strict peer of
//! the tests. **Not a real authorization server** — it listens on 127.0.0.1 only, keeps
//! everything in memory, and exists to show and prove tokend's behaviour.
//!
//! Its semantics are NationBuilder's, the strictest of the providers tokend serves: a refresh
//! token is revoked the moment it is spent, and any reuse is answered with `invalid_grant`.
//! Every request is recorded (method, path, headers, body) so tests can assert request shapes
//! field by field, and faults can be queued to exercise every failure class.
//!
//! The HTTP/1.1 handling is deliberately minimal (keep-alive, no pipelining,
//! `Content-Length` bodies only): full control over the bytes on the wire is
//! what lets it drop connections mid-answer or trickle bytes like a slow-loris server.

use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Headers larger than this are refused; token requests are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Unix ms when the request was fully read.
    pub received_at_ms: i64,
    /// The chain a presented refresh token belonged to, if it was live.
    pub chain: Option<String>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as a form, if it is one.
    pub fn form(&self) -> Option<BTreeMap<String, String>> {
        if !self.header("content-type")?.starts_with("application/x-www-form-urlencoded") {
            return None;
        }
        Some(url::form_urlencoded::parse(&self.body).into_owned().collect())
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        if !self.header("content-type")?.starts_with("application/json") {
            return None;
        }
        serde_json::from_slice(&self.body).ok()
    }

    /// A body field, whatever the encoding.
    pub fn field(&self, name: &str) -> Option<String> {
        if let Some(form) = self.form() {
            return form.get(name).cloned();
        }
        self.json()?.get(name)?.as_str().map(str::to_string)
    }

    /// Decoded HTTP Basic credentials.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        let value = self.header("authorization")?.strip_prefix("Basic ")?;
        use base64::Engine as _;
        let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?).ok()?;
        let (user, pass) = decoded.split_once(':')?;
        Some((user.to_string(), pass.to_string()))
    }
}

#[cfg(feature = "test-support")]
pub use fault::Fault;
#[cfg(not(feature = "test-support"))]
use fault::Fault;

/// Faults the tests inject. Public only with the `test-support` feature: a release build's
/// demo provider never misbehaves on purpose.
#[cfg_attr(not(feature = "test-support"), allow(dead_code, reason = "only the tests construct faults"))]
mod fault {
    use std::time::Duration;

    /// What the next request gets instead of a normal answer.
    #[derive(Debug, Clone)]
    pub enum Fault {
        /// This status, body and extra headers; the refresh token is not spent.
        Answer { status: u16, body: String, headers: Vec<(String, String)> },
        /// Close the connection without answering, before rotating: the token is still valid.
        DropBeforeRotate,
        /// Rotate (revoke the spent token, issue a new pair), then close without answering: the
        /// client never learns the new token — the loss scenario a crash between 3 and 4 produces.
        DropAfterRotate,
        /// Send this many bytes of `x` as a 200 body.
        Huge(usize),
        /// Send a valid answer one byte every `interval`.
        SlowLoris(Duration),
        /// Wait this long, then answer normally.
        Delay(Duration),
    }
}

/// How the provider issues tokens.
#[derive(Debug, Clone)]
pub struct MockSettings {
    pub expires_in: i64,
    /// NationBuilder sends `created_at`, Wild Apricot and Nudge do not.
    pub send_created_at: bool,
    /// Rotate refresh tokens (NationBuilder); false keeps the same refresh token forever.
    pub rotate: bool,
    /// Delay before every answer, so that concurrent requests overlap.
    pub delay: Duration,
    /// Keep only the latest this many requests for [`MockProvider::requests`] (`tokend dev` runs
    /// for days); `None` keeps all, for tests that count them.
    pub keep_requests: Option<usize>,
    /// Fields added to every token answer (Wild Apricot's `permissions`,
    /// `refresh_token_expires_in`, …).
    pub answer_extras: Option<Value>,
    /// How long a spent refresh token is still honoured (django-oauth-toolkit's
    /// `REFRESH_TOKEN_GRACE_PERIOD_SECONDS`): a reuse within it gets a new pair on the same
    /// chain, and the pair its first use produced is revoked. Zero: strict, every reuse refused.
    pub reuse_grace: Duration,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            expires_in: 3600,
            send_created_at: true,
            rotate: true,
            delay: Duration::ZERO,
            keep_requests: None,
            answer_extras: None,
            reuse_grace: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct State {
    settings: MockSettings,
    requests: VecDeque<RecordedRequest>,
    faults: VecDeque<Fault>,
    /// Live refresh token → chain label.
    live: HashMap<String, String>,
    revoked: HashSet<String>,
    /// Refresh tokens rotated by a `DropAfterRotate` whose answer never arrived.
    lost_in_transit: Vec<String>,
    /// Spent refresh token → unix ms of its rotation.
    rotated_at: HashMap<String, i64>,
    /// `invalid_grant` answers to refresh tokens that were already spent.
    reuses: u64,
    /// Spent refresh token → the refresh token its rotation issued.
    successor: HashMap<String, String>,
    /// Spent refresh tokens honoured again within `reuse_grace`.
    grace_reuses: u64,
    /// Authorization code → (chain, redirect_uri, PKCE S256 challenge); single use.
    codes: HashMap<String, (String, String, Option<String>)>,
    /// username → password, for the password grant.
    users: HashMap<String, String>,
    issued: u64,
    refreshes: u64,
}

/// A running mock provider; stops when dropped.
pub struct MockProvider {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockProvider {
    /// Starts on 127.0.0.1 with an OS-chosen port, on the current tokio runtime.
    pub async fn start(settings: MockSettings) -> std::io::Result<MockProvider> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), settings).await
    }

    /// Starts on `addr`, which must be a loopback address.
    pub async fn start_on(addr: SocketAddr, settings: MockSettings) -> std::io::Result<MockProvider> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the mock provider listens on loopback only",
            ));
        }
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State { settings, ..State::default() }));
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        Ok(MockProvider { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Issues a first token pair for `chain` as an authorization would, and returns the answer
    /// JSON (what `tokend import` reads).
    pub fn authorize(&self, chain: &str) -> Value {
        let mut state = self.state();
        issue(&mut state, chain, true)
    }

    pub fn set_settings(&self, settings: MockSettings) {
        self.state().settings = settings;
    }

    #[cfg(feature = "test-support")]
    pub fn push_fault(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.iter().cloned().collect()
    }

    /// Successful refresh-token grants answered so far.
    pub fn refreshes(&self) -> u64 {
        self.state().refreshes
    }

    /// The live refresh token of `chain`, if the chain is alive.
    pub fn live_refresh_token(&self, chain: &str) -> Option<String> {
        self.state().live.iter().find(|(_, c)| c.as_str() == chain).map(|(t, _)| t.clone())
    }

    pub fn is_revoked(&self, refresh_token: &str) -> bool {
        self.state().revoked.contains(refresh_token)
    }

    /// Registers an authorization code for `chain`, as the provider's authorize page would after
    /// the user approved, bound to `redirect_uri` and to a PKCE S256 `challenge` if given.
    pub fn issue_code(&self, chain: &str, redirect_uri: &str, challenge: Option<&str>) -> String {
        let code = format!("code{:016x}", rand::random::<u64>());
        self.state().codes.insert(code.clone(), (chain.into(), redirect_uri.into(), challenge.map(str::to_string)));
        code
    }

    pub fn add_user(&self, username: &str, password: &str) {
        self.state().users.insert(username.into(), password.into());
    }

    /// When `refresh_token` was spent (unix ms), if it was.
    pub fn rotated_at(&self, refresh_token: &str) -> Option<i64> {
        self.state().rotated_at.get(refresh_token).copied()
    }

    /// How many times an already-spent refresh token was presented again.
    /// Spent refresh tokens honoured again within the reuse grace.
    pub fn grace_reuses(&self) -> u64 {
        self.state().grace_reuses
    }

    pub fn reuses(&self) -> u64 {
        self.state().reuses
    }

    /// Refresh tokens whose rotation answer was dropped on purpose.
    pub fn lost_in_transit(&self) -> Vec<String> {
        self.state().lost_in_transit.clone()
    }
}

fn issue(state: &mut State, chain: &str, with_refresh: bool) -> Value {
    state.issued += 1;
    let n = state.issued;
    let access = format!("at{n}x{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let mut answer = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": state.settings.expires_in,
        "scope": "default",
    });
    if state.settings.expires_in <= 0 {
        // A token that never expires (NationBuilder V1, some API keys).
        answer.as_object_mut().map(|a| a.remove("expires_in"));
    }
    if let Some(Value::Object(extras)) = &state.settings.answer_extras {
        for (k, v) in extras {
            answer[k] = v.clone();
        }
    }
    if with_refresh {
        let refresh = format!("rt{n}x{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        state.live.insert(refresh.clone(), chain.to_string());
        answer["refresh_token"] = Value::String(refresh);
    }
    if state.settings.send_created_at {
        answer["created_at"] = json!(crate::clock::now_secs());
    }
    answer
}

enum Reply {
    Json(u16, Value),
    Raw { status: u16, body: Vec<u8>, headers: Vec<(String, String)> },
    Drop,
    Slow(Duration, Value),
}

/// Decides the answer to one request. Runs under the state lock: rotation is atomic.
fn answer(state: &mut State, request: &RecordedRequest, fault: Option<Fault>) -> Reply {
    match fault {
        Some(Fault::Answer { status, body, headers }) => {
            return Reply::Raw { status, body: body.into_bytes(), headers };
        }
        Some(Fault::DropBeforeRotate) => return Reply::Drop,
        Some(Fault::Huge(n)) => return Reply::Raw { status: 200, body: vec![b'x'; n], headers: vec![] },
        _ => {}
    }
    if request.method != "POST" {
        return Reply::Json(405, json!({"error": "invalid_request", "error_description": "POST only"}));
    }
    if request.path.ends_with("/revoke") || request.path.ends_with("/revoke_token/") {
        // RFC 7009: 200 whether or not the token was valid.
        if let Some(token) = request.field("token")
            && state.live.remove(&token).is_some()
        {
            state.revoked.insert(token);
        }
        return Reply::Raw { status: 200, body: Vec::new(), headers: vec![] };
    }
    let grant = request.field("grant_type").unwrap_or_default();
    let reply = match grant.as_str() {
        "refresh_token" => {
            let Some(spent) = request.field("refresh_token") else {
                return Reply::Json(
                    400,
                    json!({"error": "invalid_request", "error_description": "refresh_token missing"}),
                );
            };
            let grace_ms = i64::try_from(state.settings.reuse_grace.as_millis()).unwrap_or(i64::MAX);
            let in_grace = state.rotated_at.get(&spent).is_some_and(|at| crate::clock::now_ms() - at <= grace_ms);
            if in_grace && !state.live.contains_key(&spent) {
                let successor = state.successor.get(&spent).cloned();
                let chain = successor.as_ref().and_then(|t| state.live.remove(t));
                if let (Some(chain), Some(successor)) = (chain, successor) {
                    state.revoked.insert(successor);
                    state.grace_reuses += 1;
                    state.refreshes += 1;
                    let answer = issue(state, &chain, true);
                    if let Some(next) = answer.get("refresh_token").and_then(Value::as_str) {
                        state.successor.insert(spent.clone(), next.to_string());
                    }
                    return Reply::Json(200, answer);
                }
            }
            let Some(chain) = state.live.get(&spent).cloned() else {
                let reused = state.revoked.contains(&spent);
                state.reuses += u64::from(reused);
                let why = if reused { "refresh token already used (revoked)" } else { "unknown refresh token" };
                return Reply::Json(400, json!({"error": "invalid_grant", "error_description": why}));
            };
            state.refreshes += 1;
            if state.settings.rotate {
                state.live.remove(&spent);
                state.revoked.insert(spent.clone());
                state.rotated_at.insert(spent.clone(), crate::clock::now_ms());
                let answer = issue(state, &chain, true);
                if let Some(next) = answer.get("refresh_token").and_then(Value::as_str) {
                    state.successor.insert(spent.clone(), next.to_string());
                }
                answer
            } else {
                let mut a = issue(state, &chain, false);
                a["refresh_token"] = Value::String(spent.clone());
                a
            }
        }
        "client_credentials" => issue(state, "client_credentials", false),
        "authorization_code" => {
            let code = request.field("code").unwrap_or_default();
            let Some((chain, redirect_uri, challenge)) = state.codes.remove(&code) else {
                return Reply::Json(
                    400,
                    json!({"error": "invalid_grant", "error_description": "unknown or used code"}),
                );
            };
            if request.field("redirect_uri").as_deref() != Some(redirect_uri.as_str()) {
                return Reply::Json(
                    400,
                    json!({"error": "invalid_grant", "error_description": "redirect_uri mismatch"}),
                );
            }
            if let Some(challenge) = challenge {
                let verifier = request.field("code_verifier").unwrap_or_default();
                if crate::authorize::pkce_challenge(&verifier) != challenge {
                    return Reply::Json(
                        400,
                        json!({"error": "invalid_grant", "error_description": "PKCE verification failed"}),
                    );
                }
            }
            issue(state, &chain, true)
        }
        "password" => {
            let user = request.field("username").unwrap_or_default();
            let ok = state.users.get(&user).is_some_and(|p| Some(p.as_str()) == request.field("password").as_deref());
            if !ok {
                return Reply::Json(
                    400,
                    json!({"error": "invalid_grant", "error_description": "bad username or password"}),
                );
            }
            issue(state, &format!("password:{user}"), true)
        }
        other => return Reply::Json(400, json!({"error": "unsupported_grant_type", "error_description": other})),
    };
    match fault {
        Some(Fault::DropAfterRotate) => {
            if let Some(t) = reply.get("refresh_token").and_then(Value::as_str) {
                state.lost_in_transit.push(t.to_string());
            }
            Reply::Drop
        }
        Some(Fault::SlowLoris(interval)) => Reply::Slow(interval, reply),
        _ => Reply::Json(200, reply),
    }
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    // HTTP/1.1 keep-alive: requests on one connection are answered in turn until the client
    // closes it or a fault ends it.
    while let Some(mut request) = read_request(&mut stream).await? {
        let (fault, delay) = {
            let mut s = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            request.chain = request.field("refresh_token").and_then(|t| s.live.get(&t).cloned());
            if s.settings.keep_requests.is_some_and(|keep| s.requests.len() >= keep) {
                s.requests.pop_front();
            }
            s.requests.push_back(request.clone());
            (s.faults.pop_front(), s.settings.delay)
        };
        let delay = match &fault {
            Some(Fault::Delay(d)) => delay + *d,
            _ => delay,
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let reply = {
            let mut s = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            answer(&mut s, &request, fault)
        };
        match reply {
            Reply::Drop => return Ok(()),
            Reply::Json(status, value) => {
                write_response(&mut stream, status, value.to_string().as_bytes(), &[], true).await?
            }
            Reply::Raw { status, body, headers } => {
                return write_response(&mut stream, status, &body, &headers, false).await;
            }
            Reply::Slow(interval, value) => {
                let body = value.to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).await?;
                for b in body.as_bytes() {
                    stream.write_all(&[*b]).await?;
                    tokio::time::sleep(interval).await;
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<RecordedRequest>> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(None);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_BODY_BYTES);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Some(RecordedRequest { method, path, headers, body, received_at_ms: crate::clock::now_ms(), chain: None }))
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    body: &[u8],
    headers: &[(String, String)],
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut head =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: {connection}\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // One write per answer: on a kept-alive connection a second small write would wait for the
    // client's delayed ACK (Nagle), adding tens of milliseconds to every answer.
    let mut answer = head.into_bytes();
    answer.extend_from_slice(body);
    stream.write_all(&answer).await?;
    stream.flush().await?;
    if keep_alive { Ok(()) } else { stream.shutdown().await }
}

#[cfg(test)]
mod tests {
    use super::RecordedRequest;

    #[test]
    fn basic_credentials_are_decoded() {
        // From Wild Apricot's docs: Basic QVBJS0VZOm85c2U4N3Jnb2l5c29lcjk4MDcwOS0=
        let request = RecordedRequest {
            method: "POST".into(),
            path: "/auth/token".into(),
            headers: vec![("Authorization".into(), "Basic QVBJS0VZOm85c2U4N3Jnb2l5c29lcjk4MDcwOS0=".into())],
            body: Vec::new(),
            received_at_ms: 0,
            chain: None,
        };
        assert_eq!(request.basic_auth(), Some(("APIKEY".into(), "o9se87rgoiysoer980709-".into())));
    }
}
