//! When is a credential due? Pure functions, no I/O, so the daemon, `tokend list` and the tests
//! all compute the same answer.
//!
//! ARCHITECTURE.md "Time": `expires_at = created_at + expires_in`; refresh when 75 % of the lifetime has
//! passed but at least 60 s before expiry, and never earlier than half the lifetime:
//! `lead = min(max(25 % of lifetime, 60 s), 50 % of lifetime)`, then ±5 % jitter on the lead.
//! The jitter is derived from the credential's name and generation rather than drawn at random,
//! so that every process agrees on the due time and a restart does not reshuffle the schedule,
//! while credentials imported together still spread out.

use sha2::{Digest, Sha256};
use std::time::Duration;

/// Share of the lifetime left when the default policy refreshes (refresh at 75 % elapsed).
const DEFAULT_LEAD_FRACTION: f64 = 0.25;
/// The default never cuts it closer than this to expiry, so a slow provider still has time.
const MIN_LEAD_SECS: f64 = 60.0;
/// …but never refreshes before half the lifetime, or 90 s tokens would be refreshed continuously.
const MAX_LEAD_FRACTION: f64 = 0.5;
/// An explicit "refresh N before expiry" is capped so that a refresh never fires in the first
/// 10 % of a token's life, whatever the configuration says.
const MAX_EXPLICIT_LEAD_FRACTION: f64 = 0.9;
/// ±5 % on the lead spreads credentials that were issued in the same second.
const JITTER_FRACTION: f64 = 0.05;
/// A provider `created_at` further than this from our send time is distrusted (clock skew).
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;
/// Backoff after transient failures: base, 2×base, 4×base … capped at 10 min, each ±20 %. The
/// base is 1/40 of the token's lifetime, between 250 ms and 5 s, so a 20 s token gets several
/// retries before it expires and a 24 h token does not hammer a struggling provider.
const BACKOFF_MAX_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MIN_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(600);
/// The last retry before expiry is placed at least this long before the token dies.
const LAST_RETRY_MARGIN_MS: i64 = 1000;
const BACKOFF_JITTER: f64 = 0.2;

/// The `refresh_at` setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefreshAt {
    /// ARCHITECTURE.md's default formula ("Time").
    Default,
    /// Refresh once this fraction of the lifetime has elapsed (`"80%"` → 0.8).
    Elapsed(f64),
    /// Refresh this long before expiry (`"10m"`).
    BeforeExpiry(Duration),
}

impl RefreshAt {
    /// Parses `"75%"` or a duration such as `"10m"`, `"90s"`, `"1h 30m"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(pct) = text.strip_suffix('%') {
            let pct: f64 = pct.trim().parse().map_err(|_| format!("\"{text}\" is not a percentage like \"75%\""))?;
            if !(10.0..=99.0).contains(&pct) {
                return Err(format!("\"{text}\": the percentage of lifetime elapsed must be between 10% and 99%"));
            }
            return Ok(RefreshAt::Elapsed(pct / 100.0));
        }
        let d = humantime::parse_duration(text).map_err(|_| {
            format!("\"{text}\" is neither a percentage (\"75%\") nor a duration before expiry (\"10m\")")
        })?;
        if d < Duration::from_secs(1) {
            return Err(format!("\"{text}\": refresh at least 1s before expiry"));
        }
        Ok(RefreshAt::BeforeExpiry(d))
    }

    /// How long before expiry to refresh a token that lives `lifetime_ms`, before jitter.
    pub fn lead_ms(self, lifetime_ms: i64) -> i64 {
        let life = lifetime_ms.max(0) as f64;
        let lead = match self {
            RefreshAt::Default => {
                (life * DEFAULT_LEAD_FRACTION).max(MIN_LEAD_SECS * 1000.0).min(life * MAX_LEAD_FRACTION)
            }
            RefreshAt::Elapsed(f) => life * (1.0 - f),
            RefreshAt::BeforeExpiry(d) => (d.as_millis() as f64).min(life * MAX_EXPLICIT_LEAD_FRACTION),
        };
        lead.round() as i64
    }
}

