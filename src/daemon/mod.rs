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

pub mod queue;
pub mod signals;
mod systemd;
mod watch;

use crate::clock::{now_ms, rfc3339, short_duration};
use crate::committer::Committer;
use crate::config::{self, Config, ConfigError, Credential};
use crate::hooks::{self, Event};
use crate::metrics::{self, CredentialMetrics};
use crate::provider::{Failure, GrantKind, HttpClient, ProviderKind};
use crate::refresh::{self, Outcome, RefreshError};
use crate::schedule;
use crate::sink;
use crate::store::{Lifetime, Status, Store, StoreError, TokenState};
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
    #[error("{0}")]
    Io(String),
}

/// A snapshot for start-up messages and (later) service status lines.
#[derive(Debug, Clone)]
pub struct Summary {
    pub credentials: usize,
    pub needs_reauth: usize,
    pub failing: usize,
    pub next_refresh_ms: Option<i64>,
}

impl Summary {
    pub fn describe(&self) -> String {
        let next = match self.next_refresh_ms {
            Some(at) => format!("next refresh in {}", short_duration((at - now_ms()).max(0) / 1000)),
            None => "nothing scheduled".to_string(),
        };
        format!(
            "{} credentials, {} failing, {} needing re-authorization, {next}",
            self.credentials, self.failing, self.needs_reauth
        )
    }
}

struct Entry {
    credential: Arc<Credential>,
    /// `None` while no token is stored.
    lifetime: Option<Lifetime>,
    failures: u32,
    retry_at: Option<i64>,
    in_flight: bool,
    /// In the `waiting` queue for a concurrency slot.
    waiting: bool,
    /// Refresh results since start by `metrics::RESULTS`, for metrics. (A map here cost a
    /// 300-byte node per credential once it had refreshed.)
    results: [u32; metrics::RESULTS.len()],
    /// A rotated token the provider issued but the store could not take (disk full, read-only),
    /// and its rescue file: committed before anything else is tried, so the chain survives the
    /// outage. Boxed: rare, and every credential carries the field.
    pending: Option<Box<(crate::store::NewToken, String)>>,
}

type RefreshResult = (Arc<str>, Result<Outcome, RefreshError>);

/// At most one trigger-started refresh per [`TRIGGER_MIN_INTERVAL`] for a credential: a trigger
/// that comes too soon is deferred to `next_allowed`, and that deferred refresh uses up the next
/// interval as an immediate one would.
#[derive(Debug, Clone, Copy)]
struct TriggerFloor {
    next_allowed: Instant,
    /// A deferred refresh is planned for this time; triggers before it add nothing.
    deferred_to: Option<Instant>,
}

struct Daemon {
    config: Config,
    /// The daemon's own connection: reads, imports of rescued tokens, housekeeping.
    store: Arc<Mutex<Store>>,
    /// The refresh path's connection, with group commit.
    committer: Committer,
    /// Every sink read and write of the daemon goes through this thread.
    sinks: sink::SinkWriter,
    http: HttpClient,
    queue: DeadlineQueue,
    /// Keyed by the credential's own name allocation (`Credential::name`), shared with the queue.
    /// Fx hashing: the names come from the operator's configuration, not from an adversary.
    entries: FxHashMap<Arc<str>, Entry>,
    /// In-flight refresh tasks: credential and provider.
    running: HashMap<tokio::task::Id, (Arc<str>, ProviderKind)>,
    /// Due credentials waiting for a free slot (global or per-provider concurrency). Tasks are
    /// only spawned when a slot is free: 100,000 parked futures would cost hundreds of MB.
    waiting: std::collections::VecDeque<Arc<str>>,
    in_flight_by_provider: HashMap<ProviderKind, usize>,
    /// Set on shutdown: no new refresh starts.
    stopping: bool,
    /// Rate-limit pauses by [`crate::provider::Endpoint::rate_limit_scope`]: until when that
    /// endpoint and client asked us to wait.
    paused_until: HashMap<String, i64>,
    /// Sink path → credential, and `.refresh` trigger path → credential.
    sink_owner: HashMap<PathBuf, Arc<str>>,
    trigger_owner: HashMap<PathBuf, Arc<str>>,
    /// The trigger floor of each credential refreshed through its trigger file (few ever are).
    trigger_floor: HashMap<Arc<str>, TriggerFloor>,
    fs_tx: mpsc::UnboundedSender<PathBuf>,
    watcher: Option<notify::RecommendedWatcher>,
    dirty_sinks: HashSet<Arc<str>>,
    triggered: HashSet<Arc<str>>,
    fs_due: Option<Instant>,
    reload_due: Option<Instant>,
    store_sync_due: Option<Instant>,
    publish_due: Option<Instant>,
    /// `tokend import`/`remove` touch this file to tell a running daemon to re-read the store.
    store_changed_path: PathBuf,
    /// Reloads attempted since start, numbering the outcomes `tokend reload` waits for.
    reloads: u64,
}

/// The path `tokend import`, `refresh` and `remove` touch so a running daemon re-reads the store.
pub fn store_changed_path(database: &Path) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".changed");
    database.with_file_name(name)
}

/// After a token was stored outside the daemon (`tokend import`, `authorize`): its sinks are
/// written and a running daemon is told to pick it up.
pub fn publish_imported(database: &Path, credential: &Credential, state: &TokenState) {
    sink::write_all(credential, state);
    notify_store_changed(database);
}

/// Tells a running daemon (if any) that the store changed under it. Best effort.
pub fn notify_store_changed(database: &Path) {
    let path = store_changed_path(database);
    // Only the event matters; the file is never read. Opened so that nothing planted there (a
    // FIFO, a link) can block or redirect the write.
    if let Err(e) = crate::untrusted::open_own_file(&path, true) {
        tracing::debug!(path = %path.display(), "cannot signal the daemon: {e}");
    }
}

