//! File events: sinks altered by someone else, `.refresh` triggers (with their floor), the
//! config file saved, and `<database>.changed` touched by another tokend process.

use super::*;

/// At most one trigger-started refresh per [`TRIGGER_MIN_INTERVAL`] for a credential: a trigger
/// that comes too soon is deferred to `next_allowed`, and that deferred refresh uses up the next
/// interval as an immediate one would.
#[derive(Debug, Clone, Copy)]
pub(super) struct TriggerFloor {
    pub(super) next_allowed: Instant,
    /// A deferred refresh is planned for this time; triggers before it add nothing.
    pub(super) deferred_to: Option<Instant>,
}

impl Daemon {
    pub(super) fn rebuild_watches(&mut self) {
        self.watches.sink_owner.clear();
        self.watches.trigger_owner.clear();
        let mut dirs = BTreeSet::new();
        for entry in self.entries.values() {
            for s in &entry.credential.sinks {
                self.watches.sink_owner.insert(s.path.clone(), entry.credential.name.clone());
                dirs.extend(s.path.parent().map(Path::to_path_buf));
            }
        }
        if let Some(dir) = self.config.daemon.trigger_dir.clone() {
            match prepare_trigger_dir(&dir) {
                Ok(()) => {
                    for name in self.entries.keys() {
                        self.watches.trigger_owner.insert(trigger_path(&dir, name), name.clone());
                    }
                    dirs.insert(dir);
                }
                Err(e) => tracing::error!("{e}; refresh triggers are off"),
            }
        }
        dirs.extend(self.config.path.parent().map(Path::to_path_buf));
        dirs.extend(self.store_changed_path.parent().map(Path::to_path_buf));
        self.watches.watcher = match watch::watch_dirs(&dirs, self.watches.fs_tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(
                    "cannot watch files ({e}); sinks will not be repaired and the config not reloaded on change"
                );
                None
            }
        };
    }

    pub(super) fn fs_event(&mut self, path: PathBuf) {
        let soon = Instant::now() + FS_DEBOUNCE;
        if path.as_os_str().is_empty() {
            tracing::warn!("file events were lost (the kernel's queue overflowed); checking every sink");
            let with_sinks = self.entries.iter().filter(|(_, e)| !e.credential.sinks.is_empty());
            self.watches.dirty_sinks.extend(with_sinks.map(|(name, _)| name.clone()));
            let present = self.watches.trigger_owner.iter().filter(|(path, _)| std::fs::symlink_metadata(path).is_ok());
            self.watches.triggered.extend(present.map(|(_, name)| name.clone()));
            self.due.fs.get_or_insert(soon);
        } else if path == self.config.path {
            self.due.reload = Some(Instant::now() + CONFIG_DEBOUNCE);
        } else if path == self.store_changed_path {
            // At once, not after the debounce: the other process has already written the sinks,
            // and the socket API must not keep serving the token they replaced.
            self.snapshot.forget_all();
            self.due.store_sync.get_or_insert(soon);
        } else if let Some(name) = self.watches.sink_owner.get(&path) {
            let entry = self.entries.get(name);
            let sink = entry.and_then(|e| e.credential.sinks.iter().find(|s| s.path == path));
            if sink.is_some_and(|s| self.sinks.holds_placed(s)) {
                // The sink thread's own rename, coming back through the watch.
                return;
            }
            self.watches.dirty_sinks.insert(name.clone());
            self.due.fs.get_or_insert(soon);
        } else if let Some(name) = self.watches.trigger_owner.get(&path)
            && std::fs::symlink_metadata(&path).is_ok()
        {
            self.watches.triggered.insert(name.clone());
            self.due.fs.get_or_insert(soon);
        }
    }

    pub(super) fn fs_settled(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        let now = Instant::now();
        if self.due.reload.is_some_and(|t| t <= now) {
            self.due.reload = None;
            tracing::info!(config = %self.config.path.display(), "configuration file changed; reloading");
            self.reload();
        }
        if self.due.store_sync.is_some_and(|t| t <= now) {
            self.due.store_sync = None;
            self.sync_from_store();
        }
        if self.due.publish.is_some_and(|t| t <= now) {
            self.publish();
        }
        if self.due.fs.is_some_and(|t| t <= now) {
            self.due.fs = None;
            let dirty = std::mem::take(&mut self.watches.dirty_sinks);
            self.sync_sinks_of(dirty);
            for name in std::mem::take(&mut self.watches.triggered) {
                self.trigger(&name, inflight);
            }
        }
    }

    /// A script created `<trigger_dir>/<name>.refresh`: it got a 401 and wants a new token now.
    pub(super) fn trigger(&mut self, name: &str, inflight: &mut JoinSet<RefreshResult>) {
        if !self.entries.contains_key(name) {
            return;
        }
        if let Some(dir) = &self.config.daemon.trigger_dir {
            // unlink never follows a link; whatever was created there is gone.
            let _ = std::fs::remove_file(trigger_path(dir, name));
        }
        self.force_refresh(name, "a trigger file", inflight);
    }

    /// A refresh asked for from outside the schedule (`via`: a trigger file, the socket API),
    /// under the credential's trigger floor: one too soon is deferred to the floor's end.
    pub(super) fn force_refresh(&mut self, name: &str, via: &str, inflight: &mut JoinSet<RefreshResult>) {
        let Some(entry) = self.entries.get(name) else { return };
        let now = Instant::now();
        let floor = self.watches.trigger_floor.get(name).copied();
        if floor.and_then(|f| f.deferred_to).is_some_and(|at| at > now) {
            tracing::debug!(credential = name, "refresh requested through {via}; one is already planned");
            return;
        }
        match floor.filter(|f| f.next_allowed > now) {
            None => {
                self.watches.trigger_floor.insert(
                    entry.credential.name.clone(),
                    TriggerFloor { next_allowed: now + TRIGGER_MIN_INTERVAL, deferred_to: None },
                );
                tracing::info!(credential = name, "refresh requested through {via}");
                self.start_refresh(name, inflight);
            }
            Some(f) => {
                let at = f.next_allowed;
                self.watches.trigger_floor.insert(
                    entry.credential.name.clone(),
                    TriggerFloor { next_allowed: at + TRIGGER_MIN_INTERVAL, deferred_to: Some(at) },
                );
                let at_ms = now_ms() + i64::try_from((at - now).as_millis()).unwrap_or(0);
                tracing::info!(credential = name, "refresh requested through {via} again too soon; deferred");
                let at_ms = at_ms.min(self.queue.get(name, Job::Refresh).unwrap_or(i64::MAX));
                self.queue.schedule(&entry.credential.name, Job::Refresh, at_ms);
            }
        }
    }

    /// `tokend import` / `remove` / `refresh` changed the store: pick up their state.
    pub(super) fn sync_from_store(&mut self) {
        let lifetimes = match self.store().list_lifetimes() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot re-read the store: {e}");
                return;
            }
        };
        // Another process wrote the store: the socket API reads it again, whatever changed.
        self.snapshot.forget_all();
        let mut by_name: HashMap<String, Lifetime> = lifetimes.into_iter().collect();
        let names: Vec<Arc<str>> = self.entries.keys().cloned().collect();
        let mut changed_sinks = Vec::new();
        for name in names {
            let Some(entry) = self.entries.get_mut(&name) else { continue };
            let new = by_name.remove(&*name);
            let changed = new.map(|l| (l.generation, l.status)) != entry.lifetime.map(|l| (l.generation, l.status));
            if changed && !entry.in_flight {
                tracing::info!(credential = %name, generation = new.map(|l| l.generation), "store changed by another process; picked up");
                let revived =
                    entry.lifetime.is_some_and(|l| l.status.is_dead()) && new.is_some_and(|l| !l.status.is_dead());
                let was_failing = entry.failures > 0;
                entry.lifetime = new;
                entry.failures = 0;
                entry.retry_at = None.into();
                // In the line for a refresh slot, it would be refreshed again when its turn came
                // (a fleet node starting while another catches up: a second rotation of a token
                // committed a moment ago).
                entry.waiting = false;
                if revived || was_failing {
                    // A human re-authorized (or another process refreshed a failing credential).
                    self.recovered(&name);
                }
                changed_sinks.push(name.clone());
                self.plan(&name);
                // STATUS= and the metrics file speak for the state just picked up, not for the
                // one before the import.
                self.publish_soon();
            }
        }
        // One read and one batch of writes for all of them (a fleet node reconnecting after
        // others rotated thousands).
        self.sync_sinks_of(changed_sinks);
    }
}

/// The file a script creates to ask for `name`'s refresh now.
pub(super) fn trigger_path(trigger_dir: &Path, name: &str) -> PathBuf {
    trigger_dir.join(format!("{name}.refresh"))
}

/// Creates the trigger directory if needed: sticky and group-writable, so that members of
/// tokend's group can create triggers but not remove each other's, while the sink directory stays
/// writable by tokend alone. An existing one must be a directory of tokend's (not a link).
pub(super) fn prepare_trigger_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o1770)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770)))
            .map_err(|e| format!("cannot create trigger directory {}: {e}", dir.display())),
        Err(e) => Err(format!("cannot inspect trigger directory {}: {e}", dir.display())),
        Ok(meta) if !meta.file_type().is_dir() => {
            Err(format!("trigger directory {} is {}, not a directory", dir.display(), crate::untrusted::kind_of(&meta)))
        }
        Ok(meta) if meta.uid() != nix::unistd::geteuid().as_raw() => {
            Err(format!("trigger directory {} belongs to uid {}, not to tokend's user", dir.display(), meta.uid()))
        }
        Ok(_) => Ok(()),
    }
}
