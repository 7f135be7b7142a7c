//! Where a PostgreSQL store lives: `[daemon] database = "postgres://…"` (or `postgresql://…`, or
//! libpq's `key=value` form), parsed by tokio-postgres itself, and the password from the
//! configuration's secret sources. Only [`PgTarget::shown`] — user, hosts, ports, database, never
//! a password — is ever printed.

use crate::redact::Secret;
use std::fmt;

/// libpq keywords that may open a `key=value` connection string. A SQLite file name containing
/// `=` is still a file unless it starts with one of these.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "sslmode",
    "application_name",
    "connect_timeout",
    "options",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
    "channel_binding",
];

/// Whether a `database` value names PostgreSQL rather than a SQLite file.
pub fn is_postgres(text: &str) -> bool {
    let t = text.trim_start();
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        return true;
    }
    t.split_once('=').is_some_and(|(key, _)| KEYWORDS.contains(&key.trim()))
}

#[derive(Clone)]
pub struct PgTarget {
    pub(super) config: tokio_postgres::Config,
    shown: String,
    /// Why the password could not be read, when the command does not need secrets in general
    /// (`tokend list` outside the service) but does need this one to reach the database.
    pub(super) password_unavailable: Option<String>,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgTarget({})", self.shown)
    }
}

impl PgTarget {
    /// Parses a connection string. `password` (from `database_password*`) replaces one written
    /// in the string. The error never repeats the string: it may hold a password.
    pub fn parse(text: &str, password: Option<&Secret>) -> Result<PgTarget, String> {
        let mut config: tokio_postgres::Config = text.trim().parse().map_err(|e: tokio_postgres::Error| {
            // tokio-postgres's parse errors name the offending key or value, never the password.
            format!("is not a PostgreSQL connection string ({e})")
        })?;
        if config.get_hosts().is_empty() {
            return Err("names no host (give host=… or postgres://user@host/db)".into());
        }
        if config.get_dbname().is_none() {
            return Err("names no database (postgres://user@host/DATABASE)".into());
        }
        if config.get_user().is_none() {
            return Err("names no user (postgres://USER@host/db)".into());
        }
        if let Some(p) = password {
            config.password(p.expose());
        }
        if config.get_application_name().is_none() {
            config.application_name("tokend");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        let shown = describe(&config);
        Ok(PgTarget { config, shown, password_unavailable: None })
    }

    /// A node stopped in the middle of a transaction (SIGSTOP, a frozen VM) would hold that
    /// transaction's row locks — a lease row among them — for as long as it is stopped. The server
    /// ends such a transaction after `limit`, which the configuration keeps within a lease's
    /// margin, so a stopped node is replaced within its lease. A limit in the connection string's
    /// own `options` is kept.
    pub fn end_idle_transactions_after(&mut self, limit: std::time::Duration) {
        let options = self.config.get_options().unwrap_or_default();
        if !options.contains("idle_in_transaction_session_timeout") {
            let joined = format!("{options} -c idle_in_transaction_session_timeout={}", limit.as_millis());
            self.config.options(joined.trim());
        }
    }

    /// Records that the password source could not be read (see the field).
    pub fn with_password_unavailable(mut self, why: String) -> Self {
        self.password_unavailable = Some(why);
        self
    }

    /// The password this target connects with, to reuse for another target (`tokend migrate
    /// --to`), if it is text.
    pub fn password(&self) -> Option<&str> {
        self.config.get_password().and_then(|p| std::str::from_utf8(p).ok())
    }

    /// Whether the connection string itself carries a password (an inline secret).
    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// `postgres://user@host:port/db`, without any password: safe for logs and errors.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        config.get_dbname().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_keyword_strings_are_postgres_and_file_names_are_not() {
        assert!(is_postgres("postgres://u@h/db"));
        assert!(is_postgres("postgresql://u@h/db?sslmode=require"));
        assert!(is_postgres("host=/run/pg dbname=tokend user=tokend"));
        assert!(!is_postgres("tokend.db"));
        assert!(!is_postgres("/var/lib/tokend/a=b.db"));
    }

    #[test]
    fn the_password_never_shows() {
        let t = PgTarget::parse("postgres://tokend:hunter2@db.example:5433/tokens", None).unwrap();
        assert!(t.has_password());
        assert_eq!(t.shown(), "postgres://tokend@db.example:5433/tokens");
        assert!(!format!("{t:?}").contains("hunter2"));
        let from_file = Secret::new("s3cret");
        let t = PgTarget::parse("host=/tmp/pg port=5999 dbname=d user=u", Some(&from_file)).unwrap();
        assert_eq!(t.shown(), "postgres://u@/tmp/pg:5999/d");
        assert_eq!(t.config.get_password(), Some(&b"s3cret"[..]));
    }

    #[test]
    fn incomplete_strings_say_what_is_missing() {
        assert!(PgTarget::parse("postgres://h/db", None).unwrap_err().contains("no user"));
        assert!(PgTarget::parse("postgres://u@h", None).unwrap_err().contains("no database"));
        assert!(PgTarget::parse("postgres://u:pw@h/db?sslmode=bogus", None).unwrap_err().contains("not a PostgreSQL"));
    }
}