/// Where the daemon records each reload's outcome (beside the database, private), so that
/// `tokend reload` — what `systemctl reload` runs — can wait for it and fail when the daemon kept
/// its old configuration.
pub fn reload_outcome_path(database: &Path) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".reload");
    database.with_file_name(name)
}

/// One reload's outcome: `pid P reload N ok`, or `… rejected` followed by the reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub pid: u32,
    pub reload: u64,
    pub rejected: Option<String>,
}

impl ReloadOutcome {
    fn render(&self) -> String {
        match &self.rejected {
            None => format!("pid {} reload {} ok\n", self.pid, self.reload),
            Some(why) => format!("pid {} reload {} rejected\n{why}\n", self.pid, self.reload),
        }
    }

    /// The last outcome recorded for `database`, if any.
    pub fn read(database: &Path) -> Option<ReloadOutcome> {
        let crate::untrusted::Found::Regular { bytes, .. } =
            crate::untrusted::read_regular(&reload_outcome_path(database), 64 * 1024).ok()?
        else {
            return None;
        };
        let text = String::from_utf8_lossy(&bytes);
        let (head, rest) = text.split_once('\n').unwrap_or((&text, ""));
        let words: Vec<&str> = head.split_whitespace().collect();
        let ["pid", pid, "reload", reload, verdict] = words.as_slice() else { return None };
        Some(ReloadOutcome {
            pid: pid.parse().ok()?,
            reload: reload.parse().ok()?,
            rejected: (*verdict == "rejected").then(|| rest.trim_end().to_string()),
        })
    }
}

fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    database.with_file_name(name)
}

/// The pid of the `tokend run` using `database`, if one is running (it holds the lock).
pub fn running_daemon(database: &Path) -> Option<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(database);
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(crate::untrusted::HOSTILE_OPEN_FLAGS).open(&path).ok()?;
    match file.try_lock_shared() {
        Err(std::fs::TryLockError::WouldBlock) => {}
        // Nobody holds it (or it cannot be locked at all): no daemon.
        _ => return None,
    }
    let crate::untrusted::Found::Regular { bytes, .. } = crate::untrusted::read_regular(&path, 64).ok()? else {
        return None;
    };
    String::from_utf8_lossy(&bytes).trim().strip_prefix("pid ")?.parse().ok()
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
    let store = Store::open(&config.daemon.database)?;
    let http = HttpClient::new(config.daemon.http, config.daemon.proxy.as_ref()).map_err(DaemonError::Io)?;
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel();
    let mut daemon = Daemon {
        store_changed_path: store_changed_path(&config.daemon.database),
        waiting: std::collections::VecDeque::new(),
        in_flight_by_provider: HashMap::new(),
        stopping: false,
        committer: Committer::open(&config.daemon.database)?,
        sinks: sink::SinkWriter::start()
            .map_err(|e| DaemonError::Io(format!("cannot start the sink writer thread: {e}")))?,
        config,
        store: Arc::new(Mutex::new(store)),
        http,
        queue: DeadlineQueue::default(),
        entries: FxHashMap::default(),
        running: HashMap::new(),
        paused_until: HashMap::new(),
        sink_owner: HashMap::new(),
        trigger_owner: HashMap::new(),
        trigger_floor: HashMap::new(),
        fs_tx,
        watcher: None,
        dirty_sinks: HashSet::new(),
        triggered: HashSet::new(),
        fs_due: None,
        reload_due: None,
        store_sync_due: None,
        publish_due: None,
        reloads: 0,
    };
    daemon.config.path = config_path;
    daemon.recover_abandoned_attempts()?;
    tracing::debug!(elapsed_ms = started.elapsed().as_millis(), "store opened");
    let sinks_checked = daemon.apply_config(daemon.config.clone())?;
    // READY=1 means every sink holds its token (the check runs on the sink thread).
    let _ = sinks_checked.await;
    daemon.schedule_maintenance();
    crate::memory::release_freed_memory();
    tracing::debug!(elapsed_ms = started.elapsed().as_millis(), "every credential scheduled");
    let summary = daemon.summary();
    tracing::info!(config = %daemon.config.path.display(), database = %daemon.config.daemon.database.display(), "tokend running: {}", summary.describe());
    daemon.publish();
    systemd::ready(&summary.describe());
    let watchdog_interval = systemd::watchdog_interval();
    let mut next_ping = watchdog_interval.map(|i| Instant::now() + i);

    let mut timer =
        WallTimer::new().map_err(|e| DaemonError::Io(format!("cannot create the wall-clock timer: {e}")))?;
    let mut inflight: JoinSet<RefreshResult> = JoinSet::new();
    loop {
        let next = daemon.queue.next_at();
        let fs_due =
            [daemon.fs_due, daemon.reload_due, daemon.store_sync_due, daemon.publish_due].into_iter().flatten().min();
        tokio::select! {
            biased;
            ctl = control.recv() => match ctl {
                Some(Control::Reload) => daemon.reload(),
                Some(Control::RefreshAll) => daemon.refresh_all(&mut inflight),
                Some(Control::Shutdown) | None => break,
            },
            Some(done) = inflight.join_next_with_id(), if !inflight.is_empty() => daemon.finished(done, &mut inflight),
            Some(path) = fs_rx.recv() => daemon.fs_event(path),
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
                    return Err(DaemonError::Io(format!("wall-clock timer failed: {e}")));
                }
                daemon.fire_due(&mut inflight);
            }
        }
    }

    systemd::stopping();
    daemon.stopping = true;
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

