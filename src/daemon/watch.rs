//! File-system events (inotify via `notify`) turned into paths on a channel. Directories are
//! watched, not files: an atomic rename replaces the file, and a watch on the old inode would go
//! silent after the first write (ARCHITECTURE.md, "Why these crates"). An empty path means "events were lost; re-check
//! everything".

use std::collections::BTreeSet;
use std::path::PathBuf;
use tokio::sync::mpsc::UnboundedSender;

pub fn watch_dirs(
    dirs: &BTreeSet<PathBuf>,
    tx: UnboundedSender<PathBuf>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        // Opening or reading a file is not a change. Reacting to it would loop: every check of
        // a sink reads it, and every reader of a sink would wake the daemon.
        Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => {}
        // The kernel's event queue overflowed (thousands of sinks rewritten at once): which files
        // changed is lost, so the daemon must look at all of them.
        Ok(event) if event.need_rescan() => {
            let _ = tx.send(PathBuf::new());
        }
        Ok(event) => {
            // Our own temp files: five events per written sink that can never concern a reader.
            for path in event.paths.into_iter().filter(|p| !crate::sink::is_temp_file(p)) {
                let _ = tx.send(path);
            }
        }
        Err(e) => tracing::warn!("file watch error: {e}"),
    })?;
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch directory: {e}");
        }
    }
    Ok(watcher)
}
