//! File modes, link tricks and the attacker classes of RELIABILITY.md's security table, each
//! played against the real binary: a local user who can write a sink or trigger directory, a
//! hostile or echoing token endpoint, a hook that looks around, a jammed redirect listener, an
//! inherited proxy variable.

mod support;

use base64::Engine as _;
use nix::sys::signal::Signal;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;
use support::{World, wait_for};
use tokend::dev::mock::{Fault, MockProvider, MockSettings};

const NOBODY: u32 = 65534;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn credential(name: &str, sink: &str) -> String {
    format!(
        "[[credential]]\nname = \"{name}\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"{sink}\"\n"
    )
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `argv` as uid/gid `uid`:`gid` with no supplementary groups (the second user of a test).
fn run_as(uid: u32, gid: u32, argv: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([&format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups", "--"])
        .args(argv)
        .output()
        .expect("setpriv runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_wal_and_sinks_are_private() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(
        &credential("c", "out/c.json").replace("path = \"out/c.json\"", "path = \"out/c.json\"\nformat = \"json\""),
    );
    w.authorize_and_import("c").await;
    assert_eq!(w.tokend(&["refresh", "c"], None).await.code, 0);
    let _reader = w.store(); // keeps the WAL and shm files in place while we look
    for file in ["tokend.db", "tokend.db-wal", "tokend.db-shm", "out/c.json"] {
        let path = w.path(file);
        assert!(path.exists(), "{file}");
        assert_eq!(mode(&path), 0o600, "{file} must be readable by its owner only");
    }
}

/// Class 1: a sink path swapped between a FIFO and a link to /dev/zero must neither stall the
/// daemon's loop (the old `is_current` blocked reading the FIFO) nor grow its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_or_a_link_to_dev_zero_at_a_sink_path_neither_stalls_nor_bloats_the_daemon() {
    let w = World::new(MockSettings { expires_in: 4, ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(&format!("{}\n{}", credential("a", "out/a.token"), credential("b", "out/b.token")));
    w.authorize_and_import("a").await;
    w.authorize_and_import("b").await;
    let daemon = w.start_daemon().await;
    let sink = w.path("out/a.token");
    let started = w.generation("b");
    // The attacker swaps the entry for 6 s (with 4 s tokens, b is due every ~2 s).
    let attacker = {
        let dir = w.path("out");
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs(6);
            let mut i = 0u32;
            while std::time::Instant::now() < until {
                let planted = dir.join(format!(".planted{i}"));
                if i.is_multiple_of(2) {
                    nix::unistd::mkfifo(&planted, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
                } else {
                    std::os::unix::fs::symlink("/dev/zero", &planted).unwrap();
                }
                std::fs::rename(&planted, dir.join("a.token")).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut peak_rss = 0;
    let kept_refreshing = wait_for(Duration::from_secs(6), || {
        peak_rss = peak_rss.max(rss_kib(daemon.pid()));
        w.generation("b") >= started + 2
    })
    .await;
    attacker.join().unwrap();
    assert!(kept_refreshing, "b stopped refreshing while a's sink was a FIFO/link: {}", daemon.log_text());
    assert!(peak_rss < 200 * 1024, "daemon grew to {peak_rss} KiB");
    // Signals are still acted on, and the planted entry is replaced by a's token.
    daemon.signal(Signal::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(5), || {
            let state = w.store().get("a").unwrap().unwrap();
            std::fs::symlink_metadata(&sink).is_ok_and(|m| m.file_type().is_file())
                && std::fs::read_to_string(&sink).is_ok_and(|t| t == state.access_token.expose())
        })
        .await,
        "{}",
        daemon.log_text()
    );
}

/// Class 2: a link to the attacker's file is replaced (rename over it), so readers get tokend's
/// token, not the forged one; a file with the right bytes but another owner is not "current".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_links_and_foreign_files_at_a_sink_path_are_replaced_and_counted() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config_with_daemon("metrics_file = \"tokend.prom\"", &credential("a", "out/a.token"));
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    let sink = w.path("out/a.token");
    let token = w.store().get("a").unwrap().unwrap().access_token;
    std::fs::write(w.path("forged"), "FORGED-TOKEN").unwrap();
    std::fs::rename(
        {
            std::os::unix::fs::symlink(w.path("forged"), w.path("out/.tmp-link")).unwrap();
            w.path("out/.tmp-link")
        },
        &sink,
    )
    .unwrap();
    let ours = || {
        std::fs::symlink_metadata(&sink).is_ok_and(|m| m.file_type().is_file() && m.uid() == 0)
            && std::fs::read_to_string(&sink).is_ok_and(|t| t == token.expose())
    };
    assert!(wait_for(Duration::from_secs(2), ours).await, "the link was not replaced: {}", daemon.log_text());
    assert_eq!(std::fs::read_to_string(w.path("forged")).unwrap(), "FORGED-TOKEN", "nothing written through it");
    // (logged just after the rename)
    assert!(
        wait_for(Duration::from_secs(2), || daemon
            .log_text()
            .contains("replaced a symbolic link that someone else put at the sink path"))
        .await,
        "{}",
        daemon.log_text()
    );
    // Same bytes and mode, another owner: not ours.
    std::os::unix::fs::chown(&sink, Some(NOBODY), Some(NOBODY)).unwrap();
    assert!(wait_for(Duration::from_secs(2), ours).await, "a foreign-owned sink was left in place");
    daemon.signal(Signal::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(w.path("tokend.prom")).is_ok_and(|m| m
            .lines()
            .any(|l| l.starts_with("tokend_sink_replaced_total ") && l != "tokend_sink_replaced_total 0")))
        .await,
        "{}",
        std::fs::read_to_string(w.path("tokend.prom")).unwrap_or_default()
    );
}

/// Class 3: triggers have their own sticky, group-writable directory; the sink directory can be
/// writable by tokend alone, and a `.refresh` file there does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_live_in_their_own_directory_writable_by_another_user() {
    let w = World::new(MockSettings::default()).await;
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(w.path("out")).unwrap();
    std::fs::set_permissions(w.path("out"), std::fs::Permissions::from_mode(0o750)).unwrap();
    w.write_config_with_daemon("trigger_dir = \"triggers\"", &credential("a", "out/a.token"));
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    let triggers = std::fs::metadata(w.path("triggers")).unwrap();
    assert_eq!(triggers.permissions().mode() & 0o7777, 0o1770);

    std::fs::write(w.path("out/a.token.refresh"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(w.generation("a"), 1, "a trigger in the sink directory is not a trigger any more");

    // A member of tokend's group (gid 0 here) who is another user creates the trigger.
    let touched = run_as(NOBODY, triggers.gid(), &["touch", w.path("triggers/a.refresh").to_str().unwrap()]);
    assert!(touched.status.success(), "{}", String::from_utf8_lossy(&touched.stderr));
    assert!(wait_for(Duration::from_secs(3), || w.generation("a") == 2).await, "{}", daemon.log_text());
    assert!(wait_for(Duration::from_secs(1), || !w.path("triggers/a.refresh").exists()).await);
}

/// Class 10: a trigger touched every 50 ms refreshes once per 5 s floor interval, not twice (the
/// deferred refresh did not count against the floor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_hammered_every_50_ms_refreshes_once_per_interval() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config_with_daemon("trigger_dir = \"triggers\"", &credential("a", "out/a.token"));
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    let trigger = w.path("triggers/a.refresh");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(11_000) {
        let _ = std::fs::write(&trigger, "");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refreshes = w.generation("a") - 1;
    // At 0 s, 5 s and 10 s: three intervals began within 11 s.
    assert!((2..=3).contains(&refreshes), "{refreshes} trigger refreshes in 11 s: {}", daemon.log_text());
}

/// Class 4: hooks get the documented variables, a PATH, and what `hook_env` names — never the
/// client secret tokend read from its environment, nor CREDENTIALS_DIRECTORY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_get_only_the_documented_environment() {
    let w = World::new(MockSettings::default()).await;
    let out = w.path("hook.env");
    w.write_config(&format!(
        "[[credential]]\nname = \"a\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret_env = \"MY_CLIENT_SECRET\"\nhook_env = [\"PASSED_ON\"]\non_refresh = [\"/bin/sh\", \"-c\", \"env > \\\"$0\\\"\", \"{}\"]\n",
        out.display()
    ));
    w.authorize_and_import("a").await;
    let daemon = w
        .start_daemon_env(&[
            ("MY_CLIENT_SECRET", "client-secret-from-env"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/tokend.service"),
            ("PASSED_ON", "yes"),
            ("NOT_PASSED", "no"),
        ])
        .await;
    daemon.signal(Signal::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(&out)
            .is_ok_and(|t| t.contains("TOKEND_GENERATION")))
        .await
    );
    let env = std::fs::read_to_string(&out).unwrap();
    for absent in ["client-secret-from-env", "MY_CLIENT_SECRET", "CREDENTIALS_DIRECTORY", "NOT_PASSED", "TOKEND_CONFIG"]
    {
        assert!(!env.contains(absent), "{absent} reached the hook:\n{env}");
    }
    for present in
        ["TOKEND_EVENT=refreshed", "TOKEND_CREDENTIAL=a", "PASSED_ON=yes", "PATH=/usr/local/bin:/usr/bin:/bin"]
    {
        assert!(env.lines().any(|l| l == present), "{present} missing:\n{env}");
    }
}

/// Class 5: an endpoint that echoes the request — form-encoded, JSON-escaped, Base64 in a Basic
/// header, cut at the length tokend keeps — leaks no secret into stderr, `list`, the log or hooks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_echoed_in_any_encoding_never_reach_logs_list_or_hooks() {
    let w = World::new(MockSettings::default()).await;
    let secret = "cl/ient+secret=x&y";
    let error_file = w.path("hook.error");
    w.write_config(&format!(
        "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret = \"{secret}\"\non_failure = [\"/bin/sh\", \"-c\", \"printf %s \\\"$TOKEND_ERROR\\\" > \\\"$0\\\"\", \"{}\"]\n",
        error_file.display()
    ));
    let answer = w.authorize_and_import("c").await;
    let refresh_token = answer["refresh_token"].as_str().unwrap().to_string();
    let form_secret: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("id:{secret}"));
    let json_secret = serde_json::to_string(secret).unwrap();
    let encodings =
        format!("refresh_token={refresh_token} client_secret={form_secret} auth=Basic {basic} json={json_secret}");
    let echo = |status, body: &str| Fault::Answer { status, body: body.to_string(), headers: vec![] };
    // The refresh token straddles the 200th character, where the kept text is cut: 10 of its
    // characters would be left if it were cut before it is scrubbed.
    let padded = format!("{}refresh_token={refresh_token}", "x".repeat(176));
    let forms = [
        secret.to_string(),
        form_secret.clone(),
        basic.clone(),
        json_secret.trim_matches('"').to_string(),
        refresh_token[..10].to_string(),
    ];
    let leaks = |text: &str| forms.iter().filter(|f| text.contains(f.as_str())).cloned().collect::<Vec<_>>();

    let daemon = w.start_daemon().await;
    w.mock.push_fault(echo(503, &encodings));
    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(5), || error_file.exists()).await, "{}", daemon.log_text());
    daemon.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hook_error = std::fs::read_to_string(&error_file).unwrap();
    assert!(hook_error.contains("fp:"), "{hook_error}");
    assert_eq!(leaks(&hook_error), Vec::<String>::new(), "hook TOKEND_ERROR");
    assert_eq!(leaks(&daemon.log_text()), Vec::<String>::new(), "daemon log");

    for (status, body) in [(503, &encodings), (400, &padded)] {
        w.mock.push_fault(echo(status, body));
        let run = w.tokend(&["refresh", "c"], None).await;
        assert_ne!(run.code, 0);
        assert!(run.stderr.contains("fp:"), "{}", run.stderr);
        assert_eq!(leaks(&format!("{}{}", run.stdout, run.stderr)), Vec::<String>::new(), "CLI output");
    }
    let list = w.tokend(&["list", "--json"], None).await;
    assert_eq!(leaks(&list.stdout), Vec::<String>::new(), "list's last_error");
}