/// One `tokend run` per database: an exclusive lock on `<database>.lock`, holding our pid for the
/// message the next one prints. The lock dies with the process, so a crash never leaves it stale.
fn lock_database(database: &Path) -> Result<File, DaemonError> {
    let path = lock_path(database);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The store would make its directory private; the lock comes first, so it does too.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| DaemonError::Io(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut file = crate::untrusted::open_own_file(&path, false)
        .map_err(|e| DaemonError::Io(format!("cannot open lock file {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).and_then(|()| file.write_all(format!("pid {}\n", std::process::id()).as_bytes())).ok();
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = match crate::untrusted::read_regular(&path, 64) {
                Ok(crate::untrusted::Found::Regular { bytes, .. }) => {
                    crate::redact::clean_text(&String::from_utf8_lossy(&bytes), 64)
                }
                _ => String::new(),
            };
            Err(DaemonError::AlreadyRunning {
                database: database.to_path_buf(),
                holder: if holder.is_empty() { "pid unknown".into() } else { holder },
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(DaemonError::Io(format!("cannot lock {}: {e}", path.display()))),
    }
}

impl Daemon {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn summary(&self) -> Summary {
        Summary {
            credentials: self.entries.len(),
            needs_reauth: self.entries.values().filter(|e| e.lifetime.is_some_and(|l| l.status.is_dead())).count(),
            failing: self.entries.values().filter(|e| e.failures > 0).count(),
            next_refresh_ms: self.queue.next_of(Job::Refresh),
        }
    }

    fn healthy(&self) -> bool {
        match self.store().schema_version() {
            Ok(_) => true,
            Err(e) => {
                tracing::error!("store unreachable, withholding the watchdog ping: {e}");
                false
            }
        }
    }

    fn publish_soon(&mut self) {
        self.publish_due.get_or_insert(Instant::now() + PUBLISH_INTERVAL);
    }

    /// Sends systemd a STATUS line and rewrites the metrics file.
    fn publish(&mut self) {
        self.publish_due = None;
        systemd::status(&self.summary().describe());
        let Some(path) = self.config.daemon.metrics_file.clone() else { return };
        let snapshot: BTreeMap<String, CredentialMetrics> = self
            .entries
            .iter()
            .map(|(name, e)| {
                let m = CredentialMetrics {
                    provider: e.credential.provider().to_string(),
                    expires_at: e.lifetime.and_then(|l| l.expires_at),
                    needs_reauth: e.lifetime.is_some_and(|l| l.status.is_dead()),
                    last_refresh_at: e.lifetime.and_then(|l| l.last_refresh_at),
                    refreshes: e.results.map(u64::from),
                };
                (name.to_string(), m)
            })
            .collect();
        // Readable by node_exporter's user: counts and times only, no secrets.
        if let Err(e) =
            sink::write_atomic(&path, metrics::render(&snapshot, sink::replaced_total()).as_bytes(), 0o644, None)
        {
            tracing::warn!("metrics file not written: {e}");
        }
    }

    /// A crash between "request sent" and "answer committed" leaves an attempt without a result.
    /// The stored refresh token is unchanged, so the next refresh simply retries it; if the
    /// provider did rotate in that window, the retry gets `invalid_grant` and the credential is
    /// marked `needs_reauth` — loudly, never silently.
    fn recover_abandoned_attempts(&mut self) -> Result<(), DaemonError> {
        let mut store = self.store();
        for a in store.abandoned_attempts()? {
            tracing::warn!(
                credential = %a.credential,
                spent_refresh_token = a.spent_fp.as_deref().unwrap_or("none"),
                started = %rfc3339(a.started_at_ms.div_euclid(1000)),
                "a previous run died during this refresh; retrying with the stored refresh token (if the provider rotated it in that window, the credential will need re-authorization)"
            );
            store.cancel_attempt(a.id, "abandoned: process died mid-refresh", now_ms())?;
        }
        Ok(())
    }

    /// Installs `config`: entries added, changed or dropped; sinks synced; new and changed
    /// credentials planned; watches and concurrency limits rebuilt.
    fn apply_config(&mut self, mut config: Config) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
        // Only new entries take their lifetime from here (`sync_from_store` keeps the others'),
        // so a reload that adds none does not read 100,000 rows for nothing.
        let adds = config.credentials.iter().any(|c| !self.entries.contains_key(&*c.name));
        let lifetimes: FxHashMap<String, Lifetime> =
            if adds { self.store().list_lifetimes()?.into_iter().collect() } else { FxHashMap::default() };
        // Logged one by one only when a reload adds them: at start-up, 100,000 lines say nothing.
        let starting = self.entries.is_empty();
        self.entries.reserve(config.credentials.len().saturating_sub(self.entries.len()));
        // One more name than credentials: the daemon's own maintenance job (a full vector would
        // double for it).
        self.queue.reserve(config.credentials.len() + 1);
        let wanted: HashSet<&str> = config.credentials.iter().map(|c| &*c.name).collect();
        let dropped: Vec<Arc<str>> = self.entries.keys().filter(|n| !wanted.contains(&***n)).cloned().collect();
        for name in dropped {
            if let Some(entry) = self.entries.remove(&name) {
                self.queue.cancel_all(&name);
                self.trigger_floor.remove(&name);
                sink::remove_all(&entry.credential, "credential removed from the configuration");
                tracing::info!(credential = %name, "dropped (no longer configured); its stored token is kept");
            }
        }
        // New and changed credentials; an unchanged one keeps its deadlines as they are.
        let mut replan = Vec::new();
        for configured in &mut config.credentials {
            let credential = configured.clone();
            let name = credential.name.clone();
            match self.entries.get_mut(&name) {
                Some(entry) if entry.credential == credential => {
                    // The running copy stays and the reloaded one is dropped. Kept side by side,
                    // a reload of 100,000 credentials left a second copy scattered through the
                    // heap (RSS 60 → 76 MB).
                    *configured = entry.credential.clone();
                    continue;
                }
                Some(entry) => {
                    let new_paths: HashSet<&PathBuf> = credential.sinks.iter().map(|s| &s.path).collect();
                    for old in entry.credential.sinks.iter().filter(|s| !new_paths.contains(&s.path)) {
                        let _ = sink::remove(old);
                    }
                    entry.credential = credential;
                }
                None => {
                    if starting {
                        tracing::debug!(credential = %name, provider = %credential.provider(), "configured");
                    } else {
                        tracing::info!(credential = %name, provider = %credential.provider(), "configured");
                    }
                    self.entries.insert(
                        name.clone(),
                        Entry {
                            credential,
                            lifetime: lifetimes.get(&*name).copied(),
                            failures: 0,
                            retry_at: None,
                            in_flight: false,
                            waiting: false,
                            results: [0; metrics::RESULTS.len()],
                            pending: None,
                        },
                    );
                }
            }
            replan.push(name);
        }
        self.config = config;
        // Every sink is checked: the watches are rebuilt below, and a change in between would
        // go unseen.
        let names: Vec<Arc<str>> = self.entries.keys().cloned().collect();
        let sinks_checked = self.sync_sinks_of(names);
        self.queue.defer();
        for name in &replan {
            self.plan(name);
            self.plan_cron(name);
        }
        self.queue.settle();
        self.rebuild_watches();
        Ok(sinks_checked)
    }

    fn reload(&mut self) {
        systemd::reloading();
        self.reload_config();
        crate::memory::release_freed_memory();
        systemd::ready(&self.summary().describe());
        self.publish_soon();
    }

    fn reload_config(&mut self) {
        self.reloads += 1;
        let outcome = self.try_reload();
        match &outcome {
            Ok(()) => tracing::info!("configuration reloaded: {}", self.summary().describe()),
            Err(why) => {
                for line in why.lines() {
                    tracing::error!("reload rejected, the running configuration stays: {line}");
                }
            }
        }
        let record = ReloadOutcome { pid: std::process::id(), reload: self.reloads, rejected: outcome.err() };
        let path = reload_outcome_path(&self.config.daemon.database);
        if let Err(e) = sink::write_atomic(&path, record.render().as_bytes(), 0o600, None) {
            tracing::warn!("cannot record the reload's outcome for `tokend reload`: {e}");
        }
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let config = config::load(&self.config.path).map_err(|e| e.to_string())?;
        if config.daemon.database != self.config.daemon.database {
            return Err(format!(
                "the database cannot change while running ({} → {}); restart tokend",
                self.config.daemon.database.display(),
                config.daemon.database.display()
            ));
        }
        self.apply_config(config).map(drop).map_err(|e| format!("reload failed: {e}"))
    }

    fn rebuild_watches(&mut self) {
        self.sink_owner.clear();
        self.trigger_owner.clear();
        let mut dirs = BTreeSet::new();
        for entry in self.entries.values() {
            for s in &entry.credential.sinks {
                self.sink_owner.insert(s.path.clone(), entry.credential.name.clone());
                dirs.extend(s.path.parent().map(Path::to_path_buf));
            }
        }
        if let Some(dir) = self.config.daemon.trigger_dir.clone() {
            match prepare_trigger_dir(&dir) {
                Ok(()) => {
                    for name in self.entries.keys() {
                        self.trigger_owner.insert(trigger_path(&dir, name), name.clone());
                    }
                    dirs.insert(dir);
                }
                Err(e) => tracing::error!("{e}; refresh triggers are off"),
            }
        }
        dirs.extend(self.config.path.parent().map(Path::to_path_buf));
        dirs.extend(self.store_changed_path.parent().map(Path::to_path_buf));
        self.watcher = match watch::watch_dirs(&dirs, self.fs_tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(
                    "cannot watch files ({e}); sinks will not be repaired and the config not reloaded on change"
                );
                None
            }
        };
    }

    /// Puts the credential's refresh and expiry deadlines in the queue, from its state.
    fn plan(&mut self, name: &str) {
        self.queue.cancel(name, Job::Refresh);
        self.queue.cancel(name, Job::Expire);
        let Some(entry) = self.entries.get(name) else { return };
        if entry.in_flight {
            return; // `finished` plans again.
        }
        let now = now_ms();
        let key = &entry.credential.name;
        match &entry.lifetime {
            None if matches!(entry.credential.endpoint.grant, GrantKind::ApiKey(_)) => {
                self.queue.schedule(key, Job::Refresh, entry.retry_at.unwrap_or(now));
            }
            None => {}
            Some(lifetime) => {
                if lifetime.status == Status::Active
                    && let Some(due) = schedule::next_refresh_ms(name, entry.credential.refresh_at, lifetime)
                {
                    // A deferred trigger keeps its time through re-planning.
                    let triggered = self
                        .trigger_floor
                        .get(name)
                        .and_then(|f| f.deferred_to)
                        .and_then(|at| at.checked_duration_since(Instant::now()))
                        .map(|wait| now + i64::try_from(wait.as_millis()).unwrap_or(0));
                    let at = entry.retry_at.unwrap_or(due).min(triggered.unwrap_or(i64::MAX));
                    self.queue.schedule(key, Job::Refresh, at);
                }
                if let Some(expiry) = lifetime.expires_at.map(|t| t * 1000).filter(|t| *t > now) {
                    self.queue.schedule(key, Job::Expire, expiry);
                }
            }
        }
    }

    fn plan_cron(&mut self, name: &str) {
        self.queue.cancel(name, Job::Cron);
        if let Some(entry) = self.entries.get(name)
            && let Some(cron) = &entry.credential.refresh_cron
            && let Some(at) = cron.next_after_ms(now_ms())
        {
            self.queue.schedule(&entry.credential.name, Job::Cron, at);
        }
    }

    fn schedule_maintenance(&mut self) {
        let cron = config::CronSchedule::parse(MAINTENANCE_CRON).expect("constant cron expression parses");
        if let Some(at) = cron.next_after_ms(now_ms()) {
            self.queue.schedule(&Arc::from(DAEMON_KEY), Job::Maintenance, at);
        }
    }

    fn fire_due(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        for (name, job) in self.queue.pop_due(now_ms()) {
            match job {
                Job::Refresh => self.start_refresh(&name, inflight),
                Job::Cron => {
                    tracing::info!(credential = %name, "refresh_cron fired");
                    self.start_refresh(&name, inflight);
                    self.plan_cron(&name);
                }
                Job::Expire => self.expire(&name),
                Job::Maintenance => {
                    match self.store().maintenance(now_ms(), ATTEMPT_RETENTION) {
                        Ok(pruned) => tracing::info!(pruned_attempts = pruned, "maintenance done"),
                        Err(e) => tracing::warn!("maintenance failed: {e}"),
                    }
                    self.schedule_maintenance();
                }
            }
        }
    }

    fn refresh_all(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        let names: Vec<Arc<str>> = self.entries.keys().cloned().collect();
        tracing::info!(credentials = names.len(), "refreshing everything now");
        for name in names {
            self.start_refresh(&name, inflight);
        }
    }

    fn start_refresh(&mut self, name: &str, inflight: &mut JoinSet<RefreshResult>) {
        if self.stopping {
            return;
        }
        let now = now_ms();
        let Some(entry) = self.entries.get_mut(name) else { return };
        if entry.in_flight {
            return;
        }
        let provider = entry.credential.provider();
        let paused = if self.paused_until.is_empty() {
            None
        } else {
            self.paused_until.get(&entry.credential.endpoint.rate_limit_scope()).copied().filter(|u| *u > now)
        };
        if let Some(until) = paused {
            let expires_at_ms = entry.lifetime.and_then(|l| l.expires_at).map(|t| t * 1000);
            let last_chance = expires_at_ms.map(|t| t - schedule::LAST_CHANCE_BEFORE_EXPIRY_MS).filter(|t| *t < until);
            match last_chance {
                Some(at) if now >= at => {
                    tracing::warn!(credential = name, until = %rfc3339(until / 1000), expires_at = %rfc3339(expires_at_ms.unwrap_or(0) / 1000), "rate limited past the token's expiry; one last attempt before it expires");
                }
                Some(at) => {
                    tracing::error!(credential = name, until = %rfc3339(until / 1000), expires_at = %rfc3339(expires_at_ms.unwrap_or(0) / 1000), last_attempt_at = %rfc3339(at / 1000), "the provider asks us to wait past the token's expiry; the token will expire unless one last attempt succeeds");
                    self.queue.schedule(&entry.credential.name, Job::Refresh, at);
                    return;
                }
                None => {
                    tracing::info!(credential = name, until = %rfc3339(until / 1000), "rate limited by this endpoint; refresh deferred");
                    self.queue.schedule(&entry.credential.name, Job::Refresh, until);
                    return;
                }
            }
        }
        if entry.pending.is_some() {
            self.commit_pending(name);
            return;
        }
        self.queue.cancel(name, Job::Refresh);
        let busy = self.in_flight_by_provider.get(&provider).copied().unwrap_or(0);
        if self.running.len() >= self.config.daemon.concurrency || busy >= entry.credential.provider_concurrency {
            if !entry.waiting {
                entry.waiting = true;
                self.waiting.push_back(entry.credential.name.clone());
            }
            return;
        }
        entry.in_flight = true;
        *self.in_flight_by_provider.entry(provider).or_default() += 1;
        let store = self.committer.clone();
        let http = self.http.clone();
        let sinks = self.sinks.clone();
        let credential = entry.credential.clone();
        let expected = entry.lifetime.map(|l| l.generation);
        let handle = inflight.spawn(async move {
            let result = refresh::refresh(&store, &http, &sinks, &credential, expected, Duration::ZERO).await;
            (credential.name.clone(), result)
        });
        self.running.insert(handle.id(), (entry.credential.name.clone(), provider));
    }

    /// Starts waiting refreshes while slots are free. Each waiting name is looked at once per
    /// call, so a provider at its own limit does not spin.
    fn start_waiting(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        for _ in 0..self.waiting.len() {
            if self.running.len() >= self.config.daemon.concurrency {
                break;
            }
            let Some(name) = self.waiting.pop_front() else { break };
            if let Some(entry) = self.entries.get_mut(&name) {
                entry.waiting = false;
                self.start_refresh(&name, inflight);
            }
        }
    }

    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, RefreshResult), tokio::task::JoinError>,
        inflight: &mut JoinSet<RefreshResult>,
    ) {
        let (id, outcome) = match done {
            Ok((id, result)) => (id, Ok(result)),
            Err(e) => (e.id(), Err(e)),
        };
        let Some((name, provider)) = self.running.remove(&id) else { return };
        if let Some(n) = self.in_flight_by_provider.get_mut(&provider) {
            *n = n.saturating_sub(1);
        }
        let result = match outcome {
            Ok((_, result)) => result,
            Err(e) => {
                tracing::error!(credential = %name, "refresh task died: {e}");
                Err(RefreshError::Busy { name: String::new(), pid: 0 })
            }
        };
        let now = now_ms();
        self.publish_soon();
        // Only failures need the stored state re-read (for last_error and status).
        let fresh_state = match &result {
            Ok(Outcome::Failed { .. }) | Err(_) => self.store().get(&name).ok().flatten(),
            _ => None,
        };
        let Some(entry) = self.entries.get_mut(&name) else {
            self.start_waiting(inflight);
            return;
        };
        entry.in_flight = false;
        let category = match &result {
            Ok(Outcome::Refreshed { .. } | Outcome::AlreadyRefreshed(_)) => Some("success"),
            Ok(Outcome::Failed { failure: Failure::Transient { .. }, .. }) => Some("transient"),
            Ok(Outcome::Failed { failure: Failure::Rejected { .. }, .. }) => Some("rejected"),
            Ok(Outcome::Failed { failure: Failure::Permanent { .. }, .. }) => Some("permanent"),
            Ok(Outcome::Skipped { .. }) | Err(RefreshError::Busy { .. }) => None,
            Err(_) => Some("error"),
        };
        if let Some(index) = category.and_then(|c| metrics::RESULTS.iter().position(|r| *r == c)) {
            entry.results[index] += 1;
        }
        let credential = entry.credential.clone();
        let token_life = |held: Option<Lifetime>| {
            Duration::from_secs(held.and_then(|l| l.expires_in()).unwrap_or(3600).unsigned_abs())
        };
        if let Some(fresh) = &fresh_state {
            entry.lifetime = Some(fresh.lifetime());
        }
        match result {
            Ok(Outcome::Refreshed { state, rate_limited_for }) => {
                entry.failures = 0;
                entry.retry_at = None;
                if let Some(wait) = rate_limited_for {
                    let until = now + i64::try_from(wait.as_millis()).unwrap_or(0);
                    tracing::warn!(credential = %name, until = %rfc3339(until / 1000), "rate limit budget spent; pausing this endpoint and client");
                    pause(&mut self.paused_until, &credential, now, until);
                }
                hooks::spawn(&credential, Event::Refreshed, Some(&state), None);
                entry.lifetime = Some(state.lifetime());
            }
            Ok(Outcome::AlreadyRefreshed(state)) => {
                tracing::info!(credential = %name, generation = state.generation, "refreshed by another process meanwhile");
                entry.failures = 0;
                entry.retry_at = None;
                sink::write_all(&credential, &state);
                entry.lifetime = Some(state.lifetime());
            }
            Ok(Outcome::Failed { failure, needs_reauth }) => {
                if needs_reauth {
                    entry.retry_at = None;
                    hooks::spawn(&credential, Event::NeedsReauth, fresh_state.as_ref(), Some(failure.reason()));
                } else {
                    entry.failures += 1;
                    let provider_wait = match &failure {
                        Failure::Transient { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    if let Some(wait) = provider_wait {
                        let until = now + i64::try_from(wait.as_millis()).unwrap_or(0);
                        pause(&mut self.paused_until, &credential, now, until);
                    }
                    let expires_at_ms = entry.lifetime.and_then(|l| l.expires_at).map(|t| t * 1000);
                    let at = schedule::retry_at_ms(
                        now,
                        entry.failures,
                        token_life(entry.lifetime),
                        expires_at_ms,
                        provider_wait,
                        rand::random::<f64>(),
                    );
                    tracing::info!(credential = %name, failures = entry.failures, retry_in_ms = at - now, "will retry");
                    entry.retry_at = Some(at);
                    hooks::spawn(&credential, Event::Failed, fresh_state.as_ref(), Some(failure.reason()));
                }
            }
            Ok(Outcome::Skipped { reason, state }) => {
                tracing::info!(credential = %name, "not refreshed: {}", reason.text());
                entry.retry_at = None;
                entry.lifetime = state.as_ref().map(TokenState::lifetime);
            }
            Err(RefreshError::Busy { .. }) => {
                entry.retry_at = Some(now + LEASE_BUSY_RETRY_MS);
            }
            Err(RefreshError::CommitFailed { token, rescue, .. }) => {
                // The error is already logged loudly by `refresh`; keep the token and retry the
                // commit itself — never another refresh with the revoked refresh token.
                entry.failures += 1;
                entry.pending = Some(Box::new((*token, rescue)));
                let lifetime = Duration::from_secs(60);
                entry.retry_at =
                    Some(schedule::retry_at_ms(now, entry.failures, lifetime, None, None, rand::random::<f64>()));
            }
            Err(e) => {
                tracing::error!(credential = %name, "{e}");
                entry.failures += 1;
                let expires_at_ms = entry.lifetime.and_then(|l| l.expires_at).map(|t| t * 1000);
                entry.retry_at = Some(schedule::retry_at_ms(
                    now,
                    entry.failures,
                    token_life(entry.lifetime),
                    expires_at_ms,
                    None,
                    rand::random::<f64>(),
                ));
            }
        }
        if self.dirty_sinks.contains(&name) {
            self.fs_due.get_or_insert(Instant::now() + FS_DEBOUNCE);
        }
        self.plan(&name);
        if self.entries.get(&name).is_some_and(|e| e.retry_at.is_some_and(|r| r <= now)) {
            self.start_refresh(&name, inflight);
        }
        self.start_waiting(inflight);
    }

    /// Retries storing a token whose rotation commit failed.
    fn commit_pending(&mut self, name: &str) {
        let now = now_ms();
        let Some(entry) = self.entries.get_mut(name) else { return };
        let Some(pending) = entry.pending.take() else { return };
        let (token, rescue) = *pending;
        let provider = entry.credential.provider();
        let committed = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).import(
            name,
            provider.as_str(),
            &token,
            now.div_euclid(1000),
        );
        match committed {
            Ok(state) => {
                tracing::warn!(
                    credential = name,
                    generation = state.generation,
                    "rescued token committed; the chain is intact"
                );
                if std::fs::remove_file(&rescue).is_ok() {
                    tracing::info!(credential = name, rescue = %rescue, "rescue file removed");
                }
                sink::write_all(&entry.credential, &state);
                entry.lifetime = Some(state.lifetime());
                entry.failures = 0;
                entry.retry_at = None;
            }
            Err(e) => {
                entry.failures += 1;
                let at = schedule::retry_at_ms(
                    now,
                    entry.failures,
                    Duration::from_secs(60),
                    None,
                    None,
                    rand::random::<f64>(),
                );
                tracing::error!(credential = name, rescue = %rescue, retry_in_ms = at - now, "rescued token still cannot be stored: {e}");
                entry.pending = Some(Box::new((token, rescue)));
                entry.retry_at = Some(at);
            }
        }
        self.plan(name);
        self.publish_soon();
    }

    /// The token's expiry passed. If it was not replaced meanwhile, no program may keep using it:
    /// the sinks are removed.
    fn expire(&mut self, name: &str) {
        let Some(entry) = self.entries.get(name) else { return };
        let Some(expires_at) = entry.lifetime.and_then(|l| l.expires_at) else { return };
        if expires_at * 1000 <= now_ms() {
            tracing::error!(credential = name, expired_at = %rfc3339(expires_at), "access token expired without a successful refresh; its sink files are removed");
            sink::remove_all(&entry.credential, "token expired");
            let stored = self.store().get(name).ok().flatten();
            let last_error = stored.as_ref().and_then(|s| s.last_error.as_deref());
            hooks::spawn(&entry.credential, Event::Expired, stored.as_ref(), last_error);
            self.publish_soon();
        }
    }

    /// Makes every sink of `name` match its stored token: rewritten if missing or altered,
    /// removed if the token is expired.
    fn sync_sinks(&mut self, name: &str) {
        if let Some(entry) = self.entries.get(name) {
            self.sync_sinks_of([entry.credential.name.clone()]);
        }
    }

    /// [`Self::sync_sinks`] for many credentials, with the rewrites done as one batch. The returned
    /// task ends when the files are checked and rewritten.
    fn sync_sinks_of(&mut self, names: impl IntoIterator<Item = Arc<str>>) -> tokio::task::JoinHandle<()> {
        let now = now_ms();
        let mut settled = Vec::new();
        for name in names {
            let Some(entry) = self.entries.get(&name).filter(|e| !e.credential.sinks.is_empty()) else { continue };
            if entry.in_flight {
                // The state in memory is about to be replaced and the refresh writes the sinks
                // itself; writing now could put the old token back over the new one. `finished`
                // looks again.
                self.dirty_sinks.insert(name);
                continue;
            }
            let Some(lifetime) = entry.lifetime else { continue };
            if lifetime.expires_at.is_some_and(|t| t * 1000 <= now) {
                sink::remove_all(&entry.credential, "token expired");
                continue;
            }
            settled.push(name);
        }
        let states = self.stored_states(settled);
        let items: Vec<(Arc<str>, config::SinkConfig, TokenState)> = states
            .into_iter()
            .filter_map(|state| Some((self.entries.get(state.name.as_str())?, state)))
            .flat_map(|(entry, state)| {
                let name = entry.credential.name.clone();
                entry.credential.sinks.iter().map(move |s| (name.clone(), s.clone(), state.clone()))
            })
            .collect();
        // Read and rewritten on the sink thread: a sink directory others can write must never
        // stall this loop.
        let sinks = self.sinks.clone();
        tokio::spawn(async move {
            for repaired in sinks.repair(items).await {
                match repaired.result {
                    Ok(()) => {
                        tracing::info!(credential = %repaired.credential, sink = %repaired.path.display(), "sink written")
                    }
                    Err(e) => tracing::error!(credential = %repaired.credential, "{e}"),
                }
            }
        })
    }

    /// The stored states of `names` (tokens included): one pass over the table when they are a
    /// good part of it (start-up, reload), else one lookup each — a catch-up of 100,000 checks
    /// its sinks in batches of a few hundred, and reading every row for each batch cost more
    /// than the refreshes themselves.
    fn stored_states(&self, names: Vec<Arc<str>>) -> Vec<TokenState> {
        let store = self.store();
        let read = if names.len() > 256 && names.len() * 4 > self.entries.len() {
            let wanted: HashSet<Arc<str>> = names.into_iter().collect();
            store.list().map(|all| all.into_iter().filter(|s| wanted.contains(s.name.as_str())).collect())
        } else {
            names.iter().filter_map(|name| store.get(name).transpose()).collect::<Result<Vec<_>, _>>()
        };
        read.unwrap_or_else(|e| {
            tracing::error!("cannot read tokens from the store to check their sinks: {e}");
            Vec::new()
        })
    }

    fn fs_event(&mut self, path: PathBuf) {
        let soon = Instant::now() + FS_DEBOUNCE;
        if path.as_os_str().is_empty() {
            tracing::warn!("file events were lost (the kernel's queue overflowed); checking every sink");
            let with_sinks = self.entries.iter().filter(|(_, e)| !e.credential.sinks.is_empty());
            self.dirty_sinks.extend(with_sinks.map(|(name, _)| name.clone()));
            let present = self.trigger_owner.iter().filter(|(path, _)| std::fs::symlink_metadata(path).is_ok());
            self.triggered.extend(present.map(|(_, name)| name.clone()));
            self.fs_due.get_or_insert(soon);
        } else if path == self.config.path {
            self.reload_due = Some(Instant::now() + CONFIG_DEBOUNCE);
        } else if path == self.store_changed_path {
            self.store_sync_due.get_or_insert(soon);
        } else if let Some(name) = self.sink_owner.get(&path) {
            self.dirty_sinks.insert(name.clone());
            self.fs_due.get_or_insert(soon);
        } else if let Some(name) = self.trigger_owner.get(&path)
            && std::fs::symlink_metadata(&path).is_ok()
        {
            self.triggered.insert(name.clone());
            self.fs_due.get_or_insert(soon);
        }
    }

    fn fs_settled(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        let now = Instant::now();
        if self.reload_due.is_some_and(|t| t <= now) {
            self.reload_due = None;
            tracing::info!(config = %self.config.path.display(), "configuration file changed; reloading");
            self.reload();
        }
        if self.store_sync_due.is_some_and(|t| t <= now) {
            self.store_sync_due = None;
            self.sync_from_store();
        }
        if self.publish_due.is_some_and(|t| t <= now) {
            self.publish();
        }
        if self.fs_due.is_some_and(|t| t <= now) {
            self.fs_due = None;
            let dirty = std::mem::take(&mut self.dirty_sinks);
            self.sync_sinks_of(dirty);
            for name in std::mem::take(&mut self.triggered) {
                self.trigger(&name, inflight);
            }
        }
    }

    /// A script created `<trigger_dir>/<name>.refresh`: it got a 401 and wants a new token now.
    fn trigger(&mut self, name: &str, inflight: &mut JoinSet<RefreshResult>) {
        let Some(entry) = self.entries.get(name) else { return };
        if let Some(dir) = &self.config.daemon.trigger_dir {
            // unlink never follows a link; whatever was created there is gone.
            let _ = std::fs::remove_file(trigger_path(dir, name));
        }
        let now = Instant::now();
        let floor = self.trigger_floor.get(name).copied();
        if floor.and_then(|f| f.deferred_to).is_some_and(|at| at > now) {
            tracing::debug!(credential = name, "refresh requested through a trigger file; one is already planned");
            return;
        }
        match floor.filter(|f| f.next_allowed > now) {
            None => {
                self.trigger_floor.insert(
                    entry.credential.name.clone(),
                    TriggerFloor { next_allowed: now + TRIGGER_MIN_INTERVAL, deferred_to: None },
                );
                tracing::info!(credential = name, "refresh requested through a trigger file");
                self.start_refresh(name, inflight);
            }
            Some(f) => {
                let at = f.next_allowed;
                self.trigger_floor.insert(
                    entry.credential.name.clone(),
                    TriggerFloor { next_allowed: at + TRIGGER_MIN_INTERVAL, deferred_to: Some(at) },
                );
                let at_ms = now_ms() + i64::try_from((at - now).as_millis()).unwrap_or(0);
                tracing::info!(credential = name, "refresh requested through a trigger file again too soon; deferred");
                let at_ms = at_ms.min(self.queue.get(name, Job::Refresh).unwrap_or(i64::MAX));
                self.queue.schedule(&entry.credential.name, Job::Refresh, at_ms);
            }
        }
    }

    /// `tokend import` / `remove` / `refresh` changed the store: pick up their state.
    fn sync_from_store(&mut self) {
        let lifetimes = match self.store().list_lifetimes() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot re-read the store: {e}");
                return;
            }
        };
        let mut by_name: HashMap<String, Lifetime> = lifetimes.into_iter().collect();
        let names: Vec<Arc<str>> = self.entries.keys().cloned().collect();
        for name in names {
            let Some(entry) = self.entries.get_mut(&name) else { continue };
            let new = by_name.remove(&*name);
            let changed = new.map(|l| (l.generation, l.status)) != entry.lifetime.map(|l| (l.generation, l.status));
            if changed && !entry.in_flight {
                tracing::info!(credential = %name, generation = new.map(|l| l.generation), "store changed by another process; picked up");
                entry.lifetime = new;
                entry.failures = 0;
                entry.retry_at = None;
                self.sync_sinks(&name);
                self.plan(&name);
                // STATUS= and the metrics file speak for the state just picked up, not for the
                // one before the import.
                self.publish_soon();
            }
        }
    }
}

