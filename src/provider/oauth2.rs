//! Any RFC 6749 token endpoint: `token_url` is required, client authentication is `basic`
//! (the default, §2.3.1), `body` or `json`, and an optional `scope` is sent with the refresh (§6).

use super::{Endpoint, Preset, RateLimitScope, TokenRequest, rfc6749_request};

pub const PRESET: Preset = Preset {
    name: "oauth2",
    fixed_auth: None,
    default_scope: None,
    pkce_by_default: true,
    takes_api_key: false,
    // Public clients send only their client_id.
    requires_client_secret: false,
    own_fields: &[],
    configured_by_urls: true,
    code_exchange_repeats_client: false,
    password_grant: true,
    token_url: |_| Err(("token_url", "is missing; oauth2 credentials must name their token endpoint".into())),
    authorize_url: |_| None,
    revocation_url: |_| None,
    refresh_request,
    answer_extras: &[],
    extra_env: super::scalar_extra_env,
    rate_limit: RateLimitScope::Client,
};

pub fn refresh_request(endpoint: &Endpoint, refresh_token: &str) -> TokenRequest {
    let mut fields = vec![("grant_type", "refresh_token".to_string()), ("refresh_token", refresh_token.to_string())];
    if let Some(scope) = &endpoint.scope {
        fields.push(("scope", scope.clone()));
    }
    rfc6749_request(endpoint, endpoint.auth, fields)
}
