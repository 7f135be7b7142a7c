//! From the file as written to a typed [`Config`]: every value checked, every problem reported
//! with the file, the place and the field, and provider rules asked of the provider's
//! [`crate::provider::Preset`].

mod sinks;
mod socket;

use super::raw::{RawConfig, RawCredential, RawDaemon};
use super::*;
use crate::store::postgres::PgTarget;

pub(super) struct Validator<'a> {
    file: PathBuf,
    base_dir: PathBuf,
    env: &'a dyn Environment,
    secrets: Secrets,
    problems: Vec<ConfigProblem>,
    /// Endpoints and hooks, interned: an agency's 100,000 credentials share a handful.
    endpoints: HashSet<std::sync::Arc<Endpoint>>,
    hooks: HashSet<std::sync::Arc<Hooks>>,
    /// Socket rules of the credentials that have any, interned.
    access: HashSet<std::sync::Arc<SocketAccess>>,
    socket_access: HashMap<std::sync::Arc<str>, std::sync::Arc<SocketAccess>>,
    lifecycles: HashSet<std::sync::Arc<Lifecycle>>,
    /// URLs already parsed and found acceptable, by their text: token URLs (held to the
    /// stricter check) and the others.
    secure_urls: HashMap<String, Url>,
    plain_urls: HashMap<String, Url>,
    /// Not errors, but worth an operator's attention (`tokend check`, start-up).
    warnings: Vec<String>,
    inline_secrets: usize,
}

impl<'a> Validator<'a> {
    pub(super) fn new(path: &Path, env: &'a dyn Environment, secrets: Secrets) -> Self {
        Validator {
            file: path.to_path_buf(),
            base_dir: base_dir(path),
            env,
            secrets,
            problems: Vec::new(),
            endpoints: HashSet::new(),
            hooks: HashSet::new(),
            access: HashSet::new(),
            socket_access: HashMap::new(),
            lifecycles: HashSet::new(),
            secure_urls: HashMap::new(),
            plain_urls: HashMap::new(),
            warnings: Vec::new(),
            inline_secrets: 0,
        }
    }

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

