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
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            // Token answers are a few hundred bytes; Wild Apricot's permission lists can grow, 64 KiB
            // leaves room for those and nothing pathological.
            max_answer_bytes: 64 * 1024,
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
            .timeout(limits.total_timeout)
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

    /// Sends the request and reads at most `max_answer_bytes` of the answer. Transport problems
    /// (connect, timeout, reset) come back as [`Failure::Transient`].
    pub async fn send(&self, request: &TokenRequest) -> Result<RawAnswer, Failure> {
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
