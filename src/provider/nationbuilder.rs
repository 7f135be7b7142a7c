//! NationBuilder: `POST https://{slug}.nationbuilder.com/oauth/token` with a JSON body carrying the
//! grant and the client credentials, `Content-Type` and `Accept: application/json` (406 without).
//! V2 access tokens live 86400 s and the spent refresh token is revoked on use; V1 tokens have
//! neither `expires_in` nor a refresh token and are stored and shared but never refreshed.

use super::{ClientAuth, Endpoint, Preset, RateLimitScope, TokenRequest, rfc6749_request};
use url::Url;

pub const PRESET: Preset = Preset {
    name: "nationbuilder",
    fixed_auth: Some(ClientAuth::Json),
    default_scope: None,
    // NationBuilder documents PKCE for its authorization code flow.
    pkce_by_default: true,
    takes_api_key: false,
    requires_client_secret: true,
    own_fields: &["slug"],
    configured_by_urls: false,
    code_exchange_repeats_client: false,
    password_grant: false,
    token_url: |s| match s.slug {
        Some(slug) => default_token_url(slug).map_err(|e| ("slug", e)),
        None => Err(("slug", "is missing; nationbuilder needs the nation slug (or a token_url)".into())),
    },
    authorize_url: |s| s.slug.map(|slug| ("slug", format!("https://{slug}.nationbuilder.com/oauth/authorize"))),
    revocation_url: |_| None,
    refresh_request,
    answer_extras: &[],
    extra_env: super::scalar_extra_env,
    rate_limit: RateLimitScope::Client,
};

/// NationBuilder V2 access token lifetime, for documentation and `tokend dev`.
pub const LIFETIME_SECS: i64 = 86_400;

pub fn default_token_url(slug: &str) -> Result<Url, String> {
    let valid = !slug.is_empty()
        && slug.len() <= 63
        && slug.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !slug.starts_with('-');
    if !valid {
        return Err(format!(
            "\"{slug}\" is not a nation slug (letters, digits and '-', as in https://SLUG.nationbuilder.com)"
        ));
    }
    Url::parse(&format!("https://{slug}.nationbuilder.com/oauth/token")).map_err(|e| e.to_string())
}

pub fn refresh_request(endpoint: &Endpoint, refresh_token: &str) -> TokenRequest {
    rfc6749_request(
        endpoint,
        ClientAuth::Json,
        vec![("grant_type", "refresh_token".into()), ("refresh_token", refresh_token.into())],
    )
}
