//! Putting deadlines in the queue: each credential's next refresh and expiry from its state,
//! its cron refreshes, and the daily housekeeping.

use super::*;

impl Daemon {
    /// Puts the credential's refresh and expiry deadlines in the queue, from its state.
    pub(super) fn plan(&mut self, name: &str) {
        self.queue.cancel(name, Job::Refresh);
        self.queue.cancel(name, Job::Expire);
        let Some(entry) = self.entries.get(name) else { return };
        if entry.in_flight {
            return; // `finished` plans again.
        }
        let now = now_ms();
        let key = &entry.credential.name;
        match &entry.lifetime {
            None if matches!(entry.credential.endpoint.grant, GrantKind::ApiKey(_)) => {
                self.queue.schedule(key, Job::Refresh, entry.retry_at.get().unwrap_or(now));
            }
            None => {}
            Some(lifetime) => {
                if lifetime.status == Status::Active
                    && let Some(due) = schedule::next_refresh_ms(
                        name,
                        entry.credential.refresh_at,
                        entry.credential.lifecycle.refresh_at_least,
                        lifetime,
                    )
                {
                    // A deferred trigger keeps its time through re-planning.
                    let triggered = self
                        .watches
                        .trigger_floor
                        .get(name)
                        .and_then(|f| f.deferred_to)
                        .and_then(|at| at.checked_duration_since(Instant::now()))
                        .map(|wait| now + i64::try_from(wait.as_millis()).unwrap_or(0));
                    let at = entry.retry_at.get().unwrap_or(due).min(triggered.unwrap_or(i64::MAX));
                    self.queue.schedule(key, Job::Refresh, at);
                }
                if let Some(expiry) = lifetime.expires_at().map(|t| t * 1000).filter(|t| *t > now) {
                    self.queue.schedule(key, Job::Expire, expiry);
                }
            }
        }
        self.plan_notice(name);
    }

    /// The next event for a human: a `needs_reauth` reminder while the credential is dead, else
    /// `reauth_soon` once its re-authorization deadline is within `reauth_warn`.
    pub(super) fn plan_notice(&mut self, name: &str) {
        self.queue.cancel(name, Job::Notice);
        let Some(entry) = self.entries.get(name) else { return };
        let Some(lifetime) = &entry.lifetime else { return };
        let lifecycle = &entry.credential.lifecycle;
        let at = if lifetime.status.is_dead() {
            match (lifetime.dead_since.get(), lifecycle.reauth_repeat) {
                (Some(since), Some(every)) => Some(schedule::next_reminder_ms(since, every, now_ms())),
                _ => None,
            }
        } else {
            match (schedule::reauth_deadline(lifetime, lifecycle.refresh_token_lifetime), lifecycle.reauth_warn) {
                (Some(deadline), Some(warn)) if self.notices.warned.get(name) != Some(&deadline) => {
                    Some(schedule::reauth_warning_ms(deadline, warn))
                }
                _ => None,
            }
        };
        if let Some(at) = at {
            self.queue.schedule(&entry.credential.name, Job::Notice, at);
        }
    }

    /// A [`Job::Notice`] fired.
    pub(super) fn notice(&mut self, name: &str) {
        let stored = self.store().get(name).ok().flatten();
        let Some(entry) = self.entries.get(name) else { return };
        let Some(lifetime) = entry.lifetime else { return };
        let credential = entry.credential.clone();
        if lifetime.status.is_dead() {
            let since = lifetime.dead_since.get().map_or_else(|| "an unknown time".into(), rfc3339);
            let reason = stored.as_ref().and_then(|s| s.last_error.clone());
            tracing::error!(credential = name, since = %since, reason = reason.as_deref().unwrap_or("-"), "still needs re-authorization (tokend authorize or tokend import)");
            self.notices.count(&credential.name, metrics::Notice::NeedsReauth);
            hooks::spawn(&credential, Event::NeedsReauth, stored.as_ref(), reason.as_deref());
        } else if let Some(deadline) = schedule::reauth_deadline(&lifetime, credential.lifecycle.refresh_token_lifetime)
        {
            tracing::warn!(credential = name, deadline = %rfc3339(deadline), in_ = %short_duration(deadline - now_ms() / 1000), "re-authorization will be needed by then (tokend authorize)");
            self.notices.warned.insert(credential.name.clone(), deadline);
            self.notices.count(&credential.name, metrics::Notice::ReauthSoon);
            hooks::spawn_with(&credential, Event::ReauthSoon, stored.as_ref(), None, Some(deadline));
        }
        self.plan_notice(name);
        self.publish_soon();
    }

    pub(super) fn plan_cron(&mut self, name: &str) {
        self.queue.cancel(name, Job::Cron);
        if let Some(entry) = self.entries.get(name)
            && let Some(cron) = &entry.credential.refresh_cron
            && let Some(at) = cron.next_after_ms(now_ms())
        {
            self.queue.schedule(&entry.credential.name, Job::Cron, at);
        }
    }

    pub(super) fn schedule_maintenance(&mut self) {
        let cron = config::CronSchedule::parse(MAINTENANCE_CRON).expect("constant cron expression parses");
        if let Some(at) = cron.next_after_ms(now_ms()) {
            self.queue.schedule(&Arc::from(DAEMON_KEY), Job::Maintenance, at);
        }
    }
}
