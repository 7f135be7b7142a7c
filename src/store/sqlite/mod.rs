//! The token store: one SQLite file (WAL, `synchronous=FULL`) holding every credential's token
//! state, the attempts in flight and the leases. SQL lives here and nowhere else.
//!
//! Why each piece exists:
//! - **Leases** (`lease` table) make sure one credential is refreshed by one holder at a time,
//!   across tasks *and* processes: taken under `BEGIN IMMEDIATE` (the database write lock), with
//!   the holder's pid and a deadline. A lease whose holder process is gone, or whose deadline has
//!   passed, is reclaimed.
//! - **Attempts** (`attempt` table) record which refresh token (by fingerprint) is about to be
//!   spent, durably, *before* the request leaves. An attempt without a result after a crash is
//!   the evidence that a rotation may have happened in the crash window.
//! - **The rotation commit** writes the new access token, the new refresh token, the lifetime and
//!   the generation in one transaction; `synchronous=FULL` makes it durable when `commit` returns.
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] only ever grows.

/// The parameters of a statement that stores a token: `?1` the credential's name, `?2`–`?10` the
/// token's columns (access token, refresh token — both as [`sealed`] returned them —, type,
/// scope, expires_in, created_at, expires_at, extra, refresh_token_expires_at), then each
/// statement's own from `?11` on. One list for every statement that writes a token, so that none
/// can put a column in the wrong place.
macro_rules! token_params {
    ($name:expr, $token:expr, $sealed:expr $(, $rest:expr)* $(,)?) => {
        rusqlite::params![
            $name,
            $sealed.0,
            $sealed.1,
            $token.token_type,
            $token.scope,
            $token.expires_in,
            $token.created_at,
            $token.expires_at(),
            $token.extra,
            $token.refresh_token_expires_at,
            $($rest),*
        ]
    };
}

pub(crate) mod ops;
mod sealing;
pub use sealing::{KeyUse, backup, count_credentials, remove_with_side_files};

use super::{Begin, LeaseHolder, Lifetime, NewToken, OpenAttempt, Status, StoreError, TokenState};
use crate::seal::{Column, SealError, Sealer};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every schema change is appended here; index + 1 is the `user_version` it leads to.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE credential (
        name            TEXT PRIMARY KEY,
        provider        TEXT NOT NULL,
        access_token    TEXT NOT NULL,
        refresh_token   TEXT,
        token_type      TEXT NOT NULL,
        scope           TEXT,
        expires_in      INTEGER,
        created_at      INTEGER NOT NULL,
        expires_at      INTEGER,
        generation      INTEGER NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('active', 'needs_reauth')),
        last_error      TEXT,
        last_refresh_at INTEGER,
        updated_at      INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE attempt (
        id              INTEGER PRIMARY KEY,
        credential      TEXT NOT NULL,
        from_generation INTEGER NOT NULL,
        spent_fp        TEXT,
        holder          TEXT NOT NULL,
        started_at_ms   INTEGER NOT NULL,
        finished_at_ms  INTEGER,
        result          TEXT
    ) STRICT;
    CREATE INDEX attempt_open ON attempt (credential) WHERE finished_at_ms IS NULL;
    CREATE TABLE lease (
        credential      TEXT PRIMARY KEY,
        holder          TEXT NOT NULL,
        pid             INTEGER NOT NULL,
        deadline_ms     INTEGER NOT NULL
    ) STRICT;
",
    // v2: `revoked` status (tokend revoke). SQLite cannot alter a CHECK constraint: rebuild.
    r"
    CREATE TABLE credential_v2 (
        name            TEXT PRIMARY KEY,
        provider        TEXT NOT NULL,
        access_token    TEXT NOT NULL,
        refresh_token   TEXT,
        token_type      TEXT NOT NULL,
        scope           TEXT,
        expires_in      INTEGER,
        created_at      INTEGER NOT NULL,
        expires_at      INTEGER,
        generation      INTEGER NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('active', 'needs_reauth', 'revoked')),
        last_error      TEXT,
        last_refresh_at INTEGER,
        updated_at      INTEGER NOT NULL
    ) STRICT;
    INSERT INTO credential_v2 SELECT * FROM credential;
    DROP TABLE credential;
    ALTER TABLE credential_v2 RENAME TO credential;
