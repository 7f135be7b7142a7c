//! A thread that takes its work from a channel in batches: whatever arrives while it works on
//! one batch makes the next. The committer (one transaction, one fsync, per batch) and the sink
//! writer (one round of file syncs per batch) both have this shape. The thread ends when the last
//! sender is dropped.

use std::sync::mpsc;

/// Starts the thread `name`; `work` gets each batch (at most `max_batch` jobs, in arrival order).
pub fn spawn<J: Send + 'static>(
    name: &str,
    max_batch: usize,
    mut work: impl FnMut(Vec<J>) + Send + 'static,
) -> std::io::Result<mpsc::Sender<J>> {
    let (jobs, queue) = mpsc::channel::<J>();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            work(batch);
        }
    })?;
    Ok(jobs)
}
