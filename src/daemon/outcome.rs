//! What a finished refresh means for its credential: [`decide`] turns the result into a
//! [`Decision`] (pure, unit-tested), and [`Daemon::finished`] carries it out.

use super::*;
use admission::pause;

impl Daemon {
    pub(super) fn finished(
        &mut self,
        done: Result<(tokio::task::Id, RefreshResult), tokio::task::JoinError>,
        inflight: &mut JoinSet<RefreshResult>,
    ) {
        let (id, outcome) = match done {
            Ok((id, result)) => (id, Ok(result)),
            Err(e) => (e.id(), Err(e)),
        };
        let Some((name, provider)) = self.running.remove(&id) else { return };
        if let Some(n) = self.in_flight_by_provider.get_mut(&provider) {
            *n = n.saturating_sub(1);
        }
        let result = match outcome {
            Ok((_, result)) => result,
            Err(e) => {
                tracing::error!(credential = %name, "refresh task died: {e}");
                Err(RefreshError::Busy { name: String::new(), pid: 0 })
            }
        };
        let now = now_ms();
        self.publish_soon();
        // Only failures need the stored state re-read (for last_error and status).
        let fresh_state = match &result {
            Ok(Outcome::Failed { .. }) | Err(_) => self.store().get(&name).ok().flatten(),
            _ => None,
        };
        let Some(entry) = self.entries.get_mut(&name) else {
            self.start_waiting(inflight);
            return;
        };
        entry.in_flight = false;
        let category = match &result {
            Ok(Outcome::Refreshed { .. } | Outcome::AlreadyRefreshed(_)) => Some("success"),
            Ok(Outcome::Failed { failure: Failure::Transient { .. }, .. }) => Some("transient"),
            Ok(Outcome::Failed { failure: Failure::Rejected { .. }, .. }) => Some("rejected"),
            Ok(Outcome::Failed { failure: Failure::Permanent { .. }, .. }) => Some("permanent"),
            Ok(Outcome::Skipped { .. }) | Err(RefreshError::Busy { .. }) => None,
            Err(_) => Some("error"),
        };
        if let Some(index) = category.and_then(|c| metrics::RESULTS.iter().position(|r| *r == c)) {
            entry.results[index] += 1;
        }
        let credential = entry.credential.clone();
        let token_life = |held: Option<Lifetime>| {
            Duration::from_secs(held.and_then(|l| l.expires_in()).unwrap_or(3600).unsigned_abs())
        };
        if let Some(fresh) = &fresh_state {
            entry.lifetime = Some(fresh.lifetime());
        }
        match result {
            Ok(Outcome::Refreshed { state, rate_limited_for }) => {
                entry.failures = 0;
                entry.retry_at = None;
                if let Some(wait) = rate_limited_for {
                    let until = now + i64::try_from(wait.as_millis()).unwrap_or(0);
                    tracing::warn!(credential = %name, until = %rfc3339(until / 1000), "rate limit budget spent; pausing this endpoint and client");
                    pause(&mut self.paused_until, &credential, now, until);
                }
                hooks::spawn(&credential, Event::Refreshed, Some(&state), None);
                entry.lifetime = Some(state.lifetime());
            }
            Ok(Outcome::AlreadyRefreshed(state)) => {
                tracing::info!(credential = %name, generation = state.generation, "refreshed by another process meanwhile");
                entry.failures = 0;
                entry.retry_at = None;
                sink::write_all(&credential, &state);
                entry.lifetime = Some(state.lifetime());
            }
            Ok(Outcome::Failed { failure, needs_reauth }) => {
                if needs_reauth {
                    entry.retry_at = None;
                    hooks::spawn(&credential, Event::NeedsReauth, fresh_state.as_ref(), Some(failure.reason()));
                } else {
                    entry.failures += 1;
                    let provider_wait = match &failure {
                        Failure::Transient { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    if let Some(wait) = provider_wait {
                        let until = now + i64::try_from(wait.as_millis()).unwrap_or(0);
                        pause(&mut self.paused_until, &credential, now, until);
                    }
                    let expires_at_ms = entry.lifetime.and_then(|l| l.expires_at).map(|t| t * 1000);
                    let at = schedule::retry_at_ms(
                        now,
                        entry.failures,
                        token_life(entry.lifetime),
                        expires_at_ms,
                        provider_wait,
                        rand::random::<f64>(),
                    );
                    tracing::info!(credential = %name, failures = entry.failures, retry_in_ms = at - now, "will retry");
                    entry.retry_at = Some(at);
                    hooks::spawn(&credential, Event::Failed, fresh_state.as_ref(), Some(failure.reason()));
                }
            }
            Ok(Outcome::Skipped { reason, state }) => {
                tracing::info!(credential = %name, "not refreshed: {}", reason.text());
                entry.retry_at = None;
                entry.lifetime = state.as_ref().map(TokenState::lifetime);
            }
            Err(RefreshError::Busy { .. }) => {
                entry.retry_at = Some(now + LEASE_BUSY_RETRY_MS);
            }
            Err(RefreshError::CommitFailed { token, rescue, .. }) => {
                // The error is already logged loudly by `refresh`; keep the token and retry the
                // commit itself — never another refresh with the revoked refresh token.
                entry.failures += 1;
                entry.pending = Some(Box::new((*token, rescue)));
                let lifetime = Duration::from_secs(60);
                entry.retry_at =
                    Some(schedule::retry_at_ms(now, entry.failures, lifetime, None, None, rand::random::<f64>()));
            }
            Err(e) => {
                tracing::error!(credential = %name, "{e}");
                entry.failures += 1;
                let expires_at_ms = entry.lifetime.and_then(|l| l.expires_at).map(|t| t * 1000);
                entry.retry_at = Some(schedule::retry_at_ms(
                    now,
                    entry.failures,
                    token_life(entry.lifetime),
                    expires_at_ms,
                    None,
                    rand::random::<f64>(),
                ));
            }
        }
        if self.dirty_sinks.contains(&name) {
            self.fs_due.get_or_insert(Instant::now() + FS_DEBOUNCE);
        }
        self.plan(&name);
        if self.entries.get(&name).is_some_and(|e| e.retry_at.is_some_and(|r| r <= now)) {
            self.start_refresh(&name, inflight);
        }
        self.start_waiting(inflight);
    }

    /// Retries storing a token whose rotation commit failed.
    pub(super) fn commit_pending(&mut self, name: &str) {
        let now = now_ms();
        let Some(entry) = self.entries.get_mut(name) else { return };
        let Some(pending) = entry.pending.take() else { return };
        let (token, rescue) = *pending;
        let provider = entry.credential.provider();
        let committed = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).import(
            name,
            provider.as_str(),
            &token,
            now.div_euclid(1000),
        );
        match committed {
            Ok(state) => {
                tracing::warn!(
                    credential = name,
                    generation = state.generation,
                    "rescued token committed; the chain is intact"
                );
                if std::fs::remove_file(&rescue).is_ok() {
                    tracing::info!(credential = name, rescue = %rescue, "rescue file removed");
                }
                sink::write_all(&entry.credential, &state);
                entry.lifetime = Some(state.lifetime());
                entry.failures = 0;
                entry.retry_at = None;
            }
            Err(e) => {
                entry.failures += 1;
                let at = schedule::retry_at_ms(
                    now,
                    entry.failures,
                    Duration::from_secs(60),
                    None,
                    None,
                    rand::random::<f64>(),
                );
                tracing::error!(credential = name, rescue = %rescue, retry_in_ms = at - now, "rescued token still cannot be stored: {e}");
                entry.pending = Some(Box::new((token, rescue)));
                entry.retry_at = Some(at);
            }
        }
        self.plan(name);
        self.publish_soon();
    }
}
