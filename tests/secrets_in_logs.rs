//! No token or secret appears in full in any log line, at any level, on success or failure.

mod support;

use support::World;
use tokend::dev::mock::{Fault, MockSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_carry_tokens_or_secrets() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        r#"
[[credential]]
name = "c"
provider = "oauth2"
token_url = "{mock}/token"
client_id = "id"
client_secret = "client-secret-0123456789"
"#,
    );
    let first = w.authorize_and_import("c").await;
    let mut logs = String::new();
    let mut run = |r: support::Run| {
        logs.push_str(&r.stderr);
        logs.push_str(&r.stdout);
    };
    for format in ["text", "json"] {
        run(w.tokend_env(&["--log-format", format, "refresh", "c"], None, &[("RUST_LOG", "trace")]).await);
    }
    // Failures whose bodies echo the refresh token back must not leak it either.
    let live = w.mock.live_refresh_token("c").unwrap();
    w.mock.push_fault(Fault::Answer {
        status: 400,
        body: format!(r#"{{"error":"invalid_grant","error_description":"token {live} is revoked"}}"#),
        headers: vec![],
    });
    run(w.tokend_env(&["refresh", "c"], None, &[("RUST_LOG", "trace")]).await);
    run(w.tokend_env(&["list"], None, &[("RUST_LOG", "trace")]).await);

    assert!(logs.contains("refreshed"), "the logs were captured: {logs}");
    assert!(logs.lines().count() > 10, "trace level produced output");
    let mut secrets = vec!["client-secret-0123456789".to_string(), live];
    secrets.push(first["access_token"].as_str().unwrap().into());
    secrets.push(first["refresh_token"].as_str().unwrap().into());
    for r in w.mock.requests() {
        secrets.extend(r.field("refresh_token"));
    }
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "secret {} leaked into logs", tokend::redact::fingerprint(s));
    }
    assert!(
        logs.contains(&tokend::redact::fingerprint(first["refresh_token"].as_str().unwrap())) || logs.contains("fp:")
    );
}
