//! Nudge: `POST {base}/api/oauth/zapier/token`, form body with `grant_type`, `client_id`,
//! `client_secret` and `refresh_token`. Access tokens live 3600 s. Rate limits (5000 requests per
//! hour per user) are announced in `X-RateLimit-Remaining` / `X-RateLimit-Reset`, which
//! [`super::interpret`] honours for every provider.

use super::{ClientAuth, Endpoint, Preset, RateLimitScope, Settings, TokenRequest, rfc6749_request};
use url::Url;

pub const PRESET: Preset = Preset {
    name: "nudge",
    fixed_auth: Some(ClientAuth::Body),
    default_scope: Some("read write"),
    pkce_by_default: true,
    takes_api_key: false,
    requires_client_secret: true,
    own_fields: &["base_url"],
    configured_by_urls: false,
    code_exchange_repeats_client: false,
    password_grant: false,
    token_url: |s| {
        let base = base(s);
        let base = if base.ends_with('/') { base.to_string() } else { format!("{base}/") };
        Url::parse(&base)
            .map_err(|e| ("base_url", format!("\"{base}\" is not a URL ({e})")))
            .and_then(|b| default_token_url(&b).map_err(|e| ("base_url", e)))
    },
    authorize_url: |s| Some(("base_url", format!("{}/api/oauth/zapier/authorize", base(s).trim_end_matches('/')))),
    // Documented only as a path: the RFC 7009 shape is assumed (README, "Revocation").
    revocation_url: |s| Some(format!("{}/api/oauth/zapier/revoke", base(s).trim_end_matches('/'))),
    refresh_request,
    answer_extras: &[],
    extra_env: super::scalar_extra_env,
    rate_limit: RateLimitScope::Credential,
};

fn base<'a>(settings: &Settings<'a>) -> &'a str {
    settings.base_url.unwrap_or(DEFAULT_BASE_URL)
}

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
