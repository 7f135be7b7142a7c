//! Wall-clock helpers. Token lifetimes are wall-clock facts (a provider's `created_at` is a unix
//! timestamp), so everything persisted is unix time; monotonic time is only used for sleeping.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch; a clock before 1970 reads as 0 rather than panicking.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Seconds since the unix epoch.
pub fn now_secs() -> i64 {
    now_ms().div_euclid(1000)
}

/// RFC 3339 (UTC, whole seconds) for a unix timestamp in seconds, as written into sinks and `list`.
pub fn rfc3339(unix_secs: i64) -> String {
    let secs = u64::try_from(unix_secs.max(0)).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// A short human duration such as `3h12m`, `45s` or `-2m` (already past).
pub fn short_duration(secs: i64) -> String {
    let sign = if secs < 0 { "-" } else { "" };
    let s = secs.unsigned_abs();
    let (d, h, m, sec) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60, s % 60);
    let body = if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations_read_naturally() {
        assert_eq!(short_duration(45), "45s");
        assert_eq!(short_duration(125), "2m5s");
        assert_eq!(short_duration(3 * 3600 + 12 * 60), "3h12m");
        assert_eq!(short_duration(90_000), "1d1h");
        assert_eq!(short_duration(-120), "-2m0s");
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(1_632_773_996), "2021-09-27T20:19:56Z");
    }
}
