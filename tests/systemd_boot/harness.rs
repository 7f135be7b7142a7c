//! The harness of the tests that run tokend under a real systemd (`tests/systemd_boot.rs`,
//! `tests/deb_package.rs`): a container booted by the scripts beside this file, the crate's mock
//! token endpoint listening inside it, soft checks with a report, and what both tests ask the
//! installed service (`tokend list --json` as its user, the journal).
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokend::dev::mock::{MockProvider, MockSettings};

pub const SYSTEMD: &str = "/lib/systemd/systemd";
pub const CONFIG: &str = "/etc/tokend/tokend.toml";
/// Where the package puts the binary, and where README's manual steps put it too (the unit's
/// ExecStart=).
pub const TOKEND: &str = "/usr/bin/tokend";

// ------------------------------------------------------------------------------------------------
// The container.

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// Everything it printed, for evidence.
    pub fn text(&self) -> String {
        let mut t = self.stdout.trim_end().to_string();
        if !self.stderr.trim().is_empty() {
            if !t.is_empty() {
                t.push('\n');
            }
            t.push_str(self.stderr.trim_end());
        }
        t
    }
}

/// An unnamed temp file holding `bytes`, read from the start: stdin for a command inside.
pub fn file_holding(bytes: &[u8]) -> File {
    let mut file = tempfile::tempfile().expect("temp file");
    std::io::Write::write_all(&mut file, bytes).expect("write temp file");
    std::io::Seek::rewind(&mut file).expect("rewind temp file");
    file
}

/// A booted container. Dropping it powers it off and removes its cgroup.
pub struct Container {
    dir: Option<tempfile::TempDir>,
    scripts: PathBuf,
    pub init_pid: i32,
    halted: bool,
}

