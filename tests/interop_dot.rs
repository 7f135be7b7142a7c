//! Interop with an authorization server we did not write: django-oauth-toolkit 3.4.1 on
//! 127.0.0.1 with refresh-token rotation, reuse protection and no grace period, 6 s access tokens,
//! a confidential client and PKCE required. The test plays the browser (logged-in session →
//! authorize → redirect delivered to `tokend authorize`), then `tokend run` refreshes several
//! times, and afterwards every refresh token tokend spent must be refused by the server.
//!
//! Once more with a grace period (REFRESH_TOKEN_GRACE_PERIOD_SECONDS = 10): the daemon aborts
//! between the server's answer and the commit, and the chain survives because the next start
//! retries the interrupted attempt first.
//!
//! Needs Python 3: `tests/peers/dot/setup-venv.sh` (run by `.ci/run`, or by this test) installs
//! the server in `target/dot-venv`. Without python3 the test says SKIPPED and why.

mod support;

use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use support::{World, wait_for};
use tokend::dev::mock::MockSettings;
use tokio::io::{AsyncBufReadExt, BufReader};

const CLIENT_ID: &str = "tokend-interop";
const CLIENT_SECRET: &str = "interop-secret-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn peer_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if std::process::Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED interop with django-oauth-toolkit: python3 is not installed");
        support::record_figures("skipped-interop", "interop_dot: skipped, python3 is not installed");
        return None;
    }
    let setup = std::process::Command::new("bash").arg(root.join("tests/peers/dot/setup-venv.sh")).status().unwrap();
    assert!(setup.success(), "tests/peers/dot/setup-venv.sh failed (python3 is here, so this is a real failure)");
    Some(root.join("target/dot-venv/bin/python"))
}

