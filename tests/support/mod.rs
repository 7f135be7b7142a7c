//! Test fixtures: a temp dir with a config, the loopback mock provider, and the real `tokend`
//! binary run as a child process.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::PathBuf;
use std::process::Stdio;
use tempfile::TempDir;
use tokend::dev::mock::{MockProvider, MockSettings};
use tokio::io::AsyncWriteExt;

pub mod backend;
pub mod postgres;

pub use backend::Backend;

pub struct World {
    pub dir: TempDir,
    pub mock: MockProvider,
    /// The store the config points at: the SQLite file in `dir`, or a database of this World's
    /// own PostgreSQL server (`backend.rs`).
    pub backend: Backend,
    pg: Option<backend::PgDatabase>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl World {
    pub async fn new(settings: MockSettings) -> World {
        World::on(Backend::Sqlite, settings).await
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("tokend.toml")
    }

    /// Writes the config; `{mock}` becomes the mock's base URL.
    pub fn write_config(&self, body: &str) {
        self.write_config_with_daemon("", body);
    }

    /// A config whose `[daemon]` table is exactly `daemon` (no default `database` line): for
    /// PostgreSQL nodes (`postgres::daemon_lines`).
    pub fn write_config_daemon_only(&self, daemon: &str, body: &str) {
        let text = format!("[daemon]\n{daemon}\n{}", body.replace("{mock}", &self.mock.url("")));
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Same, with extra lines in the `[daemon]` table; the `database` line is this World's
    /// backend's.
    pub fn write_config_with_daemon(&self, daemon: &str, body: &str) {
        let text =
            format!("[daemon]\n{}{daemon}\n{}", self.database_lines(), body.replace("{mock}", &self.mock.url("")));
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub async fn tokend(&self, args: &[&str], stdin: Option<&str>) -> Run {
        self.tokend_env(args, stdin, &[]).await
    }

    pub async fn tokend_env(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokend"));
        cmd.args(args)
            .env("TOKEND_CONFIG", self.config_path())
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = tokio::time::timeout(std::time::Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("tokend did not finish within 120 s")
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Issues a first token pair at the mock and imports it; returns the answer.
    pub async fn authorize_and_import(&self, name: &str) -> serde_json::Value {
        let answer = self.mock.authorize(name);
        let run = self.tokend(&["import", name], Some(&answer.to_string())).await;
        assert_eq!(run.code, 0, "import failed: {}", run.stderr);
        answer
    }

    pub async fn list_json(&self) -> Vec<serde_json::Value> {
        let run = self.tokend(&["list", "--json"], None).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        serde_json::from_str(&run.stdout).unwrap()
    }

    pub async fn row(&self, name: &str) -> serde_json::Value {
        self.list_json().await.into_iter().find(|r| r["name"] == name).expect("credential listed")
    }

    pub async fn show(&self, name: &str) -> Run {
        self.tokend(&["show", name], None).await
    }
}

/// A running `tokend run` child; killed if the test ends first.
pub struct DaemonProcess {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl DaemonProcess {
    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: std::time::Duration) -> i32 {
        let status =
            tokio::time::timeout(within, self.child.wait()).await.expect("daemon did not exit in time").unwrap();
        status.code().unwrap_or(-1)
    }
}

impl World {
    /// Starts `tokend run` and waits until it reports running.
    pub async fn start_daemon(&self) -> DaemonProcess {
        self.start_daemon_env(&[]).await
    }

    pub async fn start_daemon_env(&self, env: &[(&str, &str)]) -> DaemonProcess {
        self.start_daemon_with(&self.config_path(), env).await
    }

    /// A daemon on another configuration file (fleet tests: one per node).
    pub async fn start_daemon_with(&self, config: &std::path::Path, env: &[(&str, &str)]) -> DaemonProcess {
        let daemon = self.spawn_daemon(config, env);
        let started =
            wait_for(std::time::Duration::from_secs(20), || daemon.log_text().contains("tokend running")).await;
        assert!(started, "daemon did not start: {}", daemon.log_text());
        daemon
    }

    /// `tokend run` on `config`, its log in the World's directory, without waiting for it.
    pub fn spawn_daemon(&self, config: &std::path::Path, env: &[(&str, &str)]) -> DaemonProcess {
        let log = self.path(&format!("daemon-{}.log", rand::random::<u32>()));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
            .args(["--log-level", "debug", "run"])
            .envs(env.iter().copied())
            .env("TOKEND_CONFIG", config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        DaemonProcess { child, log }
    }
}

/// Polls `condition` every 50 ms until it holds or `within` passes.
pub async fn wait_for(within: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Appends a test's figures to `<target tmp>/figures/<name>.txt`; `.ci/run` prints them, since
/// cargo hides the output of passing tests.
pub fn record_figures(name: &str, text: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("figures");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.txt")), format!("{text}\n")).unwrap();
}

/// A token answer as a store receives it (store-level tests): an hour's access token
/// `access` and refresh token `refresh`.
pub fn token(access: &str, refresh: &str) -> tokend::store::NewToken {
    tokend::store::NewToken {
        access_token: tokend::redact::Secret::new(access),
        refresh_token: Some(tokend::redact::Secret::new(refresh)),
        token_type: "Bearer".into(),
        scope: None,
        expires_in: Some(3600),
        created_at: tokend::clock::now_secs(),
        extra: None,
        refresh_token_expires_at: None,
    }
}
