//! `tokend run`: the wiring that keeps every credential fresh. Business rules live elsewhere —
//! *when* in [`crate::schedule`], *how* in [`crate::refresh`]; this module owns the loop that
//! connects them to time, signals and files:
//!
//! ```text
//! select! {
//!     control (signals)      → shutdown / reload / refresh all
//!     a refresh finished     → record the outcome, plan the next deadline
//!     file event             → (debounced) rewrite altered sinks, `.refresh` triggers, config reload
//!     the earliest deadline  → start due refreshes, expire dead tokens from sinks, housekeeping
//! }
//! ```
//!
//! One wall-clock timer ([`crate::timer::WallTimer`]) waits for the earliest deadline of a
//! [`queue::DeadlineQueue`]; when nothing is due the process sleeps without waking.

mod admission;
mod events;
mod fleet;
mod instance;
mod on_demand;
mod outcome;
mod plan;
mod publish;
pub mod queue;
mod reconcile;
pub mod signals;
mod sink_sync;
mod systemd;
mod watch;

use events::TriggerFloor;
use instance::lock_database;
pub use instance::{
    ReloadOutcome, notify_store_changed, publish_imported, reload_outcome_path, running_daemon, store_changed_path,
};
pub use publish::Summary;

use crate::clock::{now_ms, rfc3339, short_duration};
use crate::config::{self, Config, ConfigError, Credential};
use crate::hooks::{self, Event};
use crate::metrics::{self, CredentialMetrics};
use crate::provider::{Failure, GrantKind, HttpClient, ProviderKind};
use crate::refresh::{self, Outcome, RefreshError};
use crate::schedule;
use crate::sink;
use crate::store::{AnyRefreshStore, AnyStore, Lifetime, Status, StoreError, TokenState};
use crate::timer::WallTimer;
use queue::{DeadlineQueue, Job};
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// In-flight refreshes get this long to finish and commit after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// File events are collected for this long before acting, so one rename is handled once.
const FS_DEBOUNCE: Duration = Duration::from_millis(100);
/// Editors write a config in several steps; wait for them to finish before reloading.
const CONFIG_DEBOUNCE: Duration = Duration::from_millis(300);
/// When another process (`tokend refresh`) holds a credential's lease, look again after this.
const LEASE_BUSY_RETRY_MS: i64 = 2000;
/// How long after a busy lease's end it is looked at again (the store's clock and ours differ by
/// the round trip that reported it).
const LEASE_END_SLACK_MS: i64 = 100;
/// `.refresh` triggers for one credential are honoured at most this often; a script stuck in a
/// 401 loop must not hammer the provider.
const TRIGGER_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Finished attempt records are kept this long for diagnosis.
const ATTEMPT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Daily housekeeping, 03:17 UTC (croner syntax).
const MAINTENANCE_CRON: &str = "17 3 * * *";
/// Metrics and systemd STATUS are published at most this often.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// The queue key of daemon-wide jobs; credential names cannot be empty.
const DAEMON_KEY: &str = "";

/// What signals (or a test) ask the daemon to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Shutdown,
    Reload,
    RefreshAll,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another `tokend run` is using {database} ({holder}); refusing to start a second one")]
    AlreadyRunning { database: PathBuf, holder: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The HTTP client could not be built (a bad proxy URL, no TLS roots).
    #[error("{0}")]
    Http(String),
    /// A socket of `[daemon] socket` / `credential_socket` could not be served.
    #[error("{0}")]
    Socket(String),
}

struct Entry {
    credential: Arc<Credential>,
    /// `None` while no token is stored.
    lifetime: Option<Lifetime>,
    failures: u32,
    /// When to try again after a failure (unix ms); unknown: at the planned refresh point.
    retry_at: crate::store::MaybeTime,
    in_flight: bool,
    /// In the `waiting` queue for a concurrency slot.
    waiting: bool,
    /// Refresh results since start by `metrics::RefreshResult`, for metrics. (A map here cost a
    /// 300-byte node per credential once it had refreshed.)
    results: [u32; metrics::RefreshResult::ALL.len()],
    /// A rotated token the provider issued but the store could not take (disk full, read-only),
    /// and its rescue file: committed before anything else is tried, so the chain survives the
    /// outage. Boxed: rare, and every credential carries the field.
    pending: Option<Box<(crate::store::NewToken, String)>>,
}

type RefreshResult = (Arc<str>, Result<Outcome, RefreshError>);

