//! What a finished refresh means for its credential: [`decide`] turns the result into a
//! [`Decision`] (pure, unit-tested), and [`Daemon::finished`] carries it out.

use super::*;
use admission::pause;

/// A token's life when nothing says otherwise, for backoff: the length of Nudge's and most
/// providers' access tokens.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(3600);
/// A credential is refreshed successfully at most once per this long, whatever its schedule says.
const MIN_GAP_AFTER_REFRESH_MS: i64 = 1000;
/// Backoff for retrying a commit that failed (disk full, read-only): the store, not the
/// provider, has to recover, and the rescued token does not expire sooner for waiting.
const COMMIT_RETRY_BASE: Duration = Duration::from_secs(60);

/// What the daemon holds about a credential that a result is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    pub failures: u32,
    pub lifetime: Option<Lifetime>,
}

/// What a refresh's result means for its credential, decided without I/O by [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Decision {
    /// Consecutive failures after this result.
    pub failures: u32,
    /// When to try again; `None` means at the refresh point planned from the lifetime.
    pub retry_at: Option<i64>,
    /// The lifetime to hold from now on.
    pub lifetime: Option<Lifetime>,
    /// The endpoint (and client) asked for no requests until then.
    pub pause_until: Option<i64>,
    /// How `tokend_refresh_total` counts it; `None` when nothing was attempted.
    pub counted_as: Option<metrics::RefreshResult>,
    /// The hook event, if any.
    pub event: Option<Event>,
    /// A credential that was failing is healthy again.
    pub recovered: bool,
}

/// The decision for `result`, given what was held before (`held`), the stored state re-read
/// after a failure (`fresh`, for its status and last error), the time, and a random number in
/// [0, 1) for backoff jitter.
pub(super) fn decide(
    held: Held,
    result: &Result<Outcome, RefreshError>,
    fresh: Option<Lifetime>,
    now: i64,
    random: f64,
) -> Decision {
    let lifetime = fresh.or(held.lifetime);
    let token_life =
        lifetime.and_then(|l| l.expires_in()).map_or(ASSUMED_LIFETIME, |s| Duration::from_secs(s.unsigned_abs()));
    let expires_at_ms = lifetime.and_then(|l| l.expires_at()).map(|t| t * 1000);
    let backoff = |failures: u32, provider_wait: Option<Duration>| {
        schedule::retry_at_ms(now, failures, token_life, expires_at_ms, provider_wait, random)
    };
    let until = |wait: Duration| now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
    let healthy = |state: &TokenState, pause_until, event| Decision {
        failures: 0,
        retry_at: None,
        lifetime: Some(state.lifetime()),
        pause_until,
        counted_as: Some(metrics::RefreshResult::Success),
        event,
        recovered: held.failures > 0,
    };
    match result {
        Ok(Outcome::Refreshed { state, rate_limited_for }) => {
            healthy(state, rate_limited_for.map(until), Some(Event::Refreshed))
        }
        Ok(Outcome::AlreadyRefreshed(state)) => healthy(state, None, None),
        Ok(Outcome::Failed { failure, needs_reauth: true }) => Decision {
            failures: held.failures,
            retry_at: None,
            lifetime,
            pause_until: None,
            counted_as: Some(counted_as(failure)),
            event: Some(Event::NeedsReauth),
            recovered: false,
        },
        Ok(Outcome::Failed { failure, needs_reauth: false }) => {
            let provider_wait = match failure {
                Failure::Transient { retry_after, .. } => *retry_after,
                _ => None,
            };
            let failures = held.failures + 1;
            Decision {
                failures,
                retry_at: Some(backoff(failures, provider_wait)),
                lifetime,
                pause_until: provider_wait.map(until),
                counted_as: Some(counted_as(failure)),
                event: Some(Event::Failed),
                recovered: false,
            }
        }
        Ok(Outcome::Skipped { state, .. }) => Decision {
            failures: held.failures,
            retry_at: None,
            lifetime: state.as_ref().map(TokenState::lifetime),
            pause_until: None,
            counted_as: None,
            event: None,
            recovered: false,
        },
        // Another process holds the lease, or ours ran out before the request left: nothing was
        // attempted; look again soon — and right after a lease ends, so that a holder that died
        // or stopped on another machine is replaced within its lease.
        Err(busy @ (RefreshError::Busy { .. } | RefreshError::LeaseRanOut { .. })) => Decision {
            failures: held.failures,
            // The holder already committed (a fleet node, `tokend refresh`): the new token is
            // planned like any other. Looking again in 2 s would spend it at once.
            retry_at: if fresh.is_some_and(|f| Some(f.generation) != held.lifetime.map(|l| l.generation)) {
                None
            } else {
                let lease_left_ms = match busy {
                    RefreshError::Busy { lease_left_ms, .. } => *lease_left_ms,
                    _ => 0,
                };
                Some(now + LEASE_BUSY_RETRY_MS.min(lease_left_ms.max(0) + LEASE_END_SLACK_MS))
            },
            lifetime,
            pause_until: None,
            counted_as: None,
            event: None,
            recovered: false,
        },
        // The token is kept in memory and its commit retried — never another refresh with the
        // revoked refresh token.
        Err(RefreshError::CommitFailed { .. }) => {
            let failures = held.failures + 1;
            Decision {
                failures,
                retry_at: Some(schedule::retry_at_ms(now, failures, COMMIT_RETRY_BASE, None, None, random)),
                lifetime,
                pause_until: None,
                counted_as: Some(metrics::RefreshResult::Error),
                event: None,
                recovered: false,
            }
        }
        Err(RefreshError::Store(_) | RefreshError::TaskDied { .. }) => {
            let failures = held.failures + 1;
            Decision {
                failures,
                retry_at: Some(backoff(failures, None)),
                lifetime,
                pause_until: None,
                counted_as: Some(metrics::RefreshResult::Error),
                event: None,
                recovered: false,
            }
        }
    }
}

