//! Sending a [`TokenRequest`]: reqwest over rustls, no redirects (a redirect would carry the client
//! secret to another host), connect and total timeouts, and a cap on the bytes read from an answer
//! so a hostile or broken endpoint cannot exhaust memory.

use super::{Failure, RequestBody, TokenRequest};
use std::time::Duration;

/// Hosts never reached through a proxy: what tokend accepts plain `http` for.
const LOOPBACK_HOSTS: &str = "localhost,127.0.0.0/8,::1";

/// Limits on one exchange with a token endpoint.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub connect_timeout: Duration,
    /// Whole exchange, body included, so a slow-loris answer cannot hold a lease forever.
    pub total_timeout: Duration,
    pub max_answer_bytes: usize,
    /// How long a refresh lease outlives the longest exchange: a request is sent only while at
    /// least `total_timeout` of the lease is left, and this much time passes at most between
    /// taking the lease and sending (a begin transaction on a slow database, a paused process).
    pub lease_margin: Duration,
}

impl HttpLimits {
    /// The length of a refresh lease: no exchange started under it can still be running when it
    /// ends, so another holder may then take over without ever racing this one's request.
    pub fn lease_length(&self) -> Duration {
        self.total_timeout + self.lease_margin
    }

    /// How long after asking for a lease its request may still be sent: the whole exchange,
    /// late answers included ([`HttpClient::send`]), then ends inside the lease.
    pub fn send_within(&self) -> Duration {
        self.lease_margin.saturating_sub(LATE_ANSWER_GRACE)
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            // Token answers are a few hundred bytes; Wild Apricot's permission lists can grow, 64 KiB
            // leaves room for those and nothing pathological.
            max_answer_bytes: 64 * 1024,
            lease_margin: Duration::from_secs(30),
        }
    }
}

/// What came back, before interpretation.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<String>,
    pub ratelimit_remaining: Option<String>,
    pub ratelimit_reset: Option<String>,
    pub location: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    limits: HttpLimits,
}

impl HttpClient {
    /// `proxy` is the only proxy ever used (`[daemon] proxy`), and never for loopback hosts:
    /// `http_proxy`/`https_proxy` in the environment are ignored, so that an inherited variable
    /// cannot send client secrets and refresh tokens through a host nobody chose.
    pub fn new(limits: HttpLimits, proxy: Option<&url::Url>) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(limits.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .no_proxy();
        if let Some(url) = proxy {
            let proxy = reqwest::Proxy::all(url.as_str())
                .map_err(|e| format!("proxy {}: {e}", url.host_str().unwrap_or_default()))?
                .no_proxy(reqwest::NoProxy::from_string(LOOPBACK_HOSTS));
            builder = builder.proxy(proxy);
        }
        let client = builder.build().map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self { client, limits })
    }

    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    /// Sends the request and reads at most `max_answer_bytes` of the answer within
    /// `total_timeout`. Transport problems (connect, timeout, reset) come back as
    /// [`Failure::Transient`].
    ///
    /// An answer that already arrived wins over the timeout. A process that was stopped
    /// (SIGSTOP, a frozen VM) while waiting wakes with the timer expired and the provider's answer
    /// — a rotated refresh token, the only live one — in its socket; reqwest's own timeout would
    /// discard it. So the exchange gets [`LATE_ANSWER_GRACE`] more to be read out before it is
    /// given up: within the lease, whose margin is at least a second.
    pub async fn send(&self, request: &TokenRequest) -> Result<RawAnswer, Failure> {
        let mut exchange = std::pin::pin!(self.exchange(request));
        if let Ok(answer) = tokio::time::timeout(self.limits.total_timeout, &mut exchange).await {
            return answer;
        }
        tokio::time::timeout(LATE_ANSWER_GRACE, exchange).await.unwrap_or_else(|_| {
            Err(Failure::Transient {
                reason: format!("timed out: no complete answer within {:?}", self.limits.total_timeout),
                retry_after: None,
            })
        })
    }

    async fn exchange(&self, request: &TokenRequest) -> Result<RawAnswer, Failure> {
        let mut builder = self.client.post(request.url.clone()).header(reqwest::header::ACCEPT, "application/json");
        if let Some((user, pass)) = &request.basic_auth {
            builder = builder.basic_auth(user, Some(pass.expose()));
        }
        builder = match &request.body {
            RequestBody::Form(pairs) => builder.form(pairs),
            RequestBody::Json(map) => builder.json(map),
        };
        let mut response = builder.send().await.map_err(transport_failure)?;
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut answer = RawAnswer {
            status: response.status().as_u16(),
            body: Vec::new(),
            retry_after: header("retry-after"),
            ratelimit_remaining: header("x-ratelimit-remaining"),
            ratelimit_reset: header("x-ratelimit-reset"),
            location: header("location"),
        };
        let cap = self.limits.max_answer_bytes;
        if response.content_length().is_some_and(|n| n > cap as u64) {
            return Err(too_large(cap));
        }
        while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
            if answer.body.len() + chunk.len() > cap {
                return Err(too_large(cap));
            }
            answer.body.extend_from_slice(&chunk);
        }
        Ok(answer)
    }
}

/// How long an exchange whose timeout fired may still deliver an answer that is already on its
/// way (see [`HttpClient::send`]).
const LATE_ANSWER_GRACE: Duration = Duration::from_millis(250);

fn too_large(cap: usize) -> Failure {
    Failure::Rejected { reason: format!("token endpoint answered with more than {cap} bytes; answer discarded") }
}

fn transport_failure(e: reqwest::Error) -> Failure {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transport error"
    };
    // reqwest's Display names the URL, never the body or the Basic credentials.
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    Failure::Transient { reason: format!("{what}: {detail}"), retry_after: None }
}
