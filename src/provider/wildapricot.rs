//! Wild Apricot: `POST https://oauth.wildapricot.org/auth/token`, HTTP Basic
//! `client_id:client_secret`, form `grant_type=refresh_token&refresh_token=…`. Access tokens live
//! 1800 s and the answer carries no `created_at`. API-key credentials instead ask again with
//! `grant_type=client_credentials&scope=auto` and Basic `APIKEY:<key>`; no refresh token is needed.

use super::{ClientAuth, Endpoint, RequestBody, TokenRequest, rfc6749_request};
use crate::redact::Secret;

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
    let scope = endpoint.scope.clone().unwrap_or_else(|| "auto".into());
    TokenRequest {
        url: endpoint.token_url.clone(),
        basic_auth: Some((API_KEY_USER.into(), api_key.clone())),
        body: RequestBody::Form(vec![("grant_type", "client_credentials".into()), ("scope", scope)]),
    }
}
