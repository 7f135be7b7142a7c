//! Token answers (RFC 6749 §5.1) and error answers (§5.2), classified the one way ARCHITECTURE.md's
//! "Failure classes" table says. Parsing is strict about what tokend will store or write into a
//! file — a token with a newline in it could inject lines into an env sink — and lenient about
//! what providers vary on (numbers as strings, scope as a list, extra fields).

use super::RawAnswer;
use crate::redact::{Scrubber, Secret};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// A longer `expires_in` than ten years is a provider bug or an attack, not a lifetime.
pub const MAX_EXPIRES_IN_SECS: i64 = 10 * 365 * 86_400;
/// Tokens are opaque but printable; bounded so one answer cannot bloat the store or a sink.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// When a 429 or 5xx gives no hint, wait this long before the next try (the scheduler's backoff
/// may stretch it further).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// A provider can ask for at most this much patience through headers; more is clamped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much of an error body is kept in `last_error`.
const MAX_REASON_CHARS: usize = 200;
/// A whole failure reason (our words around the provider's) is cut at this length.
const MAX_FAILURE_CHARS: usize = 400;

/// A successful token answer, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAnswer {
    pub access_token: Secret,
    pub token_type: String,
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<i64>,
    pub scope: Option<String>,
    /// The provider's issue time (NationBuilder sends it), unix seconds, not yet trusted.
    pub created_at: Option<i64>,
    /// How long the refresh token lives, where the provider says (`refresh_token_expires_in`).
    pub refresh_token_expires_in: Option<i64>,
    /// Every other field of the answer, as sent; which of them are kept is the credential's
    /// choice ([`select_extras`]).
    pub extra: serde_json::Map<String, Value>,
}

/// The fields [`parse_token_json`] reads itself; everything else is an extra.
const KNOWN_FIELDS: &[&str] = &[
    "access_token",
    "token_type",
    "refresh_token",
    "expires_in",
    "scope",
    "created_at",
    "refresh_token_expires_in",
    "error",
    "error_description",
];
/// Extras kept for one credential, as JSON: enough for account lists, small enough for a sink.
pub const MAX_EXTRA_BYTES: usize = 16 * 1024;
/// A string inside kept extras is cut at this many characters.
const MAX_EXTRA_STRING_CHARS: usize = 1024;

/// Whether an answer field may never be kept as an extra: tokens and secrets stay where tokend
/// guards them, and the fields tokend stores itself are not duplicated.
pub fn is_forbidden_extra(field: &str) -> bool {
    let lower = field.to_ascii_lowercase();
    KNOWN_FIELDS.contains(&lower.as_str())
        || lower.ends_with("token")
        || lower.contains("secret")
        || lower.contains("password")
        || lower == "code"
}

/// The extras of `answer` named in `keep`, cleaned (control characters out, strings bounded) and
/// serialized; `Ok(None)` when the answer carries none of them, `Err` when they are too large.
pub fn select_extras(answer: &TokenAnswer, keep: &[String]) -> Result<Option<String>, String> {
    let mut kept = serde_json::Map::new();
    for field in keep {
        if let Some(value) = answer.extra.get(field) {
            kept.insert(field.clone(), cleaned(value));
        }
    }
    if kept.is_empty() {
        return Ok(None);
    }
    let text = Value::Object(kept).to_string();
    if text.len() > MAX_EXTRA_BYTES {
        return Err(format!("the answer's extras are {} bytes, more than {MAX_EXTRA_BYTES}", text.len()));
    }
    Ok(Some(text))
}

fn cleaned(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::String(crate::redact::clean_text(s, MAX_EXTRA_STRING_CHARS)),
        Value::Array(items) => Value::Array(items.iter().map(cleaned).collect()),
        Value::Object(map) => Value::Object(
            map.iter().map(|(k, v)| (crate::redact::clean_text(k, MAX_EXTRA_STRING_CHARS), cleaned(v))).collect(),
        ),
        other => other.clone(),
    }
}

/// Why a refresh did not produce a token, in the classes that decide what happens next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Connect error, timeout, 5xx, 429: try again later, no sooner than `retry_after`.
    Transient { reason: String, retry_after: Option<Duration> },
    /// The provider rejected the grant or the client (`invalid_grant`, 400/401…): the credential
    /// needs a human. Retrying would only hammer the provider.
    Permanent { reason: String },
    /// The endpoint answered something tokend will not store (garbage 2xx, redirect, 404…): the
    /// stored state is kept untouched and the attempt is retried with backoff, loudly.
    Rejected { reason: String },
}

