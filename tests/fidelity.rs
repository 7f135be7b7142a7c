//! What provider answers carry reaches scripts; rate limits pause the budget the provider means;
//! a human hears about re-authorization before it bites, again while it is needed, and when it is
//! over. Each against the strict mock, with the real `tokend` binary.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::{World, wait_for};
use tokend::dev::mock::{Fault, MockSettings};

/// A hook that appends one line per event: time (ms), event, credential, then the variables a
/// script would use.
fn event_hook(w: &World) -> String {
    let script = w.path("hook.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"$(date +%s%3N) $TOKEND_EVENT $TOKEND_CREDENTIAL id=${TOKEND_ACCOUNT_ID:--} ids=${TOKEND_ACCOUNT_IDS:--} deadline=${TOKEND_REAUTH_DEADLINE:--} extra=${TOKEND_EXTRA:--}\" >> events.log\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script.display().to_string()
}

fn events(w: &World) -> Vec<String> {
    std::fs::read_to_string(w.path("events.log")).unwrap_or_default().lines().map(String::from).collect()
}

fn events_of(w: &World, event: &str, credential: &str) -> Vec<String> {
    events(w)
        .into_iter()
        .filter(|l| l.split(' ').nth(1) == Some(event) && l.split(' ').nth(2) == Some(credential))
        .collect()
}

fn read(w: &World, file: &str) -> String {
    std::fs::read_to_string(w.path(file)).unwrap_or_default()
}

fn account(id: u64) -> serde_json::Value {
    serde_json::json!({"accountId": id, "availableScopes": ["contacts_view", "events_view"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wild_apricot_accounts_reach_sinks_hooks_show_and_list() {
    let one = serde_json::json!({"permissions": [account(123)]});
    let w = World::new(MockSettings {
        expires_in: 3,
        send_created_at: false,
        answer_extras: Some(one),
        ..MockSettings::default()
    })
    .await;
    std::fs::create_dir(w.path("out")).unwrap();
    let hook = event_hook(&w);
    w.write_config(&format!(
        "[[credential]]\nname = \"wa\"\nprovider = \"wildapricot\"\ntoken_url = \"{{mock}}/auth/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\non_refresh = [\"{hook}\"]\n[[credential.sink]]\npath = \"out/wa.json\"\nformat = \"json\"\n[[credential.sink]]\npath = \"out/wa.env\"\nformat = \"env\"\n"
    ));
    w.authorize_and_import("wa").await;

    let shown = w.tokend(&["show", "wa", "--json"], None).await;
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(shown["extra"]["permissions"][0]["accountId"], 123, "{shown}");
    assert_eq!(w.row("wa").await["extra"]["permissions"][0]["availableScopes"][1], "events_view");

    let mut daemon = w.start_daemon().await;
    assert!(
        wait_for(Duration::from_secs(10), || w.generation("wa") >= 2 && read(&w, "out/wa.env").contains("ACCOUNT_ID="))
            .await,
        "{}",
        daemon.log_text()
    );
    let env = read(&w, "out/wa.env");
    assert!(env.contains("TOKEND_WA_ACCOUNT_IDS='123'\n") && env.contains("TOKEND_WA_ACCOUNT_ID='123'\n"), "{env}");
    let json: serde_json::Value = serde_json::from_str(&read(&w, "out/wa.json")).unwrap();
    assert_eq!(json["extra"]["permissions"][0]["accountId"], 123, "{json}");
    assert!(wait_for(Duration::from_secs(5), || !events_of(&w, "refreshed", "wa").is_empty()).await);
    let line = events_of(&w, "refreshed", "wa").remove(0);
    assert!(line.contains(" id=123 ids=123 ") && line.contains("\"accountId\":123"), "{line}");

    // The token now acts for two accounts: the list grows, the single id goes away.
    let two = serde_json::json!({"permissions": [account(123), account(456)]});
    w.mock.set_settings(MockSettings {
        expires_in: 3,
        send_created_at: false,
        answer_extras: Some(two),
        ..MockSettings::default()
    });
    assert!(
        wait_for(Duration::from_secs(10), || read(&w, "out/wa.env").contains("ACCOUNT_IDS='123,456'")).await,
        "{}",
        read(&w, "out/wa.env")
    );
    let env = read(&w, "out/wa.env");
    assert!(!env.contains("ACCOUNT_ID="), "one id only when there is exactly one account: {env}");
    let json: serde_json::Value = serde_json::from_str(&read(&w, "out/wa.json")).unwrap();
    assert_eq!(json["extra"]["permissions"][1]["accountId"], 456, "{json}");
    assert!(
        wait_for(Duration::from_secs(5), || events_of(&w, "refreshed", "wa")
            .iter()
            .any(|l| l.contains(" id=- ids=123,456 ")))
        .await,
        "{:?}",
        events(&w)
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_keeps_the_named_fields_and_never_a_token() {
    let extras = serde_json::json!({"org_id": "o-77", "id_token": "jwt-secret-value", "user": {"id": 5}});
    let w = World::new(MockSettings { answer_extras: Some(extras), ..MockSettings::default() }).await;
    let credential = "[[credential]]\nname = \"g\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
    let sink = "[[credential.sink]]\npath = \"g.env\"\nformat = \"env\"\n";

    w.write_config(&format!("{credential}extra_fields = [\"org_id\", \"id_token\"]\n{sink}"));
    let check = w.tokend(&["check"], None).await;
    assert_eq!(check.code, 3, "{}", check.stderr);
    assert!(
        check
            .stderr
            .contains("field \"extra_fields\": \"id_token\" is a token, a secret or a field tokend already stores"),
        "{}",
        check.stderr
    );

    w.write_config(&format!("{credential}extra_fields = [\"org_id\", \"user\"]\n{sink}"));
    w.authorize_and_import("g").await;
    let shown = w.tokend(&["show", "g", "--json"], None).await;
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(shown["extra"], serde_json::json!({"org_id": "o-77", "user": {"id": 5}}));
    let env = read(&w, "g.env");
    assert!(env.contains("TOKEND_G_ORG_ID='o-77'\n"), "{env}");
    assert!(!env.contains("jwt-secret-value"), "{env}");
    let listed = w.tokend(&["list", "--json"], None).await.stdout;
    assert!(!listed.contains("jwt-secret-value"), "{listed}");
}

/// Two Nudge users of one client. The first one's answer says its hourly budget is spent; the
/// other user's token must still be refreshed on time.
async fn rate_limit_run(scope: Option<&str>) -> (bool, String) {
    let w = World::new(MockSettings { expires_in: 60, send_created_at: false, ..MockSettings::default() }).await;
    let scope_line = scope.map(|s| format!("rate_limit = \"{s}\"\n")).unwrap_or_default();
    let mut config = String::new();
    for name in ["alice", "bob"] {
        config.push_str(&format!(
            "[[credential]]\nname = \"{name}\"\nprovider = \"nudge\"\ntoken_url = \"{{mock}}/api/oauth/zapier/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\nrefresh_at = \"54s\"\n{scope_line}\n"
        ));
    }
    w.write_config(&config);
    // alice's token was issued 57 s ago: due now, 3 s left. bob's is due in 6 s.
    let issued = (tokend::clock::now_secs() - 57).to_string();
    let answer = w.mock.authorize("alice").to_string();
    assert_eq!(w.tokend(&["import", "alice", "--issued-at", &issued], Some(&answer)).await.code, 0);
    w.authorize_and_import("bob").await;
    w.mock.push_fault(Fault::Answer {
        status: 429,
        body: r#"{"error":"rate_limited"}"#.into(),
        headers: vec![("Retry-After".into(), "3600".into()), ("X-RateLimit-Remaining".into(), "0".into())],
    });
    let daemon = w.start_daemon().await;
    let bob_on_time = wait_for(Duration::from_secs(15), || w.generation("bob") >= 2).await;
    (bob_on_time, daemon.log_text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nudge_user_rate_limited_while_another_keeps_refreshing() {
    let (bob_on_time, log) = rate_limit_run(None).await;
    assert!(bob_on_time, "bob was paused by alice's limit:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("rate limited past the access token's expiry")
            && l.contains("credential=alice")
            && l.contains("expires_at=")),
        "a wait past expiry is an error naming when the token expires:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_client_pauses_every_credential_of_the_client() {
    let (bob_on_time, log) = rate_limit_run(Some("client")).await;
    assert!(!bob_on_time, "with rate_limit = \"client\" bob waits for alice's pause:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_soon_needs_reauth_reminders_and_recovered_fire_at_their_times() {
    let w = World::new(MockSettings::default()).await;
    let hook = event_hook(&w);
    w.write_config_with_daemon(
        "metrics_file = \"metrics.prom\"\ntrigger_dir = \"triggers\"",
        &format!(
            "[[credential]]\nname = \"soon\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\nrefresh_token_lifetime = \"6s\"\nreauth_warn = \"4s\"\non_failure = [\"{hook}\"]\n\n\
             [[credential]]\nname = \"dead\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\nreauth_repeat = \"2s\"\non_failure = [\"{hook}\"]\n\n\
             [[credential]]\nname = \"flaky\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\non_failure = [\"{hook}\"]\n"
        ),
    );
    let imported_at = tokend::clock::now_secs();
    w.authorize_and_import("soon").await;
    w.authorize_and_import("flaky").await;
    // dead's token is an hour old and expired: due at once, and the provider rejects its grant.
    let issued = (tokend::clock::now_secs() - 3600).to_string();
    let answer = w.mock.authorize("dead").to_string();
    assert_eq!(w.tokend(&["import", "dead", "--issued-at", &issued], Some(&answer)).await.code, 0);
    w.mock.push_fault(Fault::Answer {
        status: 400,
        body: r#"{"error":"invalid_grant","error_description":"revoked by the user"}"#.into(),
        headers: vec![],
    });
    let daemon = w.start_daemon().await;

    // needs_reauth at once, then every 2 s; reauth_soon once, 4 s before the 6 s deadline.
    assert!(
        wait_for(Duration::from_secs(12), || events_of(&w, "needs_reauth", "dead").len() >= 3).await,
        "{:?}\n{}",
        events(&w),
        daemon.log_text()
    );
    let times: Vec<i64> =
        events_of(&w, "needs_reauth", "dead").iter().map(|l| l.split(' ').next().unwrap().parse().unwrap()).collect();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        // 2 s apart; each time is taken inside the hook, so a slow hook start skews one gap.
        assert!((500..=3_500).contains(&gap), "reminders 2 s apart, got {gap} ms: {times:?}");
    }
    let soon = events_of(&w, "reauth_soon", "soon");
    assert_eq!(soon.len(), 1, "{:?}", events(&w));
    let deadline = tokend::clock::rfc3339(imported_at + 6);
    let next_second = tokend::clock::rfc3339(imported_at + 7);
    assert!(
        soon[0].contains(&format!("deadline={deadline}")) || soon[0].contains(&format!("deadline={next_second}")),
        "{soon:?}"
    );
    let warned_at: i64 = soon[0].split(' ').next().unwrap().parse().unwrap();
    assert!((warned_at - (imported_at + 2) * 1000).abs() <= 2_000, "warned 4 s before the deadline: {warned_at}");

    // `list` says since when, the metrics say what and by when.
    let row = w.row("dead").await;
    assert_eq!(row["status"], "needs_reauth");
    assert!(row["dead_since"].is_string(), "{row}");
    assert!(w.tokend(&["list"], None).await.stdout.contains("needs_reauth for "));
    assert!(w.row("soon").await["reauth_deadline"].is_string());
    assert!(
        wait_for(Duration::from_secs(3), || {
            let m = read(&w, "metrics.prom");
            m.contains("tokend_credential_needs_reauth{credential=\"dead\",provider=\"oauth2\"} 1")
                && m.contains(&format!(
                    "tokend_credential_reauth_deadline_seconds{{credential=\"soon\",provider=\"oauth2\"}} {}",
                    imported_at + 6
                ))
                && m.contains(
                    "tokend_credential_events_total{credential=\"soon\",provider=\"oauth2\",event=\"reauth_soon\"} 1",
                )
        })
        .await,
        "{}",
        read(&w, "metrics.prom")
    );

    // A human re-authorizes: recovered, and the reminders stop.
    w.authorize_and_import("dead").await;
    assert!(
        wait_for(Duration::from_secs(5), || !events_of(&w, "recovered", "dead").is_empty()).await,
        "{:?}",
        events(&w)
    );
    let reminders = events_of(&w, "needs_reauth", "dead").len();

    // A transient failure, then the retry succeeds: recovered.
    w.mock.push_fault(Fault::Answer { status: 503, body: "down".into(), headers: vec![] });
    std::fs::write(w.path("triggers/flaky.refresh"), "").unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || !events_of(&w, "recovered", "flaky").is_empty()).await,
        "{:?}\n{}",
        events(&w),
        daemon.log_text()
    );
    assert_eq!(events_of(&w, "failed", "flaky").len(), 1, "{:?}", events(&w));
    assert_eq!(events_of(&w, "needs_reauth", "dead").len(), reminders, "no reminder after re-authorization");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_at_least_exercises_a_token_that_never_expires() {
    let w = World::new(MockSettings { expires_in: 0, ..MockSettings::default() }).await;
    w.write_config("[[credential]]\nname = \"v1\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\nrefresh_at_least = \"2s\"\n");
    w.authorize_and_import("v1").await;
    assert_eq!(w.row("v1").await["expires_at"], serde_json::Value::Null);
    let daemon = w.start_daemon().await;
    assert!(wait_for(Duration::from_secs(9), || w.generation("v1") >= 3).await, "{}", daemon.log_text());
    assert_eq!(w.mock.reuses(), 0);
}
