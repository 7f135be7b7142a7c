//! Providers: build the token request in each provider's documented shape, send it, and turn the
//! answer into a [`TokenAnswer`] or a classified [`Failure`]. One file per provider; no store, no
//! files. The shapes come from the providers' own docs (see README "Providers").

mod answer;
mod http;
pub mod nationbuilder;
pub mod nudge;
pub mod oauth2;
pub mod wildapricot;

pub use answer::{
    Failure, MAX_EXPIRES_IN_SECS, TokenAnswer, interpret, is_forbidden_extra, parse_token_json, rate_limit_reset_in,
    select_extras, wait_hint,
};
pub use http::{HttpClient, HttpLimits, RawAnswer};

use crate::redact::Secret;
use std::fmt;
use std::str::FromStr;
use url::Url;

/// Everything tokend knows about one provider: its name, defaults and rules. Each
/// `provider/<name>.rs` states its own `PRESET`; [`REGISTRY`] lists them. The configuration
/// validator asks the preset and never names a provider.
pub struct Preset {
    /// The `provider = "…"` value.
    pub name: &'static str,
    /// How the client authenticates; `None` lets the configuration choose (`auth`, default
    /// Basic as RFC 6749 §2.3.1 recommends).
    pub fixed_auth: Option<ClientAuth>,
    /// The scope sent when the configuration names none.
    pub default_scope: Option<&'static str>,
    /// Send a PKCE S256 challenge unless the configuration says otherwise (where documented).
    pub pkce_by_default: bool,
    /// Takes an `api_key` instead of a client id and secret (Wild Apricot).
    pub takes_api_key: bool,
    /// A confidential client: a client secret is required.
    pub requires_client_secret: bool,
    /// Its own settings among `slug`, `base_url`, `site` (refused for other providers).
    pub own_fields: &'static [&'static str],
    /// A plain RFC 6749 server described by URLs in the configuration (`oauth2`).
    pub configured_by_urls: bool,
    /// The code exchange repeats `client_id`, `redirect_uri` and `scope` in the form besides
    /// the Basic header (Wild Apricot's documented shape).
    pub code_exchange_repeats_client: bool,
    /// Offers the resource-owner password grant.
    pub password_grant: bool,
    /// The token endpoint when `token_url` is not given, from the provider's own settings; the
    /// error names the field to fix.
    pub token_url: fn(&Settings<'_>) -> Result<Url, (&'static str, String)>,
    /// The authorization endpoint when `authorize_url` is not given, and the field it comes from.
    pub authorize_url: fn(&Settings<'_>) -> Option<(&'static str, String)>,
    /// The RFC 7009 revocation endpoint when `revocation_url` is not given.
    pub revocation_url: fn(&Settings<'_>) -> Option<String>,
    /// The refresh request, in the provider's shape.
    pub refresh_request: fn(&Endpoint, &str) -> TokenRequest,
    /// Answer fields beyond RFC 6749's that scripts need and that are kept without being asked
    /// for (Wild Apricot's `permissions`); `extra_fields` in the configuration adds more.
    pub answer_extras: &'static [&'static str],
    /// The environment variables (names without the `TOKEND_<NAME>_` prefix) that the kept
    /// extras become in env sinks and hooks.
    pub extra_env: fn(&Extras) -> Vec<(String, String)>,
    /// Whose budget a rate-limit answer speaks for, unless the configuration says otherwise.
    pub rate_limit: RateLimitScope,
}

/// The answer fields kept for a credential, by name.
pub type Extras = serde_json::Map<String, serde_json::Value>;

/// Which credentials a rate-limit answer (429, an exhausted `X-RateLimit-Remaining`) pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateLimitScope {
    /// Only the credential that got the answer: the limit is per user and each token is one
    /// user's (Nudge).
    Credential,
    /// Every credential of the same client at the same token endpoint.
    Client,
    /// Every credential at the same token endpoint.
    Provider,
}

impl RateLimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitScope::Credential => "credential",
            RateLimitScope::Client => "client",
            RateLimitScope::Provider => "provider",
        }
    }
}

impl FromStr for RateLimitScope {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "credential" => Ok(RateLimitScope::Credential),
            "client" => Ok(RateLimitScope::Client),
            "provider" => Ok(RateLimitScope::Provider),
            _ => Err(()),
        }
    }
}

/// Scalar extras become variables of their own name, upper-cased (`org_id` → `ORG_ID`); lists
/// and objects are left to the json sink and `TOKEND_EXTRA`.
pub fn scalar_extra_env(extra: &serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    use serde_json::Value;
    extra
        .iter()
        .filter_map(|(field, value)| {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            let name: String =
                field.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
            Some((name, text))
        })
        .collect()
}

