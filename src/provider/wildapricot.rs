//! Wild Apricot: `POST https://oauth.wildapricot.org/auth/token`, HTTP Basic
//! `client_id:client_secret`, form `grant_type=refresh_token&refresh_token=…`. Access tokens live
//! 1800 s and the answer carries no `created_at`. API-key credentials instead ask again with
//! `grant_type=client_credentials&scope=auto` and Basic `APIKEY:<key>`; no refresh token is needed.

use super::{ClientAuth, Endpoint, Preset, RequestBody, TokenRequest, rfc6749_request};
use crate::redact::Secret;
use url::Url;

pub const PRESET: Preset = Preset {
    name: "wildapricot",
    fixed_auth: Some(ClientAuth::Basic),
    default_scope: Some(DEFAULT_SCOPE),
    // Not documented by Wild Apricot; `pkce = true` forces it.
    pkce_by_default: false,
    takes_api_key: true,
    requires_client_secret: true,
    own_fields: &["site"],
    configured_by_urls: false,
    code_exchange_repeats_client: true,
    password_grant: true,
    token_url: |_| Ok(Url::parse(DEFAULT_TOKEN_URL).expect("constant URL parses")),
    authorize_url: |s| {
        let host = s.site?.trim_start_matches("https://").trim_end_matches('/');
        Some(("site", format!("https://{host}/sys/login/OAuthLogin")))
    },
    revocation_url: |_| None,
    refresh_request,
};

/// "auto": every scope the account's permissions allow.
pub const DEFAULT_SCOPE: &str = "auto";

pub const DEFAULT_TOKEN_URL: &str = "https://oauth.wildapricot.org/auth/token";
pub const LIFETIME_SECS: i64 = 1800;
/// The fixed Basic-auth user name Wild Apricot expects in front of an API key.
pub const API_KEY_USER: &str = "APIKEY";

pub fn refresh_request(endpoint: &Endpoint, refresh_token: &str) -> TokenRequest {
    rfc6749_request(
        endpoint,
        ClientAuth::Basic,
        vec![("grant_type", "refresh_token".into()), ("refresh_token", refresh_token.into())],
    )
}

pub fn api_key_request(endpoint: &Endpoint, api_key: &Secret) -> TokenRequest {
    let scope = endpoint.scope.clone().unwrap_or_else(|| DEFAULT_SCOPE.into());
    TokenRequest {
        url: endpoint.token_url.clone(),
        basic_auth: Some((API_KEY_USER.into(), api_key.clone())),
        body: RequestBody::Form(vec![("grant_type", "client_credentials".into()), ("scope", scope)]),
    }
}
