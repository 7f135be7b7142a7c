//! The PostgreSQL store, for fleets of nodes sharing one credential set (README "Fleet",
//! ARCHITECTURE.md "Fleet"). SQL lives in `ops.rs`, the schema in `schema.sql`.
//!
//! Two threads per [`PgStore`] own a connection each, on runtimes of their own: the daemon's
//! loop and the CLI call them synchronously (like the SQLite store, whose calls also block for a
//! transaction), the refresh path asynchronously through [`crate::store::RefreshStore`]. The
//! writer (`tokend-pg`) runs the refresh path's operations in group commits (`batch.rs`) and
//! everything else that writes one at a time; the reader (`tokend-pg-read`) answers reads
//! (`get`, `list`, leases), so that a read never waits for a batch, and never sees a batch's
//! uncommitted writes. A connection that broke is opened again by the next operation; an
//! operation (or a batch) that does not finish within [`OPERATION_TIMEOUT`] drops the connection
//! and fails, so a server that stopped answering cannot wedge a node.
//!
//! Unlike SQLite, the schema is not migrated by every start: `tokend migrate` does it, and every
//! other command refuses a database without tokend's tables or with a schema this tokend does
//! not know, before anything is sent to a provider.

mod batch;
pub mod listen;
mod ops;
pub mod settings;
mod target;

pub use ops::COMMIT_CHANNEL;
pub use target::{PgTarget, is_postgres};

use super::{Begin, LeaseHolder, Lifetime, NewToken, OpenAttempt, StoreError, TokenState};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_postgres::Client;

/// Every schema version, in order; index + 1 is the version it leads to. Append, never edit.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    // v2: what answers carry for scripts, when the refresh token dies, since when a credential is
    // dead (the SQLite store's v3).
    "ALTER TABLE tokend_credential ADD COLUMN extra text;
     ALTER TABLE tokend_credential ADD COLUMN refresh_token_expires_at bigint;
     ALTER TABLE tokend_credential ADD COLUMN refresh_token_issued_at bigint;
     ALTER TABLE tokend_credential ADD COLUMN dead_since bigint;
     UPDATE tokend_credential SET refresh_token_issued_at = created_at WHERE refresh_token IS NOT NULL;
     UPDATE tokend_credential SET dead_since = updated_at WHERE status <> 'active';",
    // v3: what each node would send for each credential, so that nodes can tell when they
    // disagree (settings.rs).
    "CREATE TABLE tokend_node_settings (
         node        text NOT NULL,
         credential  text NOT NULL,
         settings    text NOT NULL,
         recorded_at timestamptz NOT NULL DEFAULT now(),
         PRIMARY KEY (node, credential)
     );",
];
/// The server process of this node's listening connection (0: none). Attempts record it as
/// the session whose existence says the attempt may still land: that connection is never inside a
/// transaction, so the server never ends it for idling in one (see
/// [`PgTarget::end_idle_transactions_after`]), and it lives exactly as long as the node does.
/// Without a listener (the CLI) the attempt's own session is used, which lives through its refresh.
pub(crate) static LISTENER_BACKEND: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Serialises concurrent `tokend migrate` runs (an arbitrary constant: "tokend" in ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e64;
/// One store operation (a transaction or a read) must finish within this.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

type PgFuture<'c> = Pin<Box<dyn Future<Output = ()> + Send + 'c>>;
type PlainJob = Box<dyn for<'c> FnOnce(&'c mut Session) -> PgFuture<'c> + Send>;

/// Work for a store thread: an operation on its own, or one of the refresh path's, which the
/// writer commits in batches.
enum Job {
    Plain(PlainJob),
    Batched(Box<dyn batch::BatchOp>),
}

/// This node, for lease and attempt rows: the host name and the boot id, so that a pid is
/// compared only with pids of the same boot of the same machine.
pub fn node_identity() -> &'static str {
    static NODE: OnceLock<String> = OnceLock::new();
    NODE.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        format!("{}/{}", read("/proc/sys/kernel/hostname"), read("/proc/sys/kernel/random/boot_id"))
    })
}

/// Whether a process with this pid exists on this machine (EPERM: it exists, owned by another
/// user).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    pid > 0
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Ok(()) | Err(nix::errno::Errno::EPERM)
        )
}

/// A store thread's side: the target, the connection if one is open, and the statements
/// prepared on it.
struct Session {
    target: PgTarget,
    client: Option<Client>,
    statements: ops::Statements,
}