    pub(super) fn config(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
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
                socket_access: self.socket_access,
            })
        } else {
            Err(ConfigError(self.problems))
        }
    }

    fn daemon(&mut self, mut raw: RawDaemon) -> DaemonConfig {
        let place = "[daemon]";
        let (database, mut postgres) = self.database(place, &mut raw);
        let concurrency =
            raw.concurrency.and_then(|n| self.positive(place, "concurrency", n, 10_000)).unwrap_or(DEFAULT_CONCURRENCY);
        let mut http = provider::HttpLimits::default();
        if let Some(t) = raw.connect_timeout {
            http.connect_timeout = self.duration(place, "connect_timeout", &t).unwrap_or(http.connect_timeout);
        }
        if let Some(t) = raw.request_timeout {
            http.total_timeout = self.duration(place, "request_timeout", &t).unwrap_or(http.total_timeout);
        }
        if let Some(t) = raw.lease_margin {
            match self.duration(place, "lease_margin", &t) {
                Some(d) if d >= Duration::from_secs(1) => http.lease_margin = d,
                Some(_) => self.report(place, Some("lease_margin"), format!("\"{t}\" is too short: at least 1s")),
                None => {}
            }
        }
        if let Some(target) = postgres.as_mut() {
            target.end_idle_transactions_after(http.lease_margin.min(Duration::from_secs(5)));
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
        let (socket, credential_socket) = self.sockets(place, raw.socket, raw.credential_socket);
        if postgres.is_some() {
            // The socket API answers from the SQLite store and its commits (src/socket/); a fleet
            // node's tokens live in PostgreSQL.
            for (field, set) in [("socket", socket.is_some()), ("credential_socket", credential_socket.is_some())] {
                if set {
                    self.report(place, Some(field), "is not offered with a PostgreSQL database yet (README \"Fleet\")");
                }
            }
        }
        let key = self.key_source(place, raw.key_credential, raw.key_file, raw.key_env);
        DaemonConfig {
            database,
            concurrency,
            http,
            metrics_file,
            trigger_dir,
            proxy,
            socket,
            credential_socket,
            key,
            postgres,
        }
    }

    /// At most one of `key_credential`, `key_file`, `key_env`; the key itself is read when the
    /// store is opened (src/at_rest.rs), by every command that opens it.
    fn key_source(
        &mut self,
        place: &str,
        credential: Option<String>,
        file: Option<PathBuf>,
        env: Option<String>,
    ) -> Option<crate::seal::KeySource> {
        use crate::seal::KeySource;
        let given = [credential.is_some(), file.is_some(), env.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            self.report(place, Some("key_credential"), "give only one of key_credential, key_file, key_env");
            return None;
        }
        match (credential, file, env) {
            (Some(c), _, _) if c.is_empty() || c.contains('/') => {
                self.report(
                    place,
                    Some("key_credential"),
                    format!("\"{c}\" must be a bare credential name, without '/'"),
                );
                None
            }
            (Some(c), _, _) => Some(KeySource::Credential(c)),
            (_, Some(f), _) if f.as_os_str().is_empty() => {
                self.report(place, Some("key_file"), "is empty");
                None
            }
            (_, Some(f), _) => Some(KeySource::File(self.resolve(&f))),
            (_, _, Some(v)) if v.is_empty() => {
                self.report(place, Some("key_env"), "is empty");
                None
            }
            (_, _, Some(v)) => Some(KeySource::Env(v)),
            _ => None,
        }
    }

    /// `database`: a SQLite file, or (fleet mode) a PostgreSQL connection string whose password
    /// comes from `database_password*` like any other secret. Commands that skip secrets still
    /// need this one to reach the store: a source that cannot be read is then no problem of the
    /// file, and the store names it when it cannot connect.
    fn database(&mut self, place: &str, raw: &mut RawDaemon) -> (PathBuf, Option<PgTarget>) {
        let password_given = raw.database_password.is_some()
            || raw.database_password_file.is_some()
            || raw.database_password_env.is_some()
            || raw.database_password_credential.is_some();
        let text = raw.database.as_ref().and_then(|p| p.to_str()).map(str::to_string);
        let Some(url) = text.filter(|t| crate::store::postgres::is_postgres(t)) else {
            if password_given {
                self.report(
                    place,
                    Some("database_password"),
                    "is for a PostgreSQL database; this one is a SQLite file",
                );
            }
            if raw.state_dir.is_some() {
                self.report(
                    place,
                    Some("state_dir"),
                    "is for a PostgreSQL database; SQLite keeps its files beside the database",
                );
            }
            let database = match raw.database.take() {
                Some(p) if p.as_os_str().is_empty() => {
                    self.report(place, Some("database"), "is empty");
                    PathBuf::new()
                }
                Some(p) => self.resolve(&p),
                None => default_database(self.env),
            };
            return (database, None);
        };
        let local = fleet_local_base(self.env, raw.state_dir.take().map(|p| self.resolve(&p)));
        let mode = std::mem::replace(&mut self.secrets, Secrets::Read);
        let problems = self.problems.len();
        let password = self.secret(
            place,
            "database_password",
            raw.database_password.take(),
            raw.database_password_file.take(),
            raw.database_password_env.take(),
            raw.database_password_credential.take(),
        );
        self.secrets = mode;
        let unavailable = if mode == Secrets::Skip && self.problems.len() > problems {
            let why = self.problems.drain(problems..).map(|p| p.to_string()).collect::<Vec<_>>().join("; ");
            Some(why)
        } else {
            None
        };
        match PgTarget::parse(&url, password.ok().flatten().as_ref()) {
            Ok(target) => {
                if target.has_password() && !password_given {
                    self.inline_secrets += 1;
                }
                let target = match unavailable {
                    Some(why) => target.with_password_unavailable(why),
                    None => target,
                };
                (local, Some(target))
            }
            Err(e) => {
                self.report(place, Some("database"), format!("the PostgreSQL connection string {e}"));
                (local, None)
            }
        }
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

    /// A lifecycle period: a second to ten years ("off" where `allow_off`, as `Some(None)`).
    fn period(&mut self, place: &str, field: &str, text: Option<&str>, allow_off: bool) -> Option<Option<Duration>> {
        let text = text?;
        if allow_off && text == "off" {
            return Some(None);
        }
        match humantime::parse_duration(text) {
            Ok(d) if d >= Duration::from_secs(1) && d.as_secs() <= 10 * 365 * 86_400 => Some(Some(d)),
            Ok(_) => {
                self.report(place, Some(field), format!("\"{text}\" is out of range; expected 1s to 10 years"));
                None
            }
            Err(_) => {
                let off = if allow_off { " or \"off\"" } else { "" };
                self.report(place, Some(field), format!("\"{text}\" is not a duration like \"7d\"{off}"));
                None
            }
        }
    }

    fn lifecycle(&mut self, place: &str, raw: [Option<&str>; 4]) -> Lifecycle {
        let [refresh_token_lifetime, reauth_warn, refresh_at_least, reauth_repeat] = raw;
        let defaults = Lifecycle::default();
        Lifecycle {
            refresh_token_lifetime: self
                .period(place, "refresh_token_lifetime", refresh_token_lifetime, false)
                .flatten(),
            reauth_warn: self.period(place, "reauth_warn", reauth_warn, false).flatten(),
            refresh_at_least: self.period(place, "refresh_at_least", refresh_at_least, false).flatten(),
            reauth_repeat: self.period(place, "reauth_repeat", reauth_repeat, true).unwrap_or(defaults.reauth_repeat),
        }
    }

    /// The answer fields a credential keeps: the preset's, then the configuration's. Tokens and
    /// secrets are refused by name.
    fn extra_fields(&mut self, place: &str, preset: &provider::Preset, raw: Option<&[String]>) -> Vec<String> {
        let mut fields: Vec<String> = preset.answer_extras.iter().map(|f| f.to_string()).collect();
        for field in raw.unwrap_or_default() {
            if field.is_empty() || field.len() > 64 || field.chars().any(|c| c.is_control()) {
                self.report(
                    place,
                    Some("extra_fields"),
                    format!("\"{}\" is not an answer field name", field.escape_debug()),
                );
            } else if provider::is_forbidden_extra(field) {
                self.report(
                    place,
                    Some("extra_fields"),
                    format!("\"{field}\" is a token, a secret or a field tokend already stores; it is never kept as an extra"),
                );
            } else if !fields.contains(field) {
                fields.push(field.clone());
            }
        }
        fields
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

        let preset = kind.preset();
        let settings = provider::Settings {
            slug: raw.slug.as_deref(),
            base_url: raw.base_url.as_deref(),
            site: raw.site.as_deref(),
        };
        for (field, given) in [("slug", settings.slug), ("base_url", settings.base_url), ("site", settings.site)] {
            if given.is_some() && !preset.own_fields.contains(&field) {
                let owners: Vec<&str> =
                    provider::REGISTRY.iter().filter(|p| p.own_fields.contains(&field)).map(|p| p.name).collect();
                let hint = if field == "base_url" { "; use token_url" } else { "" };
                self.report(
                    &place,
                    Some(field),
                    format!("only {} credentials have a {field}, this one is {kind}{hint}", owners.join(" and ")),
                );
            }
        }
        let token_url = self.token_url(&place, preset, &settings, &raw);
        let authorization = self.authorization(&place, preset, &settings, &raw);
        let revocation_url = match &raw.revocation_url {
            Some(u) => self.url_field(&place, "revocation_url", u, true),
            None => (preset.revocation_url)(&settings).and_then(|u| Url::parse(&u).ok()),
        };
        let scope = raw.scope.clone().or_else(|| preset.default_scope.map(str::to_string));
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
        let grant = match api_key {
            Some(key) if preset.takes_api_key => GrantKind::ApiKey(key),
            Some(_) => {
                let takers: Vec<&str> = provider::REGISTRY.iter().filter(|p| p.takes_api_key).map(|p| p.name).collect();
                self.report(
                    &place,
                    Some("api_key"),
                    format!("only {} credentials take an API key", takers.join(" and ")),
                );
                GrantKind::RefreshToken
            }
            None => GrantKind::RefreshToken,
        };
        let is_api_key = matches!(grant, GrantKind::ApiKey(_)) || api_key_failed;
        let client_id = raw.client_id.clone().unwrap_or_default();
        if !is_api_key {
            if raw.client_id.as_deref().is_none_or(str::is_empty) {
                self.report(&place, Some("client_id"), "is missing");
            }
            if client_secret.is_none() && !client_secret_failed && preset.requires_client_secret {
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

        let auth = match (preset.fixed_auth, raw.auth.as_deref()) {
            (_, None) => kind.default_auth(),
            (None, Some(a)) => a.parse().unwrap_or_else(|()| {
                self.report(
                    &place,
                    Some("auth"),
                    format!("\"{a}\" is not a client authentication; expected basic, body or json"),
                );
                kind.default_auth()
            }),
            (Some(fixed), Some(a)) if a.parse::<ClientAuth>().ok() == Some(fixed) => fixed,
            (Some(_), Some(a)) => {
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
        let extra_fields = self.extra_fields(&place, preset, raw.extra_fields.as_deref());
        let rate_limit = match raw.rate_limit.as_deref() {
            None => preset.rate_limit,
            Some(text) => text.parse().unwrap_or_else(|()| {
                self.report(
                    &place,
                    Some("rate_limit"),
                    format!("\"{text}\" is not a rate-limit scope; expected credential, client or provider"),
                );
                preset.rate_limit
            }),
        };
        let lifecycle = self.lifecycle(
            &place,
            [
                raw.refresh_token_lifetime.as_deref(),
                raw.reauth_warn.as_deref(),
                raw.refresh_at_least.as_deref(),
                raw.reauth_repeat.as_deref(),
            ],
        );
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
        let pass_env = raw.hook_env.clone().unwrap_or_default();
        if let Some(bad) = pass_env.iter().find(|v| v.is_empty() || v.contains(['=', '\0'])) {
            self.report(
                &place,
                Some("hook_env"),
                format!("\"{}\" is not an environment variable name", bad.escape_debug()),
            );
        }
        let access = self.access(&place, raw.readers, raw.units, raw.credential_format);
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
            extra_fields,
            rate_limit,
            provider_concurrency: provider_concurrency.unwrap_or(global_concurrency),
        };
        let name: std::sync::Arc<str> = name.into();
        if let Some(access) = access.filter(|a| *a != SocketAccess::default()) {
            let shared = intern(&mut self.access, access);
            self.socket_access.insert(name.clone(), shared);
        }
        Some(Credential {
            name,
            endpoint: intern(&mut self.endpoints, endpoint),
            refresh_at,
            sinks,
            refresh_cron: refresh_cron.map(Box::new),
            hooks: intern(&mut self.hooks, hooks),
            lifecycle: intern(&mut self.lifecycles, lifecycle),
        })
    }

    fn token_url(
        &mut self,
        place: &str,
        preset: &provider::Preset,
        settings: &provider::Settings<'_>,
        raw: &RawCredential,
    ) -> Option<Url> {
        if let Some(known) = raw.token_url.as_deref().and_then(|text| self.secure_urls.get(text)) {
            return Some(known.clone());
        }
        let parsed = match &raw.token_url {
            Some(u) => Url::parse(u).map_err(|e| ("token_url", format!("\"{u}\" is not a URL ({e})"))),
            None => (preset.token_url)(settings),
        };
        match parsed {
            Ok(url) => match provider::check_token_url(&url) {
                Ok(()) => {
                    if let Some(text) = &raw.token_url {
                        self.secure_urls.insert(text.clone(), url.clone());
                    }
                    Some(url)
                }
                Err(e) => {
                    // A derived URL is fixed where it came from.
                    let field = match (&raw.token_url, preset.own_fields.first()) {
                        (None, Some(own)) => own,
                        _ => "token_url",
                    };
                    self.report(place, Some(field), e);
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

    /// The authorization-code settings, with the provider's documented authorize URL.
    fn authorization(
        &mut self,
        place: &str,
        preset: &provider::Preset,
        settings: &provider::Settings<'_>,
        raw: &RawCredential,
    ) -> Option<provider::Authorization> {
        let redirect_uri =
            self.url_field(place, "redirect_uri", raw.redirect_uri.as_deref().unwrap_or(DEFAULT_REDIRECT_URI), false)?;
        let authorize_url = match (&raw.authorize_url, (preset.authorize_url)(settings)) {
            (Some(u), _) => Some(self.url_field(place, "authorize_url", u, true)?),
            (None, Some((field, derived))) => Some(self.url_field(place, field, &derived, true)?),
            (None, None) => None,
        };
        let pkce = raw.pkce.unwrap_or(preset.pkce_by_default);
        Some(provider::Authorization { authorize_url, redirect_uri, pkce })
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
}