/// Class 5, first authorization: the password, the code and the client secret echoed back by a
/// failing exchange or revocation never reach the terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_secrets_echoed_by_authorize_or_revoke_stay_hidden() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        "[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nrevocation_url = \"{mock}/revoke\"\nclient_id = \"cid\"\nclient_secret = \"csecret-/+=\"\nauth = \"body\"\n",
    );
    let password = "pa ss/word+1";
    let encoded: String = url::form_urlencoded::byte_serialize(password.as_bytes()).collect();
    w.mock.push_fault(Fault::Answer {
        status: 400,
        body: format!("{{\"error\":\"invalid_request\",\"error_description\":\"bad form: password={encoded}&client_secret=csecret-%2F%2B%3D\"}}"),
        headers: vec![],
    });
    let run = w.tokend(&["authorize", "o", "--password"], Some(&format!("joe\n{password}\n"))).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    for leak in [password, encoded.as_str(), "csecret-%2F%2B%3D", "csecret-/+="] {
        assert!(!all.contains(leak), "{leak} leaked: {all}");
    }

    w.authorize_and_import("o").await;
    w.mock.push_fault(Fault::Answer {
        status: 400,
        body: "echo: client_secret=csecret-%2F%2B%3D".into(),
        headers: vec![],
    });
    let run = w.tokend(&["revoke", "o"], None).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("revocation refused"), "{}", run.stderr);
    assert!(!run.stderr.contains("csecret-%2F%2B%3D"), "{}", run.stderr);
}