impl Session {
    async fn connection(&mut self) -> Result<(&mut Client, &mut ops::Statements), String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.drop_connection();
            self.client = Some(connect(&self.target).await?);
        }
        match self.client.as_mut() {
            Some(client) => Ok((client, &mut self.statements)),
            None => Err("no connection".to_string()),
        }
    }

    fn drop_connection(&mut self) {
        self.client = None;
        self.statements.clear();
    }

    /// The refresh path's operations that arrived together, in one transaction; each is told the
    /// outcome once it is settled.
    async fn commit_batch(&mut self, mut ops: Vec<Box<dyn batch::BatchOp>>, stats: &batch::BatchStats) {
        let outcome = tokio::time::timeout(OPERATION_TIMEOUT, async {
            let (client, statements) = self.connection().await.map_err(|why| (why, false))?;
            let committed = batch::run(client, statements, &mut ops, stats).await;
            if committed.is_err() && !client.is_closed() && client.batch_execute("ROLLBACK").await.is_err() {
                return Err((committed.err().unwrap_or_default(), true));
            }
            committed.map_err(|why| (why, false))
        })
        .await;
        let outcome = match outcome {
            Ok(Ok(read_only)) => {
                if read_only {
                    self.drop_connection();
                }
                Ok(())
            }
            Ok(Err((why, unusable))) => {
                if unusable || self.client.as_ref().is_some_and(Client::is_closed) {
                    self.drop_connection();
                }
                Err(why)
            }
            Err(_) => {
                // Whatever the server is doing with this connection, it is not ours any more.
                self.drop_connection();
                Err(format!("no answer within {}s", OPERATION_TIMEOUT.as_secs()))
            }
        };
        for op in ops {
            op.settle(outcome.clone());
        }
    }
}

/// Starts a store thread: it takes jobs in arrival order; the batched ones that wait together
/// (up to [`batch::MAX_BATCH`]) are committed in one transaction.
fn spawn_worker(
    name: &str,
    target: &PgTarget,
    stats: Arc<batch::BatchStats>,
) -> std::io::Result<tokio::sync::mpsc::UnboundedSender<Job>> {
    let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    let mut session = Session { target: target.clone(), client: None, statements: ops::Statements::new() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name(name.into()).spawn(move || {
        runtime.block_on(async move {
            let mut next = None;
            while let Some(job) = match next.take() {
                Some(job) => Some(job),
                None => rx.recv().await,
            } {
                match job {
                    Job::Plain(job) => job(&mut session).await,
                    Job::Batched(first) => {
                        let mut ops = vec![first];
                        while ops.len() < batch::MAX_BATCH {
                            match rx.try_recv() {
                                Ok(Job::Batched(op)) => ops.push(op),
                                Ok(plain) => {
                                    next = Some(plain);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        session.commit_batch(ops, &stats).await;
                    }
                }
            }
        });
    })?;
    Ok(jobs)
}

/// TLS through rustls (never OpenSSL), the server's certificate checked against the system's
/// roots by the platform verifier — used unless `sslmode=disable`.
fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

type RawConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// A client and the connection that must be driven for it (by the caller).
async fn connect_raw(target: &PgTarget) -> Result<(Client, RawConnection), String> {
    if let Some(why) = &target.password_unavailable {
        return Err(format!("no password to connect with: {why}"));
    }
    target.config.connect(tls()?).await.map_err(|e| describe(&e))
}

async fn connect(target: &PgTarget) -> Result<Client, String> {
    let (client, connection) = connect_raw(target).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("database connection lost: {}", describe(&e));
        }
    });
    Ok(client)
}

/// The server refused a write because this session is read-only (SQLSTATE 25006).
fn read_only_session(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// The server's own message for database errors (tokio-postgres prints only "db error"), the
/// cause for connection errors. Neither ever holds the password.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A handle on the store's worker thread; clones share it, and it ends with the last one.
#[derive(Clone)]
pub struct PgStore {
    /// The writer: the refresh path's operations (batched) and every other write.
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    /// The reader, on a connection of its own.
    reads: tokio::sync::mpsc::UnboundedSender<Job>,
    stats: Arc<batch::BatchStats>,
    shown: Arc<str>,
    /// This node's directory for local files (rescue files, the daemon's lock).
    local: Arc<PathBuf>,
    /// Rotation commits that failed (the server unreachable) by credential: the attempt and the
    /// generation spent, and the answer's access token. The daemon retries such a commit
    /// through [`PgStore::import`]; here that retry stays fenced (see `import`).
    unsettled: Arc<std::sync::Mutex<std::collections::HashMap<String, Unsettled>>>,
}

#[derive(Debug, Clone)]
struct Unsettled {
    attempt_id: i64,
    from_generation: i64,
    access_token: String,
}

/// A lease row, for `tokend list` and STATUS=.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Lease {
    pub credential: String,
    pub holder: String,
    /// Host name and boot id of the holder's machine.
    pub node: String,
    pub pid: u32,
    /// By the server's clock; negative once past the deadline (the lease may be taken over).
    pub seconds_left: f64,
}

/// The schema a database holds, as `tokend migrate` and the start-up check see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// No `tokend_schema` table: a new database, or another application's.
    NoTables,
    Version(usize),
}