fn counted_as(failure: &Failure) -> metrics::RefreshResult {
    match failure {
        Failure::Transient { .. } => metrics::RefreshResult::Transient,
        Failure::Rejected { .. } => metrics::RefreshResult::Rejected,
        Failure::Permanent { .. } => metrics::RefreshResult::Permanent,
    }
}

/// The message a panicking task left, for the log.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(e) => e.to_string(),
    }
}

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
        let Some((name, provider)) = self.admission.running.remove(&id) else { return };
        if let Some(n) = self.admission.in_flight_by_provider.get_mut(&provider) {
            *n = n.saturating_sub(1);
        }
        let result = match outcome {
            Ok((_, result)) => result,
            Err(e) => Err(RefreshError::TaskDied { name: name.to_string(), message: panic_message(e) }),
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
        let held = Held { failures: entry.failures, lifetime: entry.lifetime };
        let decision =
            decide(held, &result, fresh_state.as_ref().map(TokenState::lifetime), now, rand::random::<f64>());
        entry.failures = decision.failures;
        entry.retry_at = decision.retry_at.into();
        entry.lifetime = decision.lifetime;
        if let Some(kind) = decision.counted_as {
            entry.results[kind.index()] += 1;
        }
        let credential = entry.credential.clone();
        if let Some(until) = decision.pause_until {
            let scope = credential.endpoint.rate_limit.as_str();
            match decision.lifetime.and_then(|l| l.expires_at()).filter(|t| *t * 1000 < until) {
                Some(expires_at) => {
                    tracing::error!(credential = %name, until = %rfc3339(until / 1000), expires_at = %rfc3339(expires_at), rate_limit = scope, "rate limited past the access token's expiry: it will expire then unless the last attempt before it succeeds")
                }
                None => {
                    tracing::warn!(credential = %name, until = %rfc3339(until / 1000), rate_limit = scope, "rate limited: no requests until then for this {scope}")
                }
            }
            pause(&mut self.admission.paused_until, &credential, now, until);
        }
        self.answer_waiters(&name, &result);
        let result_was_skipped = matches!(result, Ok(Outcome::Skipped { .. }));
        if decision.recovered {
            self.recovered(&name);
        }
        if decision.event == Some(Event::NeedsReauth) {
            self.notices.count(&name, metrics::Notice::NeedsReauth);
        }
        match result {
            Ok(Outcome::Refreshed { state, .. }) => hooks::spawn(&credential, Event::Refreshed, Some(&state), None),
            Ok(Outcome::AlreadyRefreshed(state)) => {
                tracing::info!(credential = %name, generation = state.generation, "refreshed by another process meanwhile");
                self.snapshot.forget(&name);
                self.write_sinks_queued(vec![(credential.clone(), state)]);
            }
            Ok(Outcome::Failed { failure, .. }) => {
                if let Some(at) = decision.retry_at {
                    tracing::info!(credential = %name, failures = decision.failures, retry_in_ms = at - now, "will retry");
                }
                if let Some(event) = decision.event {
                    hooks::spawn(&credential, event, fresh_state.as_ref(), Some(failure.reason()));
                }
            }
            Ok(Outcome::Skipped { reason, .. }) => {
                tracing::info!(credential = %name, "not refreshed: {}", reason.text());
            }
            Err(RefreshError::CommitFailed { token, rescue, .. }) => {
                // Already logged loudly by `refresh`.
                if let Some(entry) = self.entries.get_mut(&name) {
                    entry.pending = Some(Box::new((*token, rescue)));
                }
            }
            Err(RefreshError::Busy { .. } | RefreshError::LeaseRanOut { .. }) => {}
            Err(e) => tracing::error!(credential = %name, "{e}"),
        }
        // A busy lease or a failure re-read the store. If another holder (another fleet node,
        // `tokend refresh`) committed meanwhile, the sinks take its token now: the lifetime just
        // picked up would otherwise hide the change until the next one.
        if let Some(state) =
            fresh_state.filter(|s| !s.status.is_dead() && held.lifetime.map(|l| l.generation) != Some(s.generation))
        {
            self.write_sinks_queued(vec![(credential, state)]);
        }
        if self.watches.dirty_sinks.contains(&name) {
            self.due.fs.get_or_insert(Instant::now() + FS_DEBOUNCE);
        }

        self.plan(&name);
        if decision.counted_as == Some(metrics::RefreshResult::Success)
            && let Some(entry) = self.entries.get(&name)
            && self.queue.get(&name, Job::Refresh).is_some_and(|at| at < now + MIN_GAP_AFTER_REFRESH_MS)
        {
            // The new token's refresh point is already (nearly) past: a lifetime shorter than
            // `refresh_at`, or a `created_at` floored to the second. Refreshing at once would loop.
            self.queue.schedule(&entry.credential.name, Job::Refresh, now + MIN_GAP_AFTER_REFRESH_MS);
        }
        if result_was_skipped
            && self.queue.get(&name, Job::Refresh).is_some_and(|at| at < now + MIN_GAP_AFTER_REFRESH_MS)
        {
            // Nothing could be sent (no token, dead, nothing to renew with) and nothing changes
            // that by waiting: an import or a reload plans it again.
            self.queue.cancel(&name, Job::Refresh);
        }
        if self.entries.get(&name).is_some_and(|e| e.retry_at.get().is_some_and(|r| r <= now)) {
            self.start_refresh(&name, inflight);
        }
        self.start_waiting(inflight);
    }

    /// A credential that was failing, rate-limited or dead is healthy again: said once, to the
    /// log, the alerting hook and the metrics.
    pub(super) fn recovered(&mut self, name: &str) {
        let Some(entry) = self.entries.get(name) else { return };
        let credential = entry.credential.clone();
        self.notices.count(&credential.name, metrics::Notice::Recovered);
        let state = self.store().get(name).ok().flatten();
        tracing::info!(credential = name, "recovered: healthy again");
        hooks::spawn(&credential, Event::Recovered, state.as_ref(), None);
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
                self.snapshot.forget(name);
                sink::write_all(&entry.credential, &state);
                entry.lifetime = Some(state.lifetime());
                entry.failures = 0;
                entry.retry_at = None.into();
            }
            // Fleet: the generation moved on while the store was unreachable; the answer is kept
            // by the store (and the rescue file), and the newer stored token is what the sinks get.
            Err(e @ StoreError::Superseded { .. }) => {
                tracing::error!(credential = name, rescue = %rescue, "{e}");
                entry.failures = 0;
                entry.retry_at = None.into();
                entry.lifetime = self
                    .store
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(name)
                    .ok()
                    .flatten()
                    .map(|s| s.lifetime());
                self.sync_sinks(name);
            }
            Err(e) => {
                entry.failures += 1;
                let at =
                    schedule::retry_at_ms(now, entry.failures, COMMIT_RETRY_BASE, None, None, rand::random::<f64>());
                tracing::error!(credential = name, rescue = %rescue, retry_in_ms = at - now, "rescued token still cannot be stored: {e}");
                entry.pending = Some(Box::new((token, rescue)));
                entry.retry_at = Some(at).into();
            }
        }
        self.plan(name);
        self.publish_soon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::Secret;
    use crate::refresh::SkipReason;
    use crate::store::NewToken;

    const NOW: i64 = 1_700_000_000_000;

    fn state(generation: i64, expires_in: i64) -> TokenState {
        let created_at = NOW / 1000;
        TokenState {
            name: "c".into(),
            provider: "oauth2".into(),
            access_token: Secret::new("at"),
            refresh_token: Some(Secret::new("rt")),
            token_type: "Bearer".into(),
            scope: None,
            expires_in: Some(expires_in),
            created_at,
            expires_at: Some(created_at + expires_in),
            generation,
            status: Status::Active,
            last_error: None,
            last_refresh_at: Some(created_at),
            attempts_in_flight: 0,
            extra: None,
            refresh_token_expires_at: None,
            refresh_token_issued_at: None,
            dead_since: None,
        }
    }

    fn held(failures: u32) -> Held {
        Held { failures, lifetime: Some(state(3, 3600).lifetime()) }
    }

    #[allow(clippy::result_large_err, reason = "the type refresh() itself returns")]
    fn failed(failure: Failure, needs_reauth: bool) -> Result<Outcome, RefreshError> {
        Ok(Outcome::Failed { failure, needs_reauth })
    }

    #[test]
    fn a_refresh_resets_failures_and_may_pause_the_endpoint() {
        let fresh = state(4, 3600);
        let done = Ok(Outcome::Refreshed { state: fresh.clone(), rate_limited_for: Some(Duration::from_secs(60)) });
        let d = decide(held(3), &done, None, NOW, 0.5);
        assert_eq!(d.failures, 0);
        assert_eq!(d.retry_at, None);
        assert_eq!(d.lifetime, Some(fresh.lifetime()));
        assert_eq!(d.pause_until, Some(NOW + 60_000));
        assert_eq!(d.counted_as, Some(metrics::RefreshResult::Success));
        assert_eq!(d.event, Some(Event::Refreshed));
        assert!(d.recovered, "healthy after 3 failures");

        let d = decide(held(2), &Ok(Outcome::AlreadyRefreshed(fresh.clone())), None, NOW, 0.5);
        assert_eq!((d.failures, d.retry_at, d.event), (0, None, None));
        assert_eq!(d.counted_as, Some(metrics::RefreshResult::Success));
        assert!(d.recovered);

        let done = Ok(Outcome::Refreshed { state: fresh, rate_limited_for: None });
        assert!(!decide(held(0), &done, None, NOW, 0.5).recovered, "nothing to recover from");
    }

    #[test]
    fn transient_failures_back_off_and_honour_the_providers_wait() {
        let down = failed(Failure::Transient { reason: "HTTP 503".into(), retry_after: None }, false);
        let first = decide(held(0), &down, None, NOW, 0.5);
        let second = decide(held(1), &down, None, NOW, 0.5);
        assert_eq!((first.failures, second.failures), (1, 2));
        assert!(first.retry_at.unwrap() > NOW && second.retry_at.unwrap() > first.retry_at.unwrap());
        assert_eq!(first.counted_as, Some(metrics::RefreshResult::Transient));
        assert_eq!(first.event, Some(Event::Failed));
        assert_eq!(first.pause_until, None);

        let told =
            failed(Failure::Transient { reason: "429".into(), retry_after: Some(Duration::from_secs(120)) }, false);
        let d = decide(held(0), &told, None, NOW, 0.5);
        assert_eq!(d.pause_until, Some(NOW + 120_000));
        assert_eq!(d.retry_at, Some(NOW + 120_000));
    }

    #[test]
    fn rejected_answers_are_retried_and_dead_grants_are_not() {
        let garbage = failed(Failure::Rejected { reason: "not JSON".into() }, false);
        let d = decide(held(0), &garbage, None, NOW, 0.5);
        assert_eq!((d.failures, d.counted_as), (1, Some(metrics::RefreshResult::Rejected)));
        assert!(d.retry_at.is_some());

        let mut dead = state(3, 3600).lifetime();
        dead.status = Status::NeedsReauth;
        let revoked = failed(Failure::Permanent { reason: "invalid_grant".into() }, true);
        let d = decide(held(0), &revoked, Some(dead), NOW, 0.5);
        assert_eq!(d.retry_at, None, "never sent again until a human re-authorizes");
        assert_eq!(d.lifetime, Some(dead), "the store's status is held");
        assert_eq!((d.counted_as, d.event), (Some(metrics::RefreshResult::Permanent), Some(Event::NeedsReauth)));

        // invalid_grant explained by a rotation elsewhere: an ordinary retry.
        let elsewhere = failed(Failure::Permanent { reason: "invalid_grant".into() }, false);
        let d = decide(held(0), &elsewhere, None, NOW, 0.5);
        assert!(d.retry_at.is_some());
        assert_eq!(d.event, Some(Event::Failed));
    }

    #[test]
    fn skipped_and_busy_are_not_counted() {
        let skipped = Ok(Outcome::Skipped { reason: SkipReason::NoToken, state: None });
        let d = decide(held(1), &skipped, None, NOW, 0.5);
        assert_eq!((d.retry_at, d.lifetime, d.counted_as, d.event), (None, None, None, None));
        let busy = Err(RefreshError::Busy { name: "c".into(), pid: 7, lease_left_ms: 30_000 });
        let d = decide(held(1), &busy, None, NOW, 0.5);
        assert_eq!((d.failures, d.retry_at, d.counted_as), (1, Some(NOW + LEASE_BUSY_RETRY_MS), None));
    }

    #[test]
    fn a_lease_about_to_end_is_looked_at_right_after_its_end() {
        let ending = Err(RefreshError::Busy { name: "c".into(), pid: 7, lease_left_ms: 700 });
        let d = decide(held(0), &ending, None, NOW, 0.5);
        assert_eq!(d.retry_at, Some(NOW + 700 + LEASE_END_SLACK_MS));
        let ran_out = Err(RefreshError::LeaseRanOut { name: "c".into(), waited_ms: 31_000 });
        let d = decide(held(0), &ran_out, None, NOW, 0.5);
        assert_eq!((d.retry_at, d.counted_as), (Some(NOW + LEASE_END_SLACK_MS), None));
    }

    #[test]
    fn a_busy_lease_whose_holder_already_committed_plans_the_new_token() {
        let busy = Err(RefreshError::Busy { name: "c".into(), pid: 7, lease_left_ms: 30_000 });
        // Still the generation we meant to refresh: look again soon.
        let d = decide(held(0), &busy, Some(state(3, 3600).lifetime()), NOW, 0.5);
        assert_eq!(d.retry_at, Some(NOW + LEASE_BUSY_RETRY_MS));
        // The holder (another fleet node) committed generation 4: no retry that would spend it.
        let newer = state(4, 3600).lifetime();
        let d = decide(held(0), &busy, Some(newer), NOW, 0.5);
        assert_eq!((d.retry_at, d.lifetime), (None, Some(newer)));
    }

    #[test]
    fn a_dead_task_or_a_failed_commit_is_an_error_with_backoff() {
        let died = Err(RefreshError::TaskDied { name: "c".into(), message: "boom".into() });
        let first = decide(held(0), &died, None, NOW, 0.5);
        let third = decide(held(2), &died, None, NOW, 0.5);
        assert_eq!(first.counted_as, Some(metrics::RefreshResult::Error));
        assert_eq!(first.failures, 1);
        assert!(first.retry_at.unwrap() - NOW >= 4_000, "backs off (not the 2 s lease poll): {:?}", first.retry_at);
        assert!(third.retry_at.unwrap() > first.retry_at.unwrap());

        let token = NewToken {
            access_token: Secret::new("a"),
            refresh_token: None,
            token_type: "Bearer".into(),
            scope: None,
            expires_in: Some(60),
            created_at: NOW / 1000,
            extra: None,
            refresh_token_expires_at: None,
        };
        let source = StoreError::Other { path: "db".into(), message: "disk full".into() };
        let lost =
            Err(RefreshError::CommitFailed { name: "c".into(), source, rescue: "r".into(), token: Box::new(token) });
        let d = decide(held(0), &lost, None, NOW, 0.5);
        assert_eq!((d.failures, d.counted_as), (1, Some(metrics::RefreshResult::Error)));
        assert!(d.retry_at.unwrap() > NOW);
    }
}