/// Class 6: escape sequences and NUL in a provider's error never reach a terminal, and a NUL does
/// not keep the `on_failure` hook from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_from_the_network_reach_no_terminal_and_stop_no_hook() {
    let w = World::new(MockSettings::default()).await;
    let paged = w.path("paged");
    w.write_config(&format!(
        "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\non_failure = [\"/bin/sh\", \"-c\", \"printf %s \\\"$TOKEND_ERROR\\\" > \\\"$0\\\"\", \"{}\"]\n",
        paged.display()
    ));
    w.authorize_and_import("c").await;
    // An OAuth error inside a 200 answer, as some providers send them.
    let hostile =
        r#"{"error":"invalid_grant","error_description":"gone \u0000\u001b[2J\u001b]0;pwned\u0007 \u202eevil"}"#;
    let daemon = w.start_daemon().await;
    w.mock.push_fault(Fault::Answer { status: 200, body: hostile.into(), headers: vec![] });
    daemon.signal(Signal::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(5), || paged.exists()).await,
        "the on_failure hook never ran: {}",
        daemon.log_text()
    );
    let paged_text = std::fs::read_to_string(&paged).unwrap();
    assert!(paged_text.contains("invalid_grant"), "{paged_text}");
    for text in [paged_text, w.tokend(&["list"], None).await.stdout, w.tokend(&["list", "--json"], None).await.stdout] {
        assert!(!text.contains('\u{1b}') && !text.contains('\0') && !text.contains('\u{202e}'), "{text:?}");
    }
}

