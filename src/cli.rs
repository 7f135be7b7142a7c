//! The command line: parse, dispatch, print. Decisions belong to the library modules; this file
//! turns their results into text, JSON and exit codes.

use crate::clock::{now_ms, now_secs, rfc3339, short_duration};
use crate::config::{self, Config, ConfigError, Credential};
use crate::daemon::{self, DaemonError};
use crate::provider::{self, HttpClient};
use crate::redact::fingerprint;
use crate::refresh::{self, Outcome, RefreshError, SkipReason};
use crate::schedule;
use crate::sink;
use crate::store::{AnyStore, Status, StoreError, TokenState};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

/// Exit codes, documented in README "Exit codes". Stable: scripts branch on them.
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything else that went wrong: database, files, I/O.
    pub const FAILURE: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// The configuration file is invalid.
    pub const CONFIG: u8 = 3;
    /// No such credential in the configuration, or no token stored for it yet.
    pub const UNKNOWN: u8 = 4;
    /// The credential needs re-authorization (the provider rejected its grant).
    pub const NEEDS_REAUTH: u8 = 5;
    /// The stored access token has expired.
    pub const EXPIRED: u8 = 6;
    /// A temporary failure (provider down, rate limited, answer rejected, busy): try again later.
    pub const TEMPORARY: u8 = 7;
    /// The encryption key is missing, unreadable or wrong, or a stored value does not decrypt
    /// (README "Encryption at rest"). Nothing was sent and nothing overwritten.
    pub const KEY: u8 = 8;
    /// A PostgreSQL store cannot be used: unreachable, login refused, no tokend tables (run
    /// `tokend migrate`), or a schema this tokend does not know.
    pub const STORE: u8 = 9;
}

/// Longest stdin `tokend import` reads; a token answer is a few hundred bytes.
const MAX_IMPORT_BYTES: u64 = 1024 * 1024;

