//! `tokend run` as a real child process: refreshes ahead of expiry over many cycles, signals,
//! reload, sink repair, trigger files, outages.

mod support;

use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::{World, wait_for};
use tokend::dev::mock::{Fault, MockSettings};

fn json_sink(w: &World, file: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(w.path(file)).ok()?).ok()
}

fn rfc3339_secs(text: &str) -> i64 {
    humantime::parse_rfc3339(text).unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_every_credential_fresh_over_many_cycles() {
    let w = World::new(MockSettings { expires_in: 4, ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let mut config = String::new();
    for (name, provider, path) in [
        ("nb", "nationbuilder", "/oauth/token"),
        ("nudge", "nudge", "/api/oauth/zapier/token"),
        ("wa", "wildapricot", "/auth/token"),
    ] {
        config.push_str(&format!(
            "[[credential]]\nname = \"{name}\"\nprovider = \"{provider}\"\ntoken_url = \"{{mock}}{path}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"out/{name}.json\"\nformat = \"json\"\n\n"
        ));
    }
    w.write_config(&config);
    for name in ["nb", "nudge", "wa"] {
        w.authorize_and_import(name).await;
    }
    let mut daemon = w.start_daemon().await;

    // Sample every sink for 14 s (3 to 4 lifetimes): never an expired token, generations only
    // go up, one at a time.
    let mut last_generation = std::collections::HashMap::new();
    let mut reads = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(14);
    while tokio::time::Instant::now() < until {
        for name in ["nb", "nudge", "wa"] {
            let sink = json_sink(&w, &format!("out/{name}.json")).expect("sink present and valid JSON");
            let expires_at = rfc3339_secs(sink["expires_at"].as_str().unwrap());
            assert!(expires_at > tokend::clock::now_secs(), "{name}: sink holds an expired token: {sink}");
            let generation = sink["generation"].as_i64().unwrap();
            let previous = last_generation.insert(name, generation).unwrap_or(generation);
            assert!(
                generation == previous || generation == previous + 1,
                "{name}: generation jumped {previous} → {generation}"
            );
            reads += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);

    // A restart picks up where the last run stopped.
    let before_restart = w.generation("nb");
    let mut daemon = w.start_daemon().await;
    assert!(
        wait_for(Duration::from_secs(6), || w.generation("nb") >= before_restart + 2).await,
        "{}",
        daemon.log_text()
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);

    let store = w.store();
    let mut refreshes = 0;
    for name in ["nb", "nudge", "wa"] {
        let state = store.get(name).unwrap().unwrap();
        assert!(state.generation >= 5, "{name}: only {} generations in 14 s of 4 s tokens", state.generation);
        refreshes += state.generation - 1;
        assert_eq!(
            state.refresh_token.unwrap().expose(),
            w.mock.live_refresh_token(name).unwrap(),
            "{name}: store and provider agree"
        );
        assert_eq!(state.status, tokend::store::Status::Active);
    }
    assert_eq!(refreshes as u64, w.mock.refreshes(), "every generation is one refresh, and every refresh a generation");
    assert!(reads > 300, "sampled {reads} times");
}

const ONE: &str = r#"
[[credential]]
name = "a"
provider = "oauth2"
token_url = "{mock}/token"
client_id = "c"
client_secret = "s"
[[credential.sink]]
path = "out/a.token"
mode = "0640"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_refreshes_and_sigterm_lets_the_refresh_commit() {
    let w = World::new(MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(&format!("{ONE}\n{}", ONE.replace("\"a\"", "\"b\"").replace("a.token", "b.token")));
    w.authorize_and_import("a").await;
    w.authorize_and_import("b").await;
    let mut daemon = w.start_daemon().await;
    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(5), || w.mock.requests().len() == 2).await, "SIGUSR1 refreshes all");
    // Both requests are now waiting 1.5 s for their answers: stop the daemon mid-refresh.
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
    for name in ["a", "b"] {
        let state = w.store().get(name).unwrap().unwrap();
        assert_eq!(state.generation, 2, "{name}: the in-flight refresh was committed before exit");
        assert_eq!(state.refresh_token.unwrap().expose(), w.mock.live_refresh_token(name).unwrap());
        assert_eq!(std::fs::read_to_string(w.path(&format!("out/{name}.token"))).unwrap(), state.access_token.expose());
    }
    assert!(daemon.log_text().contains("signal received signal=\"SIGTERM\""), "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_drops_credentials_and_rejects_bad_config() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    assert!(w.path("out/a.token").exists());

    // Replace "a" by an API-key credential "key": no import needed, the daemon fetches its token.
    w.write_config(
        r#"
[[credential]]
name = "key"
provider = "wildapricot"
token_url = "{mock}/auth/token"
api_key = "k-123456"
[[credential.sink]]
path = "out/key.token"
"#,
    );
    daemon.signal(Signal::SIGHUP);
    assert!(wait_for(Duration::from_secs(5), || w.path("out/key.token").exists()).await, "{}", daemon.log_text());
    assert!(
        wait_for(Duration::from_secs(5), || !w.path("out/a.token").exists()).await,
        "dropped credential's sink removed"
    );
    assert_eq!(w.generation("a"), 1, "the dropped credential's stored token is kept");

    std::fs::write(w.config_path(), "[[credential]]\nname = \"broken\"\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(5), || daemon
            .log_text()
            .contains("reload rejected, the running configuration stays"))
        .await,
        "{}",
        daemon.log_text()
    );
    // Still alive and still serving the old configuration.
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid()), None).is_ok());
    assert!(w.path("out/key.token").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_replans_changed_credentials_and_leaves_the_others_alone() {
    // 10 s tokens; "2s" before expiry puts both refreshes 8 s after the import.
    let w = World::new(MockSettings { expires_in: 10, ..MockSettings::default() }).await;
    let config = |a_refresh_at: &str| {
        ["a", "b"]
            .iter()
            .map(|name| {
                let refresh_at = if *name == "a" { a_refresh_at } else { "2s" };
                format!(
                    "[[credential]]\nname = \"{name}\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\nrefresh_at = \"{refresh_at}\"\n\n"
                )
            })
            .collect::<String>()
    };
    w.write_config(&config("2s"));
    w.authorize_and_import("a").await;
    w.authorize_and_import("b").await;
    let imported = std::time::Instant::now();
    let mut daemon = w.start_daemon().await;

    // "10%" of the lifetime elapsed: already past, so "a" is due the moment it is re-planned.
    w.write_config(&config("10%"));
    daemon.signal(Signal::SIGHUP);
    assert!(wait_for(Duration::from_secs(4), || w.generation("a") == 2).await, "{}", daemon.log_text());
    assert!(imported.elapsed() < Duration::from_secs(5), "too slow to tell the two deadlines apart");
    assert_eq!(w.generation("b"), 1, "the unchanged credential is not refreshed early");
    // ... and it still has its deadline: refreshed 8 s after the import, with no reload needed.
    assert!(wait_for(Duration::from_secs(12), || w.generation("b") == 2).await, "{}", daemon.log_text());
    assert!(imported.elapsed() >= Duration::from_secs(6), "b refreshed at its own time");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_change_reloads_without_a_signal() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    w.write_config(&format!(
        "{ONE}\n[[credential]]\nname = \"key\"\nprovider = \"wildapricot\"\ntoken_url = \"{{mock}}/auth/token\"\napi_key = \"k\"\n[[credential.sink]]\npath = \"out/key.token\"\n"
    ));
    assert!(wait_for(Duration::from_secs(5), || w.path("out/key.token").exists()).await, "{}", daemon.log_text());
    assert!(w.path("out/a.token").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_or_deleted_sinks_are_rewritten_and_planted_symlinks_replaced() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let victim = w.path("victim");
    std::fs::write(&victim, "precious").unwrap();
    w.write_config(&format!("{ONE}\n{}", ONE.replace("\"a\"", "\"b\"").replace("a.token", "b.token")));
    w.authorize_and_import("a").await;
    w.authorize_and_import("b").await;
    let daemon = w.start_daemon().await;
    std::os::unix::fs::symlink(&victim, w.path("out/.planted")).unwrap();
    std::fs::rename(w.path("out/.planted"), w.path("out/b.token")).unwrap();

    let sink = w.path("out/a.token");
    let token = std::fs::read_to_string(&sink).unwrap();
    assert_eq!(std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777, 0o640);
    std::fs::remove_file(&sink).unwrap();
    assert!(
        wait_for(Duration::from_secs(1), || std::fs::read_to_string(&sink).is_ok_and(|t| t == token)).await,
        "deleted sink rewritten within 1 s"
    );
    std::fs::write(&sink, "tampered").unwrap();
    assert!(
        wait_for(Duration::from_secs(1), || std::fs::read_to_string(&sink).is_ok_and(|t| t == token)).await,
        "altered sink rewritten within 1 s"
    );
    assert_eq!(std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777, 0o640);

    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(5), || w.generation("b") == 2).await);
    let b = w.store().get("b").unwrap().unwrap();
    assert!(
        wait_for(Duration::from_secs(1), || std::fs::read_to_string(w.path("out/b.token"))
            .is_ok_and(|t| t == b.access_token.expose()))
        .await
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "nothing written through the symlink");
    assert!(std::fs::symlink_metadata(w.path("out/b.token")).unwrap().file_type().is_file(), "the link was replaced");
    assert!(
        wait_for(Duration::from_secs(2), || daemon
            .log_text()
            .contains("replaced a symbolic link that someone else put at the sink path"))
        .await,
        "{}",
        daemon.log_text()
    );
}

/// Found by the 10,000-credential catch-up: a sink repaired from the state in memory while that
/// credential's refresh was in flight put the old token back over the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_never_goes_back_to_an_older_token_while_a_refresh_is_in_flight() {
    let w = World::new(MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    let sink = w.path("out/a.token");
    let old = std::fs::read_to_string(&sink).unwrap();
    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(5), || w.mock.requests().len() == 1).await, "refresh sent");
    std::fs::remove_file(&sink).unwrap();
    // The answer is 1.5 s away; until it is committed, the sink may be absent but never old again.
    let mut seen = Vec::new();
    let settled = wait_for(Duration::from_secs(10), || {
        let now = std::fs::read_to_string(&sink).ok();
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        w.generation("a") == 2 && now.is_some_and(|t| t != old)
    })
    .await;
    assert!(settled, "new token in the sink; contents seen: {}", seen.len());
    assert!(!seen.contains(&Some(old.clone())), "the old token came back after the sink was deleted");
    let state = w.store().get("a").unwrap().unwrap();
    assert_eq!(std::fs::read_to_string(&sink).unwrap(), state.access_token.expose());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touching_the_trigger_file_refreshes_now() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config_with_daemon("trigger_dir = \"triggers\"", ONE);
    w.authorize_and_import("a").await;
    let _daemon = w.start_daemon().await;
    let meta = std::fs::metadata(w.path("triggers")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o1770, "sticky, group-writable trigger directory");
    let trigger = w.path("triggers/a.refresh");
    let status = std::process::Command::new("touch").arg(&trigger).status().unwrap();
    assert!(status.success());
    assert!(wait_for(Duration::from_secs(3), || w.generation("a") == 2).await);
    assert!(wait_for(Duration::from_secs(1), || !trigger.exists()).await, "trigger file removed");
    let token = w.store().get("a").unwrap().unwrap().access_token;
    assert!(
        wait_for(Duration::from_secs(1), || std::fs::read_to_string(w.path("out/a.token"))
            .is_ok_and(|t| t == token.expose()))
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_outage_backs_off_and_recovers_before_expiry() {
    let w = World::new(MockSettings { expires_in: 12, ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    for _ in 0..4 {
        w.mock.push_fault(Fault::Answer { status: 503, body: "down".into(), headers: vec![] });
    }
    let daemon = w.start_daemon().await;
    // Due at 6 s; four 503s with 0.3 / 0.6 / 1.2 / 2.4 s backoff; the fifth try succeeds before 12 s.
    assert!(wait_for(Duration::from_secs(13), || w.generation("a") == 2).await, "{}", daemon.log_text());
    let requests = w.mock.requests().len();
    assert_eq!(requests, 5, "four failures and one success, nothing more");
    assert!(w.path("out/a.token").exists(), "the token never expired from the sink");
    assert_eq!(daemon.log_text().matches("will retry").count(), 4, "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_database_refuses_to_start() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(ONE);
    let daemon = w.start_daemon().await;
    let second = w.tokend(&["run"], None).await;
    assert_eq!(second.code, 1);
    assert!(
        second.stderr.contains(&format!("another `tokend run` is using {}", w.path("tokend.db").display())),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains(&format!("pid {}", daemon.pid())), "{}", second.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrefreshable_token_leaves_the_sinks_when_it_expires() {
    let w = World::new(MockSettings { expires_in: 3, ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(&ONE.replace("mode = \"0640\"", "format = \"json\""));
    w.authorize_and_import("a").await;
    for _ in 0..40 {
        w.mock.push_fault(Fault::Answer { status: 500, body: "broken".into(), headers: vec![] });
    }
    let daemon = w.start_daemon().await;
    assert!(w.path("out/a.token").exists());
    assert!(wait_for(Duration::from_secs(6), || !w.path("out/a.token").exists()).await, "{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("access token expired without a successful refresh; its sink files are removed")
    );
    assert_eq!(w.show("a").await.code, 6, "show refuses the expired token too");
    // Retries continue (the refresh token may still work), with capped backoff: a handful, not a flood.
    let requests = w.mock.requests().len();
    assert!((3..=15).contains(&requests), "{requests} requests in ~6 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_get_context_not_the_token_and_never_block_refreshing() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let dump = w.path("out/hook.env");
    w.write_config(&format!(
        "{}\non_refresh = [\"/bin/sh\", \"-c\", \"env | grep ^TOKEND_ | sort > {}\"]\n\n{}\non_refresh = [\"sleep\", \"60\"]\nhook_timeout = \"1s\"\n",
        ONE.replace("[[credential.sink]]\npath = \"out/a.token\"\nmode = \"0640\"\n", ""),
        dump.display(),
        ONE.replace("\"a\"", "\"b\"").replace("[[credential.sink]]\npath = \"out/a.token\"\nmode = \"0640\"\n", ""),
    ));
    w.authorize_and_import("a").await;
    w.authorize_and_import("b").await;
    let daemon = w.start_daemon().await;
    daemon.signal(Signal::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(&dump)
            .is_ok_and(|t| t.contains("TOKEND_GENERATION")))
        .await
    );
    let env = std::fs::read_to_string(&dump).unwrap();
    assert!(env.contains("TOKEND_EVENT=refreshed\n"), "{env}");
    assert!(env.contains("TOKEND_CREDENTIAL=a\n"), "{env}");
    assert!(env.contains("TOKEND_PROVIDER=oauth2\n"), "{env}");
    assert!(env.contains("TOKEND_GENERATION=2\n"), "{env}");
    assert!(env.contains("TOKEND_EXPIRES_AT="), "{env}");
    assert!(!env.contains("TOKEND_ACCESS_TOKEN"), "the token is only passed when asked: {env}");
    let token = w.store().get("a").unwrap().unwrap().access_token;
    assert!(!env.contains(token.expose()));

    // b's hook hangs; b is refreshed again regardless, and the hook is killed after 1 s.
    assert!(wait_for(Duration::from_secs(3), || w.generation("b") == 2).await);
    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(3), || w.generation("b") == 3).await, "{}", daemon.log_text());
    assert!(wait_for(Duration::from_secs(3), || daemon.log_text().contains("hook timed out and was killed")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_cron_renews_on_its_schedule() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        "[[credential]]\nname = \"key\"\nprovider = \"wildapricot\"\ntoken_url = \"{mock}/auth/token\"\napi_key = \"k\"\nrefresh_cron = \"* * * * * *\"\n",
    );
    let daemon = w.start_daemon().await;
    // First token at start (API keys need no import), then one per second from the cron.
    assert!(wait_for(Duration::from_secs(6), || w.generation("key") >= 4).await, "{}", daemon.log_text());
    assert!(daemon.log_text().contains("refresh_cron fired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_reading_a_sink_do_not_wake_the_daemon() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    let switches = || -> u64 {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap().flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            total += status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        total
    };
    // A consumer reads its token a few times, as programs do.
    for _ in 0..5 {
        assert!(!std::fs::read_to_string(w.path("out/a.token")).unwrap().is_empty());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = switches();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woken = switches() - before;
    assert!(woken <= 5, "the daemon kept waking after a reader opened its sink: {woken} context switches in 2 s");
}

/// What `systemctl reload` runs: `tokend reload` fails (exit 3) on an invalid configuration and
/// the daemon keeps the old one; a valid one is validated, then the daemon is told to load it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_command_validates_before_signalling_the_daemon() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    let good = std::fs::read_to_string(w.config_path()).unwrap();

    std::fs::write(w.path("broken.toml"), "[[credential]]\nname = \"broken\"\n").unwrap();
    let pid = daemon.pid().to_string();
    let broken = w.tokend(&["--config", w.path("broken.toml").to_str().unwrap(), "reload", "--pid", &pid], None).await;
    assert_eq!(broken.code, 3, "{}", broken.stderr);
    assert!(broken.stderr.contains("the running daemon keeps its current configuration"), "{}", broken.stderr);
    assert!(
        !daemon.log_text().contains("signal received signal=\"SIGHUP\""),
        "an invalid config never reaches the daemon"
    );

    let other_database = good.replace("database = \"tokend.db\"", "database = \"other.db\"");
    std::fs::write(w.path("other.toml"), other_database).unwrap();
    let moved = w.tokend(&["--config", w.path("other.toml").to_str().unwrap(), "reload", "--pid", &pid], None).await;
    assert_eq!(moved.code, 1, "{}", moved.stderr);
    assert!(moved.stderr.contains("the database cannot change while running"), "{}", moved.stderr);

    // Valid in shape, but a secret the daemon cannot read: checked by the daemon itself (systemd
    // keeps /run/credentials from ExecReload=), and `reload` waits for its verdict.
    std::fs::write(w.config_path(), good.replace("client_secret = \"s\"", "client_secret_env = \"TOKEND_TEST_UNSET\""))
        .unwrap();
    let unreadable = w.tokend(&["reload", "--pid", &pid], None).await;
    assert_eq!(unreadable.code, 3, "{}", unreadable.stderr);
    assert!(unreadable.stderr.contains("TOKEND_TEST_UNSET is not set"), "{}", unreadable.stderr);
    assert!(unreadable.stderr.contains("reload rejected"), "{}", unreadable.stderr);
    std::fs::write(w.config_path(), &good).unwrap();

    let ok = w.tokend(&["reload", "--pid", &pid], None).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        wait_for(Duration::from_secs(5), || daemon.log_text().contains("configuration reloaded")).await,
        "{}",
        daemon.log_text()
    );
    // Without --pid, the daemon is found through the database's lock.
    assert_eq!(w.tokend(&["reload"], None).await.code, 0);
}

/// A refresh task that panics is an error: logged with its message, counted under
/// `result="error"`, and retried with backoff — not every 2 s as a busy lease, uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_task_that_dies_is_counted_and_backed_off() {
    let w = World::new(MockSettings::default()).await;
    w.write_config_with_daemon("metrics_file = \"tokend.prom\"\n", ONE);
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon_env(&[("TOKEND_TEST_PANIC_IN_REFRESH", "a")]).await;
    daemon.signal(Signal::SIGUSR1);
    let died = "the refresh task died: injected by TOKEND_TEST_PANIC_IN_REFRESH";
    assert!(wait_for(Duration::from_secs(5), || daemon.log_text().contains(died)).await, "{}", daemon.log_text());
    let error = "tokend_refresh_total{credential=\"a\",provider=\"oauth2\",result=\"error\"} 1";
    assert!(
        wait_for(Duration::from_secs(3), || std::fs::read_to_string(w.path("tokend.prom"))
            .is_ok_and(|m| m.contains(error)))
        .await,
        "{}",
        std::fs::read_to_string(w.path("tokend.prom")).unwrap_or_default()
    );
    // The first retry of a 1 h token comes after about 5 s (backoff), not after 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(daemon.log_text().matches(died).count(), 1, "{}", daemon.log_text());
}

/// Found while testing the package: a refresh point that is already past when the new token
/// arrives (`refresh_at` larger than a tiny lifetime, a `created_at` floored to the second) made
/// the daemon refresh again at once, many times a second. At most one success per second now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_point_already_past_does_not_refresh_in_a_loop() {
    let w = World::new(MockSettings { expires_in: 6, ..MockSettings::default() }).await;
    w.write_config(&ONE.replace("client_secret = \"s\"", "client_secret = \"s\"\nrefresh_at = \"18h\""));
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let refreshes = w.mock.refreshes();
    assert!(refreshes >= 2, "it still refreshes: {refreshes}: {}", daemon.log_text());
    assert!(refreshes <= 6, "{refreshes} refreshes in 4 s with 6 s tokens");
}

/// A credential waiting for a refresh slot whose token is replaced meanwhile (an import here; in
/// a fleet, another node's commit picked up by a store re-read) is taken out of the line: its
/// turn would otherwise refresh the token just stored a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_replaced_while_waiting_for_a_refresh_slot_is_not_refreshed_again() {
    let w = World::new(MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let three: String = ["a", "b", "c"]
        .iter()
        .map(|n| ONE.replace("\"a\"", &format!("\"{n}\"")).replace("a.token", &format!("{n}.token")))
        .collect();
    w.write_config_with_daemon("concurrency = 1", &three);
    // All three due at start; one refresh slot: "a" goes first, "b" and "c" wait in line.
    for name in ["a", "b", "c"] {
        let mut answer = w.mock.authorize(name);
        answer["created_at"] = serde_json::json!(tokend::clock::now_secs() - 3590);
        let run = w.tokend(&["import", name], Some(&answer.to_string())).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let mut daemon = w.start_daemon().await;
    assert!(wait_for(Duration::from_secs(5), || w.mock.requests().len() == 1).await, "{}", daemon.log_text());
    // While "c" waits, an operator imports a fresh grant for it (generation 2, due in an hour).
    w.authorize_and_import("c").await;
    assert!(wait_for(Duration::from_secs(10), || w.generation("b") == 2).await, "{}", daemon.log_text());
    // "c"'s turn would have come right after "b"'s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(w.generation("c"), 2, "the imported token was refreshed again: {}", daemon.log_text());
    assert_eq!(w.mock.requests().len(), 2, "requests: {:?}", w.mock.requests());
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
}
