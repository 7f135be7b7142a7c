//! The seam between the two backends: [`AnyStore`] is what the CLI and the daemon hold for
//! reads, imports and housekeeping, [`AnyRefreshStore`] what the refresh path holds. Each is the
//! SQLite store (the embedded default) or the PostgreSQL one (`[daemon] database = "postgres://…"`),
//! chosen once from the configuration; nothing above this file asks which.

use super::postgres::PgStore;
use super::{Begin, LeaseHolder, Lifetime, NewToken, OpenAttempt, RefreshStore, Store, StoreError, TokenState};
use crate::committer::Committer;
use crate::config::{Config, DaemonConfig};
use std::path::Path;
use std::time::Duration;

pub enum AnyStore {
    Sqlite(Store),
    Postgres(PgStore),
}

impl AnyStore {
    /// Opens the store the configuration names, with its key: SQLite is created and migrated as
    /// before, sealed with the configured key (`src/at_rest.rs`); a PostgreSQL store must already
    /// carry this tokend's schema (`tokend migrate`).
    pub fn open(config: &Config) -> Result<AnyStore, StoreError> {
        match &config.daemon.postgres {
            Some(target) => Ok(AnyStore::Postgres(Self::open_postgres(target, &config.daemon)?)),
            None => Ok(AnyStore::Sqlite(crate::at_rest::open(config)?)),
        }
    }

    /// [`AnyStore::open`] for commands that need no token: a SQLite store opens without its key.
    pub fn open_without_key(config: &Config) -> Result<AnyStore, StoreError> {
        match &config.daemon.postgres {
            Some(target) => Ok(AnyStore::Postgres(Self::open_postgres(target, &config.daemon)?)),
            None => Ok(AnyStore::Sqlite(crate::at_rest::open_without_key(config)?)),
        }
    }

    /// [`AnyStore::open`] for `tokend run`: a SQLite store's key checked (and a plaintext store
    /// encrypted in place) before anything is sent.
    pub fn open_for_daemon(config: &Config) -> Result<AnyStore, StoreError> {
        match &config.daemon.postgres {
            Some(target) => Ok(AnyStore::Postgres(Self::open_postgres(target, &config.daemon)?)),
            None => Ok(AnyStore::Sqlite(crate::at_rest::open_for_daemon(config)?.0)),
        }
    }

    /// Encryption at rest covers the SQLite store only so far: a PostgreSQL store with a key
    /// configured is refused rather than silently kept in plaintext.
    fn open_postgres(target: &super::postgres::PgTarget, daemon: &DaemonConfig) -> Result<PgStore, StoreError> {
        if daemon.key.is_some() {
            return Err(StoreError::Postgres {
                target: target.shown().to_string(),
                message: "encryption at rest (key_credential, key_file, key_env) is not supported on a PostgreSQL store yet; remove the key setting or keep a SQLite database".into(),
            });
        }
        PgStore::open(target, &daemon.database)
    }

    /// What seals values in this store (the configured key on SQLite; PostgreSQL stores are not
    /// sealed yet and refuse a key).
    pub fn sealer(&self) -> crate::seal::Sealer {
        match self {
            AnyStore::Sqlite(s) => s.sealer().clone(),
            AnyStore::Postgres(_) => crate::seal::Sealer::plaintext(),
        }
    }

    /// The refresh path's handle on the same store: SQLite's group committer (with the store's
    /// key), or a clone of the PostgreSQL handle.
    pub fn refresh_store(&self) -> Result<AnyRefreshStore, StoreError> {
        match self {
            AnyStore::Sqlite(s) => Ok(AnyRefreshStore::Sqlite(Committer::open_sealed(s.path(), s.sealer().clone())?)),
            AnyStore::Postgres(p) => Ok(AnyRefreshStore::Postgres(p.clone())),
        }
    }

