//! Prometheus text-format metrics for node_exporter's textfile collector: one file, rewritten
//! atomically (never read half-written), no HTTP listener to harden.

use std::collections::BTreeMap;
use std::fmt::Write;

/// How a refresh ended, as counted in `tokend_refresh_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshResult {
    /// A new token was committed (or another process had just committed one).
    Success,
    /// Connect error, timeout, 5xx, 429: retried.
    Transient,
    /// An answer tokend will not store: retried.
    Rejected,
    /// The grant or client is dead: needs re-authorization.
    Permanent,
    /// tokend's own side failed: the store, the commit, or the refresh task itself.
    Error,
}

impl RefreshResult {
    pub const ALL: [RefreshResult; 5] = [Self::Success, Self::Transient, Self::Rejected, Self::Permanent, Self::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Transient => "transient",
            Self::Rejected => "rejected",
            Self::Permanent => "permanent",
            Self::Error => "error",
        }
    }

    /// Its position in [`Self::ALL`] and in a [`CredentialMetrics::refreshes`] array.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The events for humans counted in `tokend_credential_events_total{event}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    NeedsReauth,
    ReauthSoon,
    Recovered,
}

pub const NOTICES: [Notice; 3] = [Notice::NeedsReauth, Notice::ReauthSoon, Notice::Recovered];

impl Notice {
    pub fn as_str(self) -> &'static str {
        match self {
            Notice::NeedsReauth => "needs_reauth",
            Notice::ReauthSoon => "reauth_soon",
            Notice::Recovered => "recovered",
        }
    }
}

/// What the metrics file says about one credential.
#[derive(Debug, Clone, Default)]
pub struct CredentialMetrics {
    pub provider: String,
    pub expires_at: Option<i64>,
    pub needs_reauth: bool,
    pub last_refresh_at: Option<i64>,
    /// Counts by [`RefreshResult::ALL`] (same order) since the daemon started.
    pub refreshes: [u64; RefreshResult::ALL.len()],
    /// When a human must authorize again at the latest, where known (unix seconds).
    pub reauth_deadline: Option<i64>,
    /// Events for humans by [`NOTICES`] (same order) since the daemon started.
    pub notices: [u64; NOTICES.len()],
}

/// The textfile for `credentials`; `sinks_replaced` counts entries others planted at sink paths
/// (links, FIFOs, foreign files) that sink writes replaced since the daemon started.
pub fn render(credentials: &BTreeMap<String, CredentialMetrics>, sinks_replaced: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP tokend_sink_replaced_total Entries someone else put at a sink path (links, FIFOs, foreign files), replaced by tokend.\n# TYPE tokend_sink_replaced_total counter\ntokend_sink_replaced_total {sinks_replaced}"
    );
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let label = |name: &str, m: &CredentialMetrics| format!("credential=\"{name}\",provider=\"{}\"", m.provider);
    family(
        "tokend_token_expires_at_seconds",
        "gauge",
        "Unix time the current access token expires (absent when it never expires).",
        credentials.iter().filter_map(|(n, m)| m.expires_at.map(|t| (label(n, m), t.to_string()))).collect(),
    );
    family(
        "tokend_credential_needs_reauth",
        "gauge",
        "1 when the provider rejected the grant and a human must authorize again.",
        credentials.iter().map(|(n, m)| (label(n, m), u8::from(m.needs_reauth).to_string())).collect(),
    );
    family(
        "tokend_credential_reauth_deadline_seconds",
        "gauge",
        "Unix time by which a human must authorize again (refresh token or consent lifetime; absent when unknown).",
        credentials.iter().filter_map(|(n, m)| m.reauth_deadline.map(|t| (label(n, m), t.to_string()))).collect(),
    );
    family(
        "tokend_credential_events_total",
        "counter",
        "Events for humans since the daemon started: needs_reauth (and its reminders), reauth_soon, recovered (credentials that had none are left out).",
        credentials
            .iter()
            // Most credentials never need a human: 100,000 × 3 rows of zeros say nothing.
            .filter(|(_, m)| m.notices.iter().any(|c| *c > 0))
            .flat_map(|(n, m)| {
                NOTICES
                    .iter()
                    .zip(m.notices)
                    .map(move |(e, count)| (format!("{},event=\"{}\"", label(n, m), e.as_str()), count.to_string()))
            })
            .collect(),
    );
    family(
        "tokend_last_refresh_timestamp_seconds",
        "gauge",
        "Unix time of the last successful refresh.",
        credentials.iter().filter_map(|(n, m)| m.last_refresh_at.map(|t| (label(n, m), t.to_string()))).collect(),
    );
    family(
        "tokend_refresh_total",
        "counter",
        "Refresh attempts since the daemon started, by result.",
        credentials
            .iter()
            .flat_map(|(n, m)| {
                RefreshResult::ALL
                    .iter()
                    .zip(m.refreshes)
                    .map(move |(r, count)| (format!("{},result=\"{}\"", label(n, m), r.as_str()), count.to_string()))
            })
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let mut m = CredentialMetrics { provider: "nudge".into(), expires_at: Some(1700000000), ..Default::default() };
        m.refreshes[0] = 3;
        m.reauth_deadline = Some(1_800_000_000);
        m.notices[2] = 1;
        let text = render(&BTreeMap::from([("n1".to_string(), m)]), 2);
        assert!(text.contains("\ntokend_sink_replaced_total 2\n"));
        assert!(text.contains("# TYPE tokend_refresh_total counter\n"));
        assert!(text.contains("tokend_token_expires_at_seconds{credential=\"n1\",provider=\"nudge\"} 1700000000\n"));
        assert!(text.contains("tokend_refresh_total{credential=\"n1\",provider=\"nudge\",result=\"success\"} 3\n"));
        assert!(text.contains("tokend_refresh_total{credential=\"n1\",provider=\"nudge\",result=\"permanent\"} 0\n"));
        assert!(text.contains("tokend_credential_needs_reauth{credential=\"n1\",provider=\"nudge\"} 0\n"));
        assert!(!text.contains("tokend_last_refresh_timestamp_seconds{"), "no sample without a refresh");
        assert!(
            text.contains(
                "tokend_credential_reauth_deadline_seconds{credential=\"n1\",provider=\"nudge\"} 1800000000\n"
            )
        );
        assert!(
            text.contains(
                "tokend_credential_events_total{credential=\"n1\",provider=\"nudge\",event=\"recovered\"} 1\n"
            )
        );
    }
}
