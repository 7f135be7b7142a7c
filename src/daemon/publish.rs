//! What the daemon tells the world about itself: systemd STATUS= lines and the Prometheus
//! textfile, republished (at most once a second) after every state change; and the health the
//! watchdog ping depends on.

use super::*;

/// A snapshot for start-up messages and (later) service status lines.
#[derive(Debug, Clone)]
pub struct Summary {
    pub credentials: usize,
    pub needs_reauth: usize,
    pub failing: usize,
    pub next_refresh_ms: Option<i64>,
}

impl Summary {
    pub fn describe(&self) -> String {
        let next = match self.next_refresh_ms {
            Some(at) => format!("next refresh in {}", short_duration((at - now_ms()).max(0) / 1000)),
            None => "nothing scheduled".to_string(),
        };
        format!(
            "{} credentials, {} failing, {} needing re-authorization, {next}",
            self.credentials, self.failing, self.needs_reauth
        )
    }
}

impl Daemon {
    pub(super) fn summary(&self) -> Summary {
        Summary {
            credentials: self.entries.len(),
            needs_reauth: self.entries.values().filter(|e| e.lifetime.is_some_and(|l| l.status.is_dead())).count(),
            failing: self.entries.values().filter(|e| e.failures > 0).count(),
            next_refresh_ms: self.queue.next_of(Job::Refresh),
        }
    }

    pub(super) fn healthy(&self) -> bool {
        match self.store().schema_version() {
            Ok(_) => true,
            Err(e) => {
                tracing::error!("store unreachable, withholding the watchdog ping: {e}");
                false
            }
        }
    }

    pub(super) fn publish_soon(&mut self) {
        self.due.publish.get_or_insert(Instant::now() + PUBLISH_INTERVAL);
    }

    /// Sends systemd a STATUS line and rewrites the metrics file.
    pub(super) fn publish(&mut self) {
        self.due.publish = None;
        systemd::status(&format!("{}{}", self.summary().describe(), self.fleet_status()));
        let Some(path) = self.config.daemon.metrics_file.clone() else { return };
        let snapshot: BTreeMap<String, CredentialMetrics> = self
            .entries
            .iter()
            .map(|(name, e)| {
                let m = CredentialMetrics {
                    provider: e.credential.provider().to_string(),
                    expires_at: e.lifetime.and_then(|l| l.expires_at()),
                    needs_reauth: e.lifetime.is_some_and(|l| l.status.is_dead()),
                    last_refresh_at: e.lifetime.and_then(|l| l.last_refresh_at.get()),
                    refreshes: e.results.map(u64::from),
                    reauth_deadline: e
                        .lifetime
                        .and_then(|l| schedule::reauth_deadline(&l, e.credential.lifecycle.refresh_token_lifetime)),
                    notices: self.notices.counts.get(name).copied().unwrap_or_default().map(u64::from),
                };
                (name.to_string(), m)
            })
            .collect();
        // Readable by node_exporter's user: counts and times only, no secrets.
        let text = metrics::render(&snapshot, sink::replaced_total()) + &self.fleet_metrics();
        if let Err(e) = sink::write_atomic(&path, text.as_bytes(), 0o644, None) {
            tracing::warn!("metrics file not written: {e}");
        }
    }
}
