//! `tokend dev`: a self-contained demo, like `vault server -dev`. It starts three loopback DEMO
//! token endpoints (NationBuilder, Nudge and Wild Apricot shapes) that issue short-lived tokens
//! and revoke each refresh token on use, writes a throwaway config and store in a temp folder,
//! imports a first token for each credential, and runs the real daemon in the foreground.
//! Everything lives and dies with the process; nothing listens beyond 127.0.0.1.

use crate::clock::now_secs;
use crate::daemon;
pub mod mock;

use std::os::unix::fs::OpenOptionsExt;

use mock::{MockProvider, MockSettings};

/// The demo's providers remember this many requests: enough to look at, bounded for a demo left
/// running for days.
const DEV_KEPT_REQUESTS: usize = 1000;
use crate::provider::parse_token_json;
use crate::refresh::new_token;
use crate::schedule::imported_issue_time;
use crate::store::Store;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

/// (credential name, provider, token path at the mock, sends created_at, sink file, sink format)
const DEMO: [(&str, &str, &str, bool, &str, &str); 3] = [
    ("nationbuilder-demo", "nationbuilder", "/oauth/token", true, "nationbuilder.token", "raw"),
    ("nudge-demo", "nudge", "/api/oauth/zapier/token", false, "nudge.env", "env"),
    ("wildapricot-demo", "wildapricot", "/auth/token", false, "wildapricot.json", "json"),
];

#[derive(Debug, thiserror::Error)]
#[error("tokend dev: {0}")]
pub struct DevError(String);

fn fail(what: &str, e: impl std::fmt::Display) -> DevError {
    DevError(format!("{what}: {e}"))
}

pub async fn run(lifetime: Duration, keep: bool) -> Result<(), DevError> {
    let dir =
        tempfile::Builder::new().prefix("tokend-dev-").tempdir().map_err(|e| fail("cannot create a temp folder", e))?;
    let root = dir.path().to_path_buf();
    let sinks = root.join("sinks");
    std::fs::create_dir(&sinks).map_err(|e| fail("cannot create the sink folder", e))?;

    let expires_in = i64::try_from(lifetime.as_secs()).unwrap_or(20).max(2);
    let mut providers = Vec::new();
    let mut config = format!(
        "# Written by `tokend dev`: a throwaway demo.\n[daemon]\ndatabase = \"{}\"\ntrigger_dir = \"{}\"\n",
        root.join("tokend.db").display(),
        root.join("triggers").display()
    );
    for (name, provider, path, created_at, sink, format) in DEMO {
        // Wild Apricot's answers carry the accounts a token may act on: the demo's json sink shows
        // them under "extra" (README, "What answers carry").
        let answer_extras = (provider == "wildapricot").then(|| {
            serde_json::json!({"permissions": [{"accountId": 123456, "availableScopes": ["contacts_view", "events_view"]}]})
        });
        let settings = MockSettings {
            expires_in,
            send_created_at: created_at,
            keep_requests: Some(DEV_KEPT_REQUESTS),
            answer_extras,
            ..MockSettings::default()
        };
        let mock = MockProvider::start(settings).await.map_err(|e| fail("cannot start the demo provider", e))?;
        config.push_str(&format!(
            "\n[[credential]]\nname = \"{name}\"\nprovider = \"{provider}\"\ntoken_url = \"{}\"\nclient_id = \"demo-{provider}\"\nclient_secret = \"demo-secret\"\n\n[[credential.sink]]\npath = \"{}\"\nformat = \"{format}\"\n",
            mock.url(path),
            sinks.join(sink).display()
        ));
        providers.push((name, provider, mock));
    }
    let config_path = root.join("tokend.toml");
    // It holds the demo's (inline) client secrets: readable by this user only, as a real one should be.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config_path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, config.as_bytes()))
        .map_err(|e| fail("cannot write the demo config", e))?;

    let mut store = Store::open(&root.join("tokend.db")).map_err(|e| fail("cannot open the demo store", e))?;
    for (name, provider, mock) in &providers {
        let answer =
            parse_token_json(mock.authorize(name).to_string().as_bytes()).map_err(|e| fail("demo answer", e))?;
        let keep: Vec<String> = provider
            .parse::<crate::provider::ProviderKind>()
            .map(|p| p.preset().answer_extras.iter().map(|f| f.to_string()).collect())
            .unwrap_or_default();
        let token = new_token(&answer, imported_issue_time(answer.created_at, now_secs()), name, &keep);
        store.import(name, provider, &token, now_secs()).map_err(|e| fail("cannot import the demo token", e))?;
    }
    drop(store);

    print_banner(&root, &providers, expires_in);
    let (tx, rx) = mpsc::unbounded_channel();
    let _signals = daemon::signals::forward(tx.clone()).map_err(|e| fail("cannot install signal handlers", e))?;
    let result = daemon::run(&config_path, rx).await.map_err(|e| DevError(e.to_string()));
    drop(tx);
    if keep {
        let kept = dir.keep();
        println!("demo folder kept: {}", kept.display());
    }
    result
}

fn print_banner(root: &Path, providers: &[(&str, &str, MockProvider)], expires_in: i64) {
    println!("tokend dev — a DEMO. The token endpoints below are fakes on loopback, not real providers.");
    println!("Tokens live {expires_in} s; each refresh token is revoked when spent (NationBuilder semantics).");
    println!();
    for (name, provider, mock) in providers {
        println!("  {name:<20} {provider:<14} demo endpoint {}", mock.url(""));
    }
    println!();
    println!("  config   {}", root.join("tokend.toml").display());
    println!("  database {}", root.join("tokend.db").display());
    println!("  sinks    {}", root.join("sinks").display());
    println!();
    println!("Watch the tokens rotate in another terminal:");
    println!("  watch -n1 'tail -n +1 {}/*'", root.join("sinks").display());
    println!("Force a refresh the way a script that got a 401 would:");
    println!("  touch {}", root.join("triggers").join(format!("{}.refresh", DEMO[0].0)).display());
    println!("Or all of them: kill -USR1 {}   ·   Stop: Ctrl-C", std::process::id());
    println!();
}
