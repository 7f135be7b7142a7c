//! The token store: every credential's token state, the attempts in flight and the leases.
//! [`sqlite::Store`] is the embedded backend (one SQLite file, WAL, `synchronous=FULL`), and SQL
//! lives there and nowhere else. The refresh path reaches the store only through
//! [`RefreshStore`] — the operations a second backend (PostgreSQL, for fleets) implements too.

mod sqlite;

pub(crate) use sqlite::ops;
pub use sqlite::{BatchJob, KeyUse, Store, backup, count_credentials, remove_with_side_files};

// ---- fleet: the PostgreSQL backend and the seam that picks a backend (issue 17) ----
mod backend;
pub mod postgres;
pub use backend::{AnyRefreshStore, AnyStore};

use crate::redact::Secret;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("database {path}: {context}: {source}")]
    Io { path: PathBuf, context: String, source: std::io::Error },
    #[error("database {path}: {message}")]
    Other { path: PathBuf, message: String },
    /// The encryption key is missing, wrong or unreadable, or a sealed value does not open.
    #[error("database {path}: {source}")]
    Key { path: PathBuf, source: crate::seal::SealError },
    /// A PostgreSQL store; `target` is shown without any password.
    #[error("database {target}: {message}")]
    Postgres { target: String, message: String },
    /// The fenced rotation commit found the generation moved on from the one spent: the answer
    /// was kept (`kept` says where), the stored token left alone.
    #[error(
        "credential {name}: the answer to generation {spent} lost the fenced commit (the store is at generation {found}); the answer was kept in {kept}"
    )]
    Superseded { name: String, spent: i64, found: i64, kept: String },
}

impl StoreError {
    /// A statement's error, with a key problem met inside it (a sealed value that does not open)
    /// brought out as [`StoreError::Key`].
    pub fn from_sql(path: &Path, source: rusqlite::Error) -> StoreError {
        match source {
            rusqlite::Error::FromSqlConversionFailure(i, t, e) => match e.downcast::<crate::seal::SealError>() {
                Ok(seal) => StoreError::Key { path: path.to_path_buf(), source: *seal },
                Err(e) => StoreError::Sqlite {
                    path: path.to_path_buf(),
                    source: rusqlite::Error::FromSqlConversionFailure(i, t, e),
                },
            },
            source => StoreError::Sqlite { path: path.to_path_buf(), source },
        }
    }

    /// Whether this is about the encryption key (exit code 8 on the command line).
    pub fn is_key_problem(&self) -> bool {
        matches!(self, StoreError::Key { .. })
    }
}

/// `active` credentials are refreshed; `needs_reauth` ones (grant rejected) and `revoked` ones
/// (`tokend revoke`) wait for a human to authorize again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    NeedsReauth,
    Revoked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::NeedsReauth => "needs_reauth",
            Status::Revoked => "revoked",
        }
    }

    /// Not to be refreshed until a new token is imported or authorized.
    pub fn is_dead(self) -> bool {
        self != Status::Active
    }
}

/// A credential's stored token state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenState {
    pub name: String,
    pub provider: String,
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub token_type: String,
    pub scope: Option<String>,
    pub expires_in: Option<i64>,
    pub created_at: i64,
    /// `None` for tokens that never expire (NationBuilder V1, some API keys).
    pub expires_at: Option<i64>,
    pub generation: i64,
    pub status: Status,
    pub last_error: Option<String>,
    pub last_refresh_at: Option<i64>,
    pub attempts_in_flight: i64,
    /// The answer fields kept for scripts (a JSON object), e.g. Wild Apricot's `permissions`.
    pub extra: Option<String>,
    /// When the refresh token dies, where an answer said (`refresh_token_expires_in`).
    pub refresh_token_expires_at: Option<i64>,
    /// When the current refresh token was issued.
    pub refresh_token_issued_at: Option<i64>,
    /// Since when the credential has been `needs_reauth` or `revoked`.
    pub dead_since: Option<i64>,
}

/// What decides when a stored token is due, and what the daemon reports about it: all it keeps
/// in memory per credential. The tokens stay in the store and are read when a sink or a hook
/// needs them, so 100,000 credentials do not hold 100,000 pairs of tokens in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub generation: i64,
    pub created_at: i64,
    /// `created_at + expires_in`: the lifetime itself is not kept (100,000 × 16 bytes). Unknown
    /// for tokens that never expire; read it with [`Lifetime::expires_at`].
    pub expires: MaybeTime,
    pub status: Status,
    pub last_refresh_at: MaybeTime,
    pub refresh_token_expires_at: MaybeTime,
    pub refresh_token_issued_at: MaybeTime,
    pub dead_since: MaybeTime,
}

/// A unix time (seconds, or milliseconds where the field says so) that may be unknown, in 8 bytes
/// instead of an `Option<i64>`'s 16: every credential's [`Lifetime`] holds five (100,000 of them
/// in the daemon). 0 stands for unknown; nothing tokend keeps happened at the epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaybeTime(i64);

impl MaybeTime {
    pub fn get(self) -> Option<i64> {
        (self.0 != 0).then_some(self.0)
    }
}

impl From<Option<i64>> for MaybeTime {
    fn from(t: Option<i64>) -> Self {
        MaybeTime(t.unwrap_or(0))
    }
}

impl Lifetime {
    /// When the access token expires; `None` for tokens that never do.
    pub fn expires_at(&self) -> Option<i64> {
        self.expires.get()
    }

    /// The life the provider granted, in seconds.
    pub fn expires_in(&self) -> Option<i64> {
        self.expires_at().map(|at| at.saturating_sub(self.created_at))
    }
}

