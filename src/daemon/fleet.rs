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

/// Store events handled in one turn of the daemon's loop; the rest wait for the next turn, so
/// that a burst cannot hold off timers, signals and finished refreshes for long.
const MAX_EVENTS_AT_ONCE: usize = 2048;

/// The next store event, or never for a store without notifications.
pub(super) async fn next_event(events: &mut Option<UnboundedReceiver<StoreEvent>>) -> Option<StoreEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    fn store_event(&mut self, event: StoreEvent) {
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
            StoreEvent::Changed { name, generation } => self.pick_up(vec![(name.into(), generation)]),
        }
    }

    /// `first` and whatever else the listener has queued, at most [`MAX_EVENTS_AT_ONCE`]: while
    /// another node catches up, thousands of changes arrive in a burst, and taken together their
    /// states are read in one query and their files written in one batch. Changes are taken in
    /// the order heard, before a reconnection's full re-read.
    pub(super) fn store_events(&mut self, first: StoreEvent, more: &mut Option<UnboundedReceiver<StoreEvent>>) {
        let mut heard = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(event) = next.take() {
            match event {
                StoreEvent::Changed { name, generation } => heard.push((name.into(), generation)),
                other => {
                    self.pick_up(std::mem::take(&mut heard));
                    self.store_event(other);
                }
            }
            taken += 1;
            if taken < MAX_EVENTS_AT_ONCE {
                next = more.as_mut().and_then(|rx| rx.try_recv().ok());
            }
        }
        self.pick_up(heard);
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
        for (name, _) in &settled {
            self.fleet.heard_in_flight.remove(name);
        }
        self.pick_up(settled);
    }

    /// Each credential is at the given generation in the store: those for which that is news
    /// (another node's rotation, an import anywhere) take their stored state, read in one query,
    /// and their sinks are rewritten in one batch on the sink thread.
    fn pick_up(&mut self, changes: Vec<(Arc<str>, i64)>) {
        let mut news: Vec<Arc<str>> = Vec::with_capacity(changes.len());
        for (name, generation) in changes {
            let Some(entry) = self.entries.get(&*name) else { continue };
            if entry.lifetime.is_some_and(|l| l.generation == generation) {
                tracing::debug!(credential = &*name, generation, "heard a change already known here");
                continue;
            }
            if entry.in_flight {
                tracing::debug!(
                    credential = &*name,
                    generation,
                    "heard a change while refreshing it here; looking again after"
                );
                self.fleet.heard_in_flight.insert(entry.credential.name.clone(), generation);
                continue;
            }
            news.push(entry.credential.name.clone());
        }
        news.sort_unstable();
        news.dedup();
        if news.is_empty() {
            return;
        }
        let names: Vec<&str> = news.iter().map(|n| &**n).collect();
        let read = self.store().get_many(&names);
        let mut stored: FxHashMap<String, TokenState> = match read {
            Ok(states) => states.into_iter().map(|s| (s.name.clone(), s)).collect(),
            Err(e) => {
                tracing::warn!(credentials = news.len(), "cannot read credentials another node changed: {e}");
                return;
            }
        };
        let mut fresh = Vec::with_capacity(news.len());
        for name in news {
            let state = stored.remove(&*name);
            let Some(entry) = self.entries.get_mut(&name) else { continue };
            let lifetime = state.as_ref().map(TokenState::lifetime);
            if lifetime == entry.lifetime {
                tracing::debug!(credential = &*name, "heard a change the store does not show");
                continue;
            }
            tracing::debug!(
                credential = &*name,
                generation = lifetime.map(|l| l.generation),
                "changed by another node; picked up"
            );
            entry.lifetime = lifetime;
            entry.failures = 0;
            entry.retry_at = None.into();
            // In the line for a refresh slot, it would be refreshed again when its turn comes.
            entry.waiting = false;
            let credential = entry.credential.clone();
            // The socket API (not offered on fleet nodes yet) must never answer with the token
            // this change replaced.
            self.snapshot.forget(&name);
            match state {
                Some(state) if !state.status.is_dead() => fresh.push((credential, state)),
                _ => self.sync_sinks(&name),
            }
            self.plan(&name);
        }
        self.write_sinks_queued(fresh);
        self.publish_soon();
    }
}