impl Failure {
    /// The same failure with its reason rewritten.
    pub fn map_reason(self, f: impl FnOnce(String) -> String) -> Failure {
        match self {
            Failure::Transient { reason, retry_after } => Failure::Transient { reason: f(reason), retry_after },
            Failure::Permanent { reason } => Failure::Permanent { reason: f(reason) },
            Failure::Rejected { reason } => Failure::Rejected { reason: f(reason) },
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Failure::Transient { reason, .. } | Failure::Permanent { reason } | Failure::Rejected { reason } => reason,
        }
    }
}

/// Raw JSON shape; every field loose so that type problems get our own precise message.
#[derive(Deserialize)]
struct WireAnswer {
    access_token: Option<Value>,
    token_type: Option<Value>,
    refresh_token: Option<Value>,
    expires_in: Option<Value>,
    scope: Option<Value>,
    created_at: Option<Value>,
    refresh_token_expires_in: Option<Value>,
    error: Option<Value>,
    error_description: Option<Value>,
}

/// Parses a token-endpoint JSON answer (what `tokend import` reads, and the body of a 2xx).
pub fn parse_token_json(body: &[u8]) -> Result<TokenAnswer, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("answer is not UTF-8 ({e})"))?;
    let wire: WireAnswer =
        serde_json::from_str(text).map_err(|e| format!("answer is not a JSON token object: {}", json_error(&e)))?;
    if let Some(error) = wire.error.as_ref().and_then(Value::as_str) {
        let desc = wire.error_description.as_ref().and_then(Value::as_str).unwrap_or("");
        return Err(format!("answer is an OAuth error: {error} {desc}").trim_end().to_string());
    }
    let access_token = token_field(wire.access_token.as_ref(), "access_token")?
        .ok_or_else(|| "answer has no \"access_token\"".to_string())?;
    let refresh_token = token_field(wire.refresh_token.as_ref(), "refresh_token")?;
    let token_type = match &wire.token_type {
        None | Some(Value::Null) => "Bearer".to_string(),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_graphic()) => {
            s.clone()
        }
        Some(other) => return Err(format!("\"token_type\" must be a short word, got {}", describe(other))),
    };
    let expires_in = match integer_field(wire.expires_in.as_ref(), "expires_in")? {
        None => None,
        Some(n) if (1..=MAX_EXPIRES_IN_SECS).contains(&n) => Some(n),
        Some(n) => return Err(format!("\"expires_in\" is {n}; expected 1 to {MAX_EXPIRES_IN_SECS} seconds")),
    };
    let created_at = match integer_field(wire.created_at.as_ref(), "created_at")? {
        Some(n) if n < 0 => return Err(format!("\"created_at\" is {n}; expected a unix timestamp")),
        other => other,
    };
    let scope = match &wire.scope {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            Some(items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "))
        }
        Some(other) => return Err(format!("\"scope\" must be a string, got {}", describe(other))),
    };
    if scope.as_ref().is_some_and(|s| s.chars().any(char::is_control)) {
        return Err("\"scope\" contains control characters".into());
    }
    // A bad refresh-token lifetime only loses a warning, never the token: it is ignored.
    let refresh_token_expires_in = integer_field(wire.refresh_token_expires_in.as_ref(), "refresh_token_expires_in")
        .ok()
        .flatten()
        .filter(|n| (1..=MAX_EXPIRES_IN_SECS).contains(n));
    // The same text again, as a map, for the fields tokend does not read itself (bounded by the
    // answer size limit; a few microseconds).
    let mut extra: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap_or_default();
    extra.retain(|k, _| !KNOWN_FIELDS.contains(&k.as_str()));
    Ok(TokenAnswer {
        access_token,
        token_type,
        refresh_token,
        expires_in,
        scope,
        created_at,
        refresh_token_expires_in,
        extra,
    })
}

fn json_error(e: &serde_json::Error) -> String {
    // serde_json's messages quote at most a field name or a type, never a whole value.
    e.to_string()
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn token_field(v: Option<&Value>, name: &str) -> Result<Option<Secret>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(format!("\"{name}\" is empty")),
        Some(Value::String(s)) if s.len() > MAX_TOKEN_LEN => {
            Err(format!("\"{name}\" is longer than {MAX_TOKEN_LEN} bytes"))
        }
        Some(Value::String(s)) if !s.chars().all(|c| c.is_ascii_graphic()) => {
            Err(format!("\"{name}\" contains whitespace, control or non-ASCII characters"))
        }
        Some(Value::String(s)) => Ok(Some(Secret::new(s.clone()))),
        Some(other) => Err(format!("\"{name}\" must be a string, got {}", describe(other))),
    }
}