/// Class 7: a 429 with an hour's Retry-After from one endpoint pauses that endpoint only, and the
/// paused credential still gets a last attempt before its token expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_pauses_only_its_own_endpoint_and_not_past_expiry() {
    let w = World::new(MockSettings { expires_in: 6, ..MockSettings::default() }).await;
    let other = MockProvider::start(MockSettings { expires_in: 6, ..MockSettings::default() }).await.unwrap();
    w.write_config(&format!(
        "{}\n[[credential]]\nname = \"y\"\nprovider = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
        credential("x", "x.token"),
        other.url("/token")
    ));
    w.authorize_and_import("x").await;
    let y_answer = other.authorize("y");
    assert_eq!(w.tokend(&["import", "y"], Some(&y_answer.to_string())).await.code, 0);
    w.mock.push_fault(Fault::Answer {
        status: 429,
        body: "slow down".into(),
        headers: vec![("Retry-After".into(), "3600".into())],
    });
    let daemon = w.start_daemon().await;
    // Both are due at ~3 s; x is told to wait an hour.
    assert!(
        wait_for(Duration::from_secs(10), || w.generation("y") >= 3).await,
        "y was paused by x's 429: {}",
        daemon.log_text()
    );
    assert!(w.generation("x") >= 2, "x had no last attempt before its token expired: {}", daemon.log_text());
    assert!(w.path("x.token").exists(), "x's token expired from its sink");
}

