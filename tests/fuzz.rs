//! Hostile input, property-based (proptest, bounded case counts): the token-answer parser, the
//! answer classifier and the config parser never panic, and whatever they accept is safe to store
//! and to write into a file. Five properties × `CASES` inputs each per run.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use tokend::provider::{RawAnswer, interpret, parse_token_json};

const CASES: u32 = 4000;

fn accepted_answer_is_safe(bytes: &[u8]) {
    if let Ok(a) = parse_token_json(bytes) {
        assert!(!a.access_token.expose().is_empty());
        assert!(a.access_token.expose().chars().all(|c| c.is_ascii_graphic()), "storable and writable into any sink");
        if let Some(r) = &a.refresh_token {
            assert!(r.expose().chars().all(|c| c.is_ascii_graphic()));
        }
        if let Some(e) = a.expires_in {
            assert!((1..=tokend::provider::MAX_EXPIRES_IN_SECS).contains(&e));
        }
        assert!(a.created_at.is_none_or(|c| c >= 0));
    }
}

/// JSON values of every type, including the awkward ones.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| serde_json::json!(f)),
        ".{0,40}".prop_map(serde_json::Value::String),
        "[a-zA-Z0-9._~+/-]{1,40}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const ANSWER_KEYS: [&str; 8] =
    ["access_token", "refresh_token", "token_type", "expires_in", "scope", "created_at", "error", "error_description"];

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_answer_parser(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        accepted_answer_is_safe(&bytes);
    }

    #[test]
    fn answer_shaped_objects_with_any_field_types(fields in prop::collection::btree_map(prop::sample::select(&ANSWER_KEYS[..]), any_json(), 0..8)) {
        let object: serde_json::Map<String, serde_json::Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        accepted_answer_is_safe(serde_json::Value::Object(object).to_string().as_bytes());
    }

    #[test]
    fn any_status_headers_and_body_are_classified(
        status in 100u16..600,
        body in prop::collection::vec(any::<u8>(), 0..256),
        retry_after in proptest::option::of(".{0,30}"),
        remaining in proptest::option::of(".{0,12}"),
        reset in proptest::option::of("-?[0-9]{0,20}"),
    ) {
            let raw = RawAnswer { status, body, retry_after, ratelimit_remaining: remaining, ratelimit_reset: reset, location: None };
        if let Err(f) = interpret(&raw, 1_700_000_000, &tokend::redact::Scrubber::new(&["secret-value"])) {
            prop_assert!(!f.reason().contains("secret-value"));
            prop_assert!(!f.reason().chars().any(char::is_control), "{:?}", f.reason());
        }
    }

    #[test]
    fn arbitrary_text_never_panics_the_config_parser(text in ".{0,400}") {
            let env = BTreeMap::new();
        if let Err(e) = tokend::config::parse_with(Path::new("/etc/tokend/fuzz.toml"), &text, &env) {
            for line in e.to_string().lines() {
                prop_assert!(line.starts_with("/etc/tokend/fuzz.toml: "), "{line}");
            }
        }
    }

    #[test]
    fn credential_tables_with_wrong_values_get_named_errors(
        values in prop::collection::btree_map(
            prop::sample::select(&["name", "provider", "client_id", "client_secret", "slug", "base_url", "token_url", "auth", "scope", "refresh_at", "refresh_cron", "api_key", "hook_timeout"][..]),
            prop_oneof![
                ".{0,20}".prop_map(|s| format!("{s:?}")),
                any::<i64>().prop_map(|n| n.to_string()),
                Just("true".to_string()),
                Just("[1, \"a\"]".to_string()),
                Just("{ x = 1 }".to_string()),
            ],
            0..10,
        )
    ) {
            let mut text = String::from("[[credential]]\n");
        for (k, v) in &values {
            text.push_str(&format!("{k} = {v}\n"));
        }
        let env = BTreeMap::new();
        match tokend::config::parse_with(Path::new("/etc/tokend/fuzz.toml"), &text, &env) {
            Ok(c) => prop_assert_eq!(c.credentials.len(), 1),
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.is_empty());
                for line in text.lines() {
                    prop_assert!(line.starts_with("/etc/tokend/fuzz.toml: "), "{line}");
                }
            }
        }
    }
}