struct Daemon {
    config: Config,
    /// The daemon's own connection: reads, imports of rescued tokens, housekeeping.
    store: Arc<Mutex<AnyStore>>,
    /// The refresh path's connection: with group commit on SQLite.
    committer: AnyRefreshStore,
    /// The socket API's tokens in memory; see `forget` calls for what empties it.
    snapshot: Arc<crate::socket::TokenSnapshot>,
    /// Every sink read and write of the daemon goes through this thread.
    sinks: sink::SinkWriter,
    http: HttpClient,
    queue: DeadlineQueue,
    /// Keyed by the credential's own name allocation (`Credential::name`), shared with the queue.
    /// Fx hashing: the names come from the operator's configuration, not from an adversary.
    entries: FxHashMap<Arc<str>, Entry>,
    admission: Admission,
    watches: Watches,
    due: Due,
    /// `tokend import`/`remove` touch this file to tell a running daemon to re-read the store.
    store_changed_path: PathBuf,
    /// Reloads attempted since start, numbering the outcomes `tokend reload` waits for.
    reloads: u64,
    /// The socket API's servers and the callers waiting on refreshes they asked for.
    on_demand: on_demand::OnDemand,
    notices: Notices,
    /// Fleet mode: the store's notification connection (`fleet.rs`).
    fleet: fleet::Fleet,
}

/// What humans were told, for the few credentials that had something to tell: kept beside the
/// entries rather than in each of them (100,000 entries × 28 bytes for a handful of values).
#[derive(Default)]
struct Notices {
    /// The re-authorization deadline `reauth_soon` was announced for, by credential.
    warned: FxHashMap<Arc<str>, i64>,
    /// Events since start by [`metrics::NOTICES`], for metrics.
    counts: FxHashMap<Arc<str>, [u32; metrics::NOTICES.len()]>,
}

impl Notices {
    fn count(&mut self, name: &Arc<str>, notice: metrics::Notice) {
        self.counts.entry(name.clone()).or_default()[notice as usize] += 1;
    }
}

/// Which refreshes run, which wait, and which endpoints asked us to wait (`admission.rs`).
#[derive(Default)]
struct Admission {
    /// In-flight refresh tasks: credential and provider.
    running: HashMap<tokio::task::Id, (Arc<str>, ProviderKind)>,
    /// Due credentials waiting for a free slot (global or per-provider concurrency). Tasks are
    /// only spawned when a slot is free: 100,000 parked futures would cost hundreds of MB.
    waiting: std::collections::VecDeque<Arc<str>>,
    in_flight_by_provider: HashMap<ProviderKind, usize>,
    /// Set on shutdown: no new refresh starts.
    stopping: bool,
    /// Rate-limit pauses by [`crate::provider::Endpoint::rate_limit_key`]: until when that
    /// budget (a credential, a client or a whole endpoint) asked us to wait.
    paused_until: HashMap<String, i64>,
}

/// The files the daemon watches and what their events asked for (`events.rs`).
struct Watches {
    /// Sink path → credential, and `.refresh` trigger path → credential.
    sink_owner: HashMap<PathBuf, Arc<str>>,
    trigger_owner: HashMap<PathBuf, Arc<str>>,
    /// The trigger floor of each credential refreshed through its trigger file (few ever are).
    trigger_floor: HashMap<Arc<str>, TriggerFloor>,
    fs_tx: mpsc::UnboundedSender<PathBuf>,
    watcher: Option<notify::RecommendedWatcher>,
    dirty_sinks: HashSet<Arc<str>>,
    triggered: HashSet<Arc<str>>,
}

/// Debounced work and when it is due: file events settle, the config file is re-read, the store
/// re-read, STATUS= and metrics republished.
#[derive(Default)]
struct Due {
    fs: Option<Instant>,
    reload: Option<Instant>,
    store_sync: Option<Instant>,
    publish: Option<Instant>,
}