#[derive(Parser, Debug)]
#[command(name = "tokend", version, about = "Keeps OAuth 2.0 tokens fresh and never loses a rotated refresh token")]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', env = "TOKEND_CONFIG", global = true, default_value = "/etc/tokend/tokend.toml")]
    pub config: PathBuf,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it with a full filter.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for crate::logging::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => crate::logging::LogFormat::Text,
            LogFormat::Json => crate::logging::LogFormat::Json,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate the configuration (and every secret it names); exit 3 naming each problem.
    Check,
    /// Store a token-endpoint JSON answer read from stdin (e.g. what curl printed at first authorization).
    Import {
        name: String,
        /// When the answer was issued (unix seconds or RFC 3339), if it has no created_at and was not just obtained.
        #[arg(long)]
        issued_at: Option<String>,
    },
    /// Show every credential: status, expiry, next refresh, generation, last error.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the current access token; exit non-zero (and say why) if it is expired or needs re-authorization.
    Show {
        name: String,
        /// The token with its type, expiry, scope, generation and the provider's extras, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Refresh a credential now, under its lease, and update its sinks.
    Refresh { name: String },
    /// Forget a credential's stored token and remove its sink files.
    Remove { name: String },
    /// First authorization: open the printed URL, approve, and the token is stored (code + PKCE +
    /// state; loopback redirect or --paste). API-key credentials just obtain their token.
    Authorize {
        name: String,
        /// Paste the redirect URL instead of listening on the loopback redirect_uri.
        #[arg(long)]
        paste: bool,
        /// Resource-owner password grant (Wild Apricot, oauth2): asks for username and password.
        #[arg(long)]
        password: bool,
        /// How long to wait for the redirect, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Revoke the token at the provider (RFC 7009), mark it revoked and remove its sinks.
    Revoke {
        name: String,
        /// Forget the token locally when the provider has no revocation endpoint or its revocation fails.
        #[arg(long)]
        forget: bool,
    },
    /// Run the daemon: keep every credential fresh, write sinks, obey signals (SIGHUP reload,
    /// SIGUSR1 refresh all, SIGTERM stop).
    Run,
    /// Validate the configuration, then tell the running daemon to load it (SIGHUP). Exits 3, and
    /// leaves the daemon on its old configuration, when the new one is invalid: what
    /// `systemctl reload` runs.
    Reload {
        /// The daemon's pid (systemd's $MAINPID); default: the holder of the database's lock.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Self-contained demo: loopback demo providers, three credentials, rotating token files.
    Dev {
        /// Lifetime of the demo tokens, in seconds.
        #[arg(long, default_value_t = 20)]
        lifetime: u64,
        /// Keep the demo folder when stopping.
        #[arg(long)]
        keep: bool,
    },
    /// Print a token valid for at least --min-valid: from the running daemon over `[daemon]
    /// socket` (joining any refresh in flight), else from the store, refreshing under the lease.
    Token {
        name: String,
        /// The token must stay valid this long ("300", "5m"); a shorter-lived one is replaced first.
        #[arg(long)]
        min_valid: Option<String>,
        /// Print the API's JSON object instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// Create or upgrade the store's schema (a PostgreSQL store is never migrated implicitly;
    /// SQLite is migrated by every command anyway). With --from and --to: copy a single node's
    /// SQLite store into an empty PostgreSQL store, in one transaction verified by generation counts.
    Migrate {
        /// The SQLite store to copy: `sqlite:/var/lib/tokend/tokend.db`.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// The PostgreSQL store to copy into (its password: the configuration's database_password*).
        #[arg(long, requires = "from")]
        to: Option<String>,
    },
    /// Print the completion script for SHELL on stdout (the package installs those for bash, zsh
    /// and fish).
    Completions { shell: clap_complete::Shell },
    /// Encryption at rest: create a key, or rotate the store to a new one.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Write a consistent copy of the database to FILE (safe beside the running daemon; the
    /// copy stays encrypted and needs no key to make).
    Backup { file: PathBuf },
    /// Put a backup made by `tokend backup` in place as the database (tokend stopped, no store
    /// there yet); the configured key must open every value in it.
    Restore { file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Write a new random key to FILE (mode 0600, never overwriting) and print how to give it to
    /// the service as an encrypted systemd credential.
    Init {
        file: PathBuf,
        /// Also encrypt the configuration's existing plaintext database with it now (tokend stopped).
        #[arg(long)]
        encrypt_existing: bool,
    },
    /// Re-encrypt every stored value with a new key (tokend stopped); killed at any point, the
    /// same command finishes the job. NEW is a key file, `env:VAR` or `credential:NAME`.
    Rotate {
        #[arg(long)]
        new: String,
        /// Credentials re-encrypted per transaction.
        #[arg(long, default_value_t = crate::at_rest::DEFAULT_BATCH)]
        batch: usize,
    },
}

/// An error for the user: one line and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::new(exit::CONFIG, e.to_string())
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        let code = if e.is_key_problem() {
            exit::KEY
        } else if matches!(e, StoreError::Postgres { .. }) {
            exit::STORE
        } else {
            exit::FAILURE
        };
        CliError::new(code, e.to_string())
    }
}

impl From<RefreshError> for CliError {
    fn from(e: RefreshError) -> Self {
        let code = match e {
            RefreshError::Busy { .. } | RefreshError::LeaseRanOut { .. } => exit::TEMPORARY,
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Check => check(&cli.config),
        Command::Import { name, issued_at } => {
            import(&config::load_without_secrets(&cli.config)?, &name, issued_at.as_deref())
        }
        Command::List { json } => list(&config::load_without_secrets(&cli.config)?, json),
        Command::Show { name, json } => show(&config::load_without_secrets(&cli.config)?, &name, json),
        Command::Refresh { name } => refresh_now(&config::load(&cli.config)?, &name).await,
        Command::Remove { name } => remove(&config::load_without_secrets(&cli.config)?, &name),
        Command::Authorize { name, paste, password, timeout } => {
            let config = config::load(&cli.config)?;
            let cred = credential(&config, &name)?;
            let options = crate::authorize::Options { paste, password, timeout: Duration::from_secs(timeout) };
            let state = crate::authorize::authorize(&config, cred, options).await.map_err(|e| {
                let code = match e {
                    crate::authorize::AuthorizeError::TimedOut(_) => exit::TEMPORARY,
                    _ => exit::FAILURE,
                };
                CliError::new(code, format!("{name}: {e}"))
            })?;
            println!(
                "authorized {name}: generation {}, access token {}, {}, {}",
                state.generation,
                fingerprint(state.access_token.expose()),
                state.expires_at.map_or("no expiry".to_string(), |t| format!("expires {}", rfc3339(t))),
                if state.refresh_token.is_some() { "refresh token stored" } else { "no refresh token" }
            );
            Ok(())
        }
        Command::Revoke { name, forget } => {
            let config = config::load(&cli.config)?;
            let cred = credential(&config, &name)?;
            match crate::authorize::revoke(&config, cred, forget).await {
                Ok(crate::authorize::Revoked::AtProvider) => {
                    println!("revoked {name} at {}; local token marked revoked, sinks removed", cred.provider());
                    Ok(())
                }
                Ok(crate::authorize::Revoked::ForgottenLocally) => {
                    println!("forgot {name} locally (the provider was not told); sinks removed");
                    Ok(())
                }
                Ok(crate::authorize::Revoked::ForgottenAfterFailure(reason)) => {
                    eprintln!("tokend: {name}: {reason}");
                    println!(
                        "forgot {name} locally; the provider did NOT revoke the grant (revoke it in the provider's settings); sinks removed"
                    );
                    Ok(())
                }
                Err(e) => Err(CliError::new(exit::FAILURE, format!("{name}: {e}"))),
            }
        }
        Command::Run => run_daemon(&cli.config).await,
        Command::Reload { pid } => reload(&cli.config, pid).await,
        Command::Dev { lifetime, keep } => crate::dev::run(Duration::from_secs(lifetime), keep)
            .await
            .map_err(|e| CliError::new(exit::FAILURE, e.to_string())),
        Command::Completions { shell } => crate::manual::print_completions(shell),
        Command::Token { name, min_valid, json } => token::run(&cli.config, &name, min_valid.as_deref(), json).await,
        Command::Key(command) => key_command(&cli.config, command),
        Command::Backup { file } => {
            let config = config::load_without_secrets(&cli.config)?;
            let (id, n) = crate::at_rest::backup(&config, &file)?;
            println!(
                "backed up {n} credential(s) from {} to {} ({})",
                config.daemon.database.display(),
                file.display(),
                id.map_or("not encrypted".to_string(), |id| format!("encrypted, key id {id}"))
            );
            Ok(())
        }
        Command::Restore { file } => {
            let config = config::load_without_secrets(&cli.config)?;
            let n = crate::at_rest::restore(&config, &file)?;
            println!("restored {n} credential(s) from {} to {}", file.display(), config.daemon.database.display());
            Ok(())
        }
        Command::Migrate { from: None, .. } | Command::Migrate { to: None, .. } => {
            migrate(&config::load_without_secrets(&cli.config)?)
        }
        Command::Migrate { from: Some(from), to: Some(to) } => {
            migrate_from_sqlite(&config::load_without_secrets(&cli.config)?, &from, &to)
        }
    }
}

fn key_command(config_path: &std::path::Path, command: KeyCommand) -> Result<(), CliError> {
    match command {
        KeyCommand::Init { file, encrypt_existing } => {
            // The configuration is read first: a store to encrypt must be known before a key is made.
            let config = if encrypt_existing { Some(config::load_without_secrets(config_path)?) } else { None };
            if let Some(config) = &config {
                // Before the key is written: a refusal must not leave a key file that was never used.
                crate::at_rest::refuse_if_running(&config.daemon.database)?;
            }
            let key = crate::at_rest::write_new_key(&file).map_err(|e| CliError::new(exit::FAILURE, e))?;
            let path = std::path::absolute(&file).unwrap_or(file);
            let id = key.id();
            println!("wrote a new key to {} (mode 0600, key id {id})", path.display());
            if let Some(config) = config {
                let n = crate::at_rest::encrypt_existing(&config, key)?;
                println!(
                    "encrypted {n} credential(s) in {} with key {id}; old pages removed (VACUUM, WAL truncated)",
                    config.daemon.database.display()
                );
            }
            print!("{}", key_setup_text(&path));
            Ok(())
        }
        KeyCommand::Rotate { new, batch } => {
            let config = config::load_without_secrets(config_path)?;
            let source = match (new.strip_prefix("env:"), new.strip_prefix("credential:")) {
                (Some(var), _) => crate::seal::KeySource::Env(var.to_string()),
                (_, Some(name)) => crate::seal::KeySource::Credential(name.to_string()),
                _ => crate::seal::KeySource::File(std::path::absolute(&new).unwrap_or_else(|_| new.clone().into())),
            };
            let (id, n) = crate::at_rest::rotate(&config, &source, batch)?;
            println!("rotated {n} credential(s) in {} to key {id}", config.daemon.database.display());
            use crate::seal::KeySource;
            match (&config.daemon.key, &source) {
                // The service keeps its credential's name: only the sealed file changes.
                (Some(KeySource::Credential(name)), KeySource::File(new)) => println!(
                    "now seal the new key for the service under the same name, then start tokend:\n\n\
                     \x20 systemd-creds encrypt --name={name} {} /etc/credstore.encrypted/{name}\n",
                    new.display()
                ),
                (_, new) => println!(
                    "now set [daemon] {} in {} and start tokend",
                    match new {
                        KeySource::File(p) => format!("key_file = \"{}\"", p.display()),
                        KeySource::Env(v) => format!("key_env = \"{v}\""),
                        KeySource::Credential(c) => format!("key_credential = \"{c}\""),
                    },
                    config_path.display()
                ),
            }
            Ok(())
        }
    }
}

/// The steps after `tokend key init`: seal the key to this host as a systemd credential (with the
/// TPM2 when there is one) and hand it to the service.
fn key_setup_text(key_file: &std::path::Path) -> String {
    format!(
        "\nTo unlock at boot without a person present, seal it to this host (TPM2 where there is one):\n\n\
         \x20 mkdir -p /etc/credstore.encrypted\n\
         \x20 systemd-creds encrypt --name=tokend-key {key} /etc/credstore.encrypted/tokend-key\n\
         \x20 shred -u {key}    # once the encrypted credential works; keep a copy offline for disaster recovery\n\n\
         then give it to the service (systemctl edit tokend):\n\n\
         \x20 [Service]\n\
         \x20 LoadCredentialEncrypted=tokend-key:/etc/credstore.encrypted/tokend-key\n\n\
         and in the configuration's [daemon] table:\n\n\
         \x20 key_credential = \"tokend-key\"\n\n\
         (or, without systemd credentials: key_file = \"{key}\")\n",
        key = key_file.display()
    )
}

/// `tokend migrate --from sqlite:PATH --to postgres://…`: the single node's store, as it stands,
/// into a fleet's empty store. Refused while a daemon runs on the SQLite store or a refresh is in
/// flight there: a rotation committed to the old store after the copy would be lost to the fleet.
fn migrate_from_sqlite(config: &Config, from: &str, to: &str) -> Result<(), CliError> {
    let path = std::path::PathBuf::from(from.strip_prefix("sqlite:").ok_or_else(|| {
        CliError::new(exit::USAGE, format!("--from \"{from}\": expected sqlite:PATH (the single node's tokend.db)"))
    })?);
    if !path.is_file() {
        return Err(CliError::new(exit::FAILURE, format!("--from: {} is not a file", path.display())));
    }
    if let Some(pid) = daemon::running_daemon(&path) {
        return Err(CliError::new(
            exit::FAILURE,
            format!(
                "tokend (pid {pid}) is running on {}; stop it first, so that no rotation is committed there after the copy",
                path.display()
            ),
        ));
    }
    let password = config.daemon.postgres.as_ref().and_then(|t| t.password().map(crate::redact::Secret::new));
    let target = crate::store::postgres::PgTarget::parse(to, password.as_ref())
        .map_err(|e| CliError::new(exit::USAGE, format!("--to: the PostgreSQL connection string {e}")))?;
    let source = crate::store::Store::open(&path)?;
    let states = source.list()?;
    if let Some(busy) = states.iter().find(|s| s.attempts_in_flight > 0) {
        return Err(CliError::new(
            exit::FAILURE,
            format!(
                "{}: a refresh of {} is in flight or was abandoned; start and stop tokend once on it (it settles open attempts), then migrate",
                path.display(),
                busy.name
            ),
        ));
    }
    let store = crate::store::postgres::PgStore::start(&target, &config.daemon.database)?;
    store.migrate()?;
    let (count, generations) = store.copy_in(states, now_secs())?;
    println!(
        "copied {count} credential(s) from {} to {} in one transaction; verified: {count} credential(s), generations summing to {generations} on both sides",
        path.display(),
        target.shown()
    );
    Ok(())
}

fn migrate(config: &Config) -> Result<(), CliError> {
    match &config.daemon.postgres {
        Some(target) => {
            let store = crate::store::postgres::PgStore::start(target, &config.daemon.database)?;
            let (before, after) = store.migrate()?;
            if before == after {
                println!("{}: schema version {after}, up to date", target.shown());
            } else {
                println!("{}: schema version {before} -> {after}", target.shown());
            }
        }
        None => {
            let store = crate::store::Store::open(&config.daemon.database)?;
            println!("{}: schema version {}, up to date", config.daemon.database.display(), store.schema_version()?);
        }
    }
    Ok(())
}

async fn run_daemon(config_path: &std::path::Path) -> Result<(), CliError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let _signals = daemon::signals::forward(tx)
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot install signal handlers: {e}")))?;
    daemon::run(config_path, rx).await.map_err(|e| match e {
        // systemd does not restart on this exit code (RestartPreventExitStatus=3): say so once.
        DaemonError::Config(e) if std::env::var_os("INVOCATION_ID").is_some() => CliError::new(
            exit::CONFIG,
            format!(
                "{e}\nthe configuration is invalid: not restarting until it is fixed (then `systemctl restart tokend`)"
            ),
        ),
        DaemonError::Config(e) => CliError::from(e),
        DaemonError::Store(e) if e.is_key_problem() => CliError::new(
            exit::KEY,
            format!(
                "{e}\nnot started: nothing was sent to any provider and nothing in the store was changed{}",
                // systemd does not restart on this exit code either (RestartPreventExitStatus=3 8).
                if std::env::var_os("INVOCATION_ID").is_some() {
                    "; not restarting until the key is fixed (then `systemctl restart tokend`)"
                } else {
                    ""
                }
            ),
        ),
        DaemonError::Store(e) => CliError::from(e),
        other => CliError::new(exit::FAILURE, other.to_string()),
    })
}

/// How long `tokend reload` waits for the daemon to report the reload's outcome.
const RELOAD_WAIT: Duration = Duration::from_secs(30);

async fn reload(path: &std::path::Path, pid: Option<u32>) -> Result<(), CliError> {
    // Without secrets: systemd runs ExecReload= with /run/credentials out of reach. The daemon
    // reads them itself and reports the verdict, which is waited for below.
    let config = config::load_without_secrets(path)
        .map_err(|e| CliError::new(exit::CONFIG, format!("{e}\nthe running daemon keeps its current configuration")))?;
    let database = &config.daemon.database;
    let holder = daemon::running_daemon(database);
    let pid = match (pid, holder) {
        (Some(pid), Some(holder)) if pid == holder => pid,
        (Some(pid), _) => {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "the daemon (pid {pid}) does not use {}, the database this configuration names; the database cannot change while running: restart tokend",
                    database.display()
                ),
            ));
        }
        (None, Some(holder)) => holder,
        (None, None) => {
            return Err(CliError::new(exit::FAILURE, format!("no tokend is running on {}", database.display())));
        }
    };
    let before = daemon::ReloadOutcome::read(database).filter(|o| o.pid == pid).map_or(0, |o| o.reload);
    let signal_pid = i32::try_from(pid).map_err(|_| CliError::new(exit::USAGE, format!("{pid} is not a pid")))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(signal_pid), nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot signal the daemon (pid {pid}): {e}")))?;
    let give_up = std::time::Instant::now() + RELOAD_WAIT;
    loop {
        match daemon::ReloadOutcome::read(database).filter(|o| o.pid == pid && o.reload > before) {
            Some(daemon::ReloadOutcome { rejected: None, .. }) => {
                println!("{}: reloaded by the daemon (pid {pid})", path.display());
                return Ok(());
            }
            Some(daemon::ReloadOutcome { rejected: Some(why), .. }) => {
                return Err(CliError::new(
                    exit::CONFIG,
                    format!("{why}\nreload rejected: the running daemon keeps its current configuration"),
                ));
            }
            None if std::time::Instant::now() >= give_up => {
                return Err(CliError::new(
                    exit::TEMPORARY,
                    format!("the daemon (pid {pid}) did not report the reload within {}s", RELOAD_WAIT.as_secs()),
                ));
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn check(path: &std::path::Path) -> Result<(), CliError> {
    let config = config::load(path)?;
    // Before the "ok" line: a key that does not fit the store fails the check.
    let encryption = crate::at_rest::describe(&config)?;
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    fleet_agreement(&config)?;
    println!(
        "{}: ok, {} credential(s), database {}",
        path.display(),
        config.credentials.len(),
        match &config.daemon.postgres {
            Some(target) =>
                format!("{} (fleet; this node's files: {})", target.shown(), config.daemon.database.display()),
            None => config.daemon.database.display().to_string(),
        }
    );
    for line in encryption {
        println!("{line}");
    }
    for c in &config.credentials {
        let sinks: Vec<String> =
            c.sinks.iter().map(|s| format!("{} ({})", s.path.display(), s.format.as_str())).collect();
        println!(
            "  {} [{}] {} sinks: {}",
            c.name,
            c.provider(),
            c.endpoint.token_url,
            if sinks.is_empty() { "none".to_string() } else { sinks.join(", ") }
        );
    }
    Ok(())
}

/// A fleet node's check also compares its provider settings with the other nodes' records:
/// a node that would spend a shared refresh token differently is a configuration error. A store
/// that cannot be reached only leaves the comparison undone.
fn fleet_agreement(config: &Config) -> Result<(), CliError> {
    if config.daemon.postgres.is_none() {
        return Ok(());
    }
    let compared = AnyStore::open(config)
        .and_then(|store| store.settings_agreement(crate::store::postgres::settings::of_config(config), false));
    match compared {
        Ok(found) if found.is_empty() => Ok(()),
        Ok(found) => {
            for disagreement in &found {
                eprintln!("{}: {disagreement}", config.path.display());
            }
            Err(CliError::new(
                exit::CONFIG,
                format!(
                    "{}: provider settings differ from other fleet nodes' ({} difference(s) above); every node must send the same",
                    config.path.display(),
                    found.len()
                ),
            ))
        }
        Err(e) => {
            eprintln!("warning: provider settings not compared with the other fleet nodes: {e}");
            Ok(())
        }
    }
}

fn credential<'a>(config: &'a Config, name: &str) -> Result<&'a Credential, CliError> {
    config
        .credential(name)
        .ok_or_else(|| CliError::new(exit::UNKNOWN, format!("no credential \"{name}\" in {}", config.path.display())))
}

fn open_store(config: &Config) -> Result<AnyStore, CliError> {
    Ok(AnyStore::open(config)?)
}

fn import(config: &Config, name: &str, issued_at: Option<&str>) -> Result<(), CliError> {
    let cred = credential(config, name)?;
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_IMPORT_BYTES + 1)
        .read_to_end(&mut input)
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read stdin: {e}")))?;
    if input.len() as u64 > MAX_IMPORT_BYTES {
        return Err(CliError::new(
            exit::FAILURE,
            format!("stdin: more than {MAX_IMPORT_BYTES} bytes; expected one token answer"),
        ));
    }
    // A rescue file written with a key configured holds the answer sealed (src/refresh.rs).
    let text = String::from_utf8_lossy(&input);
    let input = match crate::seal::classify(text.trim()) {
        crate::seal::Stored::Plain => input,
        crate::seal::Stored::Sealed(_) => crate::at_rest::sealer(config)?
            .open(name, crate::seal::Column::Rescue, 0, text.trim())
            .map_err(|e| CliError::new(exit::KEY, format!("stdin: {e}")))?
            .expose()
            .as_bytes()
            .to_vec(),
    };
    let answer = provider::parse_token_json(&input).map_err(|e| CliError::new(exit::FAILURE, format!("stdin: {e}")))?;
    let issued = match issued_at {
        None => schedule::imported_issue_time(answer.created_at, now_secs()),
        Some(t) => {
            let at = parse_time(t).ok_or_else(|| {
                CliError::new(exit::USAGE, format!("--issued-at \"{t}\" is neither unix seconds nor an RFC 3339 time"))
            })?;
            schedule::IssueTime { created_at: at, distrusted_skew: None }
        }
    };
    if answer.created_at.is_none() && issued_at.is_none() {
        tracing::info!(
            credential = name,
            "answer has no created_at; taking now as its issue time (use --issued-at if it is older)"
        );
    }
    let token = refresh::new_token(&answer, issued, name, &cred.endpoint.extra_fields);
    let state = open_store(config)?.import(name, cred.provider().as_str(), &token, now_secs())?;
    daemon::publish_imported(&config.daemon.database, cred, &state);
    println!(
        "imported {name}: generation {}, access token {}, {}, {}",
        state.generation,
        fingerprint(state.access_token.expose()),
        match state.expires_at {
            Some(t) => format!("expires {}", rfc3339(t)),
            None => "no expiry".to_string(),
        },
        if state.refresh_token.is_some() { "refresh token stored" } else { "no refresh token" },
    );
    Ok(())
}

