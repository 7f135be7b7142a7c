//! End-to-end benchmark: the release `tokend run` against a loopback mock token endpoint (the
//! same one the tests use, keep-alive, in this process), and the two ways users refresh tokens
//! today (`benches/baselines/refresh.sh`: bash + curl + jq + sqlite3; `refresh.py`: requests +
//! sqlite3) against the same mock, same N, same durability. Bounded: every wait has a deadline.
//!
//!   cargo bench --bench tokend_bench            full run (the figures in BENCHMARKS.md)
//!   cargo bench --bench tokend_bench -- smoke   small and quick, for CI; no time assertions
//!   TOKEND_BENCH_BIN=path/to/old/tokend cargo bench --bench tokend_bench -- catchup n=10000
//!                                               another build through the same harness
//!   cargo bench --bench tokend_bench -- fleet n=10000 [nodes=3]
//!                                               catch-up on SQLite, then on PostgreSQL with 1
//!                                               and 3 nodes, then a fleet node's idle wake-ups
//!                                               (only when asked: needs PostgreSQL);
//!                                               `fleet idle`: the idle part alone
//!
//! Measured: catch-up (N credentials all due at once → every rotation committed and every sink
//! written), steady-state lateness (request received at the provider − due time), start-up (exec →
//! READY=1 over a real NOTIFY_SOCKET), idle wake-ups (context switches), CPU (getrusage of the
//! reaped child) and memory (VmHWM / VmRSS).

use rusqlite::OpenFlags;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokend::clock::{now_ms, now_secs};
use tokend::dev::mock::{MockProvider, MockSettings};
use tokend::provider::parse_token_json;
use tokend::refresh::new_token;
use tokend::schedule::{IssueTime, RefreshAt, due_at_ms, jitter_unit};
use tokend::store::Store;

/// The tests' PostgreSQL server (initdb + postgres in a temp dir, stopped on drop).
#[path = "../tests/support/postgres.rs"]
#[allow(dead_code, reason = "the tests use more of it")]
mod pg;

const CLIENT_ID: &str = "bench-client";
const CLIENT_SECRET: &str = "bench-secret";

/// The daemon under test: this build's, or `TOKEND_BENCH_BIN` (another build of tokend, so that
/// a before/after comparison runs through the same harness in one session).
fn tokend_binary() -> PathBuf {
    std::env::var_os("TOKEND_BENCH_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tokend")), PathBuf::from)
}

fn children_cpu_secs() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        for line in std::fs::read_to_string(task.path().join("status")).unwrap_or_default().lines() {
            if line.contains("ctxt_switches") {
                total += line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

/// Context switches of each live thread of `pid`, by thread id.
fn context_switches_by_task(pid: u32) -> std::collections::HashMap<String, u64> {
    let mut by_task = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        by_task.insert(task.file_name().to_string_lossy().into_owned(), switches);
    }
    by_task
}

/// Switches between two samples: a thread that exited meanwhile (tokio's idle blocking threads)
/// would otherwise make the process total go down.
fn switches_between(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> u64 {
    after.iter().map(|(task, n)| n.saturating_sub(before.get(task).copied().unwrap_or(0))).sum()
}

fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// utime + stime of a `/proc/.../stat` line (the fields after the parenthesised name).
fn stat_ticks(stat: &str) -> u64 {
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// (user + system) CPU seconds of each live thread of `pid`, summed by thread name, and what the
/// threads that already exited used (the process total minus the live threads).
fn cpu_by_thread(pid: u32) -> Vec<(String, f64)> {
    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let parse = |stat: &str| -> Option<(String, u64)> {
        let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
        Some((name, stat_ticks(stat)))
    };
    let mut by_name: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        if let Some((name, ticks)) = parse(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default()) {
            *by_name.entry(name).or_default() += ticks;
        }
    }
    let live: u64 = by_name.values().sum();
    let mut out: Vec<(String, f64)> =
        by_name.into_iter().map(|(name, ticks)| (name, ticks as f64 / ticks_per_sec)).collect();
    out.push(("(exited threads)".into(), cpu_ticks(pid).saturating_sub(live) as f64 / ticks_per_sec));
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn config(&self) -> PathBuf {
        self.dir.path().join("tokend.toml")
    }
    fn db(&self) -> PathBuf {
        self.dir.path().join("tokend.db")
    }
    fn sink(&self, i: usize) -> PathBuf {
        self.dir.path().join("sinks").join(format!("c{i}.token"))
    }
}

/// N credentials with live tokens at the mock; `lifetime(i)` gives each imported token's
/// (created_at, expires_in).
fn fixture(mock: &MockProvider, n: usize, sinks: bool, lifetime: impl Fn(usize) -> (i64, i64)) -> Fixture {
    fixture_sealed(mock, n, sinks, lifetime, false)
}

/// The key file of an encrypted fixture (`key_file` in its configuration).
const KEY_FILE: &str = "tokend.key";

/// The sealer a fixture's store is opened with: its key when it has one.
fn fixture_sealer(dir: &Path) -> tokend::seal::Sealer {
    match std::fs::read_to_string(dir.join(KEY_FILE)) {
        Ok(text) => tokend::seal::Sealer::with(tokend::seal::Keyring::new(
            tokend::seal::Key::from_text(&text, KEY_FILE).unwrap(),
            vec![],
        )),
        Err(_) => tokend::seal::Sealer::plaintext(),
    }
}

/// [`fixture`], with every token sealed under a key of its own when `encrypted` (README
/// "Encryption at rest").
fn fixture_sealed(
    mock: &MockProvider,
    n: usize,
    sinks: bool,
    lifetime: impl Fn(usize) -> (i64, i64),
    encrypted: bool,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sinks")).unwrap();
    let mut config = String::from(
        "[daemon]\ndatabase = \"tokend.db\"\nconcurrency = 512\n\n[provider.oauth2]\nconcurrency = 512\n\n",
    );
    if encrypted {
        tokend::at_rest::write_new_key(&dir.path().join(KEY_FILE)).unwrap();
        config = config.replace("[daemon]\n", &format!("[daemon]\nkey_file = \"{KEY_FILE}\"\n"));
    }
    for i in 0..n {
        config.push_str(&format!(
            "[[credential]]\nname = \"c{i}\"\nprovider = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n",
            mock.url("/token")
        ));
        if sinks {
            config.push_str(&format!("[[credential.sink]]\npath = \"sinks/c{i}.token\"\n"));
        }
    }
    std::fs::write(dir.path().join("tokend.toml"), config).unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let tokens: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let answer = parse_token_json(mock.authorize(name).to_string().as_bytes()).unwrap();
            let (created_at, expires_in) = lifetime(i);
            let mut token = new_token(&answer, IssueTime { created_at, distrusted_skew: None }, name, &[]);
            token.expires_in = Some(expires_in);
            token
        })
        .collect();
    let rows: Vec<(&str, &str, &tokend::store::NewToken)> =
        names.iter().zip(&tokens).map(|(n, t)| (n.as_str(), "oauth2", t)).collect();
    Store::open_sealed(&dir.path().join("tokend.db"), fixture_sealer(dir.path()))
        .unwrap()
        .import_many(&rows, now_secs())
        .unwrap();
    if sinks {
        // As a previous run left them: each sink holds the token that is now due.
        for (i, token) in tokens.iter().enumerate() {
            let path = dir.path().join("sinks").join(format!("c{i}.token"));
            std::fs::write(&path, token.access_token.expose()).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
    }
    Fixture { dir }
}

struct Running {
    child: Child,
    ready_after: Duration,
    /// One `()` per READY=1 on the daemon's `NOTIFY_SOCKET` (again after each reload). The
    /// socket is read all the time, as systemd does: status lines are sent once a second.
    ready: std::sync::mpsc::Receiver<()>,
    reading: Arc<AtomicBool>,
}

fn read_notifications(socket: UnixDatagram, ready: std::sync::mpsc::Sender<()>, reading: Arc<AtomicBool>) {
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 4096];
    while reading.load(Ordering::Relaxed) {
        if let Ok(n) = socket.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1")
        {
            let _ = ready.send(());
        }
    }
}

