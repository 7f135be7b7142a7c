//! Tokens on demand: the local HTTP API on `[daemon] socket` and systemd's `LoadCredential=` on
//! `[daemon] credential_socket` (README "Tokens on demand").
//!
//! The servers run beside the daemon's loop and never block it. They read tokens from the store
//! with their own connections, and keep what they read in a [`TokenSnapshot`] that the daemon
//! empties of a credential whenever its stored token changes; the only thing they ask the daemon is to *replace* a token (a
//! caller reported it rejected, or it has less time left than the caller needs). That request, an
//! [`Ask`], goes through a bounded channel and enters the daemon's refresh path by the same door
//! as a `.refresh` trigger file, with the same per-credential floor; every caller asking about
//! the same generation while that refresh runs waits for the same answer (one provider request).
//!
//! - `listen` binds a socket file (a stale one replaced, a live one refused) and bounds the
//!   number of connections;
//! - `peer` says who the caller is, from the kernel, and whether it may read a credential;
//! - `api` is the HTTP/1.1 API; `load_credential` systemd's credential protocol;
//! - `client` is `tokend token`'s side of the API;
//! - `snapshot` the API's memory of stored tokens, forgotten by the daemon on every change.

mod api;
pub mod client;
mod listen;
mod load_credential;
pub mod peer;
mod snapshot;

use crate::config::{Config, Credential, SocketAccess};
use crate::seal::Sealer;
use crate::store::{Store, StoreError};
use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub use listen::SocketFile;
pub(crate) use snapshot::Lookup;
pub use snapshot::TokenSnapshot;

/// Connections served at once on each socket; more are closed as soon as they are accepted. Each
/// costs a task and hyper's buffers (BENCHMARKS.md, "RSS per idle connection").
pub const MAX_CONNECTIONS: usize = 256;
/// Replacement requests queued for the daemon's loop; beyond this a caller gets 503 at once.
const ASK_QUEUE: usize = 1024;

/// "Replace generation `generation` of `name`": the daemon answers once a refresh that replaces
/// it has finished (or at once if it is already replaced, or when it cannot be).
pub struct Ask {
    pub name: Arc<str>,
    pub generation: i64,
    pub reply: oneshot::Sender<Result<i64, Refusal>>,
}

/// Why a token could not be had: an HTTP status, a stable code and a message (never a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

/// What the servers know of the configuration: the credentials by name, with their socket rules.
/// Replaced whole by the daemon on every (re)load.
#[derive(Default)]
pub struct Policy {
    credentials: FxHashMap<Arc<str>, (Arc<Credential>, Arc<SocketAccess>)>,
}

impl Policy {
    pub fn of(config: &Config) -> Policy {
        let default = Arc::new(SocketAccess::default());
        let access =
            |c: &Arc<Credential>| config.socket_access.get(&c.name).cloned().unwrap_or_else(|| default.clone());
        Policy { credentials: config.credentials.iter().map(|c| (c.name.clone(), (c.clone(), access(c)))).collect() }
    }
}

/// The daemon's end: where it installs a new policy after a reload, and where the servers' asks
/// arrive.
pub struct Sockets {
    policy: Arc<RwLock<Arc<Policy>>>,
    snapshot: Arc<TokenSnapshot>,
    /// Taken by the daemon's loop, which receives from it.
    pub asks: Option<mpsc::Receiver<Ask>>,
    _files: Vec<SocketFile>,
}

impl Sockets {
    pub fn install(&self, config: &Config) {
        let policy = Arc::new(Policy::of(config));
        *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
        // A credential removed and added again may have another store row meanwhile.
        self.snapshot.forget_all();
    }
}

/// Everything a connection handler needs, shared by all of them.
pub(crate) struct Shared {
    policy: Arc<RwLock<Arc<Policy>>>,
    asks: mpsc::Sender<Ask>,
    stores: Arc<StorePool>,
    snapshot: Arc<TokenSnapshot>,
    /// How long a caller waits for a refresh it asked for (the provider's request timeout, the
    /// trigger floor, and a margin).
    refresh_wait: Duration,
    socket_gid: u32,
    daemon_uid: u32,
}