/// A credential's provider-specific settings, as written.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings<'a> {
    pub slug: Option<&'a str>,
    pub base_url: Option<&'a str>,
    pub site: Option<&'a str>,
}

/// Every provider preset. A new provider is one file with its `PRESET` and one line here.
pub static REGISTRY: [&Preset; 4] = [&nationbuilder::PRESET, &nudge::PRESET, &wildapricot::PRESET, &oauth2::PRESET];

/// A provider: a handle to its [`Preset`], compared by name.
#[derive(Clone, Copy)]
pub struct ProviderKind(&'static Preset);

impl ProviderKind {
    pub fn all() -> impl Iterator<Item = ProviderKind> {
        REGISTRY.iter().map(|p| ProviderKind(p))
    }

    pub fn as_str(self) -> &'static str {
        self.0.name
    }

    pub fn preset(self) -> &'static Preset {
        self.0
    }

    /// How the client authenticates when the configuration does not say.
    pub fn default_auth(self) -> ClientAuth {
        self.0.fixed_auth.unwrap_or(ClientAuth::Basic)
    }
}

impl PartialEq for ProviderKind {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for ProviderKind {}

impl std::hash::Hash for ProviderKind {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
    }
}

impl PartialOrd for ProviderKind {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ProviderKind {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name.cmp(other.0.name)
    }
}

impl fmt::Debug for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::all().find(|k| k.as_str() == s).ok_or(())
    }
}

/// Where the client id and secret travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAuth {
    /// HTTP Basic `client_id:client_secret`, form body (RFC 6749 §2.3.1, the recommended way).
    Basic,
    /// `client_id` and `client_secret` as form fields.
    Body,
    /// Everything, credentials included, as one JSON object (NationBuilder's shape).
    Json,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Body => "body",
            ClientAuth::Json => "json",
        }
    }
}

impl FromStr for ClientAuth {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "basic" => Ok(ClientAuth::Basic),
            "body" => Ok(ClientAuth::Body),
            "json" => Ok(ClientAuth::Json),
            _ => Err(()),
        }
    }
}

/// How a credential obtains a new access token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GrantKind {
    /// Spend the stored refresh token (rotated by most providers).
    RefreshToken,
    /// Wild Apricot API key: ask again with `client_credentials`, Basic `APIKEY:<key>`.
    ApiKey(Secret),
}

/// Everything needed to talk to one credential's token endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub kind: ProviderKind,
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub auth: ClientAuth,
    pub scope: Option<String>,
    pub grant: GrantKind,
    /// The first-authorization side (`tokend authorize`), when the provider has one configured.
    pub authorization: Authorization,
    /// RFC 7009 revocation endpoint, where the provider has one.
    pub revocation_url: Option<Url>,
    /// Answer fields kept as extras: the preset's and the configuration's `extra_fields`.
    pub extra_fields: Vec<String>,
    /// Which credentials one rate-limit answer pauses.
    pub rate_limit: RateLimitScope,
    /// Refreshes in flight at once at this provider (`[provider.X] concurrency`, else
    /// `[daemon] concurrency`). Held here, shared, rather than in each of 100,000 credentials.
    pub provider_concurrency: usize,
}

impl Endpoint {
    /// What every fleet node refreshing one credential must agree on: everything that shapes the
    /// request a refresh token is spent in, and how its answer is read. Secrets by fingerprint.
    pub fn shared_settings(&self) -> Vec<(&'static str, String)> {
        let secret = |s: Option<&Secret>| s.map_or_else(|| "none".to_string(), Secret::fingerprint);
        vec![
            ("provider", self.kind.as_str().to_string()),
            ("token_url", self.token_url.to_string()),
            ("client_id", self.client_id.clone()),
            ("client_secret", secret(self.client_secret.as_ref())),
            ("client_auth", format!("{:?}", self.auth).to_lowercase()),
            ("scope", self.scope.clone().unwrap_or_else(|| "none".into())),
            (
                "grant",
                match &self.grant {
                    GrantKind::RefreshToken => "refresh_token".to_string(),
                    GrantKind::ApiKey(key) => format!("api_key {}", secret(Some(key))),
                },
            ),
            ("revocation_url", self.revocation_url.as_ref().map_or_else(|| "none".into(), Url::to_string)),
            ("extra_fields", self.extra_fields.join(",")),
            ("rate_limit", format!("{:?}", self.rate_limit).to_lowercase()),
        ]
    }