/// Class 8: an idle connection, a forged `error=access_denied` and a wrong `state` neither jam
/// nor abort `tokend authorize`; the real redirect still completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_listener_cannot_be_jammed_or_aborted_by_another_local_user() {
    let w = World::new(MockSettings::default()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    w.write_config(&format!(
        "[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\nauthorize_url = \"{{mock}}/authorize\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\nredirect_uri = \"{redirect}\"\n"
    ));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["authorize", "o", "--timeout", "30"])
        .env("TOKEND_CONFIG", w.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let url = loop {
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line).await.unwrap();
        if line.starts_with("http") {
            break url::Url::parse(line.trim()).unwrap();
        }
    };
    let state = url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let listening =
        wait_for(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    assert!(listening);
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for hostile in
        ["error=access_denied&error_description=%1B%5B2J", "error=access_denied&state=wrong", "code=x&state=wrong"]
    {
        let answer = reqwest::get(format!("{redirect}?{hostile}")).await.unwrap();
        assert_eq!(answer.status(), 400, "{hostile}");
    }
    let code = w.mock.issue_code(
        "o",
        &redirect,
        url.query_pairs().find(|(k, _)| k == "code_challenge").map(|(_, v)| v.into_owned()).as_deref(),
    );
    let page = reqwest::get(format!("{redirect}?code={code}&state={state}")).await.unwrap().text().await.unwrap();
    assert!(page.contains("You can close this tab"), "{page}");
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    assert!(stderr.contains("ignored a request to the redirect listener"), "{stderr}");
}

/// A stand-in proxy on loopback that records the first line of every request it gets.
async fn recording_proxy() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mut lines = tokio::io::BufReader::new(stream);
            let mut first = String::new();
            let _ = tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut first).await;
            log.lock().unwrap().push(first.trim().to_string());
        }
    });
    (port, seen)
}

