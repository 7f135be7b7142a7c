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

use crate::store::{Begin, LeaseHolder, NewToken, Op, OpResult, Store, StoreError, TokenState};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A batch larger than this is split, so one transaction never holds the write lock for long.
const MAX_BATCH: usize = 512;

type Job = (Op, oneshot::Sender<Result<OpResult, StoreError>>);

/// A cloneable handle to the committer thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

impl Committer {
    pub fn open(path: &Path) -> Result<Committer, StoreError> {
        let mut store = Store::open(path)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tokend-commit".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().unzip();
                    for (result, reply) in store.batch(&ops).into_iter().zip(replies) {
                        let _ = reply.send(result);
                    }
                }
            })
            .map_err(|e| StoreError::Other {
                path: path.to_path_buf(),
                message: format!("cannot start the commit thread: {e}"),
            })?;
        Ok(Committer { jobs, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn run(&self, op: Op) -> Result<OpResult, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Other { path: self.path.clone(), message: "the commit thread is gone".into() };
        self.jobs.send((op, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    pub async fn begin_refresh(
        &self,
        name: &str,
        holder: &LeaseHolder,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> Result<Begin, StoreError> {
        match self.run(Op::Begin { name: name.into(), holder: holder.clone(), lease_ttl, now_ms }).await? {
            OpResult::Begun(b) => Ok(b),
            other => Err(self.unexpected(&other)),
        }
    }

    pub async fn commit_rotation(
        &self,
        name: &str,
        provider: &str,
        attempt_id: i64,
        from_generation: i64,
        token: &NewToken,
        now_ms: i64,
    ) -> Result<TokenState, StoreError> {
        let op = Op::Commit {
            name: name.into(),
            provider: provider.into(),
            attempt_id,
            from_generation,
            token: token.clone(),
            now_ms,
        };
        match self.run(op).await? {
            OpResult::State(Some(state)) => Ok(state),
            other => Err(self.unexpected(&other)),
        }
    }

    pub async fn record_failure(
        &self,
        name: &str,
        attempt_id: i64,
        reason: &str,
        needs_reauth: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.run(Op::Failure { name: name.into(), attempt_id, reason: reason.into(), needs_reauth, now_ms })
            .await
            .map(drop)
    }

    pub async fn cancel_attempt(&self, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), StoreError> {
        self.run(Op::Cancel { attempt_id, why: why.into(), now_ms }).await.map(drop)
    }

    pub async fn release_lease(&self, name: &str, holder: &LeaseHolder) -> Result<(), StoreError> {
        self.run(Op::Release { name: name.into(), holder: holder.clone() }).await.map(drop)
    }

    pub async fn get(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        match self.run(Op::Get { name: name.into() }).await? {
            OpResult::State(s) => Ok(s),
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected(&self, result: &OpResult) -> StoreError {
        StoreError::Other { path: self.path.clone(), message: format!("unexpected store result {result:?}") }
    }
}