    /// Where the store is, for messages: a file, or a PostgreSQL target without its password.
    pub fn describe(&self) -> String {
        match self {
            AnyStore::Sqlite(s) => s.path().display().to_string(),
            AnyStore::Postgres(p) => p.shown().to_string(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, AnyStore::Postgres(_))
    }

    pub fn schema_version(&self) -> Result<usize, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.schema_version(),
            AnyStore::Postgres(p) => p.schema_version(),
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.get(name),
            AnyStore::Postgres(p) => p.get(name),
        }
    }

    /// The states of those of `names` that exist, in any order: one query on PostgreSQL.
    pub fn get_many(&self, names: &[&str]) -> Result<Vec<TokenState>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.get_many(names),
            AnyStore::Postgres(p) => p.get_many(names),
        }
    }

    pub fn list(&self) -> Result<Vec<TokenState>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.list(),
            AnyStore::Postgres(p) => p.list(),
        }
    }

    pub fn list_lifetimes(&self) -> Result<Vec<(String, Lifetime)>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.list_lifetimes(),
            AnyStore::Postgres(p) => p.list_lifetimes(),
        }
    }

    pub fn import(
        &mut self,
        name: &str,
        provider: &str,
        token: &NewToken,
        now_secs: i64,
    ) -> Result<TokenState, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.import(name, provider, token, now_secs),
            AnyStore::Postgres(p) => p.import(name, provider, token, now_secs),
        }
    }

    pub fn import_many(&mut self, tokens: &[(&str, &str, &NewToken)], now_secs: i64) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.import_many(tokens, now_secs),
            AnyStore::Postgres(p) => p.import_many(tokens, now_secs),
        }
    }

    pub fn remove(&mut self, name: &str) -> Result<bool, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.remove(name),
            AnyStore::Postgres(p) => p.remove(name),
        }
    }

    pub fn mark_revoked(&mut self, name: &str, now_secs: i64) -> Result<bool, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.mark_revoked(name, now_secs),
            AnyStore::Postgres(p) => p.mark_revoked(name, now_secs),
        }
    }

    /// Records this node's provider settings per credential (name, encoded) and returns where
    /// other fleet nodes' differ; `record: false` only compares (`tokend check`). One machine has
    /// no one to disagree with.
    pub fn settings_agreement(
        &self,
        settings: Vec<(String, String)>,
        record: bool,
    ) -> Result<Vec<super::postgres::settings::Disagreement>, StoreError> {
        match self {
            AnyStore::Sqlite(_) => Ok(Vec::new()),
            AnyStore::Postgres(p) if record => p.record_settings(settings),
            AnyStore::Postgres(p) => p.compare_settings(settings),
        }
    }

    /// Takes this node's settings record away (a clean stop).
    pub fn forget_settings(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(_) => Ok(()),
            AnyStore::Postgres(p) => p.forget_settings(),
        }
    }

    /// A fleet store's leases; SQLite's are not reported (one machine: `tokend list` shows the
    /// attempts in flight).
    pub fn leases(&self) -> Result<Vec<super::postgres::Lease>, StoreError> {
        match self {
            AnyStore::Sqlite(_) => Ok(Vec::new()),
            AnyStore::Postgres(p) => p.leases(),
        }
    }

    pub fn abandoned_attempts(&self) -> Result<Vec<OpenAttempt>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.abandoned_attempts(),
            AnyStore::Postgres(p) => p.abandoned_attempts(),
        }
    }

    pub fn cancel_attempt(&mut self, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.cancel_attempt(attempt_id, why, now_ms),
            AnyStore::Postgres(p) => p.cancel_attempt_now(attempt_id, why, now_ms),
        }
    }

    pub fn maintenance(&mut self, now_ms: i64, keep: Duration) -> Result<usize, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.maintenance(now_ms, keep),
            AnyStore::Postgres(p) => p.maintenance(now_ms, keep),
        }
    }
}

/// The refresh path's store, either backend.
#[derive(Clone)]
pub enum AnyRefreshStore {
    Sqlite(Committer),
    Postgres(PgStore),
}

impl AnyRefreshStore {
    /// Every commit and failure recorded through this handle empties the socket API's memory of
    /// that credential (SQLite; the socket API is not offered on a PostgreSQL store yet).
    pub fn forgetting_in(self, snapshot: std::sync::Arc<crate::socket::TokenSnapshot>) -> AnyRefreshStore {
        match self {
            AnyRefreshStore::Sqlite(c) => AnyRefreshStore::Sqlite(c.forgetting_in(snapshot)),
            postgres => postgres,
        }
    }
}

impl RefreshStore for AnyRefreshStore {
    fn path(&self) -> &Path {
        match self {
            AnyRefreshStore::Sqlite(c) => c.path(),
            AnyRefreshStore::Postgres(p) => p.path(),
        }
    }

    fn sealer(&self) -> crate::seal::Sealer {
        match self {
            AnyRefreshStore::Sqlite(c) => c.sealer(),
            AnyRefreshStore::Postgres(p) => p.sealer(),
        }
    }

    async fn begin_refresh_planned(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
        planned: Option<i64>,
    ) -> Result<Begin, StoreError> {
        match self {
            AnyRefreshStore::Sqlite(c) => c.begin_refresh_planned(name, holder, lease_ttl, now_ms, planned).await,
            AnyRefreshStore::Postgres(p) => p.begin_refresh_planned(name, holder, lease_ttl, now_ms, planned).await,
        }
    }

    async fn begin_refresh(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> Result<Begin, StoreError> {
        match self {
            AnyRefreshStore::Sqlite(c) => c.begin_refresh(name, holder, lease_ttl, now_ms).await,
            AnyRefreshStore::Postgres(p) => p.begin_refresh(name, holder, lease_ttl, now_ms).await,
        }
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
        match self {
            AnyRefreshStore::Sqlite(c) => {
                c.commit_rotation(name, provider, attempt_id, from_generation, token, now_ms).await
            }
            AnyRefreshStore::Postgres(p) => {
                p.commit_rotation(name, provider, attempt_id, from_generation, token, now_ms).await
            }
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
        match self {
            AnyRefreshStore::Sqlite(c) => c.record_failure(name, attempt_id, reason, needs_reauth, now_ms).await,
            AnyRefreshStore::Postgres(p) => p.record_failure(name, attempt_id, reason, needs_reauth, now_ms).await,
        }
    }

    async fn cancel_attempt(&self, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), StoreError> {
        match self {
            AnyRefreshStore::Sqlite(c) => c.cancel_attempt(attempt_id, why, now_ms).await,
            AnyRefreshStore::Postgres(p) => p.cancel_attempt(attempt_id, why, now_ms).await,
        }
    }

    async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), StoreError> {
        match self {
            AnyRefreshStore::Sqlite(c) => c.release_lease(name, holder).await,
            AnyRefreshStore::Postgres(p) => p.release_lease(name, holder).await,
        }
    }

    async fn get(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        match self {
            AnyRefreshStore::Sqlite(c) => RefreshStore::get(c, name).await,
            AnyRefreshStore::Postgres(p) => RefreshStore::get(p, name).await,
        }
    }
}