impl Running {
    fn wait_ready(&self) {
        self.ready.recv_timeout(Duration::from_secs(120)).expect("READY=1 within 120 s");
    }

    /// SIGHUP, then the time until the daemon says READY=1 again.
    fn reload(&self) -> Duration {
        let started = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGHUP)
            .unwrap();
        self.wait_ready();
        started.elapsed()
    }
}

fn start_tokend(f: &Fixture) -> Running {
    let socket_path = f.dir.path().join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let started = Instant::now();
    let child = Command::new(tokend_binary())
        .args(["--log-level", "warn", "run"])
        .env("TOKEND_CONFIG", f.config())
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("RUST_LOG")
        .current_dir(f.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(f.dir.path().join("tokend.log")).unwrap())
        .spawn()
        .unwrap();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let reading = Arc::new(AtomicBool::new(true));
    let flag = reading.clone();
    std::thread::spawn(move || read_notifications(socket, ready_tx, flag));
    let mut running = Running { child, ready_after: Duration::ZERO, ready, reading };
    running.wait_ready();
    running.ready_after = started.elapsed();
    running
}

/// A failed assertion must not leave a daemon running on a deleted directory.
impl Drop for Running {
    fn drop(&mut self) {
        self.reading.store(false, Ordering::Relaxed);
        if self.child.try_wait().is_ok_and(|status| status.is_none()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stop(mut r: Running) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = r.child.wait().unwrap();
    assert!(status.success(), "tokend exited with {status:?}");
}

fn count_refreshed(db: &Path) -> usize {
    let conn = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row("SELECT count(*) FROM credential WHERE generation >= 2", [], |r| r.get::<_, i64>(0)).unwrap()
        as usize
}

fn sinks_current(f: &Fixture) -> usize {
    let store = Store::open_sealed(&f.db(), fixture_sealer(f.dir.path())).unwrap();
    store
        .list()
        .unwrap()
        .iter()
        .filter(|s| {
            let i: usize = s.name[1..].parse().unwrap();
            std::fs::read(f.sink(i)).is_ok_and(|b| b == s.access_token.expose().as_bytes())
        })
        .count()
}

struct CatchUp {
    n: usize,
    secs: f64,
    per_sec: f64,
    cpu_secs: f64,
    peak_rss_mb: f64,
}

/// All N due at once: time from READY until every rotation is committed and every sink written.
fn catch_up(rt: &tokio::runtime::Runtime, n: usize) -> CatchUp {
    catch_up_sealed(rt, n, false)
}

fn catch_up_sealed(rt: &tokio::runtime::Runtime, n: usize, encrypted: bool) -> CatchUp {
    let mock = rt.block_on(MockProvider::start(MockSettings::default())).unwrap();
    let now = now_secs();
    // Lifetime 1 h, expiring in 2 min: the 15 min lead puts every credential in the past.
    let f = fixture_sealed(&mock, n, true, |_| (now + 120 - 3600, 3600), encrypted);
    let cpu_before = children_cpu_secs();
    let running = start_tokend(&f);
    let ready = Instant::now();
    let deadline = ready + Duration::from_secs(600);
    while count_refreshed(&f.db()) < n {
        assert!(Instant::now() < deadline, "catch-up of {n} did not finish in 600 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "catch-up {n}: READY after {:.2} s, every rotation committed {:.2} s later",
        running.ready_after.as_secs_f64(),
        ready.elapsed().as_secs_f64()
    );
    while sinks_current(&f) < n {
        assert!(Instant::now() < deadline, "sinks of {n} not written in 600 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = ready.elapsed().as_secs_f64();
    let pid = running.child.id();
    let peak_rss_mb = proc_status_kb(pid, "VmHWM") as f64 / 1024.0;
    let threads: Vec<String> = cpu_by_thread(pid).iter().map(|(name, s)| format!("{name} {s:.2}")).collect();
    eprintln!("catch-up {n}: CPU seconds by thread: {}", threads.join(", "));
    stop(running);
    let cpu_secs = children_cpu_secs() - cpu_before;
    assert_eq!(mock.refreshes() as usize, n, "exactly one rotation per credential");
    CatchUp { n, secs, per_sec: n as f64 / secs, cpu_secs, peak_rss_mb }
}

struct Steady {
    n: usize,
    due_in_window: usize,
    p50: i64,
    p99: i64,
    max: i64,
    startup_ms: f64,
    rss_mb: f64,
    /// After the window's refreshes: connections, buffers and moved deadlines included.
    rss_after_window_mb: f64,
    /// Three reloads (SIGHUP) of the unchanged configuration: each one's time, then RSS.
    reloads_ms: Vec<f64>,
    rss_after_reloads_mb: f64,
    idle_switches_per_min: f64,
    idle_cpu_ticks_per_min: f64,
}

/// N credentials; `due` of them come due evenly over `window` starting 20 s after start, the rest
/// in ~a day. Lateness = request received at the provider − computed due time.
fn steady(rt: &tokio::runtime::Runtime, n: usize, due: usize, window: Duration, idle: Duration) -> Steady {
    let mock =
        rt.block_on(MockProvider::start(MockSettings { expires_in: 86_400, ..MockSettings::default() })).unwrap();
    let start_ms = now_ms() + 20_000;
    let lifetime = 3600i64;
    let due_of = |i: usize| start_ms + (window.as_millis() as i64 * i as i64 / due.max(1) as i64);
    // Place each token so that its computed due time (jitter included) lands where we want it.
    let placement = |i: usize| -> (i64, i64) {
        let target = if i < due { due_of(i) } else { now_ms() + 86_000_000 };
        let lead = RefreshAt::Default.lead_ms(lifetime * 1000) as f64 * (1.0 + 0.05 * jitter_unit(&format!("c{i}"), 1));
        let expires_at = ((target as f64 + lead) / 1000.0).round() as i64;
        (expires_at - lifetime, lifetime)
    };
    let f = fixture(&mock, n, false, placement);
    let expected: Vec<i64> = (0..due)
        .map(|i| {
            let (created, life) = placement(i);
            due_at_ms(created, created + life, RefreshAt::Default, jitter_unit(&format!("c{i}"), 1))
        })
        .collect();
    let running = start_tokend(&f);
    let startup_ms = running.ready_after.as_secs_f64() * 1000.0;
    let pid = running.child.id();
    std::thread::sleep(Duration::from_millis(500));
    let rss_mb = proc_status_kb(pid, "VmRSS") as f64 / 1024.0;
    // Idle: nothing is due before start_ms.
    let (cs0, t0) = (context_switches(pid), cpu_ticks(pid));
    std::thread::sleep(idle);
    let (cs1, t1) = (context_switches(pid), cpu_ticks(pid));
    let minutes = idle.as_secs_f64() / 60.0;
    // Wait for the window to pass.
    let end = start_ms + window.as_millis() as i64 + 5_000;
    while now_ms() < end || (mock.refreshes() as usize) < due {
        assert!(now_ms() < end + 120_000, "steady state: only {} of {due} refreshed", mock.refreshes());
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_after_window_mb = proc_status_kb(pid, "VmRSS") as f64 / 1024.0;
    let reloads_ms: Vec<f64> = (0..3).map(|_| running.reload().as_secs_f64() * 1000.0).collect();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_reloads_mb = proc_status_kb(pid, "VmRSS") as f64 / 1024.0;
    stop(running);
    let mut lateness: Vec<i64> = mock
        .requests()
        .iter()
        .filter_map(|r| {
            let i: usize = r.chain.as_ref()?[1..].parse().ok()?;
            (i < due).then(|| r.received_at_ms - expected[i])
        })
        .collect();
    lateness.sort_unstable();
    assert_eq!(lateness.len(), due, "one request per due credential");
    let pct = |p: f64| lateness[((lateness.len() - 1) as f64 * p) as usize];
    Steady {
        n,
        due_in_window: due,
        p50: pct(0.5),
        p99: pct(0.99),
        max: pct(1.0),
        startup_ms,
        rss_mb,
        rss_after_window_mb,
        reloads_ms,
        rss_after_reloads_mb,
        idle_switches_per_min: (cs1 - cs0) as f64 / minutes,
        idle_cpu_ticks_per_min: (t1 - t0) as f64 / minutes,
    }
}

/// Encryption at rest on vs off in one run, alternating so that the disk's and the shared cores'
/// drift falls on both: catch-up at 10,000 (every token opened, sealed and committed) and
/// start-up at 100,000 (key loaded, key ids of every stored value checked).
fn encryption_on_off(rt: &tokio::runtime::Runtime, smoke: bool, line: &mut impl FnMut(String)) {
    let (catch_n, start_n, rounds) = if smoke { (500, 2000, 1) } else { (10_000, 100_000, 3) };
    line(format!("\n## encryption at rest: off vs on, alternating, {rounds} round(s) each\n"));
    line("| measure | off | on | on ÷ off (medians) |".into());
    line("| --- | --- | --- | --- |".into());
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        off.push(catch_up_sealed(rt, catch_n, false).per_sec);
        on.push(catch_up_sealed(rt, catch_n, true).per_sec);
    }
    let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    line(format!(
        "| catch-up {catch_n}: rotations/s (every round) | {} | {} | {:.3} |",
        show(&off),
        show(&on),
        median(on.clone()) / median(off.clone())
    ));
    let mock =
        rt.block_on(MockProvider::start(MockSettings { expires_in: 86_400, ..MockSettings::default() })).unwrap();
    let later = now_secs() + 80_000;
    let fixtures = [false, true].map(|encrypted| fixture_sealed(&mock, start_n, false, |_| (later, 3600), encrypted));
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (f, into) in fixtures.iter().zip([&mut off, &mut on]) {
            let running = start_tokend(f);
            into.push(running.ready_after.as_secs_f64() * 1000.0);
            stop(running);
        }
    }
    line(format!(
        "| start-up {start_n}: exec → READY=1, ms (every round) | {} | {} | {:.3} |",
        show(&off),
        show(&on),
        median(on.clone()) / median(off.clone())
    ));
    assert_eq!(mock.refreshes(), 0, "nothing was due in the start-up fixtures");
}

struct Baseline {
    name: &'static str,
    n: usize,
    secs: f64,
    cpu_secs: f64,
}

fn baseline(rt: &tokio::runtime::Runtime, name: &'static str, n: usize) -> Option<Baseline> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (program, script) = match name {
        "bash" => (PathBuf::from("bash"), root.join("benches/baselines/refresh.sh")),
        _ => {
            let venv = root.join("target/dot-venv/bin/python");
            if !venv.exists() {
                let ok = Command::new("bash")
                    .arg(root.join("tests/peers/dot/setup-venv.sh"))
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    println!("python baseline skipped: no python venv with requests");
                    return None;
                }
            }
            (venv, root.join("benches/baselines/refresh.py"))
        }
    };
    for tool in ["curl", "jq", "sqlite3"].iter().filter(|_| name == "bash") {
        if Command::new(tool).arg("--version").output().is_err() {
            println!("bash baseline skipped: {tool} is not installed (apt-get install curl jq sqlite3)");
            return None;
        }
    }
    let mock = rt.block_on(MockProvider::start(MockSettings::default())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sinks")).unwrap();
    let db = dir.path().join("baseline.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE credential (name TEXT PRIMARY KEY, access_token TEXT, refresh_token TEXT, expires_at INTEGER)").unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        for i in 0..n {
            let a = mock.authorize(&format!("c{i}"));
            tx.execute(
                "INSERT INTO credential VALUES (?1, ?2, ?3, 0)",
                rusqlite::params![format!("c{i}"), a["access_token"].as_str(), a["refresh_token"].as_str()],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let cpu_before = children_cpu_secs();
    let started = Instant::now();
    let status = Command::new(program)
        .arg(script)
        .args([
            db.to_str().unwrap(),
            &mock.url("/token"),
            CLIENT_ID,
            CLIENT_SECRET,
            dir.path().join("sinks").to_str().unwrap(),
        ])
        .status()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(status.success(), "{name} baseline failed");
    assert_eq!(mock.refreshes() as usize, n);
    Some(Baseline { name, n, secs, cpu_secs: children_cpu_secs() - cpu_before })
}

struct SocketLoad {
    clients: usize,
    background: usize,
    requests: usize,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    errors: usize,
    background_refreshed: usize,
    rss_before_kb: u64,
    rss_idle_kb: u64,
    idle_connections: usize,
    idle_switches_per_min: f64,
    /// Which threads switched in the idle window, and how many threads ended in it (a thread's
    /// end is not counted as a switch: its counters are gone).
    idle_woken: String,
    /// CPU seconds used during the load, by thread name: the daemon's, and the bench process's
    /// (its `bench-client` threads are the clients; the rest is mostly the mock provider).
    daemon_cpu: Vec<(String, f64)>,
    bench_cpu: Vec<(String, f64)>,
}

/// CPU seconds by thread name between two [`cpu_by_thread`] samples, largest first, zeros left out.
fn cpu_between(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
    let mut used: Vec<(String, f64)> = after
        .iter()
        .map(|(name, s)| (name.clone(), s - before.iter().find(|(n, _)| n == name).map_or(0.0, |b| b.1)))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used
}

/// The threads of `pid` that switched between two samples, by name, with their count; then how
/// many threads of the first sample were gone by the second.
fn who_switched(
    pid: u32,
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> String {
    let mut woken: Vec<String> = after
        .iter()
        .filter_map(|(task, n)| {
            let n = n.saturating_sub(before.get(task).copied().unwrap_or(0));
            let name = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/comm")).unwrap_or_default();
            (n > 0).then(|| format!("{} ×{n}", name.trim()))
        })
        .collect();
    woken.sort();
    let ended = before.keys().filter(|task| !after.contains_key(*task)).count();
    format!("{}; {ended} thread(s) ended", if woken.is_empty() { "none".to_string() } else { woken.join(", ") })
}

/// One keep-alive client: GET the token, read the answer (Content-Length), again, until `until`.
/// Returns each request's latency in µs and the number of non-200 answers.
async fn socket_client(socket: PathBuf, path: String, until: Instant) -> (Vec<u32>, usize) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut stream = BufReader::new(stream);
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
    let (mut latencies, mut errors) = (Vec::new(), 0);
    let mut line = String::new();
    let mut body = Vec::new();
    while Instant::now() < until {
        let sent = Instant::now();
        stream.get_mut().write_all(request.as_bytes()).await.unwrap();
        let (mut length, mut status) = (0usize, 0u16);
        loop {
            line.clear();
            if stream.read_line(&mut line).await.unwrap() == 0 {
                panic!("the server closed a keep-alive connection");
            }
            if line == "\r\n" {
                break;
            }
            if let Some(rest) = line.strip_prefix("HTTP/1.1 ") {
                status = rest[..3].parse().unwrap();
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        body.resize(length, 0);
        stream.read_exact(&mut body).await.unwrap();
        latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
        if status != 200 {
            errors += 1;
        }
    }
    (latencies, errors)
}

/// `GET …/token` over `[daemon] socket` from `clients` keep-alive connections for `window`, while
/// `background` other credentials come due evenly over that window; then RSS per idle connection
/// and idle wake-ups with the socket open.
fn socket_load(
    rt: &tokio::runtime::Runtime,
    clients: usize,
    background: usize,
    window: Duration,
    idle: Duration,
) -> SocketLoad {
    let mock =
        rt.block_on(MockProvider::start(MockSettings { expires_in: 86_400, ..MockSettings::default() })).unwrap();
    let lifetime = 3600i64;
    let start_ms = now_ms() + 15_000;
    // c0 is the token asked for (due in a day); c1.. come due evenly over the window.
    let placement = |i: usize| -> (i64, i64) {
        let target = if i == 0 || background == 0 {
            now_ms() + 86_000_000
        } else {
            start_ms + window.as_millis() as i64 * (i as i64 - 1) / background as i64
        };
        let lead = RefreshAt::Default.lead_ms(lifetime * 1000) as f64 * (1.0 + 0.05 * jitter_unit(&format!("c{i}"), 1));
        let expires_at = ((target as f64 + lead) / 1000.0).round() as i64;
        (expires_at - lifetime, lifetime)
    };
    let f = fixture(&mock, background + 1, false, placement);
    let config =
        std::fs::read_to_string(f.config()).unwrap().replacen("[daemon]\n", "[daemon]\nsocket = \"tokend.sock\"\n", 1);
    std::fs::write(f.config(), config).unwrap();
    let running = start_tokend(&f);
    let pid = running.child.id();
    let socket = f.dir.path().join("tokend.sock");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    let rss_before_kb = proc_status_kb(pid, "VmRSS");
    while now_ms() < start_ms {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (daemon_cpu0, bench_cpu0) = (cpu_by_thread(pid), cpu_by_thread(std::process::id()));
    let started = Instant::now();
    let until = started + window;
    let results: Vec<(Vec<u32>, usize)> = client_rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|_| tokio::spawn(socket_client(socket.clone(), "/v1/credentials/c0/token".into(), until)))
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    });
    let secs = started.elapsed().as_secs_f64();
    let daemon_cpu = cpu_between(&daemon_cpu0, &cpu_by_thread(pid));
    let bench_cpu = cpu_between(&bench_cpu0, &cpu_by_thread(std::process::id()));
    let background_refreshed = mock.refreshes() as usize;
    let errors = results.iter().map(|r| r.1).sum();
    let mut latencies: Vec<u32> = results.into_iter().flat_map(|r| r.0).collect();
    latencies.sort_unstable();
    let pct = |p: f64| u64::from(latencies[((latencies.len() - 1) as f64 * p) as usize]);
    // Idle connections: as many as the server keeps (its limit less a margin), held for a second
    // (it closes them after 5 s without a request).
    std::thread::sleep(Duration::from_millis(500));
    let rss_quiet = proc_status_kb(pid, "VmRSS");
    let idle_connections = tokend::socket::MAX_CONNECTIONS - 6;
    let held: Vec<std::os::unix::net::UnixStream> =
        (0..idle_connections).map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1000));
    let rss_idle_kb = proc_status_kb(pid, "VmRSS").saturating_sub(rss_quiet);
    drop(held);
    // Wake-ups with the socket open and nothing due (every new token lives a day), once tokio's
    // blocking threads (store reads) have idled out (10 s).
    std::thread::sleep(Duration::from_secs(12));
    let cs0 = context_switches_by_task(pid);
    std::thread::sleep(idle);
    let cs1 = context_switches_by_task(pid);
    let idle_switches_per_min = switches_between(&cs0, &cs1) as f64 * 60.0 / idle.as_secs_f64();
    let idle_woken = who_switched(pid, &cs0, &cs1);
    stop(running);
    SocketLoad {
        clients,
        background,
        requests: latencies.len(),
        secs,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        max_us: pct(1.0),
        errors,
        background_refreshed,
        rss_before_kb,
        rss_idle_kb,
        idle_connections,
        idle_switches_per_min,
        idle_woken,
        daemon_cpu,
        bench_cpu,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let smoke = args.iter().any(|a| a == "smoke");
    // Optional part filter: catchup, baselines, steady, socket, encryption (default: all).
    let parts: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["catchup", "baselines", "steady", "socket", "encryption"].contains(a))
        .collect();
    let want = |part: &str| parts.is_empty() || parts.contains(&part);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    if args.iter().any(|a| a == "fleet") {
        let n = args.iter().find_map(|a| a.strip_prefix("n=")).map_or(10_000, |n| n.parse().expect("n=NUMBER"));
        let nodes: Option<usize> =
            args.iter().find_map(|a| a.strip_prefix("nodes=")).map(|n| n.parse().expect("nodes=NUMBER"));
        if args.iter().any(|a| a == "idle") {
            fleet_idle_report(&rt);
        } else {
            fleet_report(&rt, n, nodes);
        }
        return;
    }
    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };

    let sizes: Vec<usize> = match args.iter().find_map(|a| a.strip_prefix("n=")) {
        Some(n) => vec![n.parse().expect("n=NUMBER")],
        None if smoke => vec![1000],
        None => vec![1000, 10_000, 100_000],
    };
    let baseline_n = if smoke { 50 } else { 1000 };
    line("## catch-up (all due at once; every rotation committed and every sink written)\n".to_string());
    line("| N | seconds | rotations/s | CPU s | CPU ms / rotation | peak RSS MB | every round: rotations/s @ CPU ms / rotation |".into());
    line("| --- | --- | --- | --- | --- | --- | --- |".into());
    let mut at_baseline_n = None;
    for &n in sizes.iter().filter(|_| want("catchup")) {
        // The disk's latency moves from one second to the next: up to 10,000 the median of three
        // rounds is reported (by throughput), with every round beside it.
        let rounds = if smoke || n > 10_000 { 1 } else { 3 };
        let mut runs: Vec<CatchUp> = (0..rounds).map(|_| catch_up(&rt, n)).collect();
        let every: Vec<String> =
            runs.iter().map(|c| format!("{:.0} @ {:.3}", c.per_sec, c.cpu_secs * 1000.0 / c.n as f64)).collect();
        runs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
        let c = runs.swap_remove(runs.len() / 2);
        line(format!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.3} | {:.1} | {} |",
            c.n,
            c.secs,
            c.per_sec,
            c.cpu_secs,
            c.cpu_secs * 1000.0 / c.n as f64,
            c.peak_rss_mb,
            every.join(", ")
        ));
        if n == 1000 {
            at_baseline_n = Some(c);
        }
    }
    if want("baselines") {
        let tokend_small = match at_baseline_n.filter(|c: &CatchUp| c.n == baseline_n) {
            Some(c) => c,
            None => catch_up(&rt, baseline_n),
        };
        line(format!("\n## baselines (same mock, N = {baseline_n}, sequential, durable)\n"));
        line("| tool | seconds | rotations/s | CPU s | CPU ms / rotation | tokend ÷ tool, wall | tokend ÷ tool, rotations per CPU-second |".into());
        line("| --- | --- | --- | --- | --- | --- | --- |".into());
        line(format!(
            "| tokend | {:.2} | {:.0} | {:.2} | {:.3} | 1 | 1 |",
            tokend_small.secs,
            tokend_small.per_sec,
            tokend_small.cpu_secs,
            tokend_small.cpu_secs * 1000.0 / tokend_small.n as f64
        ));
        for name in ["bash", "python"] {
            if let Some(b) = baseline(&rt, name, baseline_n) {
                line(format!(
                    "| {} (`benches/baselines/refresh.{}`) | {:.2} | {:.0} | {:.2} | {:.3} | {:.1}× faster | {:.0}× |",
                    b.name,
                    if b.name == "bash" { "sh" } else { "py" },
                    b.secs,
                    b.n as f64 / b.secs,
                    b.cpu_secs,
                    b.cpu_secs * 1000.0 / b.n as f64,
                    b.secs / tokend_small.secs,
                    (b.cpu_secs / b.n as f64) / (tokend_small.cpu_secs / tokend_small.n as f64),
                ));
            }
        }
    }

