//! Installing a configuration, at start-up and on reload: credentials added, changed or dropped,
//! unchanged ones left running as they are; and recording each reload's outcome for
//! `tokend reload`.

use super::*;

impl Daemon {
    /// Installs `config`: entries added, changed or dropped; sinks synced; new and changed
    /// credentials planned; watches and concurrency limits rebuilt.
    pub(super) fn apply_config(&mut self, mut config: Config) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
        // Only new entries take their lifetime from here (`sync_from_store` keeps the others'),
        // so a reload that adds none does not read 100,000 rows for nothing.
        let adds = config.credentials.iter().any(|c| !self.entries.contains_key(&*c.name));
        let lifetimes: FxHashMap<String, Lifetime> =
            if adds { self.store().list_lifetimes()?.into_iter().collect() } else { FxHashMap::default() };
        // Logged one by one only when a reload adds them: at start-up, 100,000 lines say nothing.
        let starting = self.entries.is_empty();
        self.entries.reserve(config.credentials.len().saturating_sub(self.entries.len()));
        // One more name than credentials: the daemon's own maintenance job (a full vector would
        // double for it).
        self.queue.reserve(config.credentials.len() + 1);
        let wanted: HashSet<&str> = config.credentials.iter().map(|c| &*c.name).collect();
        let dropped: Vec<Arc<str>> = self.entries.keys().filter(|n| !wanted.contains(&***n)).cloned().collect();
        for name in dropped {
            if let Some(entry) = self.entries.remove(&name) {
                self.queue.cancel_all(&name);
                self.watches.trigger_floor.remove(&name);
                self.notices.warned.remove(&name);
                self.notices.counts.remove(&name);
                sink::remove_all(&entry.credential, "credential removed from the configuration");
                tracing::info!(credential = %name, "dropped (no longer configured); its stored token is kept");
            }
        }
        // New and changed credentials; an unchanged one keeps its deadlines as they are.
        let mut replan = Vec::new();
        for configured in &mut config.credentials {
            let credential = configured.clone();
            let name = credential.name.clone();
            match self.entries.get_mut(&name) {
                Some(entry) if entry.credential == credential => {
                    // The running copy stays and the reloaded one is dropped. Kept side by side,
                    // a reload of 100,000 credentials left a second copy scattered through the
                    // heap (RSS 60 → 76 MB).
                    *configured = entry.credential.clone();
                    continue;
                }
                Some(entry) => {
                    let new_paths: HashSet<&PathBuf> = credential.sinks.iter().map(|s| &s.path).collect();
                    for old in entry.credential.sinks.iter().filter(|s| !new_paths.contains(&s.path)) {
                        let _ = sink::remove(old);
                    }
                    entry.credential = credential;
                }
                None => {
                    if starting {
                        tracing::debug!(credential = %name, provider = %credential.provider(), "configured");
                    } else {
                        tracing::info!(credential = %name, provider = %credential.provider(), "configured");
                    }
                    self.entries.insert(
                        name.clone(),
                        Entry {
                            credential,
                            lifetime: lifetimes.get(&*name).copied(),
                            failures: 0,
                            retry_at: None.into(),
                            in_flight: false,
                            waiting: false,
                            results: [0; metrics::RefreshResult::ALL.len()],
                            pending: None,
                        },
                    );
                }
            }
            replan.push(name);
        }
        self.config = config;
        // Every sink is checked: the watches are rebuilt below, and a change in between would
        // go unseen.
        let names: Vec<Arc<str>> = self.entries.keys().cloned().collect();
        let sinks_checked = self.sync_sinks_of(names);
        self.queue.defer();
        for name in &replan {
            self.plan(name);
            self.plan_cron(name);
        }
        self.queue.settle();
        self.rebuild_watches();
        if let Some(sockets) = &self.on_demand.sockets {
            sockets.install(&self.config);
        }
        Ok(sinks_checked)
    }

    pub(super) fn reload(&mut self) {
        systemd::reloading();
        self.reload_config();
        crate::memory::release_freed_memory();
        systemd::ready(&self.summary().describe());
        self.publish_soon();
    }

    pub(super) fn reload_config(&mut self) {
        self.reloads += 1;
        let outcome = self.try_reload();
        match &outcome {
            Ok(()) => {
                tracing::info!("configuration reloaded: {}", self.summary().describe());
                self.check_settings_agree();
            }
            Err(why) => {
                for line in why.lines() {
                    tracing::error!("reload rejected, the running configuration stays: {line}");
                }
            }
        }
        let record = ReloadOutcome { pid: std::process::id(), reload: self.reloads, rejected: outcome.err() };
        let path = reload_outcome_path(&self.config.daemon.database);
        if let Err(e) = sink::write_atomic(&path, record.render().as_bytes(), 0o600, None) {
            tracing::warn!("cannot record the reload's outcome for `tokend reload`: {e}");
        }
    }

    pub(super) fn try_reload(&mut self) -> Result<(), String> {
        let config = config::load(&self.config.path).map_err(|e| e.to_string())?;
        if config.daemon.database != self.config.daemon.database {
            return Err(format!(
                "the database cannot change while running ({} → {}); restart tokend",
                self.config.daemon.database.display(),
                config.daemon.database.display()
            ));
        }
        if config.daemon.key != self.config.daemon.key {
            // The store's connections hold the key they were opened with (src/at_rest.rs).
            return Err(
                "the encryption key (key_credential, key_file, key_env) cannot change while running; restart tokend"
                    .into(),
            );
        }
        self.apply_config(config).map(drop).map_err(|e| format!("reload failed: {e}"))
    }
}
