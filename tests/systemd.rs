//! Behaving as a systemd service: the notify protocol over a real datagram socket, journald log
//! lines, and the Prometheus textfile.

mod support;

use nix::sys::signal::Signal;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;
use support::{World, wait_for};
use tokend::dev::mock::MockSettings;

const ONE: &str = r#"
[[credential]]
name = "a"
provider = "oauth2"
token_url = "{mock}/token"
client_id = "c"
client_secret = "s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_stopping_arrive_in_order() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    let socket_path = w.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let collector = std::thread::spawn(move || {
        let mut messages = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let stopping = text.contains("STOPPING=1");
                messages.push(text);
                if stopping {
                    break;
                }
            }
        }
        messages
    });
    let mut daemon =
        w.start_daemon_env(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")]).await;
    // 400 ms watchdog → pings every 200 ms; give it time for a few.
    tokio::time::sleep(Duration::from_millis(900)).await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
    let messages = collector.join().unwrap();

    let position = |needle: &str| messages.iter().position(|m| m.lines().any(|l| l == needle));
    let ready = position("READY=1").expect("READY=1 sent");
    let ping = position("WATCHDOG=1").expect("WATCHDOG=1 sent");
    let stopping = position("STOPPING=1").expect("STOPPING=1 sent");
    assert!(ready < ping && ping < stopping, "order: {messages:?}");
    let pings = messages.iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).count();
    assert!((2..=8).contains(&pings), "{pings} pings in ~0.9 s at a 200 ms interval: {messages:?}");
    assert!(
        messages[ready].contains("STATUS=1 credentials, 0 failing, 0 needing re-authorization, next refresh in"),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_that_stops_reading_does_not_stall_refreshes() {
    // 4 s tokens: a refresh every two seconds or so.
    let w = World::new(MockSettings { expires_in: 4, ..MockSettings::default() }).await;
    w.write_config(ONE);
    w.authorize_and_import("a").await;
    let socket_path = w.path("notify.sock");
    // Bound and never read: the kernel queues a few datagrams (net.unix.max_dgram_qlen, 10 by
    // default), then a blocking sender waits forever.
    let _socket = UnixDatagram::bind(&socket_path).unwrap();
    let daemon =
        w.start_daemon_env(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap()), ("WATCHDOG_USEC", "100000")]).await;
    // A watchdog ping every 50 ms fills the queue within a second; refreshes must go on.
    assert!(
        wait_for(Duration::from_secs(15), || w.generation("a") >= 5).await,
        "generation {} after 15 s: {}",
        w.generation("a"),
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("notification queue is full"), "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_lines_carry_priorities_not_timestamps() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(ONE);
    let stderr_path = w.path("journal.txt");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["import", "a"])
        .env("TOKEND_CONFIG", w.config_path())
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(br#"{"access_token":"x1","expires_in":60}"#)?;
            child.wait()
        })
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&stderr_path).unwrap();
    let line = text.lines().find(|l| l.contains("answer has no created_at")).expect(&text);
    assert!(line.starts_with("<6>tokend::cli: answer has no created_at"), "{line}");
    assert!(!text.contains("\u{1b}["), "no colour codes for the journal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_textfile_is_written() {
    let w = World::new(MockSettings::default()).await;
    w.write_config_with_daemon("metrics_file = \"tokend.prom\"\n", ONE);
    w.authorize_and_import("a").await;
    let daemon = w.start_daemon().await;
    let metrics = w.path("tokend.prom");
    assert!(wait_for(Duration::from_secs(3), || metrics.exists()).await, "{}", daemon.log_text());
    daemon.signal(Signal::SIGUSR1);
    let want = "tokend_refresh_total{credential=\"a\",provider=\"oauth2\",result=\"success\"} 1";
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains(want))).await,
        "{}",
        std::fs::read_to_string(&metrics).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let state = w.store().get("a").unwrap().unwrap();
    assert!(text.contains(&format!(
        "tokend_token_expires_at_seconds{{credential=\"a\",provider=\"oauth2\"}} {}",
        state.expires_at.unwrap()
    )));
    assert!(text.contains("tokend_credential_needs_reauth{credential=\"a\",provider=\"oauth2\"} 0"));
    assert!(text.contains("tokend_last_refresh_timestamp_seconds{credential=\"a\",provider=\"oauth2\"}"));
    assert!(!text.contains(state.access_token.expose()));
}

/// A change another process makes in the store (`tokend import` after a re-authorization) is
/// published at once: STATUS= and the metrics file stopped saying "needing re-authorization".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_follow_an_import_by_another_process() {
    let w = World::new(MockSettings::default()).await;
    w.write_config_with_daemon("metrics_file = \"tokend.prom\"\n", ONE);
    w.authorize_and_import("a").await;
    let socket_path = w.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = statuses.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.lock().unwrap().extend(text.lines().filter_map(|l| l.strip_prefix("STATUS=")).map(str::to_string));
            }
        }
    });
    let daemon = w.start_daemon_env(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]).await;
    let last_status = || statuses.lock().unwrap().last().cloned().unwrap_or_default();
    let metrics = || std::fs::read_to_string(w.path("tokend.prom")).unwrap_or_default();
    let dead = "tokend_credential_needs_reauth{credential=\"a\",provider=\"oauth2\"} 1";
    w.mock.push_fault(tokend::dev::mock::Fault::Answer {
        status: 400,
        body: r#"{"error":"invalid_grant"}"#.into(),
        headers: vec![],
    });
    daemon.signal(Signal::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(5), || last_status().contains("1 needing re-authorization")
            && metrics().contains(dead))
        .await,
        "{:?}",
        statuses.lock().unwrap()
    );
    w.authorize_and_import("a").await;
    assert!(
        wait_for(Duration::from_secs(3), || last_status().contains("0 needing re-authorization")
            && metrics().contains(&dead.replace("} 1", "} 0")))
        .await,
        "still stale after the import: {:?}\n{}",
        statuses.lock().unwrap(),
        metrics()
    );
}

/// Install steps: a token imported before the service first ran (its /run/tokend does not exist
/// yet) is stored, and the sink is mentioned calmly instead of as an error; the daemon writes it
/// once the directory exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_before_the_runtime_directory_exists_is_calm() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(&format!("{ONE}[[credential.sink]]\npath = \"run/tokend/a.token\"\n"));
    let answer = w.mock.authorize("a");
    let import = w.tokend(&["import", "a"], Some(&answer.to_string())).await;
    assert_eq!(import.code, 0, "{}", import.stderr);
    assert!(!import.stderr.contains("ERROR"), "{}", import.stderr);
    assert!(
        import.stderr.contains("does not exist (yet); the daemon writes every sink when it starts"),
        "{}",
        import.stderr
    );
    std::fs::create_dir_all(w.path("run/tokend")).unwrap();
    let _daemon = w.start_daemon().await;
    assert_eq!(
        std::fs::read_to_string(w.path("run/tokend/a.token")).unwrap(),
        answer["access_token"].as_str().unwrap()
    );
}