    if want("socket") {
        let (background, window, idle) = if smoke {
            (500, Duration::from_secs(3), Duration::from_secs(3))
        } else {
            (10_000, Duration::from_secs(20), Duration::from_secs(30))
        };
        let l = socket_load(&rt, 64, background, window, idle);
        line(format!(
            "\n## socket API: GET …/token, {} keep-alive clients for {:.1} s while {} other credentials come due (client in this process, same 2 shared cores)\n",
            l.clients, l.secs, l.background
        ));
        line("| measure | value |".into());
        line("| --- | --- |".into());
        line(format!(
            "| requests/s | {:.0} ({} requests, {} not 200) |",
            l.requests as f64 / l.secs,
            l.requests,
            l.errors
        ));
        line(format!("| latency p50 / p99 / max | {} / {} / {} µs |", l.p50_us, l.p99_us, l.max_us));
        let per_request = |cpu: &[(String, f64)]| {
            let total: f64 = cpu.iter().map(|(_, s)| s).sum();
            let threads: Vec<String> = cpu.iter().map(|(name, s)| format!("{name} {s:.2}")).collect();
            format!("{total:.2} s, {:.1} µs per request ({})", total * 1e6 / l.requests as f64, threads.join(", "))
        };
        line(format!(
            "| daemon CPU during the load (background refreshes included) | {} |",
            per_request(&l.daemon_cpu)
        ));
        line(format!("| bench process CPU during the load (clients + mock) | {} |", per_request(&l.bench_cpu)));
        line(format!("| background refreshes done meanwhile | {} of {} |", l.background_refreshed, l.background));
        line(format!("| RSS before the load | {:.1} MB |", l.rss_before_kb as f64 / 1024.0));
        line(format!(
            "| RSS per idle connection ({} held) | {:.1} KiB |",
            l.idle_connections,
            l.rss_idle_kb as f64 / l.idle_connections as f64
        ));
        line(format!("| idle with the socket open: context switches per minute | {:.1} |", l.idle_switches_per_min));
        line(format!("| idle with the socket open: threads that switched | {} |", l.idle_woken));
    }
    if want("encryption") {
        encryption_on_off(&rt, smoke, &mut line);
    }