impl Shared {
    fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Binds the sockets `config` names and starts serving them; `None` when it names none.
/// Tokens are read with `sealer` (the store's keys) and kept in `snapshot`, which the daemon
/// empties of what it changes.
pub fn start(
    config: &Config,
    refresh_wait: Duration,
    sealer: &Sealer,
    snapshot: Arc<TokenSnapshot>,
) -> Result<Option<Sockets>, String> {
    let daemon = &config.daemon;
    if daemon.socket.is_none() && daemon.credential_socket.is_none() {
        return Ok(None);
    }
    let policy = Arc::new(RwLock::new(Arc::new(Policy::of(config))));
    let (tx, asks) = mpsc::channel(ASK_QUEUE);
    let mut files = Vec::new();
    if let Some(path) = &daemon.socket {
        // Members of the socket's group may connect: the default readers.
        let (listener, file) = listen::bind(path, 0o660)?;
        let shared = Arc::new(Shared {
            policy: policy.clone(),
            asks: tx.clone(),
            stores: Arc::new(StorePool::new(&daemon.database, sealer)),
            snapshot: snapshot.clone(),
            refresh_wait,
            socket_gid: file.gid,
            daemon_uid: nix::unistd::geteuid().as_raw(),
        });
        tracing::info!(socket = %path.display(), "serving the token API");
        tokio::spawn(api::serve(listener, shared));
        files.push(file);
    }
    if let Some(path) = &daemon.credential_socket {
        // Only the service manager (root) is served; nobody else needs to connect.
        let (listener, file) = listen::bind(path, 0o600)?;
        tracing::info!(socket = %path.display(), "serving systemd credentials (LoadCredential=)");
        tokio::spawn(load_credential::serve(
            listener,
            policy.clone(),
            Arc::new(StorePool::new(&daemon.database, sealer)),
        ));
        files.push(file);
    }
    Ok(Some(Sockets { policy, snapshot, asks: Some(asks), _files: files }))
}

/// Store connections for the servers' reads, opened on demand and kept for the next request.
/// SQLite readers in WAL mode do not block the daemon's writes, nor they them. At most
/// [`READERS`] reads run at once, so at most that many connections are ever opened (opening one
/// checks the schema in a write transaction: not something to do per request).
pub(crate) struct StorePool {
    path: PathBuf,
    sealer: Sealer,
    idle: Mutex<Vec<Store>>,
    readers: tokio::sync::Semaphore,
}

/// Reads at once (and connections kept): a point read takes microseconds.
const READERS: usize = 4;

impl StorePool {
    /// The pool with its connections opened now, at start-up, while nothing else writes: opened
    /// on first use they would be opened under load, each waiting behind the committer for the
    /// write lock that opening takes (the schema check is an immediate transaction).
    /// Opened with `sealer`, the daemon's keys: a sealed store's tokens are opened on the way out.
    fn new(path: &Path, sealer: &Sealer) -> Self {
        let idle: Vec<Store> = (0..READERS).map_while(|_| Store::open_sealed(path, sealer.clone()).ok()).collect();
        Self {
            path: path.to_path_buf(),
            sealer: sealer.clone(),
            idle: Mutex::new(idle),
            readers: tokio::sync::Semaphore::new(READERS),
        }
    }

    /// Runs `read` on a pooled connection, off the async runtime.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _turn = self.readers.acquire().await;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let taken = pool.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            let store = match taken {
                Some(store) => store,
                None => Store::open_sealed(&pool.path, pool.sealer.clone())?,
            };
            let result = read(&store);
            pool.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(store);
            result
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Other { path: self.path.clone(), message: format!("read task died: {e}") }))
    }
}

/// `*` matches any run of characters, `?` any one: enough for unit names
/// (`report-*.service`), with no escapes because unit names have no `*` or `?`.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn unit_globs() {
        assert!(glob_matches("report-job.service", "report-job.service"));
        assert!(glob_matches("report-*.service", "report-daily.service"));
        assert!(glob_matches("report-*.service", "report-.service"));
        assert!(glob_matches("*", "anything.timer"));
        assert!(glob_matches("job?.service", "job1.service"));
        assert!(!glob_matches("report-*.service", "report-daily.timer"));
        assert!(!glob_matches("report-job.service", "report-job.service2"));
        assert!(!glob_matches("job?.service", "job.service"));
        assert!(glob_matches("a*b*c", "aXXbYYc") && !glob_matches("a*b*c", "aXXbYY"));
    }
}