fn integer_field(v: Option<&Value>, name: &str) -> Result<Option<i64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().map(Some).ok_or_else(|| format!("\"{name}\" must be a whole number of seconds, got {n}"))
        }
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("\"{name}\" must be a whole number of seconds, got a non-numeric string")),
        Some(other) => Err(format!("\"{name}\" must be a number, got {}", describe(other))),
    }
}

/// Classifies an answer. Every secret of the request (`scrubber`) is taken out of any provider
/// text kept in the reason — before it is cut to length, so no prefix of one survives — and the
/// text is made safe for terminals, logs, the database and hook environments.
pub fn interpret(answer: &RawAnswer, now_secs: i64, scrubber: &Scrubber) -> Result<TokenAnswer, Failure> {
    classify(answer, now_secs, scrubber)
        .map_err(|failure| failure.map_reason(|r| scrubber.clean(&r, MAX_FAILURE_CHARS)))
}

fn classify(answer: &RawAnswer, now_secs: i64, scrubber: &Scrubber) -> Result<TokenAnswer, Failure> {
    let status = answer.status;
    let body_text = || scrubber.clean(&String::from_utf8_lossy(&answer.body), MAX_REASON_CHARS);
    match status {
        200..=299 => parse_token_json(&answer.body).map_err(|reason| {
            if oauth_error_code(&answer.body).is_some_and(is_grant_dead) {
                Failure::Permanent { reason: format!("HTTP {status} with {reason}") }
            } else {
                Failure::Rejected { reason: format!("HTTP {status} but {reason}; stored token kept") }
            }
        }),
        429 => Err(Failure::Transient {
            reason: format!("rate limited (HTTP 429): {}", body_text()),
            retry_after: Some(wait_hint(answer, now_secs).unwrap_or(DEFAULT_RETRY_AFTER)),
        }),
        408 | 500..=599 => Err(Failure::Transient {
            reason: format!("HTTP {status}: {}", body_text()),
            retry_after: wait_hint(answer, now_secs),
        }),
        300..=399 => Err(Failure::Rejected {
            reason: format!(
                "token endpoint redirected (HTTP {status}) to {}; redirects are not followed with credentials, set token_url to the final address",
                answer.location.as_deref().unwrap_or("nowhere")
            ),
        }),
        400 | 401 => {
            let code = oauth_error_code(&answer.body).unwrap_or("no OAuth error code");
            Err(Failure::Permanent { reason: format!("HTTP {status} {code}: {}", body_text()) })
        }
        _ => match oauth_error_code(&answer.body) {
            Some(code) if is_grant_dead(code) => {
                Err(Failure::Permanent { reason: format!("HTTP {status} {code}: {}", body_text()) })
            }
            _ => Err(Failure::Rejected { reason: format!("HTTP {status}: {}; stored token kept", body_text()) }),
        },
    }
}

/// The RFC 6749 §5.2 codes that mean the grant or the client is dead: only a human can help.
fn is_grant_dead(code: &str) -> bool {
    matches!(code, "invalid_grant" | "invalid_client" | "unauthorized_client" | "unsupported_grant_type")
}

fn oauth_error_code(body: &[u8]) -> Option<&str> {
    #[derive(Deserialize)]
    struct ErrorOnly<'a> {
        #[serde(borrow)]
        error: Option<&'a str>,
    }
    serde_json::from_slice::<ErrorOnly>(body).ok()?.error
}