impl TokenState {
    pub fn lifetime(&self) -> Lifetime {
        Lifetime {
            generation: self.generation,
            created_at: self.created_at,
            expires: self.expires_at.into(),
            status: self.status,
            last_refresh_at: self.last_refresh_at.into(),
            refresh_token_expires_at: self.refresh_token_expires_at.into(),
            refresh_token_issued_at: self.refresh_token_issued_at.into(),
            dead_since: self.dead_since.into(),
        }
    }
}

/// A token to store, from a refresh or an import.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub access_token: Secret,
    /// `None` keeps the stored refresh token (RFC 6749 §6: the server may not issue a new one).
    pub refresh_token: Option<Secret>,
    pub token_type: String,
    pub scope: Option<String>,
    pub expires_in: Option<i64>,
    pub created_at: i64,
    /// Kept answer fields (JSON object); `None` keeps the stored ones.
    pub extra: Option<String>,
    /// From the answer's `refresh_token_expires_in`, when it has one.
    pub refresh_token_expires_at: Option<i64>,
}

impl NewToken {
    /// The token as a token-endpoint answer (what `tokend import` reads), for rescue files and
    /// rescue rows. The kept extras go back in as the answer fields they came from, so an import
    /// restores them; the token's own fields are written over them.
    pub fn answer_json(&self) -> serde_json::Value {
        let mut json: serde_json::Map<String, serde_json::Value> =
            self.extra.as_deref().and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default();
        json.extend([
            ("access_token".to_string(), self.access_token.expose().into()),
            ("refresh_token".to_string(), self.refresh_token.as_ref().map(|t| t.expose()).into()),
            ("token_type".to_string(), self.token_type.clone().into()),
            ("scope".to_string(), self.scope.clone().into()),
            ("expires_in".to_string(), self.expires_in.into()),
            ("created_at".to_string(), self.created_at.into()),
            ("refresh_token_expires_in".to_string(), self.refresh_token_expires_at.map(|t| t - self.created_at).into()),
        ]);
        serde_json::Value::Object(json)
    }

    pub fn expires_at(&self) -> Option<i64> {
        self.expires_in.map(|e| self.created_at.saturating_add(e))
    }
}

/// Who holds a lease: unique per refresh, with the process id for stale-lease detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub id: String,
    pub pid: u32,
}

impl LeaseHolder {
    pub fn new() -> Self {
        let pid = std::process::id();
        Self { id: format!("{pid}-{:016x}", rand::random::<u64>()), pid }
    }
}

impl Default for LeaseHolder {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`Store::begin_refresh`] found.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "built once per refresh and consumed at once; boxing buys nothing")]
pub enum Begin {
    /// The lease is ours and the attempt is recorded. `state` is `None` when nothing is stored
    /// yet (an API-key credential's first token).
    Leased { state: Option<TokenState>, attempt_id: i64 },
    /// Another live holder is refreshing this credential. `lease_left_ms` is how long its lease
    /// still runs, by the store's clock (the database server's, for a fleet).
    Busy { pid: u32, lease_left_ms: i64 },
    /// Only from [`RefreshStore::begin_refresh_planned`]: the stored generation is no longer the
    /// planned one; here is the stored state. No lease is held and no attempt recorded.
    MovedOn(TokenState),
}

/// An attempt that never got a result (its process died mid-refresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAttempt {
    pub id: i64,
    pub credential: String,
    pub from_generation: i64,
    pub spent_fp: Option<String>,
    pub holder: String,
    pub started_at_ms: i64,
}

/// The store operations of one refresh (ARCHITECTURE.md, "The refresh invariant"), each one
/// durable when its future resolves `Ok`. [`crate::committer::Committer`] implements them for
/// SQLite with group commit.
pub trait RefreshStore: Clone + Send + Sync + 'static {
    /// Where the store lives: rescue files go beside it.
    fn path(&self) -> &Path;

    /// What seals the store's values; rescue files are sealed with it too (src/seal.rs).
    fn sealer(&self) -> crate::seal::Sealer {
        crate::seal::Sealer::plaintext()
    }

    /// Steps 1 and 2 in one transaction: take `name`'s lease and record the attempt to spend its
    /// current refresh token.
    fn begin_refresh(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send;

    /// [`Self::begin_refresh`] for a refresh planned from generation `planned`. A fleet store
    /// answers [`Begin::MovedOn`] when another node already spent that generation (a catch-up
    /// raced by every node), keeping nothing of the lease it looked at and writing no attempt:
    /// the check rides on the lease's own statements instead of costing a read before them.
    /// Stores with one refresher per machine have no such race to lose: the lease decides.
    fn begin_refresh_planned(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
        _planned: Option<i64>,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send {
        self.begin_refresh(name, holder, lease_ttl, now_ms)
    }

    /// Step 4: new tokens, lifetime, generation + 1, status active, attempt closed.
    fn commit_rotation(
        &self,
        name: &str,
        provider: &str,
        attempt_id: i64,
        from_generation: i64,
        token: &NewToken,
        now_ms: i64,
    ) -> impl Future<Output = Result<TokenState, StoreError>> + Send;

    /// Closes an attempt that produced no token; `needs_reauth` marks the credential dead. The
    /// answer says whether it was marked: a fleet store defers the mark while another holder's
    /// attempt on the same generation is unresolved (ARCHITECTURE.md, "Fleet").
    fn record_failure(
        &self,
        name: &str,
        attempt_id: i64,
        reason: &str,
        needs_reauth: bool,
        now_ms: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Closes an attempt abandoned before any request was sent.
    fn cancel_attempt(
        &self,
        attempt_id: i64,
        why: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Step 5's last act: only the holder's own lease is removed.
    fn release_lease(&self, name: &str, holder: &LeaseHolder) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn get(&self, name: &str) -> impl Future<Output = Result<Option<TokenState>, StoreError>> + Send;
}