impl Container {
    fn scripts() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/systemd_boot")
    }

    pub fn boot() -> Result<Container, String> {
        let dir = tempfile::Builder::new().prefix("tokend-sysd-").tempdir().map_err(|e| e.to_string())?;
        let scripts = Self::scripts();
        let out = Command::new(scripts.join("boot.sh"))
            .arg(dir.path())
            // If this process dies without running Drop (killed), the container halts itself.
            .env("SYSD_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run boot.sh: {e}"))?;
        let pid = std::fs::read_to_string(dir.path().join("init.pid")).ok().and_then(|p| p.trim().parse().ok());
        // From here on the guard owns whatever boot.sh started, even if it then failed.
        let mut container = Container { dir: Some(dir), scripts, init_pid: pid.unwrap_or(0), halted: false };
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || pid.is_none() {
            let console = std::fs::read_to_string(container.path().join("console.log")).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(15).collect();
            let why = format!(
                "boot.sh failed ({}): {state} {}\nconsole (last lines):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            let _ = container.halt();
            return Err(why);
        }
        println!("container state after boot: {state}");
        if state != "running" {
            println!("{}", std::fs::read_to_string(container.path().join("boot.out")).unwrap_or_default());
        }
        Ok(container)
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("scratch dir").path()
    }

    /// Runs `sh -c script` inside, with `args` as $1..., and `stdin` fed from a file.
    pub fn run(&self, script: &str, args: &[&str], stdin: Stdio) -> Out {
        let out = Command::new(self.scripts.join("inside.sh"))
            .arg(self.path())
            .args(["sh", "-c", script, "sh"])
            .args(args)
            .stdin(stdin)
            .output()
            .expect("run inside.sh");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn sh(&self, script: &str) -> Out {
        self.run(script, &[], Stdio::null())
    }

    /// `sh`, which must succeed: a step the rest depends on (a failure ends the test, the Drop
    /// guard still tears the container down).
    pub fn must(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(out.ok(), "inside the container, `{script}` exited {}:\n{}", out.code, out.text());
        out.stdout
    }

    /// `sh -c script` with `input` on stdin.
    pub fn sh_input(&self, script: &str, args: &[&str], input: &[u8]) -> Out {
        self.run(script, args, Stdio::from(file_holding(input)))
    }

    /// Installs `content` at `path` inside with `install -m MODE [-o OWNER] [-g GROUP]`.
    pub fn install(&self, path: &str, content: &[u8], install_args: &str) {
        self.install_from(path, file_holding(content), install_args);
    }

    /// Same, from a host file (streamed: the debug binary is over 100 MB).
    pub fn install_from(&self, path: &str, source: File, install_args: &str) {
        let script = format!("cat > /root/.staged && install {install_args} /root/.staged \"$1\" && rm /root/.staged");
        let out = self.run(&script, &[path], Stdio::from(source));
        assert!(out.ok(), "installing {path}: {}", out.text());
    }

    pub fn systemctl_show(&self, unit: &str, props: &[&str]) -> BTreeMap<String, String> {
        let args: String = props.iter().map(|p| format!(" -p {p}")).collect();
        self.sh(&format!("systemctl show{args} {unit}"))
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn prop(&self, unit: &str, prop: &str) -> String {
        self.systemctl_show(unit, &[prop]).remove(prop).unwrap_or_default()
    }

    /// Powers off, waits, removes the cgroup (halt.sh); then checks nothing of it is left.
    pub fn halt(&mut self) -> Result<(), String> {
        if self.halted {
            return Ok(());
        }
        self.halted = true;
        let out = Command::new(self.scripts.join("halt.sh"))
            .arg(self.path())
            .output()
            .map_err(|e| format!("cannot run halt.sh: {e}"))?;
        let mut problems = String::new();
        if !out.status.success() {
            let _ = write!(
                problems,
                "halt.sh: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if self.init_pid > 0 && Path::new(&format!("/proc/{}", self.init_pid)).exists() {
            let _ = write!(problems, " the container's PID 1 ({}) is still alive", self.init_pid);
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.halt() {
            eprintln!("TEARDOWN PROBLEM: {e}");
        }
        // Dropping the TempDir deletes it: kept only on request or after a failure.
        if let Some(dir) = self.dir.take()
            && (std::env::var_os("TOKEND_SYSD_KEEP").is_some() || std::thread::panicking())
        {
            let kept = dir.keep();
            eprintln!("container scratch dir kept: {} (console.log, boot.out)", kept.display());
        }
    }
}

/// The crate's mock token endpoint, listening on 127.0.0.1 *inside* the container.
pub struct InsideMock {
    pub provider: MockProvider,
    // Declared after `provider`, so it is dropped after it.
    _runtime: tokio::runtime::Runtime,
}

impl InsideMock {
    pub fn start(init_pid: i32, settings: MockSettings) -> Result<InsideMock, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let handle = runtime.handle().clone();
        let netns =
            File::open(format!("/proc/{init_pid}/ns/net")).map_err(|e| format!("container's net namespace: {e}"))?;
        // The listening socket belongs to the namespace it was created in, whichever thread later
        // accepts on it; the thread that created it ends right after.
        let provider = std::thread::spawn(move || {
            enter_net_namespace(&netns)?;
            handle.block_on(MockProvider::start(settings))
        })
        .join()
        .map_err(|_| "the mock's thread panicked".to_string())?
        .map_err(|e| format!("cannot start the mock inside the container: {e}"))?;
        Ok(InsideMock { provider, _runtime: runtime })
    }
}

pub fn enter_net_namespace(ns: &File) -> std::io::Result<()> {
    // Changes the network namespace of the calling thread alone (a thread created for this).
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

// ------------------------------------------------------------------------------------------------
// Checks and their report.

pub type Check = Result<String, String>;

#[derive(Default)]
pub struct Report {
    pub rows: Vec<(String, bool, String)>,
}

impl Report {
    pub fn record(&mut self, name: &str, result: Check) {
        let (ok, evidence) = match result {
            Ok(e) => (true, e),
            Err(e) => (false, e),
        };
        println!("\n[{}] {name}\n    {}", if ok { "PASS" } else { "FAIL" }, evidence.replace('\n', "\n    "));
        self.rows.push((name.to_string(), ok, evidence));
    }

    /// Powers the container off (the mock inside it goes first) and records whether the teardown
    /// left nothing behind.
    pub fn record_teardown(&mut self, mut container: Container, mock: InsideMock) {
        let halt_started = Instant::now();
        let halted = container.halt();
        self.record(
            "teardown: poweroff, container's PID 1 gone, cgroup removed",
            halted.map(|()| format!("in {:.2} s", halt_started.elapsed().as_secs_f64())),
        );
        drop(mock);
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (name, ok, evidence) in &self.rows {
            let first = evidence.lines().next().unwrap_or_default();
            let _ = writeln!(s, "{} {name}: {first}", if *ok { "PASS" } else { "FAIL" });
        }
        let failed = self.rows.iter().filter(|r| !r.1).count();
        let _ = write!(s, "{} checks, {} passed, {failed} failed", self.rows.len(), self.rows.len() - failed);
        s
    }
}

pub fn wait_until<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn ensure(ok: bool, evidence: String) -> Check {
    if ok { Ok(evidence) } else { Err(evidence) }
}

// ------------------------------------------------------------------------------------------------
// The installed service, as root and as its user.

pub fn repo_file(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `tokend list --json` as the service user, by name.
pub fn list(c: &Container) -> Result<BTreeMap<String, serde_json::Value>, String> {
    let out = c.sh(&format!("runuser -u tokend -- {TOKEND} -c {CONFIG} list --json"));
    if !out.ok() {
        return Err(format!("tokend list exited {}: {}", out.code, out.text()));
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.stdout))?;
    Ok(rows.into_iter().map(|r| (r["name"].as_str().unwrap_or_default().to_string(), r)).collect())
}

pub fn generations(c: &Container) -> BTreeMap<String, i64> {
    list(c).unwrap_or_default().into_iter().map(|(name, row)| (name, row["generation"].as_i64().unwrap_or(0))).collect()
}

/// Waits until every credential's generation is at least `at_least[name] + by`.
pub fn wait_generations(c: &Container, at_least: &BTreeMap<String, i64>, by: i64, within: Duration) -> Check {
    let started = Instant::now();
    let mut last = BTreeMap::new();
    let reached = wait_until(within, || {
        last = generations(c);
        at_least.iter().all(|(n, g)| last.get(n).is_some_and(|now| *now >= g + by)).then_some(())
    });
    let evidence = format!("generations {at_least:?} -> {last:?} after {:.1} s", started.elapsed().as_secs_f64());
    ensure(reached.is_some(), evidence)
}

/// Imports a first token answer for `name` as the service user, as the README does.
pub fn import(c: &Container, name: &str, answer: &serde_json::Value) -> Out {
    c.sh_input(
        &format!("runuser -u tokend -- {TOKEND} -c {CONFIG} import \"$1\""),
        &[name],
        answer.to_string().as_bytes(),
    )
}

pub fn journal(c: &Container, args: &str) -> String {
    c.sh(&format!("journalctl --no-pager -q -o cat {args}")).stdout
}

// ------------------------------------------------------------------------------------------------

pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (it boots systemd in new namespaces)".into());
    }
    if !Path::new(SYSTEMD).exists() {
        return Some(format!("systemd is not installed ({SYSTEMD} is missing)"));
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--uts", "--ipc", "--net", "--cgroup", "--", "true"])
        .stdin(Stdio::null())
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("this machine cannot create namespaces: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("this machine cannot create namespaces (unshare: {e})")),
    }
}