/// How long the provider asked us to wait: `Retry-After` (seconds or HTTP date), else the
/// `X-RateLimit-Reset` of an exhausted budget. Clamped to [`MAX_RETRY_AFTER`].
pub fn wait_hint(answer: &RawAnswer, now_secs: i64) -> Option<Duration> {
    let from_retry_after = answer.retry_after.as_deref().and_then(|v| {
        let v = v.trim();
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        let when = humantime::parse_rfc3339_weak(v).ok().or_else(|| httpdate_to_system_time(v))?;
        let when = when.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        Some(Duration::from_secs(when.saturating_sub(u64::try_from(now_secs).unwrap_or(0))))
    });
    let wait = from_retry_after.or_else(|| rate_limit_reset_in(answer, now_secs, false))?;
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Time until `X-RateLimit-Reset`. With `only_if_exhausted`, only when `X-RateLimit-Remaining`
/// is 0 (a successful answer that spent the last request); otherwise whenever the budget is not
/// explicitly positive (a 429 that only names the reset time).
pub fn rate_limit_reset_in(answer: &RawAnswer, now_secs: i64, only_if_exhausted: bool) -> Option<Duration> {
    let remaining = answer.ratelimit_remaining.as_deref().and_then(|v| v.trim().parse::<u64>().ok());
    let exhausted = if only_if_exhausted { remaining == Some(0) } else { remaining.is_none_or(|r| r == 0) };
    if !exhausted {
        return None;
    }
    let reset: i64 = answer.ratelimit_reset.as_deref()?.trim().parse().ok()?;
    // Nudge sends an epoch timestamp; some APIs send seconds-until. Anything before 2001 is a delta.
    let secs = if reset > 1_000_000_000 { reset - now_secs } else { reset };
    Some(Duration::from_secs(u64::try_from(secs.max(0)).unwrap_or(0)).min(MAX_RETRY_AFTER))
}

/// `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT` (RFC 9110 IMF-fixdate).
fn httpdate_to_system_time(v: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else { return None };
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| m == month)?
        + 1;
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{:0>2}T{time}Z", day)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(status: u16, body: &str) -> RawAnswer {
        RawAnswer {
            status,
            body: body.as_bytes().to_vec(),
            retry_after: None,
            ratelimit_remaining: None,
            ratelimit_reset: None,
            location: None,
        }
    }

    #[test]
    fn parses_nationbuilder_answer() {
        let a = parse_token_json(br#"{"access_token":"AT1","refresh_token":"RT1","token_type":"Bearer","expires_in":86400,"scope":"default","created_at":1632773996}"#).unwrap();
        assert_eq!(a.access_token.expose(), "AT1");
        assert_eq!(a.refresh_token.unwrap().expose(), "RT1");
        assert_eq!(a.expires_in, Some(86400));
        assert_eq!(a.created_at, Some(1_632_773_996));
        assert_eq!(a.scope.as_deref(), Some("default"));
    }

    #[test]
    fn parses_wild_apricot_answer_without_created_at() {
        let a = parse_token_json(br#"{"access_token":"2YotnFZFEjr1zCsicMWpAA","token_type":"Bearer","expires_in":1800,"refresh_token":"tGzv3JOkF0XG5Qx2TlKWIA","permissions":[{"accountId":123}]}"#).unwrap();
        assert_eq!(a.created_at, None);
        assert_eq!(a.expires_in, Some(1800));
        let kept = select_extras(&a, &["permissions".into()]).unwrap().unwrap();
        assert_eq!(kept, r#"{"permissions":[{"accountId":123}]}"#);
        assert_eq!(select_extras(&a, &["other".into()]).unwrap(), None);
    }

    #[test]
    fn extras_are_cleaned_bounded_and_never_tokens() {
        let a = parse_token_json(
            br#"{"access_token":"a1","refresh_token_expires_in":7200,"org":"x\u001b[2Jy","big":"BIG"}"#,
        )
        .unwrap();
        assert_eq!(a.refresh_token_expires_in, Some(7200));
        assert_eq!(select_extras(&a, &["org".into()]).unwrap().unwrap(), r#"{"org":"x [2Jy"}"#);
        assert!(!a.extra.contains_key("access_token"));
        let huge = format!(r#"{{"access_token":"a1","list":[{}]}}"#, vec!["\"0123456789\""; 2000].join(","));
        let a = parse_token_json(huge.as_bytes()).unwrap();
        assert!(select_extras(&a, &["list".into()]).unwrap_err().contains("more than"));
        for field in ["id_token", "access_token", "client_secret", "Password", "expires_in", "code"] {
            assert!(is_forbidden_extra(field), "{field}");
        }
        assert!(!is_forbidden_extra("permissions"));
    }

    #[test]
    fn v1_answer_has_no_lifetime() {
        let a = parse_token_json(
            br#"{"access_token":"v1tok","token_type":"bearer","scope":"default","created_at":1632773996}"#,
        )
        .unwrap();
        assert_eq!((a.expires_in, a.refresh_token), (None, None));
    }

    #[test]
    fn lenient_where_providers_vary() {
        let a = parse_token_json(br#"{"access_token":"x1","expires_in":"3600","scope":["read","write"]}"#).unwrap();
        assert_eq!(a.expires_in, Some(3600));
        assert_eq!(a.scope.as_deref(), Some("read write"));
        assert_eq!(a.token_type, "Bearer");
    }

    #[test]
    fn each_bad_answer_gets_its_own_message() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe", "not UTF-8"),
            (b"<html>oops</html>", "not a JSON token object"),
            (br#"{"token_type":"Bearer"}"#, "no \"access_token\""),
            (br#"{"access_token":""}"#, "\"access_token\" is empty"),
            (br#"{"access_token":42}"#, "\"access_token\" must be a string, got a number"),
            (br#"{"access_token":"a b"}"#, "contains whitespace"),
            (br#"{"access_token":"a\nTOKEND_X=1"}"#, "contains whitespace"),
            (br#"{"access_token":"a","expires_in":-5}"#, "\"expires_in\" is -5"),
            (br#"{"access_token":"a","expires_in":0}"#, "\"expires_in\" is 0"),
            (br#"{"access_token":"a","expires_in":99999999999}"#, "\"expires_in\" is 99999999999"),
            (br#"{"access_token":"a","expires_in":1.5}"#, "whole number"),
            (br#"{"access_token":"a","expires_in":"soon"}"#, "non-numeric string"),
            (br#"{"access_token":"a","created_at":-1}"#, "\"created_at\" is -1"),
            (br#"{"access_token":"a","access_token":"b"}"#, "duplicate field"),
            (br#"{"access_token":"a","scope":7}"#, "\"scope\" must be a string"),
            (br#"{"error":"invalid_grant","error_description":"revoked"}"#, "OAuth error: invalid_grant revoked"),
            (br#"[1,2]"#, "not a JSON token object"),
        ];
        for (body, expected) in cases {
            let err = parse_token_json(body).unwrap_err();
            assert!(err.contains(expected), "{:?}: got {err:?}, want {expected:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn failure_classes() {
        let now = 1_700_000_000;
        assert!(matches!(interpret(&raw(503, "down"), now, &Scrubber::default()), Err(Failure::Transient { .. })));
        assert!(matches!(
            interpret(&raw(400, r#"{"error":"invalid_grant"}"#), now, &Scrubber::default()),
            Err(Failure::Permanent { .. })
        ));
        assert!(matches!(
            interpret(&raw(401, r#"{"error":"invalid_client"}"#), now, &Scrubber::default()),
            Err(Failure::Permanent { .. })
        ));
        assert!(matches!(interpret(&raw(200, "not json"), now, &Scrubber::default()), Err(Failure::Rejected { .. })));
        assert!(matches!(
            interpret(&raw(200, r#"{"error":"invalid_grant"}"#), now, &Scrubber::default()),
            Err(Failure::Permanent { .. })
        ));
        assert!(matches!(interpret(&raw(302, ""), now, &Scrubber::default()), Err(Failure::Rejected { .. })));
        assert!(matches!(interpret(&raw(404, "nope"), now, &Scrubber::default()), Err(Failure::Rejected { .. })));
        let mut limited = raw(429, "slow down");
        limited.retry_after = Some("17".into());
        assert_eq!(
            interpret(&limited, now, &Scrubber::default()),
            Err(Failure::Transient {
                reason: "rate limited (HTTP 429): slow down".into(),
                retry_after: Some(Duration::from_secs(17))
            })
        );
        let mut nudge = raw(429, "");
        nudge.ratelimit_remaining = Some("0".into());
        nudge.ratelimit_reset = Some((now + 120).to_string());
        let Err(Failure::Transient { retry_after, .. }) = interpret(&nudge, now, &Scrubber::default()) else {
            panic!()
        };
        assert_eq!(retry_after, Some(Duration::from_secs(120)));
    }

    #[test]
    fn retry_after_http_date() {
        let mut a = raw(503, "");
        a.retry_after = Some("Wed, 15 Nov 2023 22:15:00 GMT".into());
        // 2023-11-15T22:13:20Z is 1700086400
        assert_eq!(wait_hint(&a, 1_700_086_400), Some(Duration::from_secs(100)));
    }

    #[test]
    fn error_bodies_are_scrubbed_of_secrets() {
        let err = interpret(
            &raw(400, r#"{"error":"invalid_grant","error_description":"token RT-secret-1 revoked"}"#),
            0,
            &Scrubber::new(&["RT-secret-1"]),
        )
        .unwrap_err();
        assert!(!err.reason().contains("RT-secret-1"), "{}", err.reason());
    }
}
