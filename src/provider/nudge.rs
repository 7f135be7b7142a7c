//! Nudge: `POST {base}/api/oauth/zapier/token`, form body with `grant_type`, `client_id`,
//! `client_secret` and `refresh_token`. Access tokens live 3600 s. Rate limits (5000 requests per
//! hour per user) are announced in `X-RateLimit-Remaining` / `X-RateLimit-Reset`, which
//! [`super::interpret`] honours for every provider.

use super::{ClientAuth, Endpoint, TokenRequest, rfc6749_request};
use url::Url;

pub const DEFAULT_BASE_URL: &str = "https://app.justanudge.co";
pub const LIFETIME_SECS: i64 = 3600;

pub fn default_token_url(base: &Url) -> Result<Url, String> {
    base.join("api/oauth/zapier/token").map_err(|e| e.to_string())
}

pub fn refresh_request(endpoint: &Endpoint, refresh_token: &str) -> TokenRequest {
    rfc6749_request(
        endpoint,
        ClientAuth::Body,
        vec![("grant_type", "refresh_token".into()), ("refresh_token", refresh_token.into())],
    )
}