/// A number in [-1, 1] fixed by the credential's name and generation.
pub fn jitter_unit(name: &str, generation: i64) -> f64 {
    let digest = Sha256::new().chain_update(name.as_bytes()).chain_update(generation.to_le_bytes()).finalize();
    let n = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    f64::from(n) / f64::from(u32::MAX) * 2.0 - 1.0
}

/// When the daemon refreshes the stored token of credential `name`: `None` for a dead credential
/// or a token that never expires (unless `at_least` asks for a refresh that often, counted from
/// the last refresh or the token's issue). `tokend list` shows the same time.
pub fn next_refresh_ms(
    name: &str,
    policy: RefreshAt,
    at_least: Option<Duration>,
    lifetime: &crate::store::Lifetime,
) -> Option<i64> {
    if lifetime.status.is_dead() {
        return None;
    }
    let by_expiry = lifetime
        .expires_at()
        .map(|expires_at| due_at_ms(lifetime.created_at, expires_at, policy, jitter_unit(name, lifetime.generation)));
    let by_exercise = at_least.map(|period| {
        let last = lifetime.last_refresh_at.get().unwrap_or(lifetime.created_at).max(lifetime.created_at);
        last.saturating_mul(1000).saturating_add(i64::try_from(period.as_millis()).unwrap_or(i64::MAX / 2))
    });
    match (by_expiry, by_exercise) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When a human must authorize again at the latest (unix seconds): when the refresh token dies,
/// as the provider said or as `refresh_token_lifetime` (counted from its issue) says.
pub fn reauth_deadline(lifetime: &crate::store::Lifetime, refresh_token_lifetime: Option<Duration>) -> Option<i64> {
    lifetime.refresh_token_expires_at.get().or_else(|| {
        let issued = lifetime.refresh_token_issued_at.get()?;
        Some(issued.saturating_add(i64::try_from(refresh_token_lifetime?.as_secs()).unwrap_or(i64::MAX / 2)))
    })
}

/// When the `reauth_soon` warning for `deadline` (s) is due, in unix ms: `warn` before it.
pub fn reauth_warning_ms(deadline: i64, warn: Duration) -> i64 {
    deadline.saturating_mul(1000).saturating_sub(i64::try_from(warn.as_millis()).unwrap_or(i64::MAX / 2))
}

/// The next `needs_reauth` reminder strictly after `now_ms` for a credential dead since
/// `dead_since` (s), repeated every `every`: on the same rhythm whenever the daemon starts.
pub fn next_reminder_ms(dead_since: i64, every: Duration, now_ms: i64) -> i64 {
    let every_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX / 2).max(1000);
    let start = dead_since.saturating_mul(1000);
    if now_ms < start {
        return start.saturating_add(every_ms);
    }
    let periods = (now_ms - start) / every_ms + 1;
    start.saturating_add(periods.saturating_mul(every_ms))
}

/// When a token issued at `created_at` (s) and expiring at `expires_at` (s) should be refreshed,
/// in unix milliseconds. `jitter` is in [-1, 1] (see [`jitter_unit`]).
pub fn due_at_ms(created_at: i64, expires_at: i64, policy: RefreshAt, jitter: f64) -> i64 {
    let lifetime_ms = (expires_at - created_at).saturating_mul(1000);
    let lead = policy.lead_ms(lifetime_ms) as f64;
    let jittered = lead * (1.0 + JITTER_FRACTION * jitter.clamp(-1.0, 1.0));
    expires_at.saturating_mul(1000) - jittered.round() as i64
}

/// The issue time tokend records: the provider's `created_at` when it is believable, else the local
/// time the request was *sent* (never when the answer arrived: that would overestimate the life).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueTime {
    pub created_at: i64,
    /// Set when the provider's value was ignored, to the skew in seconds (provider − local).
    pub distrusted_skew: Option<i64>,
}

