//! Keeping sink files in step with the store: rewriting altered ones (on the sink thread, never on
//! the daemon's loop) and removing those whose token expired.

use super::*;

impl Daemon {
    /// The token's expiry passed. If it was not replaced meanwhile, no program may keep using it:
    /// the sinks are removed.
    pub(super) fn expire(&mut self, name: &str) {
        let Some(entry) = self.entries.get(name) else { return };
        let Some(expires_at) = entry.lifetime.and_then(|l| l.expires_at()) else { return };
        if expires_at * 1000 <= now_ms() {
            tracing::error!(credential = name, expired_at = %rfc3339(expires_at), "access token expired without a successful refresh; its sink files are removed");
            sink::remove_all(&entry.credential, "token expired");
            let stored = self.store().get(name).ok().flatten();
            let last_error = stored.as_ref().and_then(|s| s.last_error.as_deref());
            hooks::spawn(&entry.credential, Event::Expired, stored.as_ref(), last_error);
            self.publish_soon();
        }
    }

    /// Makes every sink of `name` match its stored token: rewritten if missing or altered,
    /// removed if the token is expired.
    pub(super) fn sync_sinks(&mut self, name: &str) {
        if let Some(entry) = self.entries.get(name) {
            self.sync_sinks_of([entry.credential.name.clone()]);
        }
    }

    /// [`Self::sync_sinks`] for many credentials, with the rewrites done as one batch. The returned
    /// task ends when the files are checked and rewritten.
    pub(super) fn sync_sinks_of(&mut self, names: impl IntoIterator<Item = Arc<str>>) -> tokio::task::JoinHandle<()> {
        let now = now_ms();
        let mut settled = Vec::new();
        for name in names {
            let Some(entry) = self.entries.get(&name).filter(|e| !e.credential.sinks.is_empty()) else { continue };
            if entry.in_flight {
                // The state in memory is about to be replaced and the refresh writes the sinks
                // itself; writing now could put the old token back over the new one. `finished`
                // looks again.
                self.watches.dirty_sinks.insert(name);
                continue;
            }
            let Some(lifetime) = entry.lifetime else { continue };
            if lifetime.expires_at().is_some_and(|t| t * 1000 <= now) {
                sink::remove_all(&entry.credential, "token expired");
                continue;
            }
            settled.push(name);
        }
        let states = self.stored_states(settled);
        let items: Vec<(Arc<str>, config::SinkConfig, TokenState)> = states
            .into_iter()
            .filter_map(|state| Some((self.entries.get(state.name.as_str())?, state)))
            .flat_map(|(entry, state)| {
                let name = entry.credential.name.clone();
                entry.credential.sinks.iter().map(move |s| (name.clone(), s.clone(), state.clone()))
            })
            .collect();
        // Read and rewritten on the sink thread: a sink directory others can write must never
        // stall this loop.
        let sinks = self.sinks.clone();
        tokio::spawn(async move {
            for repaired in sinks.repair(items).await {
                match repaired.result {
                    Ok(()) => {
                        tracing::info!(credential = %repaired.credential, sink = %repaired.path.display(), "sink written")
                    }
                    Err(e) => tracing::error!(credential = %repaired.credential, "{e}"),
                }
            }
        })
    }

    /// Writes tokens another holder committed (another node, `tokend refresh`) into their
    /// credentials' sinks on the sink thread: queued now, so that this node's own next token for
    /// a credential is written after them, and written off this loop; failures are logged.
    pub(super) fn write_sinks_queued(&self, tokens: Vec<(Arc<config::Credential>, TokenState)>) {
        let writes: Vec<_> = tokens
            .iter()
            .filter(|(credential, _)| !credential.sinks.is_empty())
            .map(|(credential, state)| (credential.name.clone(), self.sinks.queue_write(&credential.sinks, state)))
            .collect();
        if writes.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for (name, written) in writes {
                for result in written.await {
                    if let Err(e) = result {
                        tracing::error!(credential = %name, "{e}");
                    }
                }
            }
        });
    }

    /// The stored states of `names` (tokens included): one pass over the table when they are a
    /// good part of it (start-up, reload), else a lookup of just those — a catch-up of 100,000
    /// checks its sinks in batches of a few hundred, and reading every row for each batch cost
    /// more than the refreshes themselves.
    pub(super) fn stored_states(&self, names: Vec<Arc<str>>) -> Vec<TokenState> {
        let store = self.store();
        let read = if names.len() > 256 && names.len() * 4 > self.entries.len() {
            let wanted: HashSet<Arc<str>> = names.into_iter().collect();
            store.list().map(|all| all.into_iter().filter(|s| wanted.contains(s.name.as_str())).collect())
        } else {
            store.get_many(&names.iter().map(|n| &**n).collect::<Vec<_>>())
        };
        read.unwrap_or_else(|e| {
            tracing::error!("cannot read tokens from the store to check their sinks: {e}");
            Vec::new()
        })
    }
}