    let (n, due, window, idle) = if smoke {
        (2000, 500, Duration::from_secs(5), Duration::from_secs(5))
    } else {
        (100_000, 10_000, Duration::from_secs(30), Duration::from_secs(15))
    };
    if !want("steady") {
        return;
    }
    let s = steady(&rt, n, due, window, idle);
    line(format!(
        "\n## steady state, start-up, memory (N = {}, {} due over {:?}, no sinks)\n",
        s.n, s.due_in_window, window
    ));
    line("| measure | value |".into());
    line("| --- | --- |".into());
    line(format!("| lateness p50 / p99 / max (ms, due → request at provider) | {} / {} / {} |", s.p50, s.p99, s.max));
    line(format!("| start-up: exec → READY=1 | {:.0} ms |", s.startup_ms));
    line(format!(
        "| RSS after start-up | {:.1} MB ({:.0} bytes per credential) |",
        s.rss_mb,
        s.rss_mb * 1048576.0 / s.n as f64
    ));
    line(format!("| RSS after the {} refreshes of the window | {:.1} MB |", s.due_in_window, s.rss_after_window_mb));
    let reloads: Vec<String> = s.reloads_ms.iter().map(|ms| format!("{ms:.0}")).collect();
    line(format!("| three reloads (SIGHUP → READY=1), unchanged configuration | {} ms |", reloads.join(", ")));
    line(format!("| RSS after the reloads | {:.1} MB |", s.rss_after_reloads_mb));
    line(format!("| idle: context switches per minute, nothing due | {:.1} |", s.idle_switches_per_min));
    line(format!("| idle: CPU ticks (1/100 s) per minute | {:.1} |", s.idle_cpu_ticks_per_min));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-report.md");
    std::fs::write(&out, &report).unwrap();
    println!("\nreport written to {}", out.display());
}

