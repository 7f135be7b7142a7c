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
    /// The socket rules of the credentials that have any; the others have the defaults.
    pub socket_access: HashMap<std::sync::Arc<str>, std::sync::Arc<SocketAccess>>,
}

/// The socket rules of a credential that has none of its own.
static DEFAULT_ACCESS: SocketAccess =
    SocketAccess { readers: None, units: Vec::new(), credential_format: SinkFormat::Raw };

impl Config {
    /// `name`'s rules on the local sockets.
    pub fn access_of(&self, name: &str) -> &SocketAccess {
        self.socket_access.get(name).map_or(&DEFAULT_ACCESS, |a| a)
    }

    pub fn credential(&self, name: &str) -> Option<&Credential> {
        self.credentials.iter().find(|c| &*c.name == name).map(|c| &**c)
    }
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The SQLite file; with a PostgreSQL store, the base name of this node's local files
    /// (`<state_dir>/fleet.lock`, `.changed`, `.reload`, rescue files beside it).
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
    /// The local HTTP API's Unix socket (src/socket/); none means off.
    pub socket: Option<PathBuf>,
    /// The socket systemd's `LoadCredential=` reads tokens from; none means off.
    pub credential_socket: Option<PathBuf>,
    /// Where the key that seals stored tokens comes from; `None`: tokens stored in plaintext.
    pub key: Option<crate::seal::KeySource>,
    /// Fleet mode: the PostgreSQL store `database` names (`None`: SQLite at `database`).
    pub postgres: Option<crate::store::postgres::PgTarget>,
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
    /// A boxed slice, not a `Vec`: fixed once read, and 8 bytes smaller in each of 100,000.
    pub sinks: Box<[SinkConfig]>,
    /// Extra refreshes on a cron schedule (tokens without expiry that should still be re-issued).
    /// Boxed: most credentials have none, and a parsed cron expression is 300+ bytes.
    pub refresh_cron: Option<Box<CronSchedule>>,
    /// Interned like `endpoint`: nearly every credential has the same (usually empty) hooks.
    pub hooks: std::sync::Arc<Hooks>,
    /// Interned like `hooks`.
    pub lifecycle: std::sync::Arc<Lifecycle>,
}

/// What keeps a chain alive beyond its access token: when its refresh token or consent dies,
/// how early a human hears of it, and how often a dead credential reminds them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lifecycle {
    /// The refresh token's life, counted from when it was issued (the authorization, for
    /// providers that do not rotate), when the answers carry no `refresh_token_expires_in`.
    pub refresh_token_lifetime: Option<Duration>,
    /// The `reauth_soon` event fires this long before the re-authorization deadline.
    pub reauth_warn: Option<Duration>,
    /// A refresh at least this often after the last one, whatever the access token's expiry:
    /// keeps refresh tokens that die unused, and tokens that never expire, exercised.
    pub refresh_at_least: Option<Duration>,
    /// `needs_reauth` is repeated this often until a human re-authorizes; `None`: once.
    pub reauth_repeat: Option<Duration>,
}

/// `needs_reauth` reminders, unless a credential says otherwise: daily.
pub const DEFAULT_REAUTH_REPEAT: Duration = Duration::from_secs(86_400);

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            refresh_token_lifetime: None,
            reauth_warn: None,
            refresh_at_least: None,
            reauth_repeat: Some(DEFAULT_REAUTH_REPEAT),
        }
    }
}

/// A credential's rules on the local sockets (README "Tokens on demand"), in
/// [`Config::socket_access`] (not in each [`Credential`]: nearly every one has the defaults).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SocketAccess {
    /// Who may read the token over `[daemon] socket`; `None`: members of the socket's group.
    pub readers: Option<Vec<Reader>>,
    /// Unit-name globs (`*`, `?`) allowed to load it through `[daemon] credential_socket`.
    pub units: Vec<String>,
    /// What the credential socket writes.
    pub credential_format: SinkFormat,
}

/// One entry of `readers`, resolved to ids when the configuration is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reader {
    Uid(u32),
    Gid(u32),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SinkFormat {
    #[default]
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

mod raw;
mod validate;

use raw::{parse_in_parallel, parse_whole};
use validate::Validator;

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
    Validator::new(path, env, secrets).config(raw)
}

/// Credentials per piece when a large file is parsed in pieces.
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

fn provider_names() -> String {
    ProviderKind::all().map(ProviderKind::as_str).collect::<Vec<_>>().join(", ")
}

/// A fleet node's local files: `<state_dir>/fleet.*`, by default where the SQLite file would be.
fn fleet_local_base(env: &dyn Environment, state_dir: Option<PathBuf>) -> PathBuf {
    match state_dir {
        Some(dir) => dir.join("fleet"),
        None => default_database(env).with_file_name("fleet"),
    }
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
    use raw::RawConfig;

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
        assert_eq!(c.credentials[0].endpoint.provider_concurrency, 2);
        assert_eq!(c.credentials[1].endpoint.token_url.as_str(), "https://oauth.wildapricot.org/auth/token");
        assert!(matches!(c.credentials[1].endpoint.grant, GrantKind::ApiKey(_)));
    }
}
