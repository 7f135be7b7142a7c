//! Wild Apricot: `POST https://oauth.wildapricot.org/auth/token`, HTTP Basic
//! `client_id:client_secret`, form `grant_type=refresh_token&refresh_token=…`. Access tokens live
//! 1800 s and the answer carries no `created_at`. API-key credentials instead ask again with
//! `grant_type=client_credentials&scope=auto` and Basic `APIKEY:<key>`; no refresh token is needed.

use super::{ClientAuth, Endpoint, Preset, RateLimitScope, RequestBody, TokenRequest, rfc6749_request};
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
    answer_extras: &["permissions"],
    extra_env: account_env,
    rate_limit: RateLimitScope::Client,
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

/// `permissions` lists the accounts a token may act on: `ACCOUNT_IDS` (comma-separated, always)
/// and `ACCOUNT_ID` when there is exactly one, so a script needs no extra API call to find it.
pub fn account_env(extra: &serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    let Some(accounts) = extra.get("permissions").and_then(|p| p.as_array()) else { return Vec::new() };
    let ids: Vec<String> = accounts
        .iter()
        .filter_map(|a| match a.get("accountId")? {
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::String(s) if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Some(s.clone())
            }
            _ => None,
        })
        .collect();
    let mut env = vec![("ACCOUNT_IDS".to_string(), ids.join(","))];
    if let [only] = ids.as_slice() {
        env.push(("ACCOUNT_ID".to_string(), only.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(json: &str) -> Vec<(String, String)> {
        account_env(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn account_ids_from_permissions() {
        let one = env(r#"{"permissions":[{"accountId":123,"availableScopes":["contacts_view"]}]}"#);
        assert_eq!(one, [("ACCOUNT_IDS".into(), "123".into()), ("ACCOUNT_ID".into(), "123".into())]);
        let two = env(r#"{"permissions":[{"accountId":123},{"accountId":456}]}"#);
        assert_eq!(two, [("ACCOUNT_IDS".to_string(), "123,456".to_string())]);
        assert!(env(r#"{"other":1}"#).is_empty());
        // A hostile id cannot smuggle characters into an env file.
        assert_eq!(env(r#"{"permissions":[{"accountId":"1'x"}]}"#), [("ACCOUNT_IDS".into(), String::new())]);
    }
}