fn parse_time(t: &str) -> Option<i64> {
    if let Ok(n) = t.trim().parse::<i64>() {
        return Some(n);
    }
    let when = humantime::parse_rfc3339_weak(t.trim()).ok()?;
    i64::try_from(when.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs()).ok()
}

/// One row of `tokend list`.
#[derive(serde::Serialize)]
struct Row {
    name: String,
    provider: String,
    status: String,
    expires_at: Option<String>,
    expires_in_secs: Option<i64>,
    next_refresh_at: Option<String>,
    generation: Option<i64>,
    attempts_in_flight: i64,
    last_error: Option<String>,
    /// By when a human must authorize again, where known.
    reauth_deadline: Option<String>,
    /// Since when the credential has needed re-authorization (or was revoked).
    dead_since: Option<String>,
    /// The provider's extras kept from its answers (e.g. Wild Apricot's `permissions`).
    extra: Option<serde_json::Value>,
    /// Fleet mode: who holds this credential's lease right now (node, pid, seconds left).
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<crate::store::postgres::Lease>,
}

/// When `state` is next due under `cred`'s policy, in unix ms; `None` when it is never refreshed.
pub fn next_refresh_ms(cred: Option<&Credential>, state: &TokenState) -> Option<i64> {
    let policy = cred.map_or(schedule::RefreshAt::Default, |c| c.refresh_at);
    let at_least = cred.and_then(|c| c.lifecycle.refresh_at_least);
    schedule::next_refresh_ms(&state.name, policy, at_least, &state.lifetime())
}