/// Runs the daemon until [`Control::Shutdown`]; tells systemd READY=1 once every credential is
/// scheduled.
pub async fn run(config_path: &Path, mut control: UnboundedReceiver<Control>) -> Result<(), DaemonError> {
    let started = Instant::now();
    let config_path = std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let config = config::load(&config_path)?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis(),
        credentials = config.credentials.len(),
        "configuration read"
    );
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    raise_open_file_limit();
    let _lock = lock_database(&config.daemon.database)?;
    // Encryption at rest: the key checked against the store before anything is sent.
    let store = AnyStore::open_for_daemon(&config)?;
    let sealer = store.sealer();
    // The socket API's memory of tokens: emptied of a credential by every change the daemon
    // commits or learns of (src/socket/snapshot.rs).
    let snapshot = Arc::new(crate::socket::TokenSnapshot::default());
    let committer = store.refresh_store()?.forgetting_in(snapshot.clone());
    let http = HttpClient::new(config.daemon.http, config.daemon.proxy.as_ref()).map_err(DaemonError::Http)?;
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel();
    let mut daemon = Daemon {
        store_changed_path: store_changed_path(&config.daemon.database),
        committer,
        snapshot: snapshot.clone(),
        sinks: sink::SinkWriter::start()
            .map_err(|source| DaemonError::Io { context: "cannot start the sink writer thread".into(), source })?,
        config,
        store: Arc::new(Mutex::new(store)),
        http,
        queue: DeadlineQueue::default(),
        entries: FxHashMap::default(),
        admission: Admission::default(),
        watches: Watches {
            sink_owner: HashMap::new(),
            trigger_owner: HashMap::new(),
            trigger_floor: HashMap::new(),
            fs_tx,
            watcher: None,
            dirty_sinks: HashSet::new(),
            triggered: HashSet::new(),
        },
        due: Due::default(),
        reloads: 0,
        on_demand: on_demand::OnDemand::default(),
        notices: Notices::default(),
        fleet: fleet::Fleet::default(),
    };
    daemon.config.path = config_path;
    let abandoned = daemon.recover_abandoned_attempts()?;
    daemon.retry_abandoned(abandoned).await;
    tracing::debug!(elapsed_ms = started.elapsed().as_millis(), "store opened");
    let sinks_checked = daemon.apply_config(daemon.config.clone())?;
    // READY=1 means every sink holds its token (the check runs on the sink thread).
    let _ = sinks_checked.await;
    daemon.schedule_maintenance();
    // Served before READY=1, so that units ordered after tokend find the sockets there.
    let refresh_wait = daemon.config.daemon.http.total_timeout + TRIGGER_MIN_INTERVAL + Duration::from_secs(5);
    daemon.on_demand.sockets =
        crate::socket::start(&daemon.config, refresh_wait, &sealer, snapshot).map_err(DaemonError::Socket)?;
    let mut asks = daemon.on_demand.sockets.as_mut().and_then(|s| s.asks.take());
    crate::memory::release_freed_memory();
    tracing::debug!(elapsed_ms = started.elapsed().as_millis(), "every credential scheduled");
    let summary = daemon.summary();
    tracing::info!(config = %daemon.config.path.display(), database = %daemon.store().describe(), "tokend running: {}", summary.describe());
    daemon.publish();
    systemd::ready(&summary.describe());
    let watchdog_interval = systemd::watchdog_interval();
    let mut next_ping = watchdog_interval.map(|i| Instant::now() + i);

    let mut timer = WallTimer::new()
        .map_err(|source| DaemonError::Io { context: "cannot create the wall-clock timer".into(), source })?;
    let mut inflight: JoinSet<RefreshResult> = JoinSet::new();
    let mut store_events = daemon.config.daemon.postgres.as_ref().map(crate::store::postgres::listen::listen);
    loop {
        let next = daemon.queue.next_at();
        let fs_due =
            [daemon.due.fs, daemon.due.reload, daemon.due.store_sync, daemon.due.publish].into_iter().flatten().min();
        tokio::select! {
            biased;
            ctl = control.recv() => match ctl {
                Some(Control::Reload) => daemon.reload(),
                Some(Control::RefreshAll) => daemon.refresh_all(&mut inflight),
                Some(Control::Shutdown) | None => break,
            },
            Some(done) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                daemon.finished(done, &mut inflight);
                daemon.pick_up_heard();
            }
            Some(path) = fs_rx.recv() => daemon.fs_event(path),
            Some(ask) = on_demand::next_ask(&mut asks) => daemon.ask(ask, &mut inflight),
            Some(event) = fleet::next_event(&mut store_events) => daemon.store_events(event, &mut store_events),
            () = sleep_until_opt(fs_due) => daemon.fs_settled(&mut inflight),
            () = sleep_until_opt(next_ping) => {
                // Pinged from the loop itself, and only while the store answers: a wedged loop
                // or a dead disk gets the service restarted.
                if daemon.healthy() {
                    systemd::watchdog();
                }
                next_ping = watchdog_interval.map(|i| Instant::now() + i);
            }
            woke = timer.sleep_until(next.unwrap_or(0)), if next.is_some() => {
                if let Err(e) = woke {
                    return Err(DaemonError::Io { context: "the wall-clock timer failed".into(), source: e });
                }
                daemon.fire_due(&mut inflight);
            }
        }
    }

    systemd::stopping();
    daemon.admission.stopping = true;
    tracing::info!(in_flight = inflight.len(), "shutting down: no new refreshes; letting in-flight ones finish");
    let grace = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(grace);
    while !inflight.is_empty() {
        tokio::select! {
            Some(done) = inflight.join_next_with_id() => daemon.finished(done, &mut JoinSet::new()),
            () = &mut grace => {
                tracing::warn!(abandoned = inflight.len(), "refreshes still waiting on their provider after {SHUTDOWN_GRACE:?}; abandoning them (their attempts stay recorded)");
                inflight.shutdown().await;
                break;
            }
        }
    }
    daemon.forget_settings();
    daemon.publish();
    tracing::info!("stopped");
    Ok(())
}