impl PgStore {
    /// Starts the store's threads (no connection yet: the first operation opens it).
    pub fn start(target: &PgTarget, local: &Path) -> Result<PgStore, StoreError> {
        let shown: Arc<str> = target.shown().into();
        let stats = Arc::new(batch::BatchStats::default());
        let started = spawn_worker("tokend-pg", target, stats.clone())
            .and_then(|jobs| Ok((jobs, spawn_worker("tokend-pg-read", target, stats.clone())?)));
        let (jobs, reads) = started.map_err(|e| StoreError::Postgres {
            target: shown.to_string(),
            message: format!("cannot start its threads: {e}"),
        })?;
        Ok(PgStore { jobs, reads, stats, shown, local: Arc::new(local.to_path_buf()), unsettled: Arc::default() })
    }

    /// Batches committed so far and the operations in them (the refresh path's group commits).
    pub fn batch_stats(&self) -> (u64, u64) {
        self.stats.get()
    }

    /// Starts the worker and checks the schema: the start of every command but `tokend migrate`.
    pub fn open(target: &PgTarget, local: &Path) -> Result<PgStore, StoreError> {
        let store = PgStore::start(target, local)?;
        match store.schema_state()? {
            SchemaState::NoTables => Err(store.error(
                "has no tokend tables (a new database, or another application's): run `tokend migrate` first".into(),
            )),
            SchemaState::Version(v) if v > MIGRATIONS.len() => Err(store.error(format!(
                "schema version {v} is newer than this tokend knows ({}); upgrade tokend on this node",
                MIGRATIONS.len()
            ))),
            SchemaState::Version(v) if v < MIGRATIONS.len() => Err(store.error(format!(
                "schema version {v} is older than this tokend's ({}): run `tokend migrate`",
                MIGRATIONS.len()
            ))),
            SchemaState::Version(_) => Ok(store),
        }
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The schema version this tokend writes.
    pub fn known_version() -> usize {
        MIGRATIONS.len()
    }

    fn error(&self, message: String) -> StoreError {
        StoreError::Postgres { target: self.shown.to_string(), message }
    }

    /// Runs `op` on the writer's (or with `read`, the reader's) connection, within
    /// [`OPERATION_TIMEOUT`], and hands its result to `reply`. `op` gets the connection's
    /// prepared statements too: the reads every refresh and every heard change make are parsed
    /// and planned once per connection, not at each call.
    fn submit<T, F>(&self, read: bool, op: F, reply: impl FnOnce(Result<T, StoreError>) + Send + 'static)
    where
        T: Send + 'static,
        F: for<'c> FnOnce(ops::Conn<'c>) -> Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>
            + Send
            + 'static,
    {
        let shown = self.shown.clone();
        let fail = move |message: String| StoreError::Postgres { target: shown.to_string(), message };
        let job: PlainJob = Box::new(move |session: &mut Session| {
            Box::pin(async move {
                let outcome = tokio::time::timeout(OPERATION_TIMEOUT, async {
                    let (client, statements) = session.connection().await.map_err(|message| (message, false))?;
                    op(ops::Conn { client, statements }).await.map_err(|e| (describe(&e), read_only_session(&e)))
                })
                .await;
                let result = match outcome {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err((message, read_only))) => {
                        // A session that began read-only (a standby, `default_transaction_read_only`)
                        // stays so while it lasts: the next operation gets a new one.
                        if read_only || session.client.as_ref().is_some_and(Client::is_closed) {
                            session.drop_connection();
                        }
                        Err(fail(message))
                    }
                    Err(_) => {
                        // Whatever the server is doing with this connection, it is not ours any more.
                        session.drop_connection();
                        Err(fail(format!("no answer within {}s", OPERATION_TIMEOUT.as_secs())))
                    }
                };
                reply(result);
            })
        });
        let queue = if read { &self.reads } else { &self.jobs };
        if let Err(tokio::sync::mpsc::error::SendError(job)) = queue.send(Job::Plain(job)) {
            // The worker is gone (its runtime panicked): run nothing; `reply` is dropped unsent,
            // which the caller reports as the thread being gone.
            drop(job);
        }
    }

