//! A real PostgreSQL server for the tests: `initdb` into a temp dir, `postgres` listening only on
//! a Unix socket in that dir, stopped (and the dir removed) on drop. The tests run as root, which
//! PostgreSQL refuses: then the server runs as `nobody` through `setpriv`. Password
//! authentication (scram) is on, so configurations must pass the password the way operators do.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

pub const PG_USER: &str = "tokend";
pub const PG_PASSWORD: &str = "pg-test-password";
/// Names the socket file (`.s.PGSQL.<port>`); nothing listens on TCP unless a test enables TLS.
pub const PG_PORT: u16 = 5432;
const NOBODY: u32 = 65534;

pub struct PgServer {
    dir: TempDir,
    child: Option<Child>,
    /// Server options beyond the Unix-socket defaults (TLS on a loopback port).
    extra: Vec<String>,
}

/// The directory holding `initdb` and `postgres`: on PATH, else Debian's versioned directory.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join("initdb").is_file() && d.join("postgres").is_file()))
    {
        return dir;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|b| b.join("initdb").is_file()).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL is not installed (.ci/run installs the postgresql package)")
}

fn as_server_user(program: PathBuf) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &NOBODY.to_string(), "--regid", &NOBODY.to_string(), "--clear-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PgServer {
    /// initdb + start; panics (the test fails) with the server's log if it does not come up.
    pub fn start() -> PgServer {
        let dir = tempfile::Builder::new().prefix("tokend-pg").tempdir().unwrap();
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(dir.path(), Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PG_PASSWORD).unwrap();
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&pwfile, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
        }
        let out = as_server_user(bin_dir().join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", PG_USER, "--auth=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut server = PgServer { dir, child: None, extra: Vec::new() };
        server.launch();
        server
    }

    /// Restarts the server with TLS on 127.0.0.1:[`PG_PORT`] (besides its socket: one port
    /// names both), with this certificate chain and key (PEM), copied where the server user can
    /// read them. Only one test at a time may do this.
    pub fn enable_tls(&mut self, cert_pem: &[u8], key_pem: &[u8]) {
        let (cert, key) = (self.dir.path().join("server.crt"), self.dir.path().join("server.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if nix::unistd::geteuid().is_root() {
            for file in [&cert, &key] {
                nix::unistd::chown(file, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
            }
        }
        self.extra = vec![
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            format!("ssl_cert_file={}", cert.display()),
            "-c".into(),
            format!("ssl_key_file={}", key.display()),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
        ];
        self.restart();
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn launch(&mut self) {
        // The log is appended to across restarts: only what this start writes says it is ready.
        let earlier = self.log().len();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log")).unwrap();
        let child = as_server_user(bin_dir().join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-c", "listen_addresses=", "-p", &PG_PORT.to_string()])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let socket = self.dir.path().join(format!(".s.PGSQL.{PG_PORT}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !(socket.exists() && self.log().get(earlier..).is_some_and(|l| l.contains("ready to accept connections")))
        {
            assert!(std::time::Instant::now() < deadline, "postgres did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server the fast way (SIGINT: abort transactions, disconnect, checkpoint) and
    /// waits for it; `restart` brings it back on the same socket and data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The server runs as another user: signal it by pid (root may).
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// A libpq key=value string for `database` on this server (no password: the configuration
    /// gives it through `database_password_file`).
    pub fn conninfo(&self, database: &str) -> String {
        format!("host={} port={PG_PORT} user={PG_USER} dbname={database}", self.dir.path().display())
    }

    /// The same as a `postgres://` URL (the socket directory as the `host` parameter).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{PG_USER}@localhost:{PG_PORT}/{database}?host={}", self.dir.path().display())
    }

    /// A client for the test's own checks and set-up.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        owner_session(&self.conninfo(database)).await
    }

    /// Creates a fresh database and returns its name.
    pub async fn create_database(&self, name: &str) -> String {
        self.client("postgres").await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        name.to_string()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `[daemon]` lines for a node on `database` of `server`: the connection string, the
/// password from a file (as operators are told to do), and the node's own state directory.
pub fn daemon_lines(server: &PgServer, database: &str, world_dir: &Path, state_dir: &str) -> String {
    let pw = world_dir.join("pg-password");
    std::fs::write(&pw, format!("{PG_PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "database = \"{}\"\ndatabase_password_file = \"{}\"\nstate_dir = \"{state_dir}\"\n",
        server.conninfo(database),
        pw.display()
    )
}

/// A session as the databases' owner on `conninfo` (one of [`PgServer::conninfo`]'s).
pub async fn owner_session(conninfo: &str) -> tokio_postgres::Client {
    let (client, connection) = format!("{conninfo} password={PG_PASSWORD}")
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}
