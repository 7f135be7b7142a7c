//! Refreshes asked for over the socket API ([`crate::socket::Ask`]): "replace generation G".
//! They enter the refresh path by the `.refresh` trigger's door ([`Daemon::force_refresh`],
//! with its floor), and every caller asking while that refresh is pending waits for its result:
//! a hundred callers reporting the same rejected token cost one provider request.

use super::*;
use crate::refresh::SkipReason;
use crate::socket::{Ask, Refusal, Sockets};

/// Callers waiting on one credential at once; more are told to try again.
const MAX_WAITERS: usize = 4096;

type Reply = tokio::sync::oneshot::Sender<Result<i64, Refusal>>;

#[derive(Default)]
pub(super) struct OnDemand {
    pub(super) sockets: Option<Sockets>,
    /// Callers waiting for the pending refresh of a credential.
    waiters: FxHashMap<Arc<str>, Vec<Reply>>,
}

impl Daemon {
    pub(super) fn ask(&mut self, ask: Ask, inflight: &mut JoinSet<RefreshResult>) {
        let Ask { name, generation, reply } = ask;
        let Some(entry) = self.entries.get(&name) else {
            let _ = reply.send(Err(Refusal::new(404, "not_found", format!("no credential \"{name}\" is configured"))));
            return;
        };
        let refusal = match entry.lifetime {
            None => Some(Refusal::new(404, "no_token", format!("no token is stored for \"{name}\" yet"))),
            Some(l) if l.generation != generation => {
                // Replaced meanwhile (or the caller read an older row): the caller re-reads.
                let _ = reply.send(Ok(l.generation));
                return;
            }
            Some(l) if l.status.is_dead() => {
                Some(Refusal::new(409, "needs_reauth", format!("\"{name}\" needs re-authorization")))
            }
            Some(_) => None,
        };
        if let Some(refusal) = refusal {
            let _ = reply.send(Err(refusal));
            return;
        }
        let now = now_ms();
        let paused = self.admission.paused_until.get(&entry.credential.endpoint.rate_limit_key(&name)).copied();
        if let Some(until) = paused.filter(|until| *until > now) {
            let seconds = u64::try_from((until - now + 999) / 1000).unwrap_or(1);
            let _ = reply.send(Err(Refusal::new(
                429,
                "rate_limited",
                format!("the provider asked for no requests for {seconds} s"),
            )
            .retry_after(seconds)));
            return;
        }
        let in_flight = entry.in_flight;
        let key = entry.credential.name.clone();
        let waiters = self.on_demand.waiters.entry(key).or_default();
        // Callers that gave up waiting leave their closed reply behind.
        waiters.retain(|w| !w.is_closed());
        if waiters.len() >= MAX_WAITERS {
            let _ = reply
                .send(Err(Refusal::new(503, "busy", "too many callers are waiting on this credential").retry_after(1)));
            return;
        }
        // Waiters already there mean a refresh is already asked for (running, waiting for a
        // slot, or deferred by the floor); so does one in flight for any reason.
        let ask_now = waiters.is_empty() && !in_flight;
        waiters.push(reply);
        if ask_now {
            self.force_refresh(&name, "the socket API", inflight);
        }
    }

    /// Answers every caller waiting on `name` with what `result` means for them; a refresh that
    /// could not take the lease leaves them waiting for the retry.
    pub(super) fn answer_waiters(&mut self, name: &str, result: &Result<Outcome, RefreshError>) {
        if !self.on_demand.waiters.contains_key(name) {
            return;
        }
        let answer = match result {
            Ok(Outcome::Refreshed { state, .. } | Outcome::AlreadyRefreshed(state)) => Ok(state.generation),
            Ok(Outcome::Failed { needs_reauth: true, failure }) => Err(Refusal::new(
                409,
                "needs_reauth",
                format!("the provider rejected the grant ({}); authorize again", failure.reason()),
            )),
            Ok(Outcome::Failed { failure: Failure::Transient { retry_after: Some(wait), .. }, .. }) => {
                Err(Refusal::new(
                    429,
                    "rate_limited",
                    format!("the provider asked for no requests for {} s", wait.as_secs()),
                )
                .retry_after(wait.as_secs().max(1)))
            }
            Ok(Outcome::Failed { failure, .. }) => Err(Refusal::new(
                503,
                "refresh_failed",
                format!("the provider did not give a new token: {}", failure.reason()),
            )
            .retry_after(5)),
            Ok(Outcome::Skipped { reason: SkipReason::NeedsReauth, .. }) => {
                Err(Refusal::new(409, "needs_reauth", "the credential needs re-authorization"))
            }
            Ok(Outcome::Skipped { reason, .. }) => Err(Refusal::new(503, "not_refreshable", reason.text())),
            Err(RefreshError::Busy { .. } | RefreshError::LeaseRanOut { .. }) => return,
            Err(_) => {
                Err(Refusal::new(503, "refresh_failed", "the refresh failed; see the daemon's log").retry_after(5))
            }
        };
        for reply in self.on_demand.waiters.remove(name).unwrap_or_default() {
            let _ = reply.send(answer.clone());
        }
    }
}

/// The next ask from the socket servers, or never when there are none.
pub(super) async fn next_ask(asks: &mut Option<tokio::sync::mpsc::Receiver<Ask>>) -> Option<Ask> {
    match asks {
        Some(asks) => asks.recv().await,
        None => std::future::pending().await,
    }
}