    /// Runs `op` in the writer's next group commit and returns its value once that committed.
    async fn batched<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(ops::Db<'c>) -> batch::OpFuture<'c, (T, bool)> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply = move |r: Result<T, String>| {
            let _ = tx.send(r);
        };
        let gone = || self.error("the database thread is gone".into());
        self.jobs.send(Job::Batched(Box::new(batch::Pending::new(op, reply)))).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(|message| self.error(message))
    }

    /// [`PgStore::batched`], waited for synchronously (the CLI, the daemon's loop).
    fn batched_blocking<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(ops::Db<'c>) -> batch::OpFuture<'c, (T, bool)> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let reply = move |r: Result<T, String>| {
            let _ = tx.send(r);
        };
        let gone = || self.error("the database thread is gone".into());
        self.jobs.send(Job::Batched(Box::new(batch::Pending::new(op, reply)))).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?.map_err(|message| self.error(message))
    }

    fn call<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut Client,
            ) -> Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>
            + Send
            + 'static,
    {
        self.call_on(false, op)
    }

    /// A read, on the reader's connection: it sees only what is committed.
    fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut Client,
            ) -> Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>
            + Send
            + 'static,
    {
        self.call_on(true, op)
    }

    fn call_on<T, F>(&self, read: bool, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut Client,
            ) -> Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>
            + Send
            + 'static,
    {
        self.call_with_statements(read, move |conn: ops::Conn<'_>| op(conn.client))
    }

    /// [`Self::submit`], waited for synchronously (the CLI, the daemon's loop).
    fn call_with_statements<T, F>(&self, read: bool, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(ops::Conn<'c>) -> Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>
            + Send
            + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(read, op, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Err(self.error("the database thread is gone".into())))
    }

    /// A read from the refresh path, on the reader's connection.
    async fn read_async<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(ops::Conn<'c>) -> Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>
            + Send
            + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(true, op, move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or_else(|_| Err(self.error("the database thread is gone".into())))
    }

    pub fn schema_state(&self) -> Result<SchemaState, StoreError> {
        self.call(|c| {
            Box::pin(async move {
                let exists: bool =
                    c.query_one("SELECT to_regclass('tokend_schema') IS NOT NULL", &[]).await?.try_get(0)?;
                if !exists {
                    return Ok(SchemaState::NoTables);
                }
                let v: i32 =
                    c.query_one("SELECT coalesce(max(version), 0) FROM tokend_schema", &[]).await?.try_get(0)?;
                Ok(SchemaState::Version(usize::try_from(v).unwrap_or(0)))
            })
        })
    }

    /// `tokend migrate`: brings the schema to this tokend's version, one transaction per step,
    /// serialised by an advisory lock. Returns the versions before and after.
    pub fn migrate(&self) -> Result<(usize, usize), StoreError> {
        let known = MIGRATIONS.len();
        let result = self.call(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS tokend_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await?;
                let before: i32 =
                    tx.query_one("SELECT coalesce(max(version), 0) FROM tokend_schema", &[]).await?.try_get(0)?;
                let before = usize::try_from(before).unwrap_or(0);
                if before > known {
                    return Ok(Err(before));
                }
                for (i, step) in MIGRATIONS.iter().enumerate().skip(before) {
                    tx.batch_execute(step).await?;
                    let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
                    tx.execute("INSERT INTO tokend_schema (version) VALUES ($1)", &[&v]).await?;
                }
                tx.commit().await?;
                Ok(Ok(before))
            })
        })?;
        match result {
            Ok(before) => Ok((before, known)),
            Err(newer) => Err(self.error(format!(
                "schema version {newer} is newer than this tokend knows ({known}); upgrade tokend on this node"
            ))),
        }
    }

    pub fn schema_version(&self) -> Result<usize, StoreError> {
        match self.schema_state()? {
            SchemaState::Version(v) => Ok(v),
            SchemaState::NoTables => Err(self.error("has no tokend tables".into())),
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        let name = name.to_string();
        self.call_with_statements(true, move |c| Box::pin(async move { ops::get(c.db(), &name).await }))
    }

    /// The states of those of `names` that exist, in one query (any order).
    pub fn get_many(&self, names: &[&str]) -> Result<Vec<TokenState>, StoreError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.call_with_statements(true, move |c| Box::pin(async move { ops::get_many(c.db(), &names).await }))
    }

    pub fn list(&self) -> Result<Vec<TokenState>, StoreError> {
        self.read(|c| Box::pin(async move { ops::list(c).await }))
    }

    pub fn list_lifetimes(&self) -> Result<Vec<(String, Lifetime)>, StoreError> {
        self.read(|c| Box::pin(async move { ops::list_lifetimes(c).await }))
    }

    pub fn import_many(&self, tokens: &[(&str, &str, &NewToken)], now_secs: i64) -> Result<(), StoreError> {
        let owned: Vec<(String, String, NewToken)> =
            tokens.iter().map(|(n, p, t)| (n.to_string(), p.to_string(), (*t).clone())).collect();
        self.call(move |c| Box::pin(async move { ops::import_many(c, &owned, now_secs).await }))
    }

    fn unsettled(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Unsettled>> {
        self.unsettled.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores a token obtained outside a refresh. A token whose fenced rotation commit failed
    /// (the daemon retrying it) is committed fenced again, never imported over a generation that
    /// moved on meanwhile.
    pub fn import(
        &self,
        name: &str,
        provider: &str,
        token: &NewToken,
        now_secs: i64,
    ) -> Result<TokenState, StoreError> {
        let retry = self.unsettled().get(name).filter(|u| u.access_token == token.access_token.expose()).cloned();
        if let Some(u) = retry {
            let (owned, provider_owned, token_owned) = (name.to_string(), provider.to_string(), token.clone());
            let committed = self.batched_blocking(move |mut db| {
                Box::pin(async move {
                    let committed = ops::commit(
                        &mut db,
                        &owned,
                        &provider_owned,
                        u.attempt_id,
                        u.from_generation,
                        &token_owned,
                        now_secs * 1000,
                    )
                    .await?;
                    Ok((committed, true))
                })
            })?;
            return match committed {
                ops::Committed::Stored(state) => {
                    self.unsettled().remove(name);
                    Ok(state)
                }
                ops::Committed::Superseded { found, rescue_id } => {
                    // Kept in the map: a further retry of this answer must not become a plain
                    // import either (the attempt is closed now, so it fails fenced again).
                    Err(StoreError::Superseded {
                        name: name.to_string(),
                        spent: u.from_generation,
                        found,
                        kept: format!("row {rescue_id} of tokend_rescue in {}", self.shown),
                    })
                }
            };
        }
        self.import_many(&[(name, provider, token)], now_secs)?;
        self.get(name)?.ok_or_else(|| self.error(format!("credential {name} vanished after import")))
    }

    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.call(move |c| Box::pin(async move { ops::remove(c, &name).await }))
    }

    pub fn mark_revoked(&self, name: &str, now_secs: i64) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.call(move |c| Box::pin(async move { ops::mark_revoked(c, &name, now_secs).await }))
    }

    /// Copies `states` (a SQLite store's credentials) into this empty store in one transaction,
    /// verified by credential count and generation sum. Returns both.
    pub fn copy_in(&self, states: Vec<TokenState>, now_secs: i64) -> Result<(i64, i64), StoreError> {
        let copied = self.call(move |c| Box::pin(async move { ops::copy_in(c, &states, now_secs).await }))?;
        copied.map_err(|why| self.error(why))
    }

    pub fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.read(|c| Box::pin(async move { ops::leases(c).await }))
    }

    pub fn abandoned_attempts(&self) -> Result<Vec<OpenAttempt>, StoreError> {
        self.call(|c| Box::pin(async move { ops::abandoned_attempts(c).await }))
    }

    pub fn cancel_attempt_now(&self, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), StoreError> {
        let why = why.to_string();
        self.batched_blocking(move |mut db| {
            Box::pin(async move { ops::cancel(&mut db, attempt_id, &why, now_ms).await.map(|()| ((), true)) })
        })
    }

    /// This node's name in the settings records: the host and the node's own directory, which
    /// stay the same across its restarts (several nodes may share a host).
    pub fn node_name(&self) -> String {
        let host = node_identity().split('/').next().unwrap_or_default();
        format!("{host}:{}", self.local.display())
    }

    /// Records this node's provider settings per credential and returns where other nodes'
    /// differ (settings.rs).
    pub fn record_settings(&self, settings: Vec<(String, String)>) -> Result<Vec<settings::Disagreement>, StoreError> {
        let node = self.node_name();
        self.call(move |c| Box::pin(async move { settings::record(c, &node, &settings).await }))
    }

    /// Where other nodes' settings differ from `settings`, recording nothing.
    pub fn compare_settings(&self, settings: Vec<(String, String)>) -> Result<Vec<settings::Disagreement>, StoreError> {
        let node = self.node_name();
        self.call(move |c| Box::pin(async move { settings::compare(c, &node, &settings).await }))
    }

    /// Removes this node's settings record (a clean stop).
    pub fn forget_settings(&self) -> Result<(), StoreError> {
        let node = self.node_name();
        self.call(move |c| Box::pin(async move { settings::forget(c, &node).await }))
    }

    pub fn maintenance(&self, now_ms: i64, keep: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        self.call(move |c| Box::pin(async move { ops::maintenance(c, cutoff).await }))
    }
}

