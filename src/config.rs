//! The configuration file: TOML → typed, validated [`Config`]. Unknown keys are errors (a typo must
//! not silently disable a setting), and every problem names the file, the credential, the field
//! and what is wrong, one line each. Secrets are read here, from the file itself, a file, an
//! environment variable or a systemd credential, and carried as [`Secret`] from then on.
//!
//! Relative paths in the file are resolved against the directory of the file itself, so a config
//! works the same whatever the working directory (systemd starts services in `/`).

use crate::provider::{self, ClientAuth, Endpoint, GrantKind, ProviderKind};
use crate::redact::Secret;
use crate::schedule::RefreshAt;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// Default sink file mode: only the daemon's user may read a token.
pub const DEFAULT_SINK_MODE: u32 = 0o600;
/// RFC 8252 loopback redirect: `tokend authorize` listens here unless told otherwise.
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8976/callback";
/// A hook that takes longer is killed; refreshing never waits for hooks anyway.
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONCURRENCY: usize = 8;
/// Longest credential name; it becomes part of environment variable names and file names.
const MAX_NAME_LEN: usize = 64;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: PathBuf,
    /// `credential "nb"` / `[daemon]` / `line 3, column 7`, whatever locates the problem.
    pub place: String,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.place)?;
        if let Some(field) = &self.field {
            write!(f, ": field \"{field}\"")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found in one configuration file; `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    /// Shared with the daemon's schedule, so 100,000 credentials are held once.
    pub credentials: Vec<std::sync::Arc<Credential>>,
    /// Problems that do not stop tokend but should be fixed (secrets other users can read).
    pub warnings: Vec<String>,
    /// Secrets written into the file itself.
    pub inline_secrets: usize,
}

impl Config {
    pub fn credential(&self, name: &str) -> Option<&Credential> {
        self.credentials.iter().find(|c| &*c.name == name).map(|c| &**c)
    }
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub database: PathBuf,
    /// Refreshes in flight at once, across all providers.
    pub concurrency: usize,
    pub http: provider::HttpLimits,
    /// Prometheus textfile (node_exporter textfile collector), rewritten after changes.
    pub metrics_file: Option<PathBuf>,
    /// Where scripts create `<credential>.refresh` to ask for a refresh now. A directory of its
    /// own, so that the sink directory can stay writable by tokend alone; none means no triggers.
    pub trigger_dir: Option<PathBuf>,
    /// The HTTP(S) proxy for token endpoints; environment proxy variables are never used.
    pub proxy: Option<Url>,
}

/// One credential: who to ask, how, when, and where its token goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Credential {
    /// Shared with the daemon's entry and deadline queue: one allocation per credential.
    pub name: std::sync::Arc<str>,
    /// Shared by every credential with the same client and endpoints (an agency's 100,000
    /// nations usually share one client), so it is held once.
    pub endpoint: std::sync::Arc<Endpoint>,
    pub refresh_at: RefreshAt,
    /// Refreshes in flight at once for this credential's provider.
    pub provider_concurrency: usize,
    pub sinks: Vec<SinkConfig>,
    /// Extra refreshes on a cron schedule (tokens without expiry that should still be re-issued).
    /// Boxed: most credentials have none, and a parsed cron expression is 300+ bytes.
    pub refresh_cron: Option<Box<CronSchedule>>,
    /// Interned like `endpoint`: nearly every credential has the same (usually empty) hooks.
    pub hooks: std::sync::Arc<Hooks>,
}

/// A parsed cron expression (croner syntax, the parser tokio-cron-scheduler uses), evaluated in
/// UTC: five fields (`min hour dom mon dow`) or six with leading seconds.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    pub text: String,
    cron: croner::Cron,
}

impl CronSchedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        use croner::parser::{CronParser, Seconds};
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(text)
            .map_err(|e| format!("\"{text}\" is not a cron expression ({e})"))?;
        Ok(Self { text: text.to_string(), cron })
    }

    /// The first occurrence strictly after `after_ms` (unix ms), if any.
    pub fn next_after_ms(&self, after_ms: i64) -> Option<i64> {
        let after = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(after_ms)?;
        self.cron.find_next_occurrence(&after, false).ok().map(|t| t.timestamp_millis())
    }
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// Commands run after a refresh or a failure. argv, never a shell string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hooks {
    pub on_refresh: Option<Vec<String>>,
    pub on_failure: Option<Vec<String>>,
    pub timeout: Duration,
    /// Pass the access token to hooks as TOKEND_ACCESS_TOKEN (off unless asked).
    pub pass_token: bool,
    /// Names of tokend's own environment variables a hook may see; every other one (secrets
    /// given through `*_env`, `CREDENTIALS_DIRECTORY`, systemd's sockets) is withheld.
    pub pass_env: Vec<String>,
}

impl Credential {
    pub fn provider(&self) -> ProviderKind {
        self.endpoint.kind
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFormat {
    Raw,
    Json,
    Env,
}

impl SinkFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkFormat::Raw => "raw",
            SinkFormat::Json => "json",
            SinkFormat::Env => "env",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub path: PathBuf,
    pub format: SinkFormat,
    pub mode: u32,
    /// Group owning the file (name, gid), so readers can be added to it.
    pub group: Option<(String, u32)>,
}

// ---- the file as written ------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    provider: BTreeMap<String, RawProviderDefaults>,
    #[serde(default)]
    credential: Vec<RawCredential>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    database: Option<PathBuf>,
    concurrency: Option<i64>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    max_answer_bytes: Option<i64>,
    metrics_file: Option<PathBuf>,
    trigger_dir: Option<PathBuf>,
    proxy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProviderDefaults {
    refresh_at: Option<String>,
    concurrency: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    name: Option<String>,
    provider: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    client_secret_credential: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    api_key_env: Option<String>,
    api_key_credential: Option<String>,
    slug: Option<String>,
    base_url: Option<String>,
    token_url: Option<String>,
    auth: Option<String>,
    scope: Option<String>,
    refresh_at: Option<String>,
    refresh_cron: Option<String>,
    redirect_uri: Option<String>,
    authorize_url: Option<String>,
    pkce: Option<bool>,
    site: Option<String>,
    revocation_url: Option<String>,
    on_refresh: Option<Vec<String>>,
    on_failure: Option<Vec<String>>,
    hook_timeout: Option<String>,
    hook_token: Option<bool>,
    hook_env: Option<Vec<String>>,
    #[serde(default)]
    sink: Vec<RawSink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    path: Option<PathBuf>,
    format: Option<String>,
    mode: Option<RawMode>,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMode {
    Int(i64),
    Text(String),
}

// ---- loading --------------------------------------------------------------------------------

/// Where secrets named by `*_env` and `*_credential` are looked up; the process environment in
/// production, a map in tests.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Whether secret sources are read. Commands that never talk to a provider (`import`, `list`,
/// `show`, `remove`) skip them, so an operator can run them outside the service, where systemd
/// credentials and the service's environment are not available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Read,
    Skip,
}

/// Reads and validates `path` with the process environment, secrets included.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &ProcessEnv, Secrets::Read)
}

/// Reads and validates `path` without reading any secret (they are left empty).
pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &ProcessEnv, Secrets::Skip)
}

pub fn load_with(path: &Path, env: &dyn Environment, secrets: Secrets) -> Result<Config, ConfigError> {
    let problem = |place: &str, message: String| {
        ConfigError(vec![ConfigProblem { file: path.to_path_buf(), place: place.to_string(), field: None, message }])
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem("cannot read", e.to_string()))?;
    let mut config = parse_with_secrets(path, &text, env, secrets)?;
    if config.inline_secrets > 0 && is_world_readable(path) {
        config.warnings.push(format!(
            "{} holds {} inline secret(s) and every local user can read it; chmod o-r it, or move the secrets to *_credential or *_file",
            path.display(),
            config.inline_secrets
        ));
    }
    Ok(config)
}

fn is_world_readable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

/// Validates configuration `text` as if read from `path`.
pub fn parse_with(path: &Path, text: &str, env: &dyn Environment) -> Result<Config, ConfigError> {
    parse_with_secrets(path, text, env, Secrets::Read)
}

fn parse_with_secrets(path: &Path, text: &str, env: &dyn Environment, secrets: Secrets) -> Result<Config, ConfigError> {
    let raw = match parse_in_parallel(text) {
        Some(raw) => raw,
        None => parse_whole(path, text)?,
    };
    Validator {
        file: path.to_path_buf(),
        base_dir: base_dir(path),
        env,
        secrets,
        problems: Vec::new(),
        endpoints: HashSet::new(),
        hooks: HashSet::new(),
        secure_urls: HashMap::new(),
        plain_urls: HashMap::new(),
        warnings: Vec::new(),
        inline_secrets: 0,
    }
    .config(raw)
}

/// Credentials per piece when a large file is parsed in pieces.
const CREDENTIALS_PER_PIECE: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentialsOnly {
    credential: Vec<RawCredential>,
}

/// A configuration with 100,000 credentials is 15 MB of TOML, and parsing it was most of
/// start-up: it is cut before `[[credential]]` headers into pieces parsed on every core. Only a
/// file where that cut cannot change the meaning is cut (no multi-line strings, no other way of
/// writing `credential`, nothing but credentials after the first piece), and any problem in any
/// piece returns `None`: the whole file is then parsed in one go, so errors and their line
/// numbers are exactly those of a plain parse.
fn parse_in_parallel(text: &str) -> Option<RawConfig> {
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

fn parse_whole(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
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

/// The directory relative paths are resolved against, made absolute so that paths in the config
/// mean the same thing whatever the working directory, and match file-watch event paths.
fn base_dir(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Identical values (secrets included) are held once, shared by every credential that has them.
fn intern<T: std::hash::Hash + Eq>(known: &mut HashSet<std::sync::Arc<T>>, value: T) -> std::sync::Arc<T> {
    if let Some(shared) = known.get(&value) {
        return shared.clone();
    }
    let shared = std::sync::Arc::new(value);
    known.insert(shared.clone());
    shared
}

struct Validator<'a> {
    file: PathBuf,
    base_dir: PathBuf,
    env: &'a dyn Environment,
    secrets: Secrets,
    problems: Vec<ConfigProblem>,
    /// Endpoints and hooks, interned: an agency's 100,000 credentials share a handful.
    endpoints: HashSet<std::sync::Arc<Endpoint>>,
    hooks: HashSet<std::sync::Arc<Hooks>>,
    /// URLs already parsed and found acceptable, by their text: token URLs (held to the
    /// stricter check) and the others.
    secure_urls: HashMap<String, Url>,
    plain_urls: HashMap<String, Url>,
    /// Not errors, but worth an operator's attention (`tokend check`, start-up).
    warnings: Vec<String>,
    inline_secrets: usize,
}

impl Validator<'_> {
    fn report(&mut self, place: &str, field: Option<&str>, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            file: self.file.clone(),
            place: place.to_string(),
            field: field.map(str::to_string),
            message: message.into(),
        });
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.base_dir.join(p) }
    }

    fn config(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let daemon = self.daemon(raw.daemon);
        let mut defaults = BTreeMap::new();
        for (name, d) in raw.provider {
            let place = format!("[provider.{name}]");
            let Ok(kind) = name.parse::<ProviderKind>() else {
                self.report(&place, None, format!("unknown provider \"{name}\"; expected one of {}", provider_names()));
                continue;
            };
            let refresh_at = d.refresh_at.and_then(|t| self.refresh_at(&place, &t));
            let concurrency = d.concurrency.and_then(|n| self.positive(&place, "concurrency", n, 10_000));
            defaults.insert(kind, (refresh_at, concurrency));
        }
        let mut credentials = Vec::new();
        let mut seen = HashSet::new();
        if raw.credential.is_empty() {
            self.report("configuration", None, "no [[credential]] defined; there is nothing to keep fresh");
        }
        for (index, rc) in raw.credential.into_iter().enumerate() {
            if let Some(c) = self.credential(index, rc, &defaults, daemon.concurrency) {
                if seen.insert(c.name.clone()) {
                    credentials.push(std::sync::Arc::new(c));
                } else {
                    self.report(
                        &format!("credential \"{}\"", c.name),
                        Some("name"),
                        "is used by an earlier credential; names must be unique",
                    );
                }
            }
        }
        let mut sink_paths = HashSet::new();
        for c in &credentials {
            for s in &c.sinks {
                if !sink_paths.insert(s.path.clone()) {
                    let place = format!("credential \"{}\"", c.name);
                    self.report(
                        &place,
                        Some("sink.path"),
                        format!("{} is already the path of another sink", s.path.display()),
                    );
                }
            }
        }
        if self.problems.is_empty() {
            Ok(Config {
                path: self.file,
                daemon,
                credentials,
                warnings: self.warnings,
                inline_secrets: self.inline_secrets,
            })
        } else {
            Err(ConfigError(self.problems))
        }
    }

    fn daemon(&mut self, raw: RawDaemon) -> DaemonConfig {
        let place = "[daemon]";
        let database = match raw.database {
            Some(p) if p.as_os_str().is_empty() => {
                self.report(place, Some("database"), "is empty");
                PathBuf::new()
            }
            Some(p) => self.resolve(&p),
            None => default_database(self.env),
        };
        let concurrency =
            raw.concurrency.and_then(|n| self.positive(place, "concurrency", n, 10_000)).unwrap_or(DEFAULT_CONCURRENCY);
        let mut http = provider::HttpLimits::default();
        if let Some(t) = raw.connect_timeout {
            http.connect_timeout = self.duration(place, "connect_timeout", &t).unwrap_or(http.connect_timeout);
        }
        if let Some(t) = raw.request_timeout {
            http.total_timeout = self.duration(place, "request_timeout", &t).unwrap_or(http.total_timeout);
        }
        if let Some(n) = raw.max_answer_bytes {
            http.max_answer_bytes =
                self.positive(place, "max_answer_bytes", n, 16 * 1024 * 1024).unwrap_or(http.max_answer_bytes);
        }
        let metrics_file = raw.metrics_file.map(|p| self.resolve(&p));
        let trigger_dir = raw.trigger_dir.map(|p| self.resolve(&p));
        let proxy = raw.proxy.and_then(|text| match Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Some(url),
            Ok(_) => {
                self.report(place, Some("proxy"), format!("\"{text}\" is not an http:// or https:// proxy URL"));
                None
            }
            Err(e) => {
                self.report(place, Some("proxy"), format!("\"{text}\" is not a URL ({e})"));
                None
            }
        });
        DaemonConfig { database, concurrency, http, metrics_file, trigger_dir, proxy }
    }

    fn positive(&mut self, place: &str, field: &str, n: i64, max: usize) -> Option<usize> {
        match usize::try_from(n) {
            Ok(v) if (1..=max).contains(&v) => Some(v),
            _ => {
                self.report(place, Some(field), format!("is {n}; expected 1 to {max}"));
                None
            }
        }
    }

    fn duration(&mut self, place: &str, field: &str, text: &str) -> Option<Duration> {
        match humantime::parse_duration(text) {
            Ok(d) if d >= Duration::from_millis(100) && d <= Duration::from_secs(600) => Some(d),
            Ok(_) => {
                self.report(place, Some(field), format!("\"{text}\" is out of range; expected 100ms to 10m"));
                None
            }
            Err(_) => {
                self.report(place, Some(field), format!("\"{text}\" is not a duration like \"10s\""));
                None
            }
        }
    }

    fn refresh_at(&mut self, place: &str, text: &str) -> Option<RefreshAt> {
        RefreshAt::parse(text).map_err(|e| self.report(place, Some("refresh_at"), e)).ok()
    }

    fn credential(
        &mut self,
        index: usize,
        raw: RawCredential,
        defaults: &BTreeMap<ProviderKind, (Option<RefreshAt>, Option<usize>)>,
        global_concurrency: usize,
    ) -> Option<Credential> {
        let before = self.problems.len();
        let Some(name) = raw.name.clone() else {
            self.report(&format!("credential #{}", index + 1), Some("name"), "is missing");
            return None;
        };
        let place = format!("credential \"{name}\"");
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.report(
                &place,
                Some("name"),
                format!(
                    "use 1 to {MAX_NAME_LEN} letters, digits, '-' or '_' (it becomes part of file and variable names)"
                ),
            );
        }
        let kind = match raw.provider.as_deref() {
            None => {
                self.report(&place, Some("provider"), format!("is missing; expected one of {}", provider_names()));
                return None;
            }
            Some(p) => match p.parse::<ProviderKind>() {
                Ok(k) => k,
                Err(()) => {
                    self.report(
                        &place,
                        Some("provider"),
                        format!("\"{p}\" is not a provider; expected one of {}", provider_names()),
                    );
                    return None;
                }
            },
        };

        let token_url = self.token_url(&place, kind, &raw);
        let authorization = self.authorization(&place, kind, &raw);
        let revocation_url = self.revocation_url(&place, kind, &raw);
        let scope = raw.scope.clone().or_else(|| match kind {
            ProviderKind::Nudge => Some("read write".into()),
            ProviderKind::WildApricot => Some("auto".into()),
            _ => None,
        });
        let api_key =
            self.secret(&place, "api_key", raw.api_key, raw.api_key_file, raw.api_key_env, raw.api_key_credential);
        let client_secret = self.secret(
            &place,
            "client_secret",
            raw.client_secret,
            raw.client_secret_file,
            raw.client_secret_env,
            raw.client_secret_credential,
        );
        let (api_key_failed, client_secret_failed) = (api_key.is_err(), client_secret.is_err());
        let (api_key, client_secret) = (api_key.unwrap_or(None), client_secret.unwrap_or(None));
        let grant = match (kind, api_key) {
            (ProviderKind::WildApricot, Some(key)) => GrantKind::ApiKey(key),
            (_, Some(_)) => {
                self.report(&place, Some("api_key"), "only wildapricot credentials take an API key");
                GrantKind::RefreshToken
            }
            (_, None) => GrantKind::RefreshToken,
        };
        let is_api_key = matches!(grant, GrantKind::ApiKey(_)) || api_key_failed;
        let client_id = raw.client_id.clone().unwrap_or_default();
        if !is_api_key {
            if raw.client_id.as_deref().is_none_or(str::is_empty) {
                self.report(&place, Some("client_id"), "is missing");
            }
            if client_secret.is_none() && !client_secret_failed && kind != ProviderKind::OAuth2 {
                self.report(
                    &place,
                    Some("client_secret"),
                    "is missing; give one of client_secret, client_secret_file, client_secret_env, client_secret_credential",
                );
            }
        } else if client_secret.is_some() {
            self.report(
                &place,
                Some("client_secret"),
                "an API-key credential authenticates with api_key alone; remove client_secret",
            );
        }

        if raw.slug.is_some() && kind != ProviderKind::NationBuilder {
            self.report(
                &place,
                Some("slug"),
                format!("only nationbuilder credentials have a slug, this one is {kind}"),
            );
        }
        if raw.base_url.is_some() && kind != ProviderKind::Nudge {
            self.report(
                &place,
                Some("base_url"),
                format!("only nudge credentials have a base_url, this one is {kind}; use token_url"),
            );
        }
        let auth = match (kind, raw.auth.as_deref()) {
            (_, None) => kind.default_auth(),
            (ProviderKind::OAuth2, Some(a)) => a.parse().unwrap_or_else(|()| {
                self.report(
                    &place,
                    Some("auth"),
                    format!("\"{a}\" is not a client authentication; expected basic, body or json"),
                );
                kind.default_auth()
            }),
            (_, Some(a)) if a.parse::<ClientAuth>().ok() == Some(kind.default_auth()) => kind.default_auth(),
            (_, Some(a)) => {
                self.report(
                    &place,
                    Some("auth"),
                    format!(
                        "{kind} always uses \"{}\" client authentication, not \"{a}\"",
                        kind.default_auth().as_str()
                    ),
                );
                kind.default_auth()
            }
        };

        let (default_refresh_at, provider_concurrency) = defaults.get(&kind).copied().unwrap_or((None, None));
        let refresh_at = match raw.refresh_at.as_deref() {
            Some(t) => self.refresh_at(&place, t).unwrap_or(RefreshAt::Default),
            None => default_refresh_at.unwrap_or(RefreshAt::Default),
        };
        let sinks = raw.sink.into_iter().enumerate().filter_map(|(i, s)| self.sink(&place, i, s)).collect();
        let refresh_cron = raw
            .refresh_cron
            .as_deref()
            .and_then(|t| CronSchedule::parse(t).map_err(|e| self.report(&place, Some("refresh_cron"), e)).ok());
        let mut hook = |field: &str, argv: Option<Vec<String>>| match argv {
            Some(argv) if argv.first().is_none_or(String::is_empty) => {
                self.report(&place, Some(field), "must be a non-empty list: [\"/path/to/program\", \"arg\", ...]");
                None
            }
            other => other,
        };
        let on_refresh = hook("on_refresh", raw.on_refresh);
        let on_failure = hook("on_failure", raw.on_failure);
        let hook_timeout = match raw.hook_timeout {
            Some(t) => self.duration(&place, "hook_timeout", &t).unwrap_or(DEFAULT_HOOK_TIMEOUT),
            None => DEFAULT_HOOK_TIMEOUT,
        };
        let pass_env = raw.hook_env.unwrap_or_default();
        if let Some(bad) = pass_env.iter().find(|v| v.is_empty() || v.contains(['=', '\0'])) {
            self.report(
                &place,
                Some("hook_env"),
                format!("\"{}\" is not an environment variable name", bad.escape_debug()),
            );
        }
        let hooks = Hooks {
            on_refresh,
            on_failure,
            timeout: hook_timeout,
            pass_token: raw.hook_token.unwrap_or(false),
            pass_env,
        };

        if self.problems.len() > before {
            return None;
        }
        let endpoint = Endpoint {
            kind,
            token_url: token_url?,
            client_id,
            client_secret,
            auth,
            scope,
            grant,
            authorization: authorization?,
            revocation_url,
        };
        Some(Credential {
            name: name.into(),
            endpoint: intern(&mut self.endpoints, endpoint),
            refresh_at,
            provider_concurrency: provider_concurrency.unwrap_or(global_concurrency),
            sinks,
            refresh_cron: refresh_cron.map(Box::new),
            hooks: intern(&mut self.hooks, hooks),
        })
    }

    fn token_url(&mut self, place: &str, kind: ProviderKind, raw: &RawCredential) -> Option<Url> {
        if let Some(known) = raw.token_url.as_deref().and_then(|text| self.secure_urls.get(text)) {
            return Some(known.clone());
        }
        let parsed = match (&raw.token_url, kind) {
            (Some(u), _) => Url::parse(u).map_err(|e| ("token_url", format!("\"{u}\" is not a URL ({e})"))),
            (None, ProviderKind::NationBuilder) => match &raw.slug {
                Some(slug) => provider::nationbuilder::default_token_url(slug).map_err(|e| ("slug", e)),
                None => Err(("slug", "is missing; nationbuilder needs the nation slug (or a token_url)".to_string())),
            },
            (None, ProviderKind::Nudge) => {
                let base = raw.base_url.as_deref().unwrap_or(provider::nudge::DEFAULT_BASE_URL);
                let base = if base.ends_with('/') { base.to_string() } else { format!("{base}/") };
                Url::parse(&base)
                    .map_err(|e| ("base_url", format!("\"{base}\" is not a URL ({e})")))
                    .and_then(|b| provider::nudge::default_token_url(&b).map_err(|e| ("base_url", e)))
            }
            (None, ProviderKind::WildApricot) => {
                Ok(Url::parse(provider::wildapricot::DEFAULT_TOKEN_URL).expect("constant URL parses"))
            }
            (None, ProviderKind::OAuth2) => {
                Err(("token_url", "is missing; oauth2 credentials must name their token endpoint".to_string()))
            }
        };
        let field = if raw.token_url.is_some() { "token_url" } else { "base_url" };
        match parsed {
            Ok(url) => match provider::check_token_url(&url) {
                Ok(()) => {
                    if let Some(text) = &raw.token_url {
                        self.secure_urls.insert(text.clone(), url.clone());
                    }
                    Some(url)
                }
                Err(e) => {
                    self.report(place, Some(if kind == ProviderKind::Nudge { field } else { "token_url" }), e);
                    None
                }
            },
            Err((field, e)) => {
                self.report(place, Some(field), e);
                None
            }
        }
    }

    fn url_field(&mut self, place: &str, field: &str, text: &str, must_be_secure: bool) -> Option<Url> {
        // Thousands of credentials usually name the same few URLs; each is parsed and checked once.
        let known = if must_be_secure { &self.secure_urls } else { &self.plain_urls };
        if let Some(url) = known.get(text) {
            return Some(url.clone());
        }
        let url = match Url::parse(text) {
            Ok(u) => u,
            Err(e) => {
                self.report(place, Some(field), format!("\"{text}\" is not a URL ({e})"));
                return None;
            }
        };
        let check = if must_be_secure {
            provider::check_token_url(&url)
        } else if matches!(url.scheme(), "http" | "https") {
            Ok(())
        } else {
            Err(format!("{url} must be an http or https URL"))
        };
        match check {
            Ok(()) => {
                let known = if must_be_secure { &mut self.secure_urls } else { &mut self.plain_urls };
                known.insert(text.to_string(), url.clone());
                Some(url)
            }
            Err(e) => {
                self.report(place, Some(field), e);
                None
            }
        }
    }

    /// The authorization-code settings, with each provider's documented authorize URL.
    fn authorization(
        &mut self,
        place: &str,
        kind: ProviderKind,
        raw: &RawCredential,
    ) -> Option<provider::Authorization> {
        if raw.site.is_some() && kind != ProviderKind::WildApricot {
            self.report(place, Some("site"), format!("only wildapricot credentials have a site, this one is {kind}"));
        }
        let redirect_uri =
            self.url_field(place, "redirect_uri", raw.redirect_uri.as_deref().unwrap_or(DEFAULT_REDIRECT_URI), false)?;
        let authorize_url = match (&raw.authorize_url, kind) {
            (Some(u), _) => Some(self.url_field(place, "authorize_url", u, true)?),
            (None, ProviderKind::NationBuilder) => raw
                .slug
                .as_ref()
                .and_then(|slug| Url::parse(&format!("https://{slug}.nationbuilder.com/oauth/authorize")).ok()),
            (None, ProviderKind::Nudge) => {
                let base = raw.base_url.as_deref().unwrap_or(provider::nudge::DEFAULT_BASE_URL).trim_end_matches('/');
                Url::parse(&format!("{base}/api/oauth/zapier/authorize")).ok()
            }
            (None, ProviderKind::WildApricot) => match &raw.site {
                Some(site) => {
                    let host = site.trim_start_matches("https://").trim_end_matches('/');
                    Some(self.url_field(place, "site", &format!("https://{host}/sys/login/OAuthLogin"), true)?)
                }
                None => None,
            },
            (None, ProviderKind::OAuth2) => None,
        };
        // NationBuilder and Nudge document PKCE; Wild Apricot does not.
        let pkce = raw.pkce.unwrap_or(kind != ProviderKind::WildApricot);
        Some(provider::Authorization { authorize_url, redirect_uri, pkce })
    }

    fn revocation_url(&mut self, place: &str, kind: ProviderKind, raw: &RawCredential) -> Option<Url> {
        match (&raw.revocation_url, kind) {
            (Some(u), _) => self.url_field(place, "revocation_url", u, true),
            (None, ProviderKind::Nudge) => {
                let base = raw.base_url.as_deref().unwrap_or(provider::nudge::DEFAULT_BASE_URL).trim_end_matches('/');
                Url::parse(&format!("{base}/api/oauth/zapier/revoke")).ok()
            }
            _ => None,
        }
    }

    /// Exactly one of `<field>`, `<field>_file`, `<field>_env`, `<field>_credential`, or none.
    /// `Err(())` means a source was given but failed, and the problem is already reported.
    fn secret(
        &mut self,
        place: &str,
        field: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
        env: Option<String>,
        credential: Option<String>,
    ) -> Result<Option<Secret>, ()> {
        let given = [inline.is_some(), file.is_some(), env.is_some(), credential.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            self.report(
                place,
                Some(field),
                format!("give only one of {field}, {field}_file, {field}_env, {field}_credential"),
            );
            return Err(());
        }
        if self.secrets == Secrets::Skip && given.iter().any(|g| *g) {
            return Ok(Some(Secret::new("")));
        }
        let value = if let Some(v) = inline {
            self.inline_secrets += 1;
            Some(v)
        } else if let Some(f) = file {
            let path = self.resolve(&f);
            if is_world_readable(&path) {
                self.warnings.push(format!(
                    "{place}: {field}_file {} can be read by every local user; chmod o-r it",
                    path.display()
                ));
            }
            self.read_secret_file(place, &format!("{field}_file"), &path)
        } else if let Some(var) = env {
            let v = self.env.var(&var);
            if v.is_none() {
                self.report(place, Some(&format!("{field}_env")), format!("environment variable {var} is not set"));
            }
            v
        } else if let Some(cred) = credential {
            match self.env.var("CREDENTIALS_DIRECTORY") {
                Some(dir) if !cred.contains('/') => {
                    let path = Path::new(&dir).join(&cred);
                    self.read_secret_file(place, &format!("{field}_credential"), &path)
                }
                Some(_) => {
                    self.report(
                        place,
                        Some(&format!("{field}_credential")),
                        format!("\"{cred}\" must be a bare credential name, without '/'"),
                    );
                    None
                }
                None => {
                    self.report(
                        place,
                        Some(&format!("{field}_credential")),
                        format!(
                            "$CREDENTIALS_DIRECTORY is not set; \"{cred}\" needs LoadCredential= in the systemd unit"
                        ),
                    );
                    None
                }
            }
        } else {
            return Ok(None);
        };
        let value = value.ok_or(())?;
        let trimmed = value.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            self.report(place, Some(field), "is empty");
            return Err(());
        }
        Ok(Some(Secret::new(trimmed)))
    }

    fn read_secret_file(&mut self, place: &str, field: &str, path: &Path) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(s) => Some(s),
            Err(e) => {
                self.report(place, Some(field), format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    fn sink(&mut self, cred_place: &str, index: usize, raw: RawSink) -> Option<SinkConfig> {
        let place = format!("{cred_place}: sink #{}", index + 1);
        let Some(path) = raw.path else {
            self.report(&place, Some("path"), "is missing");
            return None;
        };
        if path.as_os_str().is_empty() || path.file_name().is_none() {
            self.report(&place, Some("path"), format!("\"{}\" does not name a file", path.display()));
            return None;
        }
        let format = match raw.format.as_deref() {
            None | Some("raw") => SinkFormat::Raw,
            Some("json") => SinkFormat::Json,
            Some("env") => SinkFormat::Env,
            Some(other) => {
                self.report(
                    &place,
                    Some("format"),
                    format!("\"{other}\" is not a sink format; expected raw, json or env"),
                );
                return None;
            }
        };
        let mode = match raw.mode {
            None => DEFAULT_SINK_MODE,
            Some(RawMode::Int(n)) => match u32::try_from(n) {
                Ok(m) if m <= 0o777 => m,
                _ => {
                    self.report(
                        &place,
                        Some("mode"),
                        format!("{n} is not a file mode; write it in octal, as \"0640\" or 0o640"),
                    );
                    return None;
                }
            },
            Some(RawMode::Text(t)) => match u32::from_str_radix(t.trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o777 => m,
                _ => {
                    self.report(&place, Some("mode"), format!("\"{t}\" is not an octal file mode like \"0640\""));
                    return None;
                }
            },
        };
        if mode & 0o007 != 0 {
            self.report(
                &place,
                Some("mode"),
                format!("{mode:04o} lets every local user at the token; grant a group instead (e.g. 0640)"),
            );
            return None;
        }
        if mode & 0o020 != 0 {
            self.report(
                &place,
                Some("mode"),
                format!("{mode:04o} lets the group replace the token readers trust; readers need 0640 at most"),
            );
            return None;
        }
        if mode & 0o400 == 0 {
            self.report(&place, Some("mode"), format!("{mode:04o} does not let the owner read the file"));
            return None;
        }
        let group = match raw.group {
            None => None,
            Some(name) => match nix::unistd::Group::from_name(&name) {
                Ok(Some(g)) => Some((name, g.gid.as_raw())),
                Ok(None) => {
                    self.report(&place, Some("group"), format!("no group named \"{name}\" on this system"));
                    return None;
                }
                Err(e) => {
                    self.report(&place, Some("group"), format!("cannot look up group \"{name}\": {e}"));
                    return None;
                }
            },
        };
        Some(SinkConfig { path: self.resolve(&path), format, mode, group })
    }
}

fn provider_names() -> String {
    ProviderKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

/// `$STATE_DIRECTORY/tokend.db` under systemd (`StateDirectory=`), else `./tokend.db`.
fn default_database(env: &dyn Environment) -> PathBuf {
    match env.var("STATE_DIRECTORY") {
        // systemd joins several state directories with ':'; the first is ours.
        Some(dirs) if !dirs.is_empty() => PathBuf::from(dirs.split(':').next().unwrap_or(&dirs)).join("tokend.db"),
        _ => PathBuf::from("tokend.db"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = [("NB_SECRET".to_string(), "from-env".to_string())].into();
        parse_with(Path::new("/etc/tokend/tokend.toml"), text, &env)
    }

    fn large_config(count: usize) -> String {
        let mut text = String::from("[daemon]\nconcurrency = 16\n\n[provider.oauth2]\nconcurrency = 4\n\n");
        for i in 0..count {
            text.push_str(&format!(
                "[[credential]]\nname = \"c{i}\"\nprovider = \"oauth2\"\ntoken_url = \"https://auth.example.com/token\"\n\
                 client_id = \"agency\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"out/c{i}.token\"\n\n"
            ));
        }
        text
    }

    #[test]
    fn a_large_file_parsed_in_pieces_means_what_it_means_whole() {
        let text = large_config(12_345);
        assert!(text.len() > 1 << 20, "large enough to be parsed in pieces");
        let pieces = parse_in_parallel(&text).expect("cut into pieces");
        let whole = parse_whole(Path::new("t.toml"), &text).ok().unwrap();
        let names = |raw: &RawConfig| raw.credential.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&pieces), names(&whole));
        assert_eq!(pieces.daemon.concurrency, Some(16));
        assert_eq!(pieces.provider.len(), 1);
        let config = parse(&text).unwrap();
        assert_eq!(config.credentials.len(), 12_345);
        assert_eq!(config.credentials[12_344].sinks[0].path, Path::new("/etc/tokend/out/c12344.token"));
        assert!(
            std::sync::Arc::ptr_eq(&config.credentials[0].endpoint, &config.credentials[12_344].endpoint),
            "one endpoint held once"
        );
    }

    #[test]
    fn a_large_file_with_a_mistake_reports_it_as_a_whole_parse_does() {
        let good = large_config(9_000);
        // A mistake in a late piece, a table that must not follow the credentials, a duplicate.
        let typo = good.replacen("name = \"c7500\"\nprovider", "name = \"c7500\"\nprovder", 1);
        let late_daemon = format!("{good}[daemon]\nconcurrency = 3\n");
        let duplicate = good.replacen("name = \"c8000\"", "name = \"c10\"", 1);
        assert!(parse_in_parallel(&typo).is_none() && parse_in_parallel(&late_daemon).is_none());
        // 6 lines of [daemon] and [provider], 9 per credential, the field is the credential's 3rd line.
        let typo_line = format!("line {}, column 1: unknown field `provder`", 6 + 7500 * 9 + 3);
        for (text, expected) in [(&typo, typo_line.as_str()), (&late_daemon, "duplicate key"), (&duplicate, "\"c10\"")]
        {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {}", &err[..err.len().min(300)]);
        }
    }

    #[test]
    fn minimal_nationbuilder() {
        let c = parse(
            r#"
            [[credential]]
            name = "nb"
            provider = "nationbuilder"
            slug = "mynation"
            client_id = "cid"
            client_secret_env = "NB_SECRET"
            [[credential.sink]]
            path = "nb.token"
            "#,
        )
        .unwrap();
        let nb = &c.credentials[0];
        assert_eq!(nb.endpoint.token_url.as_str(), "https://mynation.nationbuilder.com/oauth/token");
        assert_eq!(nb.endpoint.client_secret.as_ref().unwrap().expose(), "from-env");
        assert_eq!(nb.endpoint.auth, ClientAuth::Json);
        assert_eq!(nb.sinks[0].path, PathBuf::from("/etc/tokend/nb.token"));
        assert_eq!(nb.sinks[0].mode, 0o600);
        assert_eq!(c.daemon.database, PathBuf::from("tokend.db"));
    }

    #[test]
    fn nudge_base_url_and_wildapricot_api_key() {
        let c = parse(
            r#"
            [provider.nudge]
            refresh_at = "80%"
            concurrency = 2
            [[credential]]
            name = "n"
            provider = "nudge"
            base_url = "https://staging.justanudge.co"
            client_id = "a"
            client_secret = "b"
            [[credential]]
            name = "wa-key"
            provider = "wildapricot"
            api_key = "k"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.credentials[0].endpoint.token_url.as_str(),
            "https://staging.justanudge.co/api/oauth/zapier/token"
        );
        assert_eq!(c.credentials[0].refresh_at, RefreshAt::Elapsed(0.8));
        assert_eq!(c.credentials[0].provider_concurrency, 2);
        assert_eq!(c.credentials[1].endpoint.token_url.as_str(), "https://oauth.wildapricot.org/auth/token");
        assert!(matches!(c.credentials[1].endpoint.grant, GrantKind::ApiKey(_)));
    }
}
