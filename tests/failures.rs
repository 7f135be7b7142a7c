//! ARCHITECTURE.md "Failure classes": what each kind of answer does to the stored state and the
//! exit code — on either store (tests/support/backend.rs): every body runs on SQLite and on
//! PostgreSQL.

mod support;

use support::{Backend, World};
use tokend::dev::mock::{Fault, MockSettings};

const TEMPORARY: i32 = 7;
const NEEDS_REAUTH: i32 = 5;

on_both_backends!(
    server_error_is_transient,
    rate_limit_with_retry_after_is_transient,
    connection_dropped_before_rotation_is_transient,
    garbage_and_oversized_success_bodies_are_never_stored,
    redirect_is_not_followed,
    invalid_grant_marks_needs_reauth_and_stops_asking,
    expired_token_is_not_shown_as_valid,
    slow_loris_answer_is_cut_off_by_the_request_timeout,
    answer_lost_after_rotation_is_flagged_not_hidden,
);

async fn world(backend: Backend) -> (World, String) {
    let w = World::on(backend, MockSettings::default()).await;
    w.write_config(
        r#"
[[credential]]
name = "c"
provider = "oauth2"
token_url = "{mock}/token"
client_id = "id"
client_secret = "secret"
"#,
    );
    w.authorize_and_import("c").await;
    let access = w.show("c").await.stdout;
    (w, access)
}