",
    // v3: what answers carry for scripts, when the refresh token dies, since when a credential
    // is dead.
    r"
    ALTER TABLE credential ADD COLUMN extra TEXT;
    ALTER TABLE credential ADD COLUMN refresh_token_expires_at INTEGER;
    ALTER TABLE credential ADD COLUMN refresh_token_issued_at INTEGER;
    ALTER TABLE credential ADD COLUMN dead_since INTEGER;
    UPDATE credential SET refresh_token_issued_at = created_at WHERE refresh_token IS NOT NULL;
    UPDATE credential SET dead_since = updated_at WHERE status != 'active';
",
];

/// How long a writer waits for another process's transaction before SQLite reports busy. The
/// longest transaction tokend holds is one rotation commit (milliseconds), so hitting this means
/// something is badly wrong rather than merely busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// One operation of a group commit ([`Store::batch`]): it runs inside the batch's transaction, in
/// a savepoint of its own, and is told once the batch committed (or failed to).
pub trait BatchJob: Send {
    fn run(&mut self, c: &Connection) -> rusqlite::Result<()>;
    /// The batch's outcome for this operation: `Ok` only when its effects are durable.
    fn settle(self: Box<Self>, outcome: Result<(), StoreError>);
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Seals every token written and opens every token read (src/seal.rs); plaintext without a key.
    sealer: Sealer,
}

/// The columns [`state_from_row`] reads, in its order; a macro so the queries below can be
/// `const` strings built from one list.
macro_rules! state_columns {
    () => {
        "name, provider, access_token, refresh_token, token_type, scope, expires_in, created_at, \
         expires_at, generation, status, last_error, last_refresh_at, \
         (SELECT count(*) FROM attempt a WHERE a.credential = c.name AND a.finished_at_ms IS NULL), \
         extra, refresh_token_expires_at, refresh_token_issued_at, dead_since"
    };
}

/// One credential's state; prepared once per connection on the refresh path.
pub(super) const STATE_BY_NAME: &str = concat!("SELECT ", state_columns!(), " FROM credential c WHERE name = ?1");
const STATE_ALL: &str = concat!("SELECT ", state_columns!(), " FROM credential c ORDER BY name");

const LIFETIMES_ALL: &str = "SELECT name, created_at, expires_at, generation, status, last_refresh_at, \
     refresh_token_expires_at, refresh_token_issued_at, dead_since FROM credential";

fn status_from_text(text: &str) -> Status {
    match text {
        "needs_reauth" => Status::NeedsReauth,
        "revoked" => Status::Revoked,
        _ => Status::Active,
    }
}

pub(super) fn state_from_row(row: &rusqlite::Row<'_>, sealer: &Sealer) -> rusqlite::Result<TokenState> {
    let status: String = row.get(10)?;
    let name: String = row.get(0)?;
    let generation: i64 = row.get(9)?;
    let access_token =
        sealer.open(&name, Column::AccessToken, generation, row.get_ref(2)?.as_str()?).map_err(seal_error)?;
    let refresh_token = match row.get_ref(3)?.as_str_or_null()? {
        Some(stored) => Some(sealer.open(&name, Column::RefreshToken, generation, stored).map_err(seal_error)?),
        None => None,
    };
    Ok(TokenState {
        name,
        provider: row.get(1)?,
        access_token,
        refresh_token,
        token_type: row.get(4)?,
        scope: row.get(5)?,
        expires_in: row.get(6)?,
        created_at: row.get(7)?,
        expires_at: row.get(8)?,
        generation,
        status: status_from_text(&status),
        last_error: row.get(11)?,
        last_refresh_at: row.get(12)?,
        attempts_in_flight: row.get(13)?,
        extra: row.get(14)?,
        refresh_token_expires_at: row.get(15)?,
        refresh_token_issued_at: row.get(16)?,
        dead_since: row.get(17)?,
    })
}