/// `concurrency` requests in flight each hold a socket, and sink batches hold files: the soft
/// limit of 1,024 is too low for `concurrency = 512`. The hard limit (systemd's default is 524,288)
/// is what the operator allows.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(soft, hard, "cannot raise the open-file limit: {e}");
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    fn store(&self) -> std::sync::MutexGuard<'_, AnyStore> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A crash between "request sent" and "answer committed" leaves an attempt without a result.
    /// The stored refresh token is unchanged, so the attempt is retried with it — first thing at
    /// start-up ([`Daemon::retry_abandoned`]): a provider with a reuse grace period
    /// (django-oauth-toolkit's `REFRESH_TOKEN_GRACE_PERIOD_SECONDS`, "leeway", "reuse interval")
    /// still honours the spent token for a short while and answers with the same or a new chain.
    /// A strict provider that did rotate answers `invalid_grant`, and the credential is marked
    /// `needs_reauth` — loudly, never silently. Returns the credentials to retry, with the
    /// generation each attempt started from.
    fn recover_abandoned_attempts(&mut self) -> Result<Vec<(Arc<Credential>, i64)>, DaemonError> {
        let mut retry: Vec<(Arc<Credential>, i64)> = Vec::new();
        let mut store = self.store();
        for a in store.abandoned_attempts()? {
            tracing::warn!(
                credential = %a.credential,
                spent_refresh_token = a.spent_fp.as_deref().unwrap_or("none"),
                started = %rfc3339(a.started_at_ms.div_euclid(1000)),
                "a previous run died during this refresh; retrying it now with the stored refresh token (if the provider rotated it in that window and has no reuse grace, the credential will need re-authorization)"
            );
            store.cancel_attempt(a.id, "abandoned: process died mid-refresh", now_ms())?;
            if let Some(credential) = self.config.credential(&a.credential)
                && !retry.iter().any(|(c, _)| c.name == credential.name)
            {
                retry.push((Arc::new(credential.clone()), a.from_generation));
            }
        }
        Ok(retry)
    }

    /// Retries the abandoned attempts before anything else happens (sinks, schedules, READY=1):
    /// a reuse grace period is often only seconds long.
    async fn retry_abandoned(&mut self, abandoned: Vec<(Arc<Credential>, i64)>) {
        if abandoned.is_empty() {
            return;
        }
        let limit = Arc::new(tokio::sync::Semaphore::new(self.config.daemon.concurrency.max(1)));
        let mut retries = JoinSet::new();
        for (credential, from_generation) in abandoned {
            let (store, http, sinks, limit) =
                (self.committer.clone(), self.http.clone(), self.sinks.clone(), limit.clone());
            retries.spawn(async move {
                let _slot = limit.acquire_owned().await;
                let result =
                    refresh::refresh(&store, &http, &sinks, &credential, Some(from_generation), Duration::ZERO).await;
                (credential, result)
            });
        }
        while let Some(done) = retries.join_next().await {
            let Ok((credential, result)) = done else { continue };
            let name = &*credential.name;
            match result {
                Ok(Outcome::Refreshed { state, .. }) => {
                    tracing::warn!(
                        credential = name,
                        generation = state.generation,
                        "the interrupted refresh was retried: the chain is intact"
                    );
                    hooks::spawn(&credential, Event::Refreshed, Some(&state), None);
                }
                Ok(Outcome::AlreadyRefreshed(_)) => {}
                Ok(Outcome::Failed { failure, needs_reauth: true }) => {
                    tracing::error!(
                        credential = name,
                        reason = failure.reason(),
                        "the interrupted refresh cannot be retried: the provider rotated the refresh token in the crash window; re-authorize"
                    );
                    hooks::spawn(&credential, Event::NeedsReauth, None, Some(failure.reason()));
                }
                Ok(other) => tracing::info!(credential = name, "retry of the interrupted refresh: {other:?}"),
                Err(e) => tracing::warn!(credential = name, "retry of the interrupted refresh failed: {e}"),
            }
        }
    }
}
