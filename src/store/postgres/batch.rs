//! Group commit on PostgreSQL, the counterpart of SQLite's [`crate::committer`]: the refresh
//! path's operations (lease + attempt, fenced commit, failure, cancel, release) that reach the
//! store's thread while it is busy run together in one transaction — one `COMMIT`, one WAL flush
//! for the whole batch instead of one per operation.
//!
//! Each operation runs in a savepoint of its own, so one that fails (a constraint, a deadlock
//! victim, a bug) is rolled back alone and reported failed while its batch-mates go on; one that
//! keeps nothing (a busy lease) is rolled back too, which also lets go of the row and advisory
//! locks it took. Every operation's result is held until the batch's `COMMIT` has returned — with
//! `synchronous_commit` on, that is when the transaction is durable — and only then handed to its
//! caller: a `COMMIT` that fails (or a connection that breaks, or a batch past its time) fails
//! every operation of the batch, whatever each found on its own.
//!
//! Round trips: the savepoint of each operation is sent together with its first statement
//! (pipelined), and the previous savepoint's release rides along with it, so an operation costs
//! its own statements plus nothing; the batch adds `BEGIN` (with the first savepoint) and `COMMIT`.

use super::ops::Db;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most operations in one transaction. PostgreSQL keeps up to 64 subtransaction ids per
/// backend in shared memory; past that every other session's snapshot has to look subtransactions
/// up on disk-backed pages, which would slow the other nodes down. Each operation that writes is one
/// subtransaction.
pub const MAX_BATCH: usize = 60;

pub type OpFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>;

/// One operation of a batch.
pub trait BatchOp: Send {
    /// Runs in the batch's transaction, in its own savepoint. `Ok(true)`: keep what it did;
    /// `Ok(false)` or `Err`: roll back to the savepoint.
    fn run<'c>(&'c mut self, db: Db<'c>) -> OpFuture<'c, bool>;
    /// The batch is over: `Ok` once it committed, `Err` with why it did not.
    fn settle(self: Box<Self>, batch: Result<(), String>);
}

/// A typed operation: its value (or its own error) is kept until the batch is settled.
pub struct Pending<T, F, R> {
    op: Option<F>,
    value: Option<T>,
    failed: Option<String>,
    reply: Option<R>,
}

impl<T, F, R> Pending<T, F, R> {
    pub fn new(op: F, reply: R) -> Self {
        Pending { op: Some(op), value: None, failed: None, reply: Some(reply) }
    }
}

impl<T, F, R> BatchOp for Pending<T, F, R>
where
    T: Send,
    F: for<'c> FnOnce(Db<'c>) -> OpFuture<'c, (T, bool)> + Send,
    R: FnOnce(Result<T, String>) + Send,
{
    fn run<'c>(&'c mut self, db: Db<'c>) -> OpFuture<'c, bool> {
        Box::pin(async move {
            let Some(op) = self.op.take() else { return Ok(false) };
            match op(db).await {
                Ok((value, keep)) => {
                    self.value = Some(value);
                    Ok(keep)
                }
                Err(e) => {
                    self.failed = Some(super::describe(&e));
                    Err(e)
                }
            }
        })
    }

    fn settle(mut self: Box<Self>, batch: Result<(), String>) {
        let outcome = match (self.failed.take(), batch) {
            (Some(own), _) => Err(own),
            (None, Err(batch)) => Err(batch),
            (None, Ok(())) => self.value.take().ok_or_else(|| "a batched operation produced no value".to_string()),
        };
        if let Some(reply) = self.reply.take() {
            reply(outcome);
        }
    }
}

/// Batches and operations committed by one store, for the benchmark and the tests.
#[derive(Debug, Default)]
pub struct BatchStats {
    batches: AtomicU64,
    operations: AtomicU64,
}

impl BatchStats {
    /// (batches committed, operations in them).
    pub fn get(&self) -> (u64, u64) {
        (self.batches.load(Ordering::Relaxed), self.operations.load(Ordering::Relaxed))
    }
}

/// Runs `batch` in one transaction on `client`. Returns `Ok` once the transaction committed —
/// with whether an operation found the session read-only, which it stays while it lasts (see
/// `read_only_session`): the caller then starts a new one. Each operation's own outcome is kept
/// in it for [`BatchOp::settle`].
pub async fn run(
    client: &tokio_postgres::Client,
    statements: &mut super::ops::Statements,
    batch: &mut [Box<dyn BatchOp>],
    stats: &BatchStats,
) -> Result<bool, String> {
    let mut read_only = false;
    let mut prefix = "BEGIN; SAVEPOINT op";
    for op in batch.iter_mut() {
        let (opened, ran) =
            tokio::join!(client.batch_execute(prefix), op.run(Db { client, statements: &mut *statements }));
        opened.map_err(|e| super::describe(&e))?;
        prefix = match ran {
            Ok(true) => "RELEASE SAVEPOINT op; SAVEPOINT op",
            Ok(false) => "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op; SAVEPOINT op",
            Err(e) if client.is_closed() => return Err(super::describe(&e)),
            Err(e) => {
                read_only |= super::read_only_session(&e);
                tracing::warn!("a store operation failed alone, its batch goes on: {}", super::describe(&e));
                "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op; SAVEPOINT op"
            }
        };
    }
    let finish = if prefix.starts_with("ROLLBACK") { "ROLLBACK TO SAVEPOINT op; COMMIT" } else { "COMMIT" };
    client.batch_execute(finish).await.map_err(|e| super::describe(&e))?;
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.operations.fetch_add(batch.len() as u64, Ordering::Relaxed);
    Ok(read_only)
}