/// A key problem met inside a statement, carried through rusqlite to [`StoreError::from_sql`].
pub(super) fn seal_error(e: SealError) -> rusqlite::Error {
    // A conversion failure is the one variant that carries any error (without rusqlite's
    // `functions` feature); StoreError::from_sql takes it out again.
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

/// A token's two secrets as stored at `generation`: sealed when the store has a key.
pub(super) fn sealed(
    sealer: &Sealer,
    name: &str,
    generation: i64,
    token: &NewToken,
) -> rusqlite::Result<(String, Option<String>)> {
    let access = sealer.seal(name, Column::AccessToken, generation, token.access_token.expose()).map_err(seal_error)?;
    let refresh = match &token.refresh_token {
        Some(t) => Some(sealer.seal(name, Column::RefreshToken, generation, t.expose()).map_err(seal_error)?),
        None => None,
    };
    Ok((access, refresh))
}

impl Store {
    /// Opens (creating with mode 0600 if needed) and migrates the database at `path`, without a
    /// key: tokens are stored in plaintext, and an encrypted store is refused.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_sealed(path, Sealer::plaintext())
    }

    /// [`Store::open`] with `sealer`'s keys: the store's key id must be one of them (see
    /// `sealing.rs`), and every token is sealed on the way in and opened on the way out.
    pub fn open_sealed(path: &Path, sealer: Sealer) -> Result<Store, StoreError> {
        let other = |message: String| StoreError::Other { path: path.to_path_buf(), message };
        let io = |context: String, source| StoreError::Io { path: path.to_path_buf(), context, source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| io(format!("cannot create directory {}", dir.display()), source))?;
        }
        // Create the file ourselves so it is 0600 from its first byte; SQLite gives the -wal and
        // -shm files the same mode as the database file.
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = std::fs::metadata(path).map_err(|source| io("cannot inspect".into(), source))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        database = %path.display(),
                        mode = format!("{:04o}", meta.permissions().mode() & 0o777),
                        "database file is readable by other users; it holds refresh tokens, consider chmod 600"
                    );
                }
            }
            Err(source) => return Err(io("cannot create".into(), source)),
        }
        // SQLite's own message for these is "unable to open database file"; say what is wrong.
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| io("cannot open for writing".into(), source))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).map_err(|e| {
            other(format!("directory {} is not writable ({e}); SQLite needs it for the WAL files", dir.display()))
        })?;
        let sql = |source| StoreError::Sqlite { path: path.to_path_buf(), source };
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(|e| {
            if matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::NotADatabase)) {
                other("is not a SQLite database (corrupt, or another file at this path); refusing to touch it".into())
            } else {
                sql(e)
            }
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(other(format!("cannot switch to WAL journal (got {mode})")));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;").map_err(sql)?;
        // The refresh path's dozen statements, parsed once.
        conn.set_prepared_statement_cache_capacity(32);
        let mut store = Store { conn, path: path.to_path_buf(), sealer };
        store.migrate()?;
        store.check_key()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::from_sql(&self.path, source)
    }

    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version > MIGRATIONS.len() {
            return Err(StoreError::Other {
                path: self.path.clone(),
                message: format!(
                    "schema version {version} is newer than this tokend knows ({}); upgrade tokend",
                    MIGRATIONS.len()
                ),
            });
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(migration).map_err(sql)?;
            tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX)).map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let v: i64 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    }

    pub fn get(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        ops::get(&self.conn, &self.sealer, name).map_err(|e| self.err(e))
    }

    /// The states of those of `names` that exist.
    pub fn get_many(&self, names: &[&str]) -> Result<Vec<TokenState>, StoreError> {
        names.iter().filter_map(|name| self.get(name).transpose()).collect()
    }

    /// Every credential's [`Lifetime`], by name, without reading the tokens.
    pub fn list_lifetimes(&self) -> Result<Vec<(String, Lifetime)>, StoreError> {
        let mut stmt = self.conn.prepare(LIFETIMES_ALL).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |row| {
                let status: String = row.get(4)?;
                Ok((
                    row.get(0)?,
                    Lifetime {
                        created_at: row.get(1)?,
                        expires: row.get::<_, Option<i64>>(2)?.into(),
                        generation: row.get(3)?,
                        status: status_from_text(&status),
                        last_refresh_at: row.get::<_, Option<i64>>(5)?.into(),
                        refresh_token_expires_at: row.get::<_, Option<i64>>(6)?.into(),
                        refresh_token_issued_at: row.get::<_, Option<i64>>(7)?.into(),
                        dead_since: row.get::<_, Option<i64>>(8)?.into(),
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    pub fn list(&self) -> Result<Vec<TokenState>, StoreError> {
        let mut stmt = self.conn.prepare(STATE_ALL).map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], |r| state_from_row(r, &self.sealer)).map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Stores a token obtained outside a refresh (first authorization): generation + 1, status
    /// active, open attempts closed as superseded.
    pub fn import(
        &mut self,
        name: &str,
        provider: &str,
        token: &NewToken,
        now_secs: i64,
    ) -> Result<TokenState, StoreError> {
        self.import_many(&[(name, provider, token)], now_secs)?;
        self.get(name)?.ok_or_else(|| StoreError::Other {
            path: self.path.clone(),
            message: format!("credential {name} vanished after import"),
        })
    }

    /// [`Store::import`] for many credentials in one durable transaction (bulk loads).
    pub fn import_many(&mut self, tokens: &[(&str, &str, &NewToken)], now_secs: i64) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::from_sql(&path, source);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
        {
            let mut generation_of = tx.prepare("SELECT generation FROM credential WHERE name = ?1").map_err(sql)?;
            let mut upsert = tx
                .prepare(
                    "INSERT INTO credential (name, provider, access_token, refresh_token, token_type, scope, expires_in,
                         created_at, expires_at, generation, status, last_error, last_refresh_at, updated_at,
                         extra, refresh_token_expires_at, refresh_token_issued_at, dead_since)
                     VALUES (?1, ?11, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, 'active', NULL, NULL, ?12,
                         ?9, ?10, CASE WHEN ?3 IS NULL THEN NULL ELSE ?7 END, NULL)
                     ON CONFLICT (name) DO UPDATE SET provider = excluded.provider, access_token = excluded.access_token,
                         refresh_token = excluded.refresh_token, token_type = excluded.token_type, scope = excluded.scope,
                         expires_in = excluded.expires_in, created_at = excluded.created_at, expires_at = excluded.expires_at,
                         generation = credential.generation + 1, status = 'active', last_error = NULL,
                         updated_at = excluded.updated_at, extra = excluded.extra,
                         refresh_token_expires_at = excluded.refresh_token_expires_at,
                         refresh_token_issued_at = excluded.refresh_token_issued_at, dead_since = NULL",
                )
                .map_err(sql)?;
            let mut close = tx
                .prepare(
                    "UPDATE attempt SET finished_at_ms = ?2, result = 'superseded by import' WHERE credential = ?1 AND finished_at_ms IS NULL",
                )
                .map_err(sql)?;
            for (name, provider, token) in tokens {
                // The generation the upsert below gives the row, which the sealed values are bound to.
                let generation = generation_of
                    .query_row([name], |r| r.get::<_, i64>(0))
                    .optional()
                    .map_err(sql)?
                    .map_or(1, |g| g + 1);
                let sealed = sealed(&self.sealer, name, generation, token).map_err(sql)?;
                upsert.execute(token_params!(name, token, sealed, provider, now_secs)).map_err(sql)?;
                close.execute(params![name, now_secs * 1000]).map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }

    /// Runs `f` inside one `BEGIN IMMEDIATE` transaction and commits it (durably).
    fn in_transaction<T>(&mut self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::from_sql(&path, source);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
        let value = f(&tx).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(value)
    }

    /// Steps 1 and 2 of the invariant in one durable transaction: take the lease for `name` and
    /// record the attempt to spend its current refresh token.
    pub fn begin_refresh(
        &mut self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> Result<Begin, StoreError> {
        let sealer = self.sealer.clone();
        self.in_transaction(|c| ops::begin(c, &sealer, name, holder, lease_ttl, now_ms))
    }

    /// Step 4: the rotation commit. One transaction: new tokens, lifetime, generation + 1, status
    /// active, attempt closed. Durable (fsync'd WAL) when this returns `Ok`.
    pub fn commit_rotation(
        &mut self,
        name: &str,
        provider: &str,
        attempt_id: i64,
        from_generation: i64,
        token: &NewToken,
        now_ms: i64,
    ) -> Result<TokenState, StoreError> {
        let path = self.path.clone();
        let sealer = self.sealer.clone();
        self.in_transaction(|c| ops::commit(c, &sealer, name, provider, attempt_id, from_generation, token, now_ms))?
            .ok_or_else(|| StoreError::Other { path, message: format!("credential {name} vanished after commit") })
    }

    /// Closes an attempt that produced no token. `needs_reauth` marks the credential dead until a
    /// human imports a new token; otherwise only `last_error` is updated.
    pub fn record_failure(
        &mut self,
        name: &str,
        attempt_id: i64,
        reason: &str,
        needs_reauth: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.in_transaction(|c| ops::failure(c, name, attempt_id, reason, needs_reauth, now_ms))
    }

    /// Closes an attempt that was abandoned before any request was sent.
    pub fn cancel_attempt(&mut self, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), StoreError> {
        self.in_transaction(|c| ops::cancel(c, attempt_id, why, now_ms))
    }

    /// Step 5's last act. Only the holder's own lease is removed.
    pub fn release_lease(&mut self, name: &str, holder: &LeaseHolder) -> Result<(), StoreError> {
        self.in_transaction(|c| ops::release(c, name, holder))
    }

    /// Runs many operations in one transaction — one fsync for all of them (group commit). Each
    /// runs in its own savepoint, so one failing operation does not undo the others; if the final
    /// commit fails, every operation is told that failure, since none of them took effect.
    pub fn batch(&mut self, jobs: Vec<Box<dyn BatchJob>>) {
        let path = self.path.clone();
        let sql = |source| StoreError::from_sql(&path, source);
        let other = |message: String| StoreError::Other { path: path.clone(), message };
        let mut tx = match self.conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let message = e.to_string();
                jobs.into_iter().for_each(|job| job.settle(Err(other(message.clone()))));
                return;
            }
        };
        let mut ran = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            let result = tx.savepoint().map_err(sql).and_then(|mut sp| {
                sp.set_drop_behavior(rusqlite::DropBehavior::Rollback);
                job.run(&sp).map_err(sql)?;
                sp.commit().map_err(sql)
            });
            ran.push((job, result));
        }
        let committed = tx.commit().map_err(|e| format!("the batch commit failed: {e}"));
        for (job, result) in ran {
            let outcome = match (&committed, result) {
                (Ok(()), result) => result,
                (Err(message), Ok(())) => Err(other(message.clone())),
                (Err(_), Err(e)) => Err(e),
            };
            job.settle(outcome);
        }
    }

    /// Attempts with no result whose holder is not alive: rotations that may have happened in a
    /// crash window.
    pub fn abandoned_attempts(&self) -> Result<Vec<OpenAttempt>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, credential, from_generation, spent_fp, holder, started_at_ms FROM attempt WHERE finished_at_ms IS NULL ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(OpenAttempt {
                    id: r.get(0)?,
                    credential: r.get(1)?,
                    from_generation: r.get(2)?,
                    spent_fp: r.get(3)?,
                    holder: r.get(4)?,
                    started_at_ms: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        let all = rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))?;
        Ok(all.into_iter().filter(|a| !ops::holder_alive(&a.holder)).collect())
    }

    /// Housekeeping: forget finished attempts older than `keep`, let SQLite refresh its planner
    /// statistics, and fold the WAL back into the database. Returns the attempts pruned.
    pub fn maintenance(&mut self, now_ms: i64, keep: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let pruned = self
            .conn
            .execute("DELETE FROM attempt WHERE finished_at_ms IS NOT NULL AND finished_at_ms < ?1", [cutoff])
            .map_err(|e| self.err(e))?;
        self.conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);").map_err(|e| self.err(e))?;
        Ok(pruned)
    }

    /// Marks a credential revoked (after `tokend revoke`): kept for the record, never refreshed.
    pub fn mark_revoked(&mut self, name: &str, now_secs: i64) -> Result<bool, StoreError> {
        self.conn
            .execute(
                "UPDATE credential SET status = 'revoked', last_error = 'revoked with tokend revoke', updated_at = ?2,
                     dead_since = COALESCE(dead_since, ?2) WHERE name = ?1",
                params![name, now_secs],
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// Removes a credential's token, leases and attempts. Returns whether it existed.
    pub fn remove(&mut self, name: &str) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
        let n = tx.execute("DELETE FROM credential WHERE name = ?1", [name]).map_err(sql)?;
        tx.execute("DELETE FROM lease WHERE credential = ?1", [name]).map_err(sql)?;
        tx.execute("DELETE FROM attempt WHERE credential = ?1", [name]).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::Secret;

    fn token(access: &str, refresh: Option<&str>, created_at: i64) -> NewToken {
        NewToken {
            access_token: Secret::new(access),
            refresh_token: refresh.map(Secret::new),
            token_type: "Bearer".into(),
            scope: Some("default".into()),
            expires_in: Some(3600),
            created_at,
            extra: None,
            refresh_token_expires_at: None,
        }
    }

    #[test]
    fn import_begin_commit_release() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sub").join("t.db");
        let mut store = Store::open(&db).unwrap();
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());

        let s = store.import("nb", "nationbuilder", &token("a1", Some("r1"), 1000), 1000).unwrap();
        assert_eq!((s.generation, s.expires_at, s.status), (1, Some(4600), Status::Active));

        let me = LeaseHolder::new();
        let Begin::Leased { state, attempt_id } =
            store.begin_refresh("nb", &me, Duration::from_secs(60), 2_000_000).unwrap()
        else {
            panic!()
        };
        assert_eq!(state.unwrap().refresh_token.unwrap().expose(), "r1");
        assert_eq!(store.get("nb").unwrap().unwrap().attempts_in_flight, 1);

        let other = LeaseHolder { id: format!("{}-other", std::process::id()), pid: std::process::id() };
        assert!(matches!(
            store.begin_refresh("nb", &other, Duration::from_secs(60), 2_000_001).unwrap(),
            Begin::Busy { .. }
        ));

        let s = store
            .commit_rotation("nb", "nationbuilder", attempt_id, 1, &token("a2", Some("r2"), 2000), 2_000_500)
            .unwrap();
        assert_eq!(
            (s.generation, s.access_token.expose(), s.refresh_token.as_ref().unwrap().expose()),
            (2, "a2", "r2")
        );
        assert_eq!(s.attempts_in_flight, 0);
        store.release_lease("nb", &me).unwrap();
        assert!(matches!(
            store.begin_refresh("nb", &other, Duration::from_secs(60), 2_000_600).unwrap(),
            Begin::Leased { .. }
        ));
    }

    #[test]
    fn missing_refresh_token_in_answer_keeps_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("t.db")).unwrap();
        store.import("c", "oauth2", &token("a1", Some("r1"), 1000), 1000).unwrap();
        let me = LeaseHolder::new();
        let Begin::Leased { attempt_id, .. } = store.begin_refresh("c", &me, Duration::from_secs(60), 1).unwrap()
        else {
            panic!()
        };
        let s = store.commit_rotation("c", "oauth2", attempt_id, 1, &token("a2", None, 2000), 2).unwrap();
        assert_eq!(s.refresh_token.unwrap().expose(), "r1");
    }

    #[test]
    fn stale_lease_of_dead_process_is_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("t.db")).unwrap();
        store.import("c", "oauth2", &token("a1", Some("r1"), 1000), 1000).unwrap();
        // pid_max is at most 2^22 on Linux: this pid cannot exist.
        let dead = LeaseHolder { id: "99999999-dead".into(), pid: 99_999_999 };
        assert!(matches!(store.begin_refresh("c", &dead, Duration::from_secs(600), 1).unwrap(), Begin::Leased { .. }));
        assert_eq!(store.abandoned_attempts().unwrap().len(), 1);
        let me = LeaseHolder::new();
        assert!(matches!(store.begin_refresh("c", &me, Duration::from_secs(60), 2).unwrap(), Begin::Leased { .. }));
    }

    #[test]
    fn needs_reauth_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        {
            let mut store = Store::open(&db).unwrap();
            store.import("c", "oauth2", &token("a1", Some("r1"), 1000), 1000).unwrap();
            let me = LeaseHolder::new();
            let Begin::Leased { attempt_id, .. } = store.begin_refresh("c", &me, Duration::from_secs(60), 1).unwrap()
            else {
                panic!()
            };
            store.record_failure("c", attempt_id, "invalid_grant", true, 2).unwrap();
        }
        let store = Store::open(&db).unwrap();
        let s = store.get("c").unwrap().unwrap();
        assert_eq!((s.status, s.last_error.as_deref()), (Status::NeedsReauth, Some("invalid_grant")));
    }

    #[test]
    fn garbage_file_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        std::fs::write(&db, vec![0x42u8; 8192]).unwrap();
        let err = Store::open(&db).err().unwrap().to_string();
        assert!(err.contains("is not a SQLite database"), "{err}");
        assert_eq!(std::fs::read(&db).unwrap(), vec![0x42u8; 8192]);
    }
}