fn peer(python: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/dot/peer.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "peer.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// django-oauth-toolkit serving on loopback with `grace_secs`, and the credential `dot`
/// authorized by `tokend authorize` (the test plays the browser).
struct Peer {
    python: PathBuf,
    base: String,
    w: World,
    server: tokio::process::Child,
}

async fn authorized_peer(grace_secs: u32) -> Option<Peer> {
    let python = peer_python()?;
    // The World's mock is unused here; it only provides the temp dir and helpers.
    let w = World::new(MockSettings::default()).await;
    let (server_port, redirect_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{server_port}");
    let redirect = format!("http://127.0.0.1:{redirect_port}/callback");
    let db = w.path("dot.sqlite3");
    assert_eq!(peer(&python, &["setup", db.to_str().unwrap(), CLIENT_ID, CLIENT_SECRET, &redirect]), "ready");
    let server = tokio::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/dot/peer.py"))
        .args(["serve", db.to_str().unwrap(), &server_port.to_string()])
        .env("TOKEND_PEER_GRACE_SECONDS", grace_secs.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.path("dot.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let up =
        wait_for(Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", server_port)).is_ok()).await;
    assert!(up, "django did not start: {}", std::fs::read_to_string(w.path("dot.log")).unwrap_or_default());
    w.write_config(&format!(
        "[[credential]]\nname = \"dot\"\nprovider = \"oauth2\"\nauthorize_url = \"{base}/o/authorize/\"\ntoken_url = \"{base}/o/token/\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nscope = \"read\"\nredirect_uri = \"{redirect}\"\n[[credential.sink]]\npath = \"dot.token\"\n"
    ));
    let mut authorize = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["authorize", "dot"])
        .env("TOKEND_CONFIG", w.config_path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(authorize.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("authorize printed a URL");
        if line.starts_with("http") {
            break line;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // Give the listener a moment to bind, then play the browser.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let browsed = peer(&python, &["browse", &base, &url]);
    assert!(browsed.starts_with("200"), "{browsed}");
    let status = tokio::time::timeout(Duration::from_secs(20), authorize.wait()).await.unwrap().unwrap();
    assert!(status.success(), "tokend authorize failed");
    Some(Peer { python, base, w, server })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_and_rotate_against_django_oauth_toolkit() {
    let Some(Peer { python, base, w, mut server }) = authorized_peer(0).await else { return };
    let first = w.store().get("dot").unwrap().unwrap();

    // Let the daemon rotate through several 6 s tokens (refresh at 3 s), recording every
    // refresh token it holds.
    let daemon = w.start_daemon().await;
    let mut seen = vec![first.refresh_token.clone().unwrap().expose().to_string()];
    let until = tokio::time::Instant::now() + Duration::from_secs(11);
    while tokio::time::Instant::now() < until {
        if let Some(t) = w.store().get("dot").unwrap().and_then(|s| s.refresh_token)
            && seen.last().map(String::as_str) != Some(t.expose())
        {
            seen.push(t.expose().to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.signal(Signal::SIGTERM);
    let mut daemon = daemon;
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
    let state = w.store().get("dot").unwrap().unwrap();
    assert!(
        state.generation >= 4,
        "at least 3 refreshes in 11 s, got generation {}: {}",
        state.generation,
        daemon.log_text()
    );
    assert_eq!(state.status, tokend::store::Status::Active);
    assert_eq!(std::fs::read_to_string(w.path("dot.token")).unwrap(), state.access_token.expose());

    // The chain is alive: the stored refresh token still works...
    let last = w.tokend(&["refresh", "dot"], None).await;
    assert_eq!(last.code, 0, "{}", last.stderr);
    // ...and every refresh token tokend spent is refused by the server.
    let spent = seen.len();
    for old in &seen {
        let answer = peer(&python, &["refresh", &base, CLIENT_ID, CLIENT_SECRET, old]);
        assert_eq!(answer, "400 invalid_grant", "a spent refresh token was accepted");
    }
    let figures = format!(
        "interop django-oauth-toolkit 3.4.1: authorized with code + PKCE + state, {} rotations by tokend run + 1 by tokend refresh; {spent} spent refresh tokens all refused (400 invalid_grant)",
        state.generation - 1
    );
    println!("{figures}");
    support::record_figures("interop", &figures);
    let _ = server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_answer_and_commit_survives_a_grace_period() {
    let Some(Peer { w, mut server, .. }) = authorized_peer(10).await else { return };
    let first = w.store().get("dot").unwrap().unwrap();

    // The first refresh (at 3 s) gets the server's answer and the process aborts before the
    // commit: the server has rotated, the store still holds the spent refresh token.
    let mut dying = w.start_daemon_env(&[("TOKEND_TEST_ABORT_BEFORE_COMMIT", "dot")]).await;
    let code = dying.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, -1, "aborted by a signal: {}", dying.log_text());
    let held = w.store().get("dot").unwrap().unwrap();
    assert_eq!((held.generation, held.attempts_in_flight), (first.generation, 1));
    assert_eq!(held.refresh_token, first.refresh_token);
    let answered = |log: &str| log.matches("\"POST /o/token/ HTTP/1.1\" 200").count();
    let dot_log = || std::fs::read_to_string(w.path("dot.log")).unwrap_or_default();
    assert_eq!(answered(&dot_log()), 2, "code exchange + the refresh whose answer died: {}", dot_log());

    // The next start retries that attempt first, within the grace: the chain lives on.
    let daemon = w.start_daemon().await;
    let log = daemon.log_text();
    assert!(log.contains("the interrupted refresh was retried: the chain is intact"), "{log}");
    let state = w.store().get("dot").unwrap().unwrap();
    assert_eq!(state.status, tokend::store::Status::Active);
    assert!(state.generation > first.generation);
    assert_eq!(answered(&dot_log()), 3, "the spent refresh token was honoured once more: {}", dot_log());
    daemon.signal(Signal::SIGTERM);
    let mut daemon = daemon;
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
    let next = w.tokend(&["refresh", "dot"], None).await;
    assert_eq!(next.code, 0, "the chain is alive: {}", next.stderr);
    let figures = "interop django-oauth-toolkit 3.4.1 with REFRESH_TOKEN_GRACE_PERIOD_SECONDS = 10: aborted between the answer and the commit, the next start retried the attempt and the server honoured the spent token; chain intact";
    println!("{figures}");
    support::record_figures("interop-grace", figures);
    let _ = server.kill().await;
}
