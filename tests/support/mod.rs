//! Test fixtures: a temp dir with a config, the loopback mock provider, and the real `tokend`
//! binary run as a child process.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::PathBuf;
use std::process::Stdio;
use tempfile::TempDir;
use tokend::mock_provider::{MockProvider, MockSettings};
use tokio::io::AsyncWriteExt;

pub struct World {
    pub dir: TempDir,
    pub mock: MockProvider,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl World {
    pub async fn new(settings: MockSettings) -> World {
        World { dir: tempfile::tempdir().unwrap(), mock: MockProvider::start(settings).await.unwrap() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("tokend.toml")
    }

    /// Writes the config; `{mock}` becomes the mock's base URL.
    pub fn write_config(&self, body: &str) {
        let text = format!("[daemon]\ndatabase = \"tokend.db\"\n\n{}", body.replace("{mock}", &self.mock.url("")));
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