/// Class 9: `http_proxy` in tokend's environment is ignored; `[daemon] proxy` is used, and never
/// for loopback token URLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_come_only_from_the_configuration_and_never_for_loopback() {
    let w = World::new(MockSettings::default()).await;
    let (port, seen) = recording_proxy().await;
    let proxy = format!("http://127.0.0.1:{port}");
    w.write_config(&credential("c", "c.token"));
    w.authorize_and_import("c").await;
    let env = [
        ("http_proxy", proxy.as_str()),
        ("HTTP_PROXY", proxy.as_str()),
        ("https_proxy", proxy.as_str()),
        ("ALL_PROXY", proxy.as_str()),
    ];
    let run = w.tokend_env(&["refresh", "c"], None, &env).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(seen.lock().unwrap().is_empty(), "the environment's proxy got {:?}", seen.lock().unwrap());

    // Configured: loopback still goes direct, anything else through the proxy.
    w.write_config_with_daemon(
        &format!("proxy = \"{proxy}\""),
        &format!(
            "{}\n[[credential]]\nname = \"far\"\nprovider = \"oauth2\"\ntoken_url = \"https://tokens.example.invalid/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
            credential("c", "c.token")
        ),
    );
    assert_eq!(w.tokend(&["refresh", "c"], None).await.code, 0);
    assert!(seen.lock().unwrap().is_empty(), "a loopback request went through the proxy");
    assert_eq!(
        w.tokend(&["import", "far"], Some(r#"{"access_token":"a","refresh_token":"r","expires_in":60}"#)).await.code,
        0
    );
    let far = w.tokend(&["refresh", "far"], None).await;
    assert_ne!(far.code, 0);
    assert_eq!(seen.lock().unwrap().first().map(String::as_str), Some("CONNECT tokens.example.invalid:443 HTTP/1.1"));
}

/// Class 11 (small ones): the database directory is private, `check` warns about secrets other
/// users can read, a group-writable sink mode is refused, the daemon is not dumpable, and a sink
/// write that fails after its temp file exists leaves no temp file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_database_directory_and_exposure_warnings() {
    let w = World::new(MockSettings::default()).await;
    std::fs::write(w.path("secret"), "file-secret").unwrap();
    std::fs::set_permissions(w.path("secret"), std::fs::Permissions::from_mode(0o644)).unwrap();
    w.write_config(&format!(
        "{}\n[[credential]]\nname = \"f\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret_file = \"secret\"\n",
        credential("c", "c.token")
    ));
    std::fs::set_permissions(w.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let check = w.tokend(&["check"], None).await;
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert!(check.stderr.contains("holds 1 inline secret(s) and every local user can read it"), "{}", check.stderr);
    assert!(
        check.stderr.contains("client_secret_file") && check.stderr.contains("can be read by every local user"),
        "{}",
        check.stderr
    );

    w.write_config(&credential("c", "c.token").replace("path = \"c.token\"", "path = \"c.token\"\nmode = \"0660\""));
    let check = w.tokend(&["check"], None).await;
    assert_eq!(check.code, 3);
    assert!(check.stderr.contains("0660 lets the group replace the token"), "{}", check.stderr);

    std::fs::write(
        w.config_path(),
        format!(
            "[daemon]\ndatabase = \"state/deep/tokend.db\"\n{}",
            credential("c", "c.token").replace("{mock}", &w.mock.url(""))
        ),
    )
    .unwrap();
    let _daemon = w.start_daemon().await;
    assert_eq!(mode(&w.path("state/deep")), 0o700);
    assert_eq!(mode(&w.path("state")), 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_is_not_dumpable_and_failed_sink_writes_leave_no_temp_file() {
    let w = World::new(MockSettings::default()).await;
    std::os::unix::fs::chown(w.dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::create_dir(w.path("out")).unwrap();
    std::os::unix::fs::chown(w.path("out"), Some(NOBODY), Some(NOBODY)).unwrap();
    // group 0: a group the daemon's user (nobody) is not in, so giving the file to it fails.
    w.write_config(
        &credential("c", "out/c.token")
            .replace("path = \"out/c.token\"", "path = \"out/c.token\"\nmode = \"0640\"\ngroup = \"root\""),
    );
    let answer = w.mock.authorize("c");
    let import = run_as_with_stdin(NOBODY, NOBODY, &w, &["import", "c"], &answer.to_string());
    assert_eq!(import.status.code(), Some(0), "{}", String::from_utf8_lossy(&import.stderr));
    assert!(String::from_utf8_lossy(&import.stderr).contains("cannot give the file to group 0"));
    let leftovers: Vec<String> = std::fs::read_dir(w.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");

    let mut daemon = tokio::process::Command::new("setpriv")
        .args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_tokend"))
        .args(["--config", w.config_path().to_str().unwrap(), "run"])
        .current_dir(w.dir.path())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = daemon.id().unwrap();
    // setpriv execs tokend in place: the same pid. A non-dumpable process's /proc files belong
    // to root, whoever runs it.
    let undumpable = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "tokend")
            && std::fs::metadata(format!("/proc/{pid}/environ")).is_ok_and(|m| m.uid() == 0)
            && std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.contains(&format!("Uid:\t{NOBODY}")))
    })
    .await;
    let _ = daemon.kill().await;
    assert!(undumpable, "tokend running as nobody still owns its /proc files (dumpable)");
}

fn run_as_with_stdin(uid: u32, gid: u32, w: &World, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("setpriv")
        .args([&format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_tokend"))
        .args(["--config", w.config_path().to_str().unwrap()])
        .args(args)
        .current_dir(w.dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_provider_keeps_a_bounded_request_log() {
    let mock = MockProvider::start(MockSettings { keep_requests: Some(2), ..MockSettings::default() }).await.unwrap();
    for _ in 0..3 {
        let _ = reqwest::Client::new().post(mock.url("/token")).body("grant_type=x").send().await.unwrap();
    }
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_link_at_a_sink_path_is_replaced_and_the_other_name_keeps_nothing_new() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(&credential("c", "out/c.token"));
    // Someone links a file they can read to where the token will go.
    std::fs::write(w.path("theirs"), "old").unwrap();
    std::fs::hard_link(w.path("theirs"), w.path("out/c.token")).unwrap();
    let answer = w.mock.authorize("c");
    let run = w.tokend(&["import", "c"], Some(&answer.to_string())).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("replaced a file with several hard links"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(w.path("theirs")).unwrap(), "old");
    assert_eq!(std::fs::read_to_string(w.path("out/c.token")).unwrap(), answer["access_token"].as_str().unwrap());
    assert_eq!(w.show("c").await.code, 0);
}
