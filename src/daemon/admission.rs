//! Starting refreshes: what is due, whether a slot is free (global and per-provider
//! concurrency, the waiting line), and whether the endpoint asked us to wait (rate-limit pauses,
//! keyed by endpoint and client).

use super::*;

impl Daemon {
    pub(super) fn fire_due(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        let mut due = self.queue.pop_due(now_ms());
        if self.config.daemon.postgres.is_some() && due.len() > 1 {
            let start = rand::random_range(0..due.len());
            due.rotate_left(start);
        }
        for (name, job) in due {
            match job {
                Job::Refresh => self.start_refresh(&name, inflight),
                Job::Cron => {
                    tracing::info!(credential = %name, "refresh_cron fired");
                    self.start_refresh(&name, inflight);
                    self.plan_cron(&name);
                }
                Job::Expire => self.expire(&name),
                Job::Notice => self.notice(&name),
                Job::Maintenance => {
                    match self.store().maintenance(now_ms(), ATTEMPT_RETENTION) {
                        Ok(pruned) => tracing::info!(pruned_attempts = pruned, "maintenance done"),
                        Err(e) => tracing::warn!("maintenance failed: {e}"),
                    }
                    self.schedule_maintenance();
                }
            }
        }
    }

    pub(super) fn refresh_all(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        let names: Vec<Arc<str>> = self.entries.keys().cloned().collect();
        tracing::info!(credentials = names.len(), "refreshing everything now");
        for name in names {
            self.start_refresh(&name, inflight);
        }
    }

    pub(super) fn start_refresh(&mut self, name: &str, inflight: &mut JoinSet<RefreshResult>) {
        if self.admission.stopping {
            return;
        }
        let now = now_ms();
        let Some(entry) = self.entries.get_mut(name) else { return };
        if entry.in_flight {
            return;
        }
        let provider = entry.credential.provider();
        let paused = if self.admission.paused_until.is_empty() {
            None
        } else {
            self.admission
                .paused_until
                .get(&entry.credential.endpoint.rate_limit_key(name))
                .copied()
                .filter(|u| *u > now)
        };
        if let Some(until) = paused {
            let expires_at_ms = entry.lifetime.and_then(|l| l.expires_at()).map(|t| t * 1000);
            let last_chance = expires_at_ms.map(|t| t - schedule::LAST_CHANCE_BEFORE_EXPIRY_MS).filter(|t| *t < until);
            match last_chance {
                Some(at) if now >= at => {
                    tracing::warn!(credential = name, until = %rfc3339(until / 1000), expires_at = %rfc3339(expires_at_ms.unwrap_or(0) / 1000), "rate limited past the token's expiry; one last attempt before it expires");
                }
                Some(at) => {
                    tracing::error!(credential = name, until = %rfc3339(until / 1000), expires_at = %rfc3339(expires_at_ms.unwrap_or(0) / 1000), last_attempt_at = %rfc3339(at / 1000), "the provider asks us to wait past the token's expiry; the token will expire unless one last attempt succeeds");
                    self.queue.schedule(&entry.credential.name, Job::Refresh, at);
                    return;
                }
                None => {
                    tracing::info!(credential = name, until = %rfc3339(until / 1000), "rate limited by this endpoint; refresh deferred");
                    self.queue.schedule(&entry.credential.name, Job::Refresh, until);
                    return;
                }
            }
        }
        if entry.pending.is_some() {
            self.commit_pending(name);
            return;
        }
        self.queue.cancel(name, Job::Refresh);
        let busy = self.admission.in_flight_by_provider.get(&provider).copied().unwrap_or(0);
        if self.admission.running.len() >= self.config.daemon.concurrency
            || busy >= entry.credential.endpoint.provider_concurrency
        {
            if !entry.waiting {
                entry.waiting = true;
                self.admission.waiting.push_back(entry.credential.name.clone());
            }
            return;
        }
        entry.in_flight = true;
        *self.admission.in_flight_by_provider.entry(provider).or_default() += 1;
        let store = self.committer.clone();
        let http = self.http.clone();
        let sinks = self.sinks.clone();
        let credential = entry.credential.clone();
        let expected = entry.lifetime.map(|l| l.generation);
        let handle = inflight.spawn(async move {
            // Debug builds only: the tests' way to make a refresh task die.
            #[cfg(debug_assertions)]
            if std::env::var_os("TOKEND_TEST_PANIC_IN_REFRESH").is_some_and(|n| n == *credential.name) {
                panic!("injected by TOKEND_TEST_PANIC_IN_REFRESH");
            }
            let result = refresh::refresh(&store, &http, &sinks, &credential, expected, Duration::ZERO).await;
            (credential.name.clone(), result)
        });
        self.admission.running.insert(handle.id(), (entry.credential.name.clone(), provider));
    }

    /// Starts waiting refreshes while slots are free. Each waiting name is looked at once per
    /// call, so a provider at its own limit does not spin.
    pub(super) fn start_waiting(&mut self, inflight: &mut JoinSet<RefreshResult>) {
        for _ in 0..self.admission.waiting.len() {
            if self.admission.running.len() >= self.config.daemon.concurrency {
                break;
            }
            let Some(name) = self.admission.waiting.pop_front() else { break };
            // Not waiting any more: another holder's commit was picked up meanwhile (`fleet.rs`).
            if let Some(entry) = self.entries.get_mut(&name).filter(|e| e.waiting) {
                entry.waiting = false;
                self.start_refresh(&name, inflight);
            }
        }
    }
}

/// Records that `credential`'s rate-limit budget (itself, its client, or its provider: the
/// credential's `rate_limit`) is spent until `until`; pauses that ended are forgotten.
pub(super) fn pause(paused_until: &mut HashMap<String, i64>, credential: &Credential, now: i64, until: i64) {
    paused_until.retain(|_, end| *end > now);
    paused_until.insert(credential.endpoint.rate_limit_key(&credential.name), until);
}
