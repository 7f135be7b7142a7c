//! The token API's memory of stored tokens, so that a `GET …/token` is answered without a store
//! read handed to a blocking thread (BENCHMARKS.md, socket section: that hand-off was most of a
//! request's cost).
//!
//! A credential's entry is filled from the store by the first request after it was forgotten, and
//! forgotten by the daemon whenever the stored token changes: right after a rotation or failure
//! is committed (before the refresh writes the sinks), when another process's change is picked up,
//! on a rescued commit and on a reload. So an answer is never older than the sinks, nor older
//! than anything the daemon knows of the store.
//!
//! The race a plain cache would have — a request reads the old row, the daemon commits and
//! forgets, the request then stores the old row for good — is closed by tickets: a request takes
//! a ticket before it reads the store and may fill the entry only if that ticket is still the
//! entry's (forgetting removes the entry, and a new one gets a new ticket).
//!
//! Tokens live here as they already do in the daemon's memory for sinks; never on disk. Refresh
//! tokens are not kept: no answer needs them.

use crate::store::TokenState;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct TokenSnapshot {
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_name: FxHashMap<Arc<str>, Entry>,
    next_ticket: u64,
}

struct Entry {
    ticket: u64,
    state: Option<Arc<TokenState>>,
}

/// What a request finds: the token, or the ticket to fill the entry with after a store read.
pub(crate) enum Lookup {
    Known(Arc<TokenState>),
    Unknown(u64),
}

impl TokenSnapshot {
    /// The stored token of `name` changed (or may have): the next request reads the store.
    pub fn forget(&self, name: &str) {
        self.entries().by_name.remove(name);
    }

    /// Anything may have changed (another process wrote the store, the configuration was
    /// reloaded): every next request reads the store.
    pub fn forget_all(&self) {
        let mut entries = self.entries();
        // Freed, not kept: the entries of credentials a reload removed must not linger.
        entries.by_name = FxHashMap::default();
    }

    /// `name`'s token if known; else a ticket, taken before the caller reads the store.
    pub(crate) fn lookup(&self, name: &Arc<str>) -> Lookup {
        let mut entries = self.entries();
        if let Some(entry) = entries.by_name.get(&**name) {
            return match &entry.state {
                Some(state) => Lookup::Known(state.clone()),
                None => Lookup::Unknown(entry.ticket),
            };
        }
        let ticket = entries.next_ticket;
        entries.next_ticket += 1;
        entries.by_name.insert(name.clone(), Entry { ticket, state: None });
        Lookup::Unknown(ticket)
    }

    /// Keeps `state`, read from the store after `ticket` was taken, unless `name` was forgotten
    /// since (then `state` may be older than what the daemon committed meanwhile).
    pub(crate) fn fill(&self, name: &str, ticket: u64, mut state: TokenState) -> Arc<TokenState> {
        state.refresh_token = None;
        let state = Arc::new(state);
        if let Some(entry) = self.entries().by_name.get_mut(name).filter(|e| e.ticket == ticket) {
            entry.state = Some(state.clone());
        }
        state
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::{Lookup, TokenSnapshot};
    use crate::redact::Secret;
    use crate::store::{Status, TokenState};
    use std::sync::Arc;

    fn state(generation: i64) -> TokenState {
        TokenState {
            name: "a".into(),
            provider: "generic".into(),
            access_token: Secret::new(format!("token-{generation}")),
            refresh_token: Some(Secret::new("refresh")),
            token_type: "Bearer".into(),
            scope: None,
            expires_in: None,
            created_at: 0,
            expires_at: None,
            generation,
            status: Status::Active,
            last_error: None,
            last_refresh_at: None,
            attempts_in_flight: 0,
            extra: None,
            refresh_token_expires_at: None,
            refresh_token_issued_at: None,
            dead_since: None,
        }
    }

    fn known(snapshot: &TokenSnapshot, name: &Arc<str>) -> Option<i64> {
        match snapshot.lookup(name) {
            Lookup::Known(s) => Some(s.generation),
            Lookup::Unknown(_) => None,
        }
    }

    #[test]
    fn filled_until_forgotten_without_the_refresh_token() {
        let (snapshot, name) = (TokenSnapshot::default(), Arc::<str>::from("a"));
        let Lookup::Unknown(ticket) = snapshot.lookup(&name) else { panic!("known before any read") };
        assert!(snapshot.fill("a", ticket, state(1)).refresh_token.is_none());
        assert_eq!(known(&snapshot, &name), Some(1));
        snapshot.forget("a");
        assert_eq!(known(&snapshot, &name), None);
        let Lookup::Unknown(ticket) = snapshot.lookup(&name) else { panic!() };
        snapshot.fill("a", ticket, state(2));
        snapshot.forget_all();
        assert_eq!(known(&snapshot, &name), None);
    }

    #[test]
    fn a_read_that_began_before_a_commit_is_not_kept() {
        let (snapshot, name) = (TokenSnapshot::default(), Arc::<str>::from("a"));
        // A request takes its ticket and reads generation 1; meanwhile the daemon commits 2 and
        // forgets; another request takes a new ticket.
        let Lookup::Unknown(old) = snapshot.lookup(&name) else { panic!() };
        snapshot.forget("a");
        let Lookup::Unknown(new) = snapshot.lookup(&name) else { panic!() };
        assert_eq!(snapshot.fill("a", old, state(1)).generation, 1, "the late reader still gets its answer");
        assert_eq!(known(&snapshot, &name), None, "but it is not kept");
        snapshot.fill("a", new, state(2));
        assert_eq!(known(&snapshot, &name), Some(2));
        // Forgotten with nobody asking again: a late fill finds no entry and keeps nothing.
        snapshot.forget("a");
        snapshot.fill("a", new, state(1));
        assert_eq!(known(&snapshot, &name), None);
    }
}
