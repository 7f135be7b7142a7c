//! One daemon per database, and the files other tokend processes use to talk to it: the
//! exclusive lock (which also names its pid), `<database>.changed`, and `<database>.reload`.

use super::*;

/// The path `tokend import`, `refresh` and `remove` touch so a running daemon re-reads the store.
pub fn store_changed_path(database: &Path) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".changed");
    database.with_file_name(name)
}

/// After a token was stored outside the daemon (`tokend import`, `authorize`): its sinks are
/// written and a running daemon is told to pick it up.
pub fn publish_imported(database: &Path, credential: &Credential, state: &TokenState) {
    sink::write_all(credential, state);
    notify_store_changed(database);
}

/// Tells a running daemon (if any) that the store changed under it. Best effort.
pub fn notify_store_changed(database: &Path) {
    let path = store_changed_path(database);
    // Only the event matters; the file is never read. Opened so that nothing planted there (a
    // FIFO, a link) can block or redirect the write.
    if let Err(e) = crate::untrusted::open_own_file(&path, true) {
        tracing::debug!(path = %path.display(), "cannot signal the daemon: {e}");
    }
}

/// Where the daemon records each reload's outcome (beside the database, private), so that
/// `tokend reload` — what `systemctl reload` runs — can wait for it and fail when the daemon kept
/// its old configuration.
pub fn reload_outcome_path(database: &Path) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".reload");
    database.with_file_name(name)
}

/// One reload's outcome: `pid P reload N ok`, or `… rejected` followed by the reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub pid: u32,
    pub reload: u64,
    pub rejected: Option<String>,
}

impl ReloadOutcome {
    pub(super) fn render(&self) -> String {
        match &self.rejected {
            None => format!("pid {} reload {} ok\n", self.pid, self.reload),
            Some(why) => format!("pid {} reload {} rejected\n{why}\n", self.pid, self.reload),
        }
    }

    /// The last outcome recorded for `database`, if any.
    pub fn read(database: &Path) -> Option<ReloadOutcome> {
        let crate::untrusted::Found::Regular { bytes, .. } =
            crate::untrusted::read_regular(&reload_outcome_path(database), 64 * 1024).ok()?
        else {
            return None;
        };
        let text = String::from_utf8_lossy(&bytes);
        let (head, rest) = text.split_once('\n').unwrap_or((&text, ""));
        let words: Vec<&str> = head.split_whitespace().collect();
        let ["pid", pid, "reload", reload, verdict] = words.as_slice() else { return None };
        Some(ReloadOutcome {
            pid: pid.parse().ok()?,
            reload: reload.parse().ok()?,
            rejected: (*verdict == "rejected").then(|| rest.trim_end().to_string()),
        })
    }
}

pub(super) fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    database.with_file_name(name)
}

/// The pid of the `tokend run` using `database`, if one is running (it holds the lock).
pub fn running_daemon(database: &Path) -> Option<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(database);
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(crate::untrusted::HOSTILE_OPEN_FLAGS).open(&path).ok()?;
    match file.try_lock_shared() {
        Err(std::fs::TryLockError::WouldBlock) => {}
        // Nobody holds it (or it cannot be locked at all): no daemon.
        _ => return None,
    }
    let crate::untrusted::Found::Regular { bytes, .. } = crate::untrusted::read_regular(&path, 64).ok()? else {
        return None;
    };
    String::from_utf8_lossy(&bytes).trim().strip_prefix("pid ")?.parse().ok()
}

/// One `tokend run` per database: an exclusive lock on `<database>.lock`, holding our pid for the
/// message the next one prints. The lock dies with the process, so a crash never leaves it stale.
pub(super) fn lock_database(database: &Path) -> Result<File, DaemonError> {
    let path = lock_path(database);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The store would make its directory private; the lock comes first, so it does too.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| DaemonError::Io { context: format!("cannot create {}", dir.display()), source })?;
    }
    let mut file = crate::untrusted::open_own_file(&path, false)
        .map_err(|source| DaemonError::Io { context: format!("cannot open lock file {}", path.display()), source })?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).and_then(|()| file.write_all(format!("pid {}\n", std::process::id()).as_bytes())).ok();
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = match crate::untrusted::read_regular(&path, 64) {
                Ok(crate::untrusted::Found::Regular { bytes, .. }) => {
                    crate::redact::clean_text(&String::from_utf8_lossy(&bytes), 64)
                }
                _ => String::new(),
            };
            Err(DaemonError::AlreadyRunning {
                database: database.to_path_buf(),
                holder: if holder.is_empty() { "pid unknown".into() } else { holder },
            })
        }
        Err(std::fs::TryLockError::Error(source)) => {
            Err(DaemonError::Io { context: format!("cannot lock {}", path.display()), source })
        }
    }
}
