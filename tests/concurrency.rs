//! `tokend refresh` from the CLI racing the daemon, hundreds of times: never a double-spent
//! refresh token, never a `database is locked` error reaching the user — on SQLite and on
//! PostgreSQL (tests/support/backend.rs).

mod support;

use nix::sys::signal::Signal;
use std::time::Duration;
use support::{Backend, World};
use tokend::dev::mock::MockSettings;

const RACES: usize = 200;
const PARALLEL: usize = 4;

on_both_backends!(cli_refreshes_racing_the_daemon_never_double_spend);

async fn cli_refreshes_racing_the_daemon_never_double_spend(backend: Backend) {
    // 2 s tokens: the daemon itself refreshes every second while the CLI hammers.
    let w = World::on(backend, MockSettings { expires_in: 2, ..MockSettings::default() }).await;
    w.write_config(
        "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
    );
    w.authorize_and_import("c").await;
    let mut daemon = w.start_daemon().await;
    let started = std::time::Instant::now();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..RACES / PARALLEL {
        let runs = futures_util::future::join_all((0..PARALLEL).map(|_| w.tokend(&["refresh", "c"], None))).await;
        for run in runs {
            assert_eq!(run.code, 0, "a CLI refresh failed: {}", run.stderr);
            assert!(!run.stderr.to_lowercase().contains("locked") && !run.stderr.contains("busy"), "{}", run.stderr);
            let kind =
                if run.stdout.contains("by another process") { "waited for another refresh" } else { "refreshed" };
            *outcomes.entry(kind.into()).or_default() += 1;
        }
    }
    let elapsed = started.elapsed();
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);

    assert_eq!(w.mock.reuses(), 0, "a spent refresh token was sent again");
    let state = w.store().get("c").unwrap().unwrap();
    assert_eq!(state.refresh_token.unwrap().expose(), w.mock.live_refresh_token("c").unwrap());
    assert_eq!((state.generation - 1) as u64, w.mock.refreshes(), "one generation per provider rotation");
    let figures = format!(
        "concurrency on {}: {RACES} CLI refreshes ({PARALLEL} at a time) racing the daemon in {:.1} s: {outcomes:?}; \
         {} rotations at the provider, 0 reuses of a spent token, 0 errors",
        backend.name(),
        elapsed.as_secs_f64(),
        w.mock.refreshes()
    );
    println!("{figures}");
    support::record_figures(&backend.figures_name("concurrency"), &figures);
}
