//! Any RFC 6749 token endpoint: `token_url` is required, client authentication is `basic`
//! (the default, §2.3.1), `body` or `json`, and an optional `scope` is sent with the refresh (§6).

use super::{Endpoint, TokenRequest, rfc6749_request};

pub fn refresh_request(endpoint: &Endpoint, refresh_token: &str) -> TokenRequest {
    let mut fields = vec![("grant_type", "refresh_token".to_string()), ("refresh_token", refresh_token.to_string())];
    if let Some(scope) = &endpoint.scope {
        fields.push(("scope", scope.clone()));
    }
    rfc6749_request(endpoint, endpoint.auth, fields)
}