    /// The key of the budget a rate-limit answer for `credential` speaks for, by
    /// [`Endpoint::rate_limit`]: the credential itself, or the token endpoint's origin and the
    /// client (the API key's fingerprint for key credentials), or the origin alone. A `429` from
    /// one host says nothing about another.
    pub fn rate_limit_key(&self, credential: &str) -> String {
        let origin = self.token_url.origin().ascii_serialization();
        match self.rate_limit {
            RateLimitScope::Credential => format!("{origin} credential {credential}"),
            RateLimitScope::Client => {
                let client = match &self.grant {
                    GrantKind::ApiKey(key) => key.fingerprint(),
                    GrantKind::RefreshToken => self.client_id.clone(),
                };
                format!("{origin} client {client}")
            }
            RateLimitScope::Provider => origin,
        }
    }
}

/// Settings for the authorization-code flow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authorization {
    /// Where the user's browser goes; `None` when it cannot be derived (Wild Apricot without
    /// `site`, `oauth2` without `authorize_url`).
    pub authorize_url: Option<Url>,
    pub redirect_uri: Url,
    /// Send a PKCE S256 challenge (RFC 7636).
    pub pkce: bool,
}

/// The first request of an authorization: code exchange or resource-owner password.
#[derive(Debug, Clone, Copy)]
pub enum FirstGrant<'a> {
    Code { code: &'a str, verifier: Option<&'a str> },
    Password { username: &'a str, password: &'a Secret },
}

/// A token request ready to send: the one value every provider file produces.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub url: Url,
    pub basic_auth: Option<(String, Secret)>,
    pub body: RequestBody,
}

/// The body encodings providers ask for.
#[derive(Debug, Clone)]
pub enum RequestBody {
    /// `application/x-www-form-urlencoded`.
    Form(Vec<(&'static str, String)>),
    /// `application/json`, sent with `Accept: application/json` (NationBuilder answers 406 without).
    Json(serde_json::Map<String, serde_json::Value>),
}

/// Body fields whose values are secrets, scrubbed from anything an endpoint sends back.
const SECRET_FIELDS: [&str; 6] = ["client_secret", "refresh_token", "code", "code_verifier", "password", "token"];

impl TokenRequest {
    /// Every secret this request carries (Basic credentials, secret body fields), for scrubbing
    /// the answer: whatever was sent must not come back into a log through an echo.
    pub fn scrubber(&self) -> crate::redact::Scrubber {
        let mut scrubber = crate::redact::Scrubber::default();
        if let Some((user, password)) = &self.basic_auth {
            scrubber.add_basic(user, password.expose());
        }
        for field in SECRET_FIELDS {
            if let Some(value) = self.body.field(field) {
                scrubber.add(value);
            }
        }
        scrubber
    }
}

impl RequestBody {
    /// The value of one field, whatever the encoding; used by tests and the mock provider.
    pub fn field(&self, name: &str) -> Option<&str> {
        match self {
            RequestBody::Form(pairs) => pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str()),
            RequestBody::Json(map) => map.get(name).and_then(|v| v.as_str()),
        }
    }
}

/// Builds the request that obtains a new token for `endpoint`, spending `refresh_token` when the
/// grant is [`GrantKind::RefreshToken`]. Returns `None` for a refresh-token grant without one.
pub fn token_request(endpoint: &Endpoint, refresh_token: Option<&str>) -> Option<TokenRequest> {
    match &endpoint.grant {
        GrantKind::ApiKey(key) => Some(wildapricot::api_key_request(endpoint, key)),
        GrantKind::RefreshToken => Some((endpoint.kind.preset().refresh_request)(endpoint, refresh_token?)),
    }
}

/// Builds the request that turns an authorization code, or a username and password, into the
/// first token pair, in the provider's shape. `Err` names why the grant does not apply.
pub fn first_request(endpoint: &Endpoint, grant: FirstGrant<'_>) -> Result<TokenRequest, String> {
    let redirect_uri = endpoint.authorization.redirect_uri.to_string();
    match grant {
        FirstGrant::Code { code, verifier } => {
            let mut fields = vec![("grant_type", "authorization_code".to_string()), ("code", code.to_string())];
            if endpoint.kind.preset().code_exchange_repeats_client {
                fields.push(("client_id", endpoint.client_id.clone()));
                fields.push(("redirect_uri", redirect_uri));
                fields.extend(endpoint.scope.clone().map(|scope| ("scope", scope)));
            } else {
                fields.push(("redirect_uri", redirect_uri));
            }
            if let Some(v) = verifier {
                fields.push(("code_verifier", v.to_string()));
            }
            Ok(rfc6749_request(endpoint, endpoint.auth, fields))
        }
        FirstGrant::Password { username, password } => {
            if !endpoint.kind.preset().password_grant {
                return Err(format!("{} does not offer the password grant", endpoint.kind));
            }
            let mut fields = vec![
                ("grant_type", "password".to_string()),
                ("username", username.to_string()),
                ("password", password.expose().to_string()),
            ];
            fields.extend(endpoint.scope.clone().map(|s| ("scope", s)));
            Ok(rfc6749_request(endpoint, endpoint.auth, fields))
        }
    }
}

/// The URL the user opens to authorize: RFC 6749 §4.1.1 with `state`, plus an S256 PKCE
/// challenge when configured.
pub fn authorization_url(endpoint: &Endpoint, state: &str, pkce_challenge: Option<&str>) -> Result<Url, String> {
    let mut url = endpoint.authorization.authorize_url.clone().ok_or_else(|| {
        let needs = endpoint.kind.preset().own_fields.iter().map(|f| format!("`{f}` or ")).collect::<String>();
        format!("{} needs {needs}`authorize_url` to authorize", endpoint.kind)
    })?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code");
        q.append_pair("client_id", &endpoint.client_id);
        q.append_pair("redirect_uri", endpoint.authorization.redirect_uri.as_str());
        if let Some(scope) = &endpoint.scope {
            q.append_pair("scope", scope);
        }
        q.append_pair("state", state);
        if let Some(challenge) = pkce_challenge {
            q.append_pair("code_challenge", challenge);
            q.append_pair("code_challenge_method", "S256");
        }
    }
    Ok(url)
}