fn answer(status: u16, body: &str, headers: &[(&str, &str)]) -> Fault {
    Fault::Answer {
        status,
        body: body.into(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// The failure left the token as it was, and the next refresh works with the same refresh token.
async fn state_kept_and_recovers(w: &World, access: &str) {
    assert_eq!(w.show("c").await.stdout, access, "stored access token must not change");
    let row = w.row("c").await;
    assert_eq!((row["status"].as_str(), row["generation"].as_i64()), (Some("active"), Some(1)));
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, 0, "recovery: {}", run.stderr);
    assert_eq!(w.row("c").await["generation"], 2);
}

async fn server_error_is_transient(backend: Backend) {
    let (w, access) = world(backend).await;
    w.mock.push_fault(answer(503, "maintenance", &[]));
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, TEMPORARY, "{}", run.stderr);
    assert!(run.stderr.contains("HTTP 503: maintenance"), "{}", run.stderr);
    assert_eq!(w.row("c").await["last_error"], "HTTP 503: maintenance");
    state_kept_and_recovers(&w, &access).await;
}

async fn rate_limit_with_retry_after_is_transient(backend: Backend) {
    let (w, access) = world(backend).await;
    w.mock.push_fault(answer(429, r#"{"error":"slow_down"}"#, &[("Retry-After", "120")]));
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, TEMPORARY, "{}", run.stderr);
    assert!(run.stderr.contains("rate limited (HTTP 429)"), "{}", run.stderr);
    state_kept_and_recovers(&w, &access).await;
}

async fn connection_dropped_before_rotation_is_transient(backend: Backend) {
    let (w, access) = world(backend).await;
    w.mock.push_fault(Fault::DropBeforeRotate);
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, TEMPORARY, "{}", run.stderr);
    state_kept_and_recovers(&w, &access).await;
}

async fn garbage_and_oversized_success_bodies_are_never_stored(backend: Backend) {
    let (w, access) = world(backend).await;
    for (fault, expect) in [
        (answer(200, "<html>proxy error</html>", &[("Content-Type", "text/html")]), "not a JSON token object"),
        (answer(200, r#"{"token_type":"Bearer"}"#, &[]), "no \"access_token\""),
        (answer(200, r#"{"access_token":"x\ny"}"#, &[]), "contains whitespace"),
        (Fault::Huge(5 * 1024 * 1024), "more than 65536 bytes"),
    ] {
        w.mock.push_fault(fault);
        let run = w.tokend(&["refresh", "c"], None).await;
        assert_eq!(run.code, TEMPORARY, "{}", run.stderr);
        assert!(run.stderr.contains(expect), "want {expect:?} in {}", run.stderr);
        assert_eq!(w.show("c").await.stdout, access);
    }
    state_kept_and_recovers(&w, &access).await;
}

async fn redirect_is_not_followed(backend: Backend) {
    let (w, access) = world(backend).await;
    w.mock.push_fault(answer(307, "", &[("Location", "http://127.0.0.1:9/elsewhere")]));
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, TEMPORARY, "{}", run.stderr);
    assert!(run.stderr.contains("redirected (HTTP 307) to http://127.0.0.1:9/elsewhere"), "{}", run.stderr);
    assert_eq!(w.mock.requests().len(), 1);
    state_kept_and_recovers(&w, &access).await;
}

async fn invalid_grant_marks_needs_reauth_and_stops_asking(backend: Backend) {
    let (w, _) = world(backend).await;
    w.mock.push_fault(answer(400, r#"{"error":"invalid_grant","error_description":"revoked"}"#, &[]));
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, NEEDS_REAUTH, "{}", run.stderr);
    assert_eq!(w.row("c").await["status"], "needs_reauth");
    let show = w.show("c").await;
    assert_eq!(show.code, NEEDS_REAUTH);
    assert!(show.stderr.contains("needs re-authorization"), "{}", show.stderr);
    assert_eq!(show.stdout, "");

    // A dead credential is not sent to the provider again…
    let again = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(again.code, NEEDS_REAUTH);
    assert_eq!(w.mock.requests().len(), 1);
    // …until a human imports a new token.
    w.authorize_and_import("c").await;
    assert_eq!(w.row("c").await["status"], "active");
    assert_eq!(w.tokend(&["refresh", "c"], None).await.code, 0);
}

async fn expired_token_is_not_shown_as_valid(backend: Backend) {
    let w = World::on(backend, MockSettings::default()).await;
    w.write_config(
        "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/t\"\nclient_id = \"i\"\n",
    );
    let old = r#"{"access_token":"old-token","refresh_token":"r","expires_in":3600,"created_at":1600000000}"#;
    assert_eq!(w.tokend(&["import", "c"], Some(old)).await.code, 0);
    let show = w.show("c").await;
    assert_eq!(show.code, 6);
    assert!(show.stderr.contains("access token expired at 2020-09-13T13:26:40Z"), "{}", show.stderr);
    assert_eq!(show.stdout, "");
    assert_eq!(w.row("c").await["status"], "expired");
}

async fn slow_loris_answer_is_cut_off_by_the_request_timeout(backend: Backend) {
    let w = World::on(backend, MockSettings::default()).await;
    w.write_config_with_daemon(
        "request_timeout = \"1s\"\n",
        "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
    );
    w.authorize_and_import("c").await;
    let access = w.show("c").await.stdout;
    // A whole valid answer, one byte every 100 ms: ~25 s if we waited.
    w.mock.push_fault(Fault::SlowLoris(std::time::Duration::from_millis(100)));
    let started = std::time::Instant::now();
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, TEMPORARY, "{}", run.stderr);
    assert!(run.stderr.contains("timed out"), "{}", run.stderr);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    // The provider did rotate (the answer was on its way): the next try uses the stored, now
    // revoked token and is told so — the credential is flagged, loudly, never silently reused.
    let next = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(next.code, NEEDS_REAUTH, "{}", next.stderr);
    assert!(next.stderr.contains("invalid_grant"), "{}", next.stderr);
    assert_eq!(w.show("c").await.code, NEEDS_REAUTH);
    assert_ne!(access, "");
}

async fn answer_lost_after_rotation_is_flagged_not_hidden(backend: Backend) {
    let (w, _) = world(backend).await;
    w.mock.push_fault(Fault::DropAfterRotate);
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, TEMPORARY, "{}", run.stderr);
    assert_eq!(w.mock.lost_in_transit().len(), 1);
    let next = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(next.code, NEEDS_REAUTH, "{}", next.stderr);
    let row = w.row("c").await;
    assert_eq!(row["status"], "needs_reauth");
    assert!(row["last_error"].as_str().unwrap().contains("refresh token already used"), "{row}");
}