pub fn issue_time(provider_created_at: Option<i64>, sent_at_secs: i64) -> IssueTime {
    match provider_created_at {
        Some(p) if (p - sent_at_secs).abs() <= MAX_CLOCK_SKEW_SECS => {
            IssueTime { created_at: p, distrusted_skew: None }
        }
        Some(p) => IssueTime { created_at: sent_at_secs, distrusted_skew: Some(p - sent_at_secs) },
        None => IssueTime { created_at: sent_at_secs, distrusted_skew: None },
    }
}

/// The issue time of an imported answer, obtained at some earlier moment: a past `created_at` is
/// believed (the answer may be hours old), one in the future beyond the skew allowance is not.
pub fn imported_issue_time(provider_created_at: Option<i64>, now_secs: i64) -> IssueTime {
    match provider_created_at {
        Some(p) if p - now_secs > MAX_CLOCK_SKEW_SECS => {
            IssueTime { created_at: now_secs, distrusted_skew: Some(p - now_secs) }
        }
        Some(p) => IssueTime { created_at: p, distrusted_skew: None },
        None => IssueTime { created_at: now_secs, distrusted_skew: None },
    }
}

/// Delay before retry number `attempt` (1-based) after a transient failure of a token living
/// `lifetime`; `unit_random` in [0, 1).
pub fn backoff(attempt: u32, lifetime: Duration, unit_random: f64) -> Duration {
    let base = (lifetime / 40).clamp(BACKOFF_MIN_BASE, BACKOFF_MAX_BASE);
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(BACKOFF_CAP);
    capped.mul_f64(1.0 + BACKOFF_JITTER * (unit_random * 2.0 - 1.0))
}

/// When to retry after failure number `attempt`: after the backoff, but while the token still
/// lives never later than just before its expiry (one more try is worth more than a long wait);
/// and never before `provider_wait` (Retry-After, rate-limit reset), which the provider set.
pub fn retry_at_ms(
    now_ms: i64,
    attempt: u32,
    lifetime: Duration,
    expires_at_ms: Option<i64>,
    provider_wait: Option<Duration>,
    unit_random: f64,
) -> i64 {
    let delay = i64::try_from(backoff(attempt, lifetime, unit_random).as_millis()).unwrap_or(i64::MAX);
    let mut at = now_ms.saturating_add(delay);
    if let Some(deadline) = expires_at_ms.map(|e| e - LAST_RETRY_MARGIN_MS).filter(|d| now_ms < *d) {
        at = at.min(deadline);
    }
    if let Some(wait) = provider_wait {
        let told = now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
        // A wait that outlasts the token still leaves one last attempt shortly before it expires.
        at = match expires_at_ms.map(|e| e - LAST_CHANCE_BEFORE_EXPIRY_MS) {
            Some(last_chance) if told > last_chance => at.max(last_chance),
            _ => at.max(told),
        };
    }
    at
}

