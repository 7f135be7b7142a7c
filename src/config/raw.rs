//! The configuration file as written: serde structures that accept exactly the documented keys
//! (unknown keys are errors), and the parse — large files in pieces on every core.

use super::{ConfigError, ConfigProblem};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) daemon: RawDaemon,
    #[serde(default)]
    pub(super) provider: BTreeMap<String, RawProviderDefaults>,
    #[serde(default)]
    pub(super) credential: Vec<RawCredential>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) database: Option<PathBuf>,
    pub(super) concurrency: Option<i64>,
    pub(super) connect_timeout: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) lease_margin: Option<String>,
    pub(super) max_answer_bytes: Option<i64>,
    pub(super) metrics_file: Option<PathBuf>,
    pub(super) trigger_dir: Option<PathBuf>,
    pub(super) proxy: Option<String>,
    // The local socket API (src/socket/).
    pub(super) socket: Option<PathBuf>,
    pub(super) credential_socket: Option<PathBuf>,
    // Encryption at rest (src/seal.rs): at most one of these.
    pub(super) key_credential: Option<String>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) key_env: Option<String>,
    // Fleet (a PostgreSQL `database`): its password, and where this node keeps its local files.
    pub(super) database_password: Option<String>,
    pub(super) database_password_file: Option<PathBuf>,
    pub(super) database_password_env: Option<String>,
    pub(super) database_password_credential: Option<String>,
    pub(super) state_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProviderDefaults {
    pub(super) refresh_at: Option<String>,
    pub(super) concurrency: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) name: Option<String>,
    pub(super) provider: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) client_secret_env: Option<String>,
    pub(super) client_secret_credential: Option<String>,
    pub(super) api_key: Option<String>,
    pub(super) api_key_file: Option<PathBuf>,
    pub(super) api_key_env: Option<String>,
    pub(super) api_key_credential: Option<String>,
    pub(super) slug: Option<String>,
    pub(super) base_url: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) auth: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) refresh_at: Option<String>,
    pub(super) refresh_cron: Option<String>,
    pub(super) redirect_uri: Option<String>,
    pub(super) authorize_url: Option<String>,
    pub(super) pkce: Option<bool>,
    pub(super) site: Option<String>,
    pub(super) revocation_url: Option<String>,
    pub(super) on_refresh: Option<Vec<String>>,
    pub(super) on_failure: Option<Vec<String>>,
    pub(super) hook_timeout: Option<String>,
    pub(super) hook_token: Option<bool>,
    pub(super) hook_env: Option<Vec<String>>,
    // The local socket API (src/socket/).
    pub(super) readers: Option<Vec<String>>,
    pub(super) units: Option<Vec<String>>,
    pub(super) credential_format: Option<String>,
    /// Answer fields to keep and hand to scripts (besides the provider's own).
    pub(super) extra_fields: Option<Vec<String>>,
    /// "credential" | "client" | "provider": what one rate-limit answer pauses.
    pub(super) rate_limit: Option<String>,
    /// How long a refresh token lives when the answers do not say.
    pub(super) refresh_token_lifetime: Option<String>,
    /// Warn this long before re-authorization will be needed.
    pub(super) reauth_warn: Option<String>,
    /// Refresh at least this often, even when the access token has no expiry.
    pub(super) refresh_at_least: Option<String>,
    /// Repeat the `needs_reauth` event this often until a human re-authorizes ("off" to not).
    pub(super) reauth_repeat: Option<String>,
    #[serde(default)]
    pub(super) sink: Vec<RawSink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    pub(super) path: Option<PathBuf>,
    pub(super) format: Option<String>,
    pub(super) mode: Option<RawMode>,
    pub(super) group: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawMode {
    Int(i64),
    Text(String),
}

const CREDENTIALS_PER_PIECE: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredentialsOnly {
    pub(super) credential: Vec<RawCredential>,
}

/// A configuration with 100,000 credentials is 15 MB of TOML, and parsing it was most of
/// start-up: it is cut before `[[credential]]` headers into pieces parsed on every core. Only a
/// file where that cut cannot change the meaning is cut (no multi-line strings, no other way of
/// writing `credential`, nothing but credentials after the first piece), and any problem in any
/// piece returns `None`: the whole file is then parsed in one go, so errors and their line
/// numbers are exactly those of a plain parse.
pub(super) fn parse_in_parallel(text: &str) -> Option<RawConfig> {
    const HEADER: &str = "[[credential]]";
    if text.len() < 1 << 20 || text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut cuts = vec![0];
    let mut credentials = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("credential")
            || trimmed.starts_with("\"credential")
            || trimmed.starts_with("'credential")
        {
            return None;
        }
        if line.starts_with(HEADER) && line[HEADER.len()..].trim_start().chars().next().is_none_or(|c| c == '#') {
            if credentials > 0 && credentials % CREDENTIALS_PER_PIECE == 0 {
                cuts.push(offset);
            }
            credentials += 1;
        }
        offset += line.len();
    }
    cuts.push(text.len());
    let pieces: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let workers = std::thread::available_parallelism().map_or(1, usize::from).min(pieces.len());
    let (first, rest) = pieces.split_first()?;
    // The first piece (with `[daemon]` and the providers) is parsed on this thread meanwhile.
    let per_worker = rest.len().div_ceil(workers).max(1);
    let (head, tails) = std::thread::scope(|scope| {
        let tails: Vec<_> = rest
            .chunks(per_worker)
            .map(|group| {
                std::thread::Builder::new().spawn_scoped(scope, move || {
                    let mut credentials = Vec::new();
                    for piece in group {
                        credentials.extend(toml::from_str::<RawCredentialsOnly>(piece).ok()?.credential);
                    }
                    Some(credentials)
                })
            })
            .collect();
        let head = toml::from_str::<RawConfig>(first).ok();
        let tails: Vec<Option<Vec<RawCredential>>> =
            tails.into_iter().map(|t| t.ok().and_then(|t| t.join().ok().flatten())).collect();
        (head, tails)
    });
    let mut raw = head?;
    for credentials in tails {
        raw.credential.extend(credentials?);
    }
    Some(raw)
}

pub(super) fn parse_whole(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let place = match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}")
            }
            None => "syntax".to_string(),
        };
        ConfigError(vec![ConfigProblem {
            file: path.to_path_buf(),
            place,
            field: None,
            message: e.message().trim().replace('\n', " "),
        }])
    })
}