// ---- fleet: catch-up on PostgreSQL, 1 and 3 nodes, beside SQLite ------------------------------

struct FleetCatchUp {
    nodes: usize,
    committed_secs: f64,
    sinks_secs: f64,
    per_sec: f64,
    cpu_secs: f64,
    by_node: Vec<i64>,
    /// Attempts by node (pid) and result: what the nodes that lost the race spent.
    attempts: String,
}

/// N credentials all due at once in a PostgreSQL store, `nodes` daemons on it, each with its own
/// sink directory: time from the first node's READY=1 until every rotation is committed, and until every
/// node's every sink holds the committed token.
fn fleet_catch_up(rt: &tokio::runtime::Runtime, n: usize, nodes: usize) -> FleetCatchUp {
    let mock = rt.block_on(MockProvider::start(MockSettings::default())).unwrap();
    let server = pg::PgServer::start();
    let db = rt.block_on(server.create_database("bench"));
    let dir = tempfile::tempdir().unwrap();
    let now = now_secs();
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let tokens: Vec<_> = names
        .iter()
        .map(|name| {
            let answer = parse_token_json(mock.authorize(name).to_string().as_bytes()).unwrap();
            let mut token =
                new_token(&answer, IssueTime { created_at: now + 120 - 3600, distrusted_skew: None }, name, &[]);
            token.expires_in = Some(3600);
            token
        })
        .collect();
    let target = tokend::store::postgres::PgTarget::parse(
        &server.conninfo(&db),
        Some(&tokend::redact::Secret::new(pg::PG_PASSWORD)),
    )
    .unwrap();
    let store = tokend::store::postgres::PgStore::start(&target, &dir.path().join("fleet")).unwrap();
    store.migrate().unwrap();
    let rows: Vec<(&str, &str, &tokend::store::NewToken)> =
        names.iter().zip(&tokens).map(|(n, t)| (n.as_str(), "oauth2", t)).collect();
    store.import_many(&rows, now).unwrap();
    let mut fixtures = Vec::new();
    for _ in 0..nodes {
        let node_dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(node_dir.path().join("sinks")).unwrap();
        let mut config = format!(
            "[daemon]\n{}concurrency = 512\n\n[provider.oauth2]\nconcurrency = 512\n\n",
            pg::daemon_lines(&server, &db, node_dir.path(), "state")
        );
        for (i, token) in tokens.iter().enumerate() {
            config.push_str(&format!(
                "[[credential]]\nname = \"c{i}\"\nprovider = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n[[credential.sink]]\npath = \"sinks/c{i}.token\"\n",
                mock.url("/token")
            ));
            let path = node_dir.path().join("sinks").join(format!("c{i}.token"));
            std::fs::write(&path, token.access_token.expose()).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
        std::fs::write(node_dir.path().join("tokend.toml"), config).unwrap();
        fixtures.push(Fixture { dir: node_dir });
    }
    let cpu_before = children_cpu_secs();
    // Timed from the first node's READY=1: it starts catching up while the others start.
    let mut running = vec![start_tokend(&fixtures[0])];
    let ready = Instant::now();
    running.extend(fixtures[1..].iter().map(start_tokend));
    let deadline = ready + Duration::from_secs(900);
    let client = rt.block_on(server.client(&db));
    let count = |sql: &str| -> i64 { rt.block_on(client.query_one(sql, &[])).unwrap().get(0) };
    while count("SELECT count(*) FROM tokend_credential WHERE generation >= 2") < n as i64 {
        assert!(Instant::now() < deadline, "fleet catch-up of {n} did not finish in 900 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let committed_secs = ready.elapsed().as_secs_f64();
    let current = || -> std::collections::HashMap<String, String> {
        rt.block_on(client.query("SELECT name, access_token FROM tokend_credential", &[]))
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    for f in &fixtures {
        loop {
            let current = current();
            let stale = (0..n)
                .filter(|i| std::fs::read(f.sink(*i)).map_or(true, |b| b != current[&format!("c{i}")].as_bytes()))
                .count();
            if stale == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{stale} sinks of a node not current in 900 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let sinks_secs = ready.elapsed().as_secs_f64();
    let by_node: Vec<i64> = running
        .iter()
        .map(|r| {
            let pid = r.child.id().to_string();
            rt.block_on(client.query_one(
                "SELECT count(*) FROM tokend_attempt WHERE result = 'refreshed' AND split_part(holder, '-', 1) = $1",
                &[&pid],
            ))
            .unwrap()
            .get(0)
        })
        .collect();
    let attempts = rt
        .block_on(client.query(
            "SELECT split_part(holder, '-', 1), coalesce(result, 'open'), count(*) FROM tokend_attempt
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        ))
        .unwrap()
        .iter()
        .map(|r| format!("{} {}: {}", r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, i64>(2)))
        .collect::<Vec<_>>()
        .join("; ");
    for r in running {
        stop(r);
    }
    let cpu_secs = children_cpu_secs() - cpu_before;
    if mock.refreshes() as usize != n {
        // What the store says of the credentials refreshed more than once, for the failure.
        let rows = rt
            .block_on(client.query(
                "SELECT a.credential, a.from_generation, a.holder, a.started_at_ms, a.finished_at_ms, a.result
                 FROM tokend_attempt a JOIN tokend_credential c ON c.name = a.credential
                 WHERE c.generation > 2 ORDER BY a.credential, a.id LIMIT 30",
                &[],
            ))
            .unwrap();
        for r in rows {
            let (name, from, holder, started, finished, result): (
                String,
                i64,
                String,
                i64,
                Option<i64>,
                Option<String>,
            ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            eprintln!("{name} from generation {from} by {holder}: {started} .. {finished:?} {result:?}");
        }
        eprintln!("reuses of a spent refresh token: {}", mock.reuses());
    }
    assert_eq!(mock.refreshes() as usize, n, "exactly one rotation per credential");
    assert_eq!(mock.reuses(), 0, "a spent refresh token was presented again");
    FleetCatchUp { nodes, committed_secs, sinks_secs, per_sec: n as f64 / sinks_secs, cpu_secs, by_node, attempts }
}

/// Idle wake-ups of one fleet node: `n` credentials in a PostgreSQL store, none due for the
/// next hour; after `settle` (start-up's sink writes done, tokio's blocking threads idled out),
/// context switches of the node's threads over `window`, and of its server backends (the
/// writer's, the reader's and the listener's connections).
fn fleet_idle(rt: &tokio::runtime::Runtime, n: usize, settle: Duration, window: Duration) -> (f64, String, f64, usize) {
    let mock = rt.block_on(MockProvider::start(MockSettings::default())).unwrap();
    let server = pg::PgServer::start();
    let db = rt.block_on(server.create_database("idle"));
    let dir = tempfile::tempdir().unwrap();
    let now = now_secs();
    let target = tokend::store::postgres::PgTarget::parse(
        &server.conninfo(&db),
        Some(&tokend::redact::Secret::new(pg::PG_PASSWORD)),
    )
    .unwrap();
    let store = tokend::store::postgres::PgStore::start(&target, &dir.path().join("fleet")).unwrap();
    store.migrate().unwrap();
    let tokens: Vec<_> = (0..n)
        .map(|i| {
            let answer = parse_token_json(mock.authorize(&format!("c{i}")).to_string().as_bytes()).unwrap();
            new_token(&answer, IssueTime { created_at: now, distrusted_skew: None }, &format!("c{i}"), &[])
        })
        .collect();
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let rows: Vec<(&str, &str, &tokend::store::NewToken)> =
        names.iter().zip(&tokens).map(|(n, t)| (n.as_str(), "oauth2", t)).collect();
    store.import_many(&rows, now).unwrap();
    drop(store);
    let node_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(node_dir.path().join("sinks")).unwrap();
    let mut config = format!("[daemon]\n{}\n", pg::daemon_lines(&server, &db, node_dir.path(), "state"));
    for i in 0..n {
        config.push_str(&format!(
            "[[credential]]\nname = \"c{i}\"\nprovider = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n[[credential.sink]]\npath = \"sinks/c{i}.token\"\n",
            mock.url("/token")
        ));
    }
    std::fs::write(node_dir.path().join("tokend.toml"), config).unwrap();
    let fixture = Fixture { dir: node_dir };
    let running = start_tokend(&fixture);
    let pid = running.child.id();
    std::thread::sleep(settle);
    let client = rt.block_on(server.client(&db));
    let backends: Vec<u32> = rt
        .block_on(
            client.query("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", &[&db]),
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0).unsigned_abs())
        .collect();
    let server_switches = || -> u64 { backends.iter().map(|b| context_switches(*b)).sum() };
    let (cs0, srv0) = (context_switches_by_task(pid), server_switches());
    std::thread::sleep(window);
    let (cs1, srv1) = (context_switches_by_task(pid), server_switches());
    let minutes = window.as_secs_f64() / 60.0;
    let woken = who_switched(pid, &cs0, &cs1);
    let per_min = switches_between(&cs0, &cs1) as f64 / minutes;
    stop(running);
    assert_eq!(mock.refreshes(), 0, "nothing was due");
    (per_min, woken, srv1.saturating_sub(srv0) as f64 / minutes, backends.len())
}

/// Three rounds of `round`: the median by `rate`, and every round's rate in the order run.
fn median_of_three<T>(mut round: impl FnMut() -> T, rate: impl Fn(&T) -> f64) -> (T, String) {
    let mut rounds: Vec<T> = (0..3).map(|_| round()).collect();
    let every = rounds.iter().map(|r| format!("{:.0}", rate(r))).collect::<Vec<_>>().join(", ");
    rounds.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    (rounds.swap_remove(1), every)
}

/// `only_nodes`: just the PostgreSQL row with that many nodes (a quicker look while working on it).
fn fleet_report(rt: &tokio::runtime::Runtime, n: usize, only_nodes: Option<usize>) {
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    println!(
        "## fleet catch-up, N = {n} (all due at once; every rotation committed and every node's every sink written)\n"
    );
    println!(
        "| store | nodes | all committed s | all sinks s | rotations/s | CPU s (nodes) | rotations by node | loadavg before | every round: rotations/s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    // As in the catch-up part: the run-to-run spread on this shared VM is wider than the effects
    // measured, so each row is the median of three rounds (by rotations/s), every round beside it.
    let before = load();
    if only_nodes.is_none() {
        let (c, every) = median_of_three(|| catch_up(rt, n), |c| c.per_sec);
        println!(
            "| SQLite | 1 | - | {:.2} | {:.0} | {:.2} | {n} | {before} | {} |",
            c.secs, c.per_sec, c.cpu_secs, every
        );
    }
    let mut attempts = Vec::new();
    for nodes in only_nodes.map_or(vec![1, 3], |n| vec![n]) {
        let before = load();
        let (f, every) = median_of_three(|| fleet_catch_up(rt, n, nodes), |f| f.per_sec);
        println!(
            "| PostgreSQL 15 | {} | {:.2} | {:.2} | {:.0} | {:.2} | {:?} | {before} | {} |",
            f.nodes, f.committed_secs, f.sinks_secs, f.per_sec, f.cpu_secs, f.by_node, every
        );
        attempts.push(format!("{} node(s), median round, attempts by node and result: {}", f.nodes, f.attempts));
    }
    println!("\n{}", attempts.join("\n"));
    println!("\nloadavg after: {}", load());
    if only_nodes.is_none() {
        fleet_idle_report(rt);
    }
}

fn fleet_idle_report(rt: &tokio::runtime::Runtime) {
    let before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    let (per_min, woken, server_per_min, backends) =
        fleet_idle(rt, 100, Duration::from_secs(15), Duration::from_secs(60));
    println!(
        "\n| idle fleet node (PostgreSQL, 100 credentials, nothing due), 60 s | context switches per minute |\n| --- | --- |\n\
         | the node's threads ({woken}) | {per_min:.1} |\n| its {backends} server backends | {server_per_min:.1} |\n\nloadavg before: {before}"
    );
}