fn display_status(state: &TokenState, now: i64) -> &'static str {
    match (state.status, state.expires_at) {
        (Status::NeedsReauth | Status::Revoked, _) => state.status.as_str(),
        (Status::Active, Some(t)) if t <= now => "expired",
        (Status::Active, _) => "active",
    }
}

fn list(config: &Config, json: bool) -> Result<(), CliError> {
    // Names, expiry and status only: no key needed (README "Encryption at rest").
    let store = AnyStore::open_without_key(config)?;
    let states = store.list()?;
    let leases = store.leases()?;
    let now = now_secs();
    let mut rows = Vec::new();
    for cred in &config.credentials {
        let row = match states.iter().find(|s| *s.name == *cred.name) {
            Some(state) => row_for(Some(cred), state, now),
            None => Row {
                name: cred.name.to_string(),
                provider: cred.provider().to_string(),
                status: "no_token".into(),
                expires_at: None,
                expires_in_secs: None,
                next_refresh_at: None,
                generation: None,
                attempts_in_flight: 0,
                last_error: None,
                reauth_deadline: None,
                dead_since: None,
                extra: None,
                lease: None,
            },
        };
        rows.push(row);
    }
    for state in states.iter().filter(|s| config.credential(&s.name).is_none()) {
        let mut row = row_for(None, state, now);
        row.status = "not_in_config".into();
        rows.push(row);
    }
    for row in &mut rows {
        row.lease = leases.iter().find(|l| l.credential == row.name).cloned();
    }
    if store.is_postgres() {
        // Fleet mode: one line for the store and one per lease, before the table (JSON: per row).
        print_fleet(&store, &leases, json);
    }
    if json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    let ago = |at: &Option<String>| at.as_deref().and_then(parse_time).map(|t| short_duration(now - t));
    let table: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.provider.clone(),
                match ago(&r.dead_since) {
                    Some(for_how_long) => format!("{} for {for_how_long}", r.status),
                    None => r.status.clone(),
                },
                r.expires_in_secs.map_or("-".into(), short_duration),
                r.next_refresh_at.clone().unwrap_or_else(|| "-".into()),
                r.reauth_deadline.as_deref().and_then(parse_time).map_or("-".into(), |t| short_duration(t - now)),
                r.generation.map_or("-".into(), |g| g.to_string()),
                r.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = ["NAME", "PROVIDER", "STATUS", "EXPIRES IN", "NEXT REFRESH", "RE-AUTH IN", "GEN", "LAST ERROR"]
        .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &table {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&table) {
        let cells: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

/// Fleet mode's lines of `tokend list` (to stderr with `--json`, which keeps stdout one JSON
/// document).
fn print_fleet(store: &AnyStore, leases: &[crate::store::postgres::Lease], json: bool) {
    let mut lines = vec![format!("store {}: reachable, {} lease(s) held", store.describe(), leases.len())];
    for l in leases {
        let when = if l.seconds_left >= 0.0 {
            format!("{:.0}s left", l.seconds_left)
        } else {
            format!("past its deadline by {:.0}s", -l.seconds_left)
        };
        lines.push(format!("lease {}: node {} pid {} ({when})", l.credential, l.node, l.pid));
    }
    for line in lines {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

fn row_for(cred: Option<&Credential>, state: &TokenState, now: i64) -> Row {
    Row {
        name: state.name.clone(),
        provider: state.provider.clone(),
        status: display_status(state, now).into(),
        expires_at: state.expires_at.map(rfc3339),
        expires_in_secs: state.expires_at.map(|t| t - now),
        next_refresh_at: match next_refresh_ms(cred, state) {
            Some(ms) => Some(rfc3339(ms.div_euclid(1000))),
            None if state.status == Status::Active && state.expires_at.is_none() => Some("never".into()),
            None => None,
        },
        generation: Some(state.generation),
        attempts_in_flight: state.attempts_in_flight,
        last_error: state.last_error.clone(),
        reauth_deadline: schedule::reauth_deadline(
            &state.lifetime(),
            cred.and_then(|c| c.lifecycle.refresh_token_lifetime),
        )
        .map(rfc3339),
        dead_since: state.dead_since.filter(|_| state.status.is_dead()).map(rfc3339),
        extra: sink::extra_value(state),
        lease: None,
    }
}

fn show(config: &Config, name: &str, json: bool) -> Result<(), CliError> {
    credential(config, name)?;
    let state = open_store(config)?.get(name)?.ok_or_else(|| {
        CliError::new(exit::UNKNOWN, format!("no token stored for {name}; run `tokend import {name}` first"))
    })?;
    if state.status.is_dead() {
        return Err(CliError::new(
            exit::NEEDS_REAUTH,
            format!(
                "{name} needs re-authorization: {}",
                state.last_error.as_deref().unwrap_or("the provider rejected its grant")
            ),
        ));
    }
    if let Some(t) = state.expires_at.filter(|t| *t <= now_secs()) {
        return Err(CliError::new(exit::EXPIRED, format!("{name}: access token expired at {}", rfc3339(t))));
    }
    if json {
        let mut value = serde_json::json!({
            "name": state.name,
            "provider": state.provider,
            "access_token": state.access_token.expose(),
            "token_type": state.token_type,
            "expires_at": state.expires_at.map(rfc3339),
            "scope": state.scope,
            "generation": state.generation,
        });
        if let Some(extra) = sink::extra_value(&state) {
            value["extra"] = extra;
        }
        println!("{value:#}");
    } else {
        println!("{}", state.access_token.expose());
    }
    Ok(())
}

async fn refresh_now(config: &Config, name: &str) -> Result<(), CliError> {
    let cred = credential(config, name)?;
    let http = HttpClient::new(config.daemon.http, config.daemon.proxy.as_ref())
        .map_err(|e| CliError::new(exit::FAILURE, e))?;
    let opened = open_store(config)?;
    let generation = opened.get(name)?.map(|s| s.generation);
    let store = opened.refresh_store()?;
    // Wait as long as another holder may legitimately keep the lease, then a little more.
    let lease_wait = config.daemon.http.total_timeout + Duration::from_secs(35);
    let started = now_ms();
    let sinks = sink::SinkWriter::start()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot start the sink writer: {e}")))?;
    let outcome = refresh::refresh(&store, &http, &sinks, cred, generation, lease_wait).await;
    daemon::notify_store_changed(&config.daemon.database);
    match outcome? {
        Outcome::Refreshed { state, .. } => {
            println!(
                "refreshed {name}: generation {}, expires {}, took {} ms",
                state.generation,
                state.expires_at.map_or("never".into(), rfc3339),
                now_ms() - started
            );
            Ok(())
        }
        Outcome::AlreadyRefreshed(state) => {
            println!("{name} was refreshed by another process meanwhile: generation {}", state.generation);
            Ok(())
        }
        Outcome::Failed { failure, needs_reauth } => {
            let code = if needs_reauth { exit::NEEDS_REAUTH } else { exit::TEMPORARY };
            Err(CliError::new(code, format!("{name}: refresh failed: {}", failure.reason())))
        }
        Outcome::Skipped { reason, .. } => {
            let code = match reason {
                SkipReason::NoToken => exit::UNKNOWN,
                SkipReason::NeedsReauth => exit::NEEDS_REAUTH,
                SkipReason::NotRefreshable => exit::FAILURE,
            };
            Err(CliError::new(code, format!("{name}: not refreshed: {}", reason.text())))
        }
    }
}

fn remove(config: &Config, name: &str) -> Result<(), CliError> {
    let existed = AnyStore::open_without_key(config)?.remove(name)?;
    daemon::notify_store_changed(&config.daemon.database);
    let mut removed_files = Vec::new();
    if let Some(cred) = config.credential(name) {
        let (removed, failed) = sink::remove_all(cred, "token removed (tokend remove)");
        if let Some(e) = failed.into_iter().next() {
            return Err(CliError::new(exit::FAILURE, e.to_string()));
        }
        removed_files.extend(removed.iter().map(|p| p.display().to_string()));
    }
    if !existed && removed_files.is_empty() {
        return Err(CliError::new(exit::UNKNOWN, format!("no token stored for {name}")));
    }
    println!(
        "removed {name}{}",
        if removed_files.is_empty() { String::new() } else { format!(" and {}", removed_files.join(", ")) }
    );
    Ok(())
}

mod token;
