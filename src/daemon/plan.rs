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
                self.queue.schedule(key, Job::Refresh, entry.retry_at.unwrap_or(now));
            }
            None => {}
            Some(lifetime) => {
                if lifetime.status == Status::Active
                    && let Some(due) = schedule::next_refresh_ms(name, entry.credential.refresh_at, lifetime)
                {
                    // A deferred trigger keeps its time through re-planning.
                    let triggered = self
                        .watches
                        .trigger_floor
                        .get(name)
                        .and_then(|f| f.deferred_to)
                        .and_then(|at| at.checked_duration_since(Instant::now()))
                        .map(|wait| now + i64::try_from(wait.as_millis()).unwrap_or(0));
                    let at = entry.retry_at.unwrap_or(due).min(triggered.unwrap_or(i64::MAX));
                    self.queue.schedule(key, Job::Refresh, at);
                }
                if let Some(expiry) = lifetime.expires_at.map(|t| t * 1000).filter(|t| *t > now) {
                    self.queue.schedule(key, Job::Expire, expiry);
                }
            }
        }
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