/// A credential told to wait past its token's expiry (429, rate-limit reset) still gets one
/// attempt this long before the token expires: the provider's wait may be a generous estimate,
/// and a dead token costs a human.
pub const LAST_CHANCE_BEFORE_EXPIRY_MS: i64 = 30_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Lifetime, Status};

    const DAY: i64 = 86_400;

    fn lifetime(created_at: i64, expires_at: Option<i64>) -> Lifetime {
        Lifetime {
            generation: 1,
            created_at,
            expires: expires_at.into(),
            status: Status::Active,
            last_refresh_at: None.into(),
            refresh_token_expires_at: None.into(),
            refresh_token_issued_at: Some(created_at).into(),
            dead_since: None.into(),
        }
    }

    #[test]
    fn refresh_at_least_exercises_tokens_without_expiry() {
        let never = lifetime(1_000_000, None);
        let week = Some(Duration::from_secs(7 * DAY as u64));
        assert_eq!(next_refresh_ms("c", RefreshAt::Default, None, &never), None);
        assert_eq!(next_refresh_ms("c", RefreshAt::Default, week, &never), Some((1_000_000 + 7 * DAY) * 1000));
        // Counted from the last refresh when there was one.
        let refreshed = Lifetime { last_refresh_at: Some(1_000_500).into(), ..never };
        assert_eq!(next_refresh_ms("c", RefreshAt::Default, week, &refreshed), Some((1_000_500 + 7 * DAY) * 1000));
        // A token that expires sooner is refreshed by its expiry, as before.
        let hourly = lifetime(1_000_000, Some(1_003_600));
        let by_expiry = next_refresh_ms("c", RefreshAt::Default, None, &hourly).unwrap();
        assert_eq!(next_refresh_ms("c", RefreshAt::Default, week, &hourly), Some(by_expiry));
        let dead = Lifetime { status: Status::NeedsReauth, ..never };
        assert_eq!(next_refresh_ms("c", RefreshAt::Default, week, &dead), None);
    }

    #[test]
    fn reauth_deadline_from_the_answer_or_the_configured_lifetime() {
        let l = lifetime(1_000_000, Some(1_003_600));
        let ninety = Some(Duration::from_secs(90 * DAY as u64));
        assert_eq!(reauth_deadline(&l, None), None);
        assert_eq!(reauth_deadline(&l, ninety), Some(1_000_000 + 90 * DAY));
        let told = Lifetime { refresh_token_expires_at: Some(1_500_000).into(), ..l };
        assert_eq!(reauth_deadline(&told, ninety), Some(1_500_000), "the provider's word wins");
        assert_eq!(reauth_warning_ms(1_500_000, Duration::from_secs(7 * DAY as u64)), (1_500_000 - 7 * DAY) * 1000);
    }

    #[test]
    fn needs_reauth_reminders_keep_their_rhythm() {
        let day = Duration::from_secs(DAY as u64);
        let since = 1_000_000;
        assert_eq!(next_reminder_ms(since, day, since * 1000), (since + DAY) * 1000);
        assert_eq!(next_reminder_ms(since, day, (since + DAY) * 1000), (since + 2 * DAY) * 1000);
        assert_eq!(next_reminder_ms(since, day, (since + DAY) * 1000 + 1), (since + 2 * DAY) * 1000);
        // A restart three and a half days later resumes on the same rhythm.
        assert_eq!(next_reminder_ms(since, day, (since + 3 * DAY + DAY / 2) * 1000), (since + 4 * DAY) * 1000);
    }

    fn due_in_secs(lifetime: i64, policy: RefreshAt) -> f64 {
        let created = 1_000_000;
        (due_at_ms(created, created + lifetime, policy, 0.0) - created * 1000) as f64 / 1000.0
    }

    #[test]
    fn a_provider_wait_past_expiry_leaves_one_last_attempt() {
        let now = 1_000_000_000;
        let expires = now + 600_000;
        let hour = Some(Duration::from_secs(3600));
        let at = retry_at_ms(now, 1, Duration::from_secs(1800), Some(expires), hour, 0.5);
        assert_eq!(at, expires - LAST_CHANCE_BEFORE_EXPIRY_MS);
        // A wait that ends before the last chance is honoured as told.
        let short = Some(Duration::from_secs(60));
        assert_eq!(retry_at_ms(now, 1, Duration::from_secs(1800), Some(expires), short, 0.5), now + 60_000);
        // Already inside the last chance window: backoff only, never an hour.
        let late = retry_at_ms(expires - 5_000, 1, Duration::from_secs(1800), Some(expires), hour, 0.5);
        assert!(late < expires, "{late}");
    }

    #[test]
    fn default_lands_providers_where_design_says() {
        assert_eq!(due_in_secs(86_400, RefreshAt::Default), 64_800.0); // NationBuilder ~18 h
        assert_eq!(due_in_secs(3600, RefreshAt::Default), 2700.0); // Nudge ~45 min
        assert_eq!(due_in_secs(1800, RefreshAt::Default), 1350.0); // Wild Apricot ~22 min
        assert_eq!(due_in_secs(200, RefreshAt::Default), 140.0); // 60 s floor wins
        assert_eq!(due_in_secs(90, RefreshAt::Default), 45.0); // half-life cap wins
        assert_eq!(due_in_secs(20, RefreshAt::Default), 10.0); // tokend dev tokens
    }

    #[test]
    fn explicit_policies() {
        assert_eq!(RefreshAt::parse("80%").unwrap(), RefreshAt::Elapsed(0.8));
        assert_eq!(due_in_secs(3600, RefreshAt::parse("80%").unwrap()), 2880.0);
        assert_eq!(due_in_secs(3600, RefreshAt::parse("10m").unwrap()), 3000.0);
        // 10 min before expiry of a 5 min token is capped to 90 % lead: refresh at 30 s.
        assert_eq!(due_in_secs(300, RefreshAt::parse("10m").unwrap()), 30.0);
        assert!(RefreshAt::parse("5%").unwrap_err().contains("between 10% and 99%"));
        assert!(RefreshAt::parse("soon").unwrap_err().contains("neither a percentage"));
    }

    #[test]
    fn jitter_stays_within_five_percent_of_lead_and_varies() {
        let created = 0;
        let values: Vec<i64> =
            (0..200).map(|g| due_at_ms(created, 3600, RefreshAt::Default, jitter_unit("c", g))).collect();
        let lead_ms = 900_000.0;
        for v in &values {
            let lead = (3_600_000 - v) as f64;
            assert!((lead - lead_ms).abs() <= lead_ms * 0.05 + 1.0, "{lead}");
        }
        let distinct: std::collections::HashSet<_> = values.iter().collect();
        assert!(distinct.len() > 150);
        assert_eq!(jitter_unit("x", 3), jitter_unit("x", 3));
    }

    #[test]
    fn skewed_created_at_is_distrusted() {
        assert_eq!(issue_time(Some(1000), 1100), IssueTime { created_at: 1000, distrusted_skew: None });
        assert_eq!(issue_time(Some(1000), 5000), IssueTime { created_at: 5000, distrusted_skew: Some(-4000) });
        assert_eq!(issue_time(None, 5000).created_at, 5000);
        assert_eq!(imported_issue_time(Some(1000), 5000).created_at, 1000);
        assert_eq!(imported_issue_time(Some(9000), 5000), IssueTime { created_at: 5000, distrusted_skew: Some(4000) });
    }

    #[test]
    fn backoff_grows_and_caps() {
        let day = Duration::from_secs(86_400);
        assert_eq!(backoff(1, day, 0.5), Duration::from_secs(5));
        assert_eq!(backoff(3, day, 0.5), Duration::from_secs(20));
        assert_eq!(backoff(30, day, 0.5), Duration::from_secs(600));
        assert!(backoff(30, day, 0.999) <= Duration::from_secs(720));
        assert!(backoff(1, day, 0.0) >= Duration::from_secs(4));
        // 20 s tokens start at 500 ms.
        assert_eq!(backoff(1, Duration::from_secs(20), 0.5), Duration::from_millis(500));
    }

    #[test]
    fn retries_stay_before_expiry_unless_the_provider_says_wait() {
        let life = Duration::from_secs(86_400);
        // 10th failure: backoff 600 s, but the token dies in 100 s → retry at 99 s.
        assert_eq!(retry_at_ms(0, 10, life, Some(100_000), None, 0.5), 99_000);
        // Already expired: plain backoff.
        assert_eq!(retry_at_ms(200_000, 1, life, Some(100_000), None, 0.5), 205_000);
        // Retry-After wins over the backoff while the token outlives it...
        assert_eq!(retry_at_ms(0, 1, life, Some(600_000), Some(Duration::from_secs(120)), 0.5), 120_000);
        // ...but not past expiry: the token dies in 3 s, so it is tried once more 1 s before.
        assert_eq!(retry_at_ms(0, 1, life, Some(3_000), Some(Duration::from_secs(120)), 0.5), 2_000);
    }
}