/// The file a script creates to ask for `name`'s refresh now.
fn trigger_path(trigger_dir: &Path, name: &str) -> PathBuf {
    trigger_dir.join(format!("{name}.refresh"))
}

/// Creates the trigger directory if needed: sticky and group-writable, so that members of
/// tokend's group can create triggers but not remove each other's, while the sink directory stays
/// writable by tokend alone. An existing one must be a directory of tokend's (not a link).
fn prepare_trigger_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o1770)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770)))
            .map_err(|e| format!("cannot create trigger directory {}: {e}", dir.display())),
        Err(e) => Err(format!("cannot inspect trigger directory {}: {e}", dir.display())),
        Ok(meta) if !meta.file_type().is_dir() => {
            Err(format!("trigger directory {} is {}, not a directory", dir.display(), crate::untrusted::kind_of(&meta)))
        }
        Ok(meta) if meta.uid() != nix::unistd::geteuid().as_raw() => {
            Err(format!("trigger directory {} belongs to uid {}, not to tokend's user", dir.display(), meta.uid()))
        }
        Ok(_) => Ok(()),
    }
}

/// Records that `credential`'s endpoint and client asked for no requests until `until`; pauses
/// that ended are forgotten.
fn pause(paused_until: &mut HashMap<String, i64>, credential: &Credential, now: i64, until: i64) {
    paused_until.retain(|_, end| *end > now);
    paused_until.insert(credential.endpoint.rate_limit_scope(), until);
}