/// RFC 7009 revocation of `token` (`token_type_hint` = `hint`), client authenticated as for the
/// token endpoint. `None` when the provider has no revocation endpoint.
pub fn revocation_request(endpoint: &Endpoint, token: &str, hint: &str) -> Option<TokenRequest> {
    let url = endpoint.revocation_url.clone()?;
    let mut request = rfc6749_request(
        endpoint,
        endpoint.auth,
        vec![("token", token.to_string()), ("token_type_hint", hint.to_string())],
    );
    request.url = url;
    Some(request)
}

/// Builds a body-carrying request in the shape `auth` asks for, with `fields` first and the client
/// credentials placed where `auth` says. Shared by the providers whose shapes are plain RFC 6749.
pub(crate) fn rfc6749_request(
    endpoint: &Endpoint,
    auth: ClientAuth,
    fields: Vec<(&'static str, String)>,
) -> TokenRequest {
    let secret = endpoint.client_secret.clone();
    match auth {
        ClientAuth::Basic => TokenRequest {
            url: endpoint.token_url.clone(),
            basic_auth: Some((endpoint.client_id.clone(), secret.unwrap_or_else(|| Secret::new("")))),
            body: RequestBody::Form(fields),
        },
        ClientAuth::Body => {
            let mut pairs = fields;
            pairs.push(("client_id", endpoint.client_id.clone()));
            if let Some(s) = secret {
                pairs.push(("client_secret", s.expose().to_string()));
            }
            TokenRequest { url: endpoint.token_url.clone(), basic_auth: None, body: RequestBody::Form(pairs) }
        }
        ClientAuth::Json => {
            let mut map = serde_json::Map::new();
            for (k, v) in fields {
                map.insert(k.to_string(), serde_json::Value::String(v));
            }
            map.insert("client_id".into(), endpoint.client_id.clone().into());
            if let Some(s) = secret {
                map.insert("client_secret".into(), s.expose().to_string().into());
            }
            TokenRequest { url: endpoint.token_url.clone(), basic_auth: None, body: RequestBody::Json(map) }
        }
    }
}

/// True for hosts where plain HTTP is acceptable: the loopback range, `::1` and `localhost`.
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Token URLs must be HTTPS, except on loopback where tests and `tokend dev` live.
pub fn check_token_url(url: &Url) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(url) => Ok(()),
        "http" => Err(format!(
            "{url} uses plain http; tokens and secrets would cross the network unencrypted (http is allowed only for 127.0.0.0/8, ::1 and localhost)"
        )),
        other => Err(format!("{url} has scheme \"{other}\"; a token endpoint must be https")),
    }
}

/// After a *successful* answer: if the provider says the budget is spent, how long until it resets.
pub fn rate_limit_reset_in_if_exhausted(answer: &RawAnswer, now_secs: i64) -> Option<std::time::Duration> {
    rate_limit_reset_in(answer, now_secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        let ok = [
            "https://x.example/t",
            "http://127.0.0.1:9/t",
            "http://127.9.9.9/t",
            "http://[::1]:8/t",
            "http://localhost/t",
        ];
        for u in ok {
            assert!(check_token_url(&Url::parse(u).unwrap()).is_ok(), "{u}");
        }
        let bad = ["http://example.com/t", "http://10.0.0.1/t", "ftp://localhost/t", "http://127.0.0.1.evil.com/t"];
        for u in bad {
            assert!(check_token_url(&Url::parse(u).unwrap()).is_err(), "{u}");
        }
    }
}
