//! Every node hears every commit: a connection of its own that `LISTEN`s on
//! [`super::COMMIT_CHANNEL`] and hands each notification (`<generation> <name>`) to the daemon.
//! It waits in the server's socket — no polling, no wake-ups while nothing changes — and when the
//! connection breaks (server restart, `pg_terminate_backend`, network) it says so and connects
//! again with capped backoff; after each (re)connection the daemon re-reads the whole store,
//! since notifications sent while nobody listened are gone.

use super::{PgTarget, connect_raw, describe};
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Listening (again): whatever was committed meanwhile must be read from the store.
    Listening,
    /// A commit, import or removal: `name` is now at `generation` (0: removed).
    Changed { name: String, generation: i64 },
    /// The listening connection broke; reconnecting.
    Lost(String),
}

/// Starts listening on the current runtime; events arrive on the returned receiver until it is
/// dropped.
pub fn listen(target: &PgTarget) -> UnboundedReceiver<StoreEvent> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let target = target.clone();
    tokio::spawn(async move {
        let mut retry = FIRST_RETRY;
        while !tx.is_closed() {
            let listened = session(&target, &tx).await;
            let why = match listened {
                // A session that was established and then broke starts the backoff over.
                Ok(why) => {
                    retry = FIRST_RETRY;
                    why
                }
                Err(why) => why,
            };
            if tx.send(StoreEvent::Lost(why)).is_err() {
                return;
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    });
    rx
}

/// One listening connection, until it breaks: `Err` if it never got to listen, `Ok(why)` if it
/// listened and then broke.
async fn session(target: &PgTarget, tx: &UnboundedSender<StoreEvent>) -> Result<String, String> {
    let (client, mut connection) = connect_raw(target).await?;
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if notes_tx.send(n.payload().to_string()).is_err() {
                        return "stopped".to_string();
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return describe(&e),
                None => return "the server closed the connection".to_string(),
            }
        }
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {}", super::COMMIT_CHANNEL)).await {
        driver.abort();
        return Err(describe(&e));
    }
    let backend = match client.query_one("SELECT pg_backend_pid()", &[]).await.and_then(|r| r.try_get::<_, i32>(0)) {
        Ok(pid) => pid,
        Err(e) => {
            driver.abort();
            return Err(describe(&e));
        }
    };
    super::LISTENER_BACKEND.store(backend, std::sync::atomic::Ordering::SeqCst);
    if tx.send(StoreEvent::Listening).is_err() {
        driver.abort();
        return Ok("stopped".into());
    }
    while let Some(payload) = notes.recv().await {
        let Some((generation, name)) = payload.split_once(' ') else { continue };
        let Ok(generation) = generation.parse() else { continue };
        if tx.send(StoreEvent::Changed { name: name.to_string(), generation }).is_err() {
            driver.abort();
            return Ok("stopped".into());
        }
    }
    super::LISTENER_BACKEND.store(0, std::sync::atomic::Ordering::SeqCst);
    drop(client);
    Ok(driver.await.unwrap_or_else(|e| e.to_string()))
}
