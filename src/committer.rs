//! Group commit. One thread owns a connection to the store and runs the refresh path's
//! operations (lease + attempt, rotation commit, failure, release) that arrive while it is busy
//! in one transaction: one fsync for a whole batch instead of one per operation. Under load that
//! is what lets rotations outrun the disk's fsync rate; at rest a batch holds one operation and
//! behaves exactly like a direct commit.
//!
//! Durability is unchanged: a caller's operation is reported done only after the transaction
//! holding it committed (WAL, `synchronous=FULL`). The caller awaits that report; it does not
//! decide anything in between, and the commit goes ahead whether or not anyone still waits for
//! it — so no effect of an answer (sinks, hooks) can happen before its commit.

use crate::seal::Sealer;
use crate::socket::TokenSnapshot;
use crate::store::{BatchJob, Begin, LeaseHolder, NewToken, RefreshStore, Store, StoreError, TokenState};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A batch larger than this is split, so one transaction never holds the write lock for long.
const MAX_BATCH: usize = 512;

/// A typed operation waiting for its batch: its result is kept until the batch committed, and
/// only then sent to the caller.
struct Pending<T, F> {
    op: Option<F>,
    value: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send, F: FnOnce(&Connection) -> rusqlite::Result<T> + Send> BatchJob for Pending<T, F> {
    fn run(&mut self, c: &Connection) -> rusqlite::Result<()> {
        if let Some(op) = self.op.take() {
            self.value = Some(op(c)?);
        }
        Ok(())
    }

    fn settle(self: Box<Self>, outcome: Result<(), StoreError>) {
        let Pending { value, reply, .. } = *self;
        let _ = reply.send(outcome.and_then(|()| value.ok_or_else(no_value)));
    }
}

/// `run` stores the value before the batch can commit; a missing one is a bug, reported as an
/// error rather than a panic in the commit thread.
fn no_value() -> StoreError {
    StoreError::Other { path: PathBuf::new(), message: "a batched operation produced no value".into() }
}

/// A cloneable handle to the committer thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Box<dyn BatchJob>>,
    path: PathBuf,
    sealer: Sealer,
    /// The daemon's socket API keeps stored tokens in memory; a committed change of a token
    /// (rotation, failure) empties it of that credential before the refresh goes on to the sinks.
    snapshot: Option<std::sync::Arc<TokenSnapshot>>,
}

impl Committer {
    pub fn open(path: &Path) -> Result<Committer, StoreError> {
        Committer::open_sealed(path, Sealer::plaintext())
    }

    /// The committer of a store opened with `sealer`'s keys ([`Store::open_sealed`]).
    pub fn open_sealed(path: &Path, sealer: Sealer) -> Result<Committer, StoreError> {
        let mut store = Store::open_sealed(path, sealer.clone())?;
        let jobs = crate::batcher::spawn("tokend-commit", MAX_BATCH, move |batch| store.batch(batch)).map_err(|e| {
            StoreError::Other { path: path.to_path_buf(), message: format!("cannot start the commit thread: {e}") }
        })?;
        Ok(Committer { jobs, path: path.to_path_buf(), sealer, snapshot: None })
    }

    /// This committer empties `snapshot` of each credential whose token it changed.
    pub fn forgetting_in(mut self, snapshot: std::sync::Arc<TokenSnapshot>) -> Committer {
        self.snapshot = Some(snapshot);
        self
    }

    /// After the commit (whatever its outcome: a failed batch may still have changed nothing, and
    /// forgetting too much only costs one store read).
    fn forget(&self, name: &str) {
        if let Some(snapshot) = &self.snapshot {
            snapshot.forget(name);
        }
    }

    /// Runs `op` in the next batch and returns its value once the batch committed.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Other { path: self.path.clone(), message: "the commit thread is gone".into() };
        self.jobs.send(Box::new(Pending { op: Some(op), value: None, reply })).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

impl RefreshStore for Committer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn sealer(&self) -> Sealer {
        self.sealer.clone()
    }

    async fn begin_refresh(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> Result<Begin, StoreError> {
        let (name, holder, sealer) = (name.to_string(), holder.clone(), self.sealer.clone());
        self.run(move |c| crate::store::ops::begin(c, &sealer, &name, &holder, lease_ttl, now_ms)).await
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
        let (name, provider, token) = (name.to_string(), provider.to_string(), token.clone());
        let (path, sealer) = (self.path.clone(), self.sealer.clone());
        let key = name.clone();
        let committed = self
            .run(move |c| {
                crate::store::ops::commit(c, &sealer, &key, &provider, attempt_id, from_generation, &token, now_ms)
            })
            .await;
        self.forget(&name);
        committed?
            .ok_or_else(|| StoreError::Other { path, message: "the credential vanished during its commit".into() })
    }

    async fn record_failure(
        &self,
        name: &str,
        attempt_id: i64,
        reason: &str,
        needs_reauth: bool,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (key, reason) = (name.to_string(), reason.to_string());
        let recorded =
            self.run(move |c| crate::store::ops::failure(c, &key, attempt_id, &reason, needs_reauth, now_ms)).await;
        self.forget(name);
        recorded.map(|()| needs_reauth)
    }

    async fn cancel_attempt(&self, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), StoreError> {
        let why = why.to_string();
        self.run(move |c| crate::store::ops::cancel(c, attempt_id, &why, now_ms)).await
    }

    async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), StoreError> {
        let (name, holder) = (name.to_string(), holder.clone());
        self.run(move |c| crate::store::ops::release(c, &name, &holder)).await
    }

    async fn get(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        let (name, sealer) = (name.to_string(), self.sealer.clone());
        self.run(move |c| crate::store::ops::get(c, &sealer, &name)).await
    }
}
