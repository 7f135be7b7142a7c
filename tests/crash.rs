//! SIGKILL at random moments, hundreds of times, and restart: no refresh-token chain may be lost
//! silently. At the end, for every credential, either the store holds the provider's live refresh
//! token, or the credential is flagged `needs_reauth` *and* the provider shows that the token the
//! store holds was rotated while a killed daemon was waiting for the answer (the crash window no
//! client can close: the answer died with the process). Those are counted; anything else fails.
//!
//! The same churn against a provider with a reuse grace period (django-oauth-toolkit's
//! `REFRESH_TOKEN_GRACE_PERIOD_SECONDS`) must lose nothing at all: the interrupted attempt is
//! retried first thing at the next start, within the grace.
//!
//! Both run on SQLite and on PostgreSQL (tests/support/backend.rs), the PostgreSQL churn shorter
//! (each life connects to a server, and CI's budget is shared): [`Budget`].

mod support;

use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use support::{Backend, World};
use tokend::clock::now_ms;
use tokend::dev::mock::MockSettings;

const CREDENTIALS: usize = 8;
/// A request sent just before a kill may be processed by the provider just after it.
const IN_FLIGHT_SLACK_MS: i64 = 200;

/// How long one backend's churn goes on: up to `max_kills` lives or `max_churn`, and how many kills
/// a run without a grace must reach to count (each life is a random 20–700 ms).
struct Budget {
    max_kills: usize,
    min_kills: usize,
    max_churn: Duration,
}

fn budget(backend: Backend) -> Budget {
    match backend {
        Backend::Sqlite => Budget { max_kills: 200, min_kills: 150, max_churn: Duration::from_secs(150) },
        Backend::Postgres => Budget { max_kills: 60, min_kills: 45, max_churn: Duration::from_secs(50) },
    }
}

on_both_backends!(
    sigkill_at_random_moments_never_loses_a_chain_silently,
    with_a_reuse_grace_period_sigkills_lose_no_chain
);

async fn sigkill_at_random_moments_never_loses_a_chain_silently(backend: Backend) {
    let run = churn(backend, "crash", Duration::ZERO).await;
    let Budget { min_kills, max_churn, .. } = budget(backend);
    assert!(run.kills >= min_kills, "only {} kills in {max_churn:?}", run.kills);
    assert!(run.silently_lost.is_empty(), "chains lost silently: {:?}\n{}", run.silently_lost, run.figures);
    assert_eq!(run.intact + run.lost_in_crash_window, CREDENTIALS);
}

async fn with_a_reuse_grace_period_sigkills_lose_no_chain(backend: Backend) {
    let run = churn(backend, "crash-grace", Duration::from_secs(10)).await;
    let Budget { max_kills, max_churn, .. } = budget(backend);
    assert!(run.kills >= max_kills, "only {} kills in {max_churn:?}", run.kills);
    assert!(run.silently_lost.is_empty(), "chains lost silently: {:?}\n{}", run.silently_lost, run.figures);
    assert_eq!(
        run.intact, CREDENTIALS,
        "a chain died although the provider honours a spent token for 10 s\n{}",
        run.figures
    );
    assert!(run.grace_reuses >= 1, "no interrupted attempt was retried within the grace\n{}", run.figures);
}

struct Churn {
    kills: usize,
    /// Spent refresh tokens the provider honoured within its grace: interrupted attempts retried.
    grace_reuses: u64,
    intact: usize,
    lost_in_crash_window: usize,
    silently_lost: Vec<String>,
    figures: String,
}