impl super::RefreshStore for PgStore {
    fn path(&self) -> &Path {
        &self.local
    }

    async fn begin_refresh(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> Result<Begin, StoreError> {
        self.begin_refresh_planned(name, holder, lease_ttl, now_ms, None).await
    }

    /// A node that lost the race for a whole catch-up learns it inside `begin`, from the state
    /// `begin` reads anyway: the lease it took is rolled back with the operation's savepoint.
    async fn begin_refresh_planned(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
        planned: Option<i64>,
    ) -> Result<Begin, StoreError> {
        let (name, holder) = (name.to_string(), holder.clone());
        self.batched(move |mut db| {
            Box::pin(async move { ops::begin(&mut db, &name, &holder, lease_ttl, now_ms, planned).await })
        })
        .await
    }

    async fn commit_rotation(
        &self,
        name: &str,
        provider: &str,
        attempt_id: i64,
        from_generation: i64,
        token: &NewToken,
        now_ms: i64,
    ) -> Result<TokenState, StoreError> {
        let (owned_name, provider, owned_token) = (name.to_string(), provider.to_string(), token.clone());
        let committed = self
            .batched(move |mut db| {
                Box::pin(async move {
                    let committed =
                        ops::commit(&mut db, &owned_name, &provider, attempt_id, from_generation, &owned_token, now_ms)
                            .await?;
                    Ok((committed, true))
                })
            })
            .await;
        let committed = match committed {
            Ok(committed) => committed,
            Err(e) => {
                let access_token = token.access_token.expose().to_string();
                self.unsettled().insert(name.to_string(), Unsettled { attempt_id, from_generation, access_token });
                return Err(e);
            }
        };
        match committed {
            ops::Committed::Stored(state) => Ok(state),
            ops::Committed::Superseded { found, rescue_id } => Err(StoreError::Superseded {
                name: name.to_string(),
                spent: from_generation,
                found,
                kept: format!("row {rescue_id} of tokend_rescue in {}", self.shown),
            }),
        }
    }

    async fn record_failure(
        &self,
        name: &str,
        attempt_id: i64,
        reason: &str,
        needs_reauth: bool,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (name, reason) = (name.to_string(), reason.to_string());
        self.batched(move |db| {
            Box::pin(async move {
                ops::failure(db.client, &name, attempt_id, &reason, needs_reauth, now_ms).await.map(|mark| (mark, true))
            })
        })
        .await
    }

    async fn cancel_attempt(&self, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), StoreError> {
        let why = why.to_string();
        self.batched(move |mut db| {
            Box::pin(async move { ops::cancel(&mut db, attempt_id, &why, now_ms).await.map(|()| ((), true)) })
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), StoreError> {
        let (name, holder) = (name.to_string(), holder.clone());
        self.batched(move |mut db| {
            Box::pin(async move { ops::release(&mut db, &name, &holder).await.map(|()| ((), true)) })
        })
        .await
    }

    async fn get(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        let name = name.to_string();
        self.read_async(move |c| Box::pin(async move { ops::get(c.db(), &name).await })).await
    }
}
