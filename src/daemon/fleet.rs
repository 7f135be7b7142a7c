//! Fleet mode in the daemon: another node's commit, heard through the store's notifications
//! ([`crate::store::postgres::listen`]), rewrites this node's sinks at once; a (re)connection of
//! the listener re-reads the whole store, since what was committed while nobody listened was
//! not heard.

use super::*;
use crate::store::postgres::listen::StoreEvent;

/// What the daemon knows of the fleet's store beyond what every store has.
#[derive(Default)]
pub(super) struct Fleet {
    /// Whether the notification connection is up (`None`: SQLite, no such thing).
    pub listening: Option<bool>,
    /// When it went down (unix seconds), for STATUS=.
    lost_since: Option<i64>,
    /// Changes heard while this node's own refresh of the credential was in flight (it lost
    /// the race for the lease, or is about to find the new generation): looked at again as soon
    /// as that refresh is over, rather than when its busy-retry comes round.
    heard_in_flight: FxHashMap<Arc<str>, i64>,
    /// Credentials whose provider settings differ from another node's, at the last comparison.
    disagreeing: usize,
}

/// The next store event, or never for a store without notifications.
pub(super) async fn next_event(events: &mut Option<UnboundedReceiver<StoreEvent>>) -> Option<StoreEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    pub(super) fn store_event(&mut self, event: StoreEvent) {
        match event {
            StoreEvent::Listening => {
                if self.fleet.listening == Some(false) {
                    tracing::info!("store notifications back; re-reading the whole store");
                }
                self.fleet.listening = Some(true);
                self.fleet.lost_since = None;
                self.check_settings_agree();
                self.sync_from_store();
                self.publish_soon();
            }
            StoreEvent::Lost(why) => {
                if self.fleet.listening != Some(false) {
                    tracing::warn!("store notifications lost ({why}); reconnecting, sinks keep their tokens meanwhile");
                }
                self.fleet.listening = Some(false);
                self.fleet.lost_since.get_or_insert_with(crate::clock::now_secs);
                self.publish_soon();
            }
            StoreEvent::Changed { name, generation } => self.pick_up(&name, generation),
        }
    }

    /// Records this node's provider settings and says, one ERROR line per credential and node,
    /// where another node's differ: a refresh by either spends the refresh token both depend on.
    /// Run whenever the listener (re)connects and after every reload.
    pub(super) fn check_settings_agree(&mut self) {
        if self.fleet.listening.is_none() {
            return;
        }
        let settings = crate::store::postgres::settings::of_config(&self.config);
        let compared = self.store().settings_agreement(settings, true);
        match compared {
            Ok(found) => {
                for disagreement in &found {
                    tracing::error!("{disagreement}; every node must send the same (sinks and hooks may differ)");
                }
                let mut names: Vec<&str> = found.iter().map(|d| d.credential.as_str()).collect();
                names.dedup();
                self.fleet.disagreeing = names.len();
            }
            Err(e) => tracing::warn!("cannot compare provider settings with the other nodes: {e}"),
        }
    }

    /// Takes this node's settings record away as it stops cleanly.
    pub(super) fn forget_settings(&self) {
        if self.fleet.listening.is_some()
            && let Err(e) = self.store().forget_settings()
        {
            tracing::warn!("cannot remove this node's settings record: {e}");
        }
    }

    /// The fleet's part of STATUS=: the store, whether it answers, the leases this node holds
    /// (one per refresh in flight). Empty on SQLite.
    pub(super) fn fleet_status(&self) -> String {
        let Some(listening) = self.fleet.listening else {
            return match &self.config.daemon.postgres {
                Some(target) => format!("; store {}: connecting", target.shown()),
                None => String::new(),
            };
        };
        let store = self.config.daemon.postgres.as_ref().map_or("?", |t| t.shown());
        let disagreeing = match self.fleet.disagreeing {
            0 => String::new(),
            n => format!("; PROVIDER SETTINGS DIFFER from another node's for {n} credential(s) (see the log)"),
        };
        match (listening, self.fleet.lost_since) {
            (true, _) => format!(
                "; store {store}: reachable, {} lease(s) held by this node{disagreeing}",
                self.admission.running.len()
            ),
            (false, since) => format!(
                "; store {store}: UNREACHABLE since {} (reconnecting; sinks keep their tokens, nothing is refreshed until it answers)",
                since.map_or("?".into(), rfc3339)
            ),
        }
    }

    /// The fleet's metrics, appended to the textfile: whether the store answers and the leases
    /// this node holds. Empty on SQLite.
    pub(super) fn fleet_metrics(&self) -> String {
        let Some(listening) = self.fleet.listening else { return String::new() };
        format!(
            "# HELP tokend_store_reachable Whether the fleet's PostgreSQL store answers (its notification connection is up).\n\
             # TYPE tokend_store_reachable gauge\ntokend_store_reachable {}\n\
             # HELP tokend_leases_held Credential leases this node holds (refreshes in flight).\n\
             # TYPE tokend_leases_held gauge\ntokend_leases_held {}\n\
             # HELP tokend_fleet_settings_disagreeing Credentials whose provider settings differ from another node's.\n\
             # TYPE tokend_fleet_settings_disagreeing gauge\ntokend_fleet_settings_disagreeing {}\n",
            u8::from(listening),
            self.admission.running.len(),
            self.fleet.disagreeing
        )
    }

    /// After a refresh finished: the changes heard while it was in flight.
    pub(super) fn pick_up_heard(&mut self) {
        if self.fleet.heard_in_flight.is_empty() {
            return;
        }
        let settled: Vec<(Arc<str>, i64)> = self
            .fleet
            .heard_in_flight
            .iter()
            .filter(|(name, _)| self.entries.get(&***name).is_none_or(|e| !e.in_flight))
            .map(|(name, generation)| (name.clone(), *generation))
            .collect();
        for (name, generation) in settled {
            self.fleet.heard_in_flight.remove(&name);
            self.pick_up(&name, generation);
        }
    }

    /// `name` is at `generation` in the store: if that is news (another node's rotation, an
    /// import anywhere), take its state and rewrite its sinks.
    fn pick_up(&mut self, name: &str, generation: i64) {
        let Some(entry) = self.entries.get(name) else { return };
        if entry.lifetime.is_some_and(|l| l.generation == generation) {
            tracing::debug!(credential = name, generation, "heard a change already known here");
            return;
        }
        if entry.in_flight {
            tracing::debug!(
                credential = name,
                generation,
                "heard a change while refreshing it here; looking again after"
            );
            self.fleet.heard_in_flight.insert(entry.credential.name.clone(), generation);
            return;
        }
        let stored = match self.store().get(name) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(credential = name, "cannot read a credential another node changed: {e}");
                return;
            }
        };
        let Some(entry) = self.entries.get_mut(name) else { return };
        let lifetime = stored.as_ref().map(TokenState::lifetime);
        if lifetime == entry.lifetime {
            tracing::debug!(credential = name, generation, "heard a change the store does not show");
            return;
        }
        tracing::debug!(
            credential = name,
            generation = lifetime.map(|l| l.generation),
            "changed by another node; picked up"
        );
        entry.lifetime = lifetime;
        entry.failures = 0;
        entry.retry_at = None.into();
        // In the line for a refresh slot, it would be refreshed again when its turn comes.
        entry.waiting = false;
        let credential = entry.credential.clone();
        match &stored {
            Some(state) if !state.status.is_dead() => sink::write_all(&credential, state),
            _ => self.sync_sinks(name),
        }
        self.plan(name);
        self.publish_soon();
    }
}