/// Starts and SIGKILLs `tokend run` up to [`Budget::max_kills`] times against the mock with
/// `reuse_grace`, then runs it once cleanly and judges every chain; `label` names the figures.
async fn churn(backend: Backend, label: &str, reuse_grace: Duration) -> Churn {
    let Budget { max_kills, max_churn, .. } = budget(backend);
    let seed: u64 = std::env::var("TOKEND_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_123);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w = World::on(backend, MockSettings { expires_in: 2, reuse_grace, ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let mut config = String::new();
    for i in 0..CREDENTIALS {
        config.push_str(&format!(
            "[[credential]]\nname = \"c{i}\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"out/c{i}.token\"\n\n"
        ));
    }
    w.write_config(&config);
    for i in 0..CREDENTIALS {
        w.authorize_and_import(&format!("c{i}")).await;
    }

    // (start, kill) of every killed daemon, unix ms.
    let mut lives: Vec<(i64, i64)> = Vec::new();
    let churn_until = tokio::time::Instant::now() + max_churn;
    while lives.len() < max_kills && tokio::time::Instant::now() < churn_until {
        // With a grace, the first life dies exactly in the crash window (after the provider's
        // answer, before the commit: the debug build's abort), so the run cannot pass without the
        // start-up retry having been needed at least once; random kills add more such windows.
        let abort_in_window = !reuse_grace.is_zero() && lives.is_empty();
        let started = now_ms();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokend"));
        command
            .args(["--log-level", "warn", "run"])
            .env("TOKEND_CONFIG", w.config_path())
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(w.path("crash.log")).unwrap())
            .kill_on_drop(true);
        if abort_in_window {
            command.env("TOKEND_TEST_ABORT_BEFORE_COMMIT", "c0");
        }
        let mut child = command.spawn().unwrap();
        if abort_in_window {
            let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .expect("aborted in the window")
                .unwrap();
            assert!(status.code().is_none(), "the first life should have aborted before its commit: {status:?}");
            lives.push((started, now_ms()));
            continue;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..700))).await;
        let killed_at = now_ms();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), Signal::SIGKILL);
        let status =
            tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("killed child reaped").unwrap();
        assert!(status.code().is_none() || status.success(), "daemon failed on its own: {status:?}");
        lives.push((started, killed_at));
    }
    let refreshes_during_churn = w.mock.refreshes();

    // One clean run settles every abandoned attempt and refreshes everything due.
    let mut daemon = w.start_daemon().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);

    let store = w.store();
    let (mut intact, mut lost_in_crash_window, mut silently_lost) = (0, 0, Vec::new());
    let mut window_evidence = Vec::new();
    for i in 0..CREDENTIALS {
        let name = format!("c{i}");
        let state = store.get(&name).unwrap().unwrap();
        let held = state.refresh_token.as_ref().unwrap().expose().to_string();
        if w.mock.live_refresh_token(&name).as_deref() == Some(held.as_str()) {
            assert_eq!(state.status, tokend::store::Status::Active, "{name}: live chain but flagged");
            intact += 1;
            continue;
        }
        let rotated = w.mock.rotated_at(&held);
        // The life the rotation happened in; failing that, one it may have been in flight at the
        // end of (lives follow each other closely, so the slack overlaps the next one's start).
        let in_window = rotated.and_then(|r| {
            let life = lives.iter().find(|(start, kill)| *start <= r && r <= *kill);
            life.or_else(|| lives.iter().find(|(start, kill)| *start <= r && r <= kill + IN_FLIGHT_SLACK_MS))
                .map(|(_, kill)| kill - r)
        });
        match (state.status, in_window) {
            (tokend::store::Status::NeedsReauth, Some(gap)) => {
                lost_in_crash_window += 1;
                window_evidence.push(if gap >= 0 {
                    format!("{name}: rotated {gap} ms before the kill")
                } else {
                    format!("{name}: request in flight at the kill, rotated {} ms after it", -gap)
                });
            }
            _ => silently_lost.push(format!("{name}: status {:?}, rotated at {rotated:?}", state.status)),
        }
    }
    let log = std::fs::read_to_string(w.path("crash.log")).unwrap_or_default() + &daemon.log_text();
    let figures = format!(
        "{label} on {}: reuse grace {reuse_grace:?}, seed {seed}, {} SIGKILLs, {refreshes_during_churn} refreshes during the churn, {} in total; \
         {CREDENTIALS} chains: {intact} intact, {lost_in_crash_window} lost in the crash window (flagged needs_reauth, confirmed by the provider), \
         {} lost silently; provider saw {} reuse(s) of a spent token refused (the retries that revealed those losses) \
         and honoured {} within the grace (interrupted attempts retried at start-up){}",
        backend.name(),
        lives.len(),
        w.mock.refreshes(),
        silently_lost.len(),
        w.mock.reuses(),
        w.mock.grace_reuses(),
        if window_evidence.is_empty() { String::new() } else { format!(" [{}]", window_evidence.join("; ")) }
    );
    println!("{figures}");
    support::record_figures(&backend.figures_name(label), &figures);
    assert!(!log.contains("panicked"), "a daemon panicked:\n{log}");
    Churn {
        kills: lives.len(),
        grace_reuses: w.mock.grace_reuses(),
        intact,
        lost_in_crash_window,
        silently_lost,
        figures,
    }
}
