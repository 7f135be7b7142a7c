//! Store and disk faults on real file systems and a real PostgreSQL server, each body on both
//! backends where the fault has a PostgreSQL twin: a store that stops taking writes after the
//! provider rotated (SQLite: its 1 MiB tmpfs fills up; PostgreSQL: the node's role loses its
//! right to update, or the server stops) and comes back, a read-only store (a read-only mount; `default_transaction_read_only`), a store that is
//! not tokend's (a file that is not SQLite; another application's database), and a read-only sink
//! directory. The sealed rescue file stays SQLite-only: encryption at rest is refused on a
//! PostgreSQL store. Needs mount(2) (root in CI); without it each test says it was skipped and why.

mod support;

use nix::sys::signal::Signal;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::postgres::{PG_PASSWORD, PG_USER};
use support::{Backend, World, wait_for};
use tokend::dev::mock::MockSettings;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str, test: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(path.to_path_buf())),
            Ok(o) => {
                let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
                eprintln!("SKIPPED {test}: cannot mount a tmpfs here ({why})");
                support::record_figures(&format!("skipped-{test}"), &format!("{test}: skipped, mount failed: {why}"));
                None
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: no mount command ({e})");
                support::record_figures(&format!("skipped-{test}"), &format!("{test}: skipped, no mount: {e}"));
                None
            }
        }
    }

    fn remount(&self, mode: &str) {
        let status =
            std::process::Command::new("mount").args(["-o", &format!("remount,{mode}")]).arg(&self.0).status().unwrap();
        assert!(status.success(), "remount {mode}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

const ONE: &str = "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";

/// The one-credential config with the database moved into `db/` (the tmpfs).
fn config_with_database_in_db_dir(w: &World) {
    w.write_config(ONE);
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(w.config_path(), text.replace("database = \"tokend.db\"", "database = \"db/tokend.db\"")).unwrap();
}

fn fill(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

/// A store that stops taking writes on cue, and takes them again. SQLite: the file's disk fills
/// up (a 1 MiB tmpfs). PostgreSQL, two ways: the server goes away (stopped, then started again on
/// the same data), or the node's role loses its right to update the credentials (reads still
/// work, as on a full disk; the right given back later). The one-credential config is written
/// for it.
enum WriteFault {
    DiskFull(Tmpfs),
    ServerDown,
    RightsRevoked,
}

/// The PostgreSQL role of a node whose rights the test takes away (not a superuser, who has them
/// all whatever is revoked).
const NODE_ROLE: &str = "node";

impl WriteFault {
    /// `on_postgres` is the PostgreSQL fault wanted; `None` when the SQLite variant cannot mount
    /// its tmpfs here (said and recorded).
    async fn prepare(w: &World, test: &str, on_postgres: WriteFault) -> Option<WriteFault> {
        match w.backend {
            Backend::Sqlite => {
                let disk = Tmpfs::mount(&w.path("db"), "1m", test)?;
                config_with_database_in_db_dir(w);
                Some(WriteFault::DiskFull(disk))
            }
            Backend::Postgres => {
                w.write_config(ONE);
                if let WriteFault::RightsRevoked = on_postgres {
                    w.pg_client()
                        .await
                        .batch_execute(&format!(
                            "CREATE ROLE {NODE_ROLE} LOGIN PASSWORD '{PG_PASSWORD}';
                             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {NODE_ROLE};
                             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {NODE_ROLE};"
                        ))
                        .await
                        .unwrap();
                    let text = std::fs::read_to_string(w.config_path()).unwrap();
                    assert!(text.contains(&format!(" user={PG_USER} ")), "{text}");
                    std::fs::write(
                        w.config_path(),
                        text.replace(&format!(" user={PG_USER} "), &format!(" user={NODE_ROLE} ")),
                    )
                    .unwrap();
                }
                Some(on_postgres)
            }
        }
    }

    async fn inject(&self, w: &World) {
        match self {
            WriteFault::DiskFull(disk) => fill(&disk.0),
            WriteFault::ServerDown => w.pg_stop(),
            WriteFault::RightsRevoked => w
                .pg_client()
                .await
                .batch_execute(&format!("REVOKE UPDATE ON tokend_credential FROM {NODE_ROLE}"))
                .await
                .unwrap(),
        }
    }

    async fn repair(&self, w: &World) {
        match self {
            WriteFault::DiskFull(disk) => std::fs::remove_file(disk.0.join("filler")).unwrap(),
            WriteFault::ServerDown => w.pg_restart(),
            WriteFault::RightsRevoked => w
                .pg_client()
                .await
                .batch_execute(&format!("GRANT UPDATE ON tokend_credential TO {NODE_ROLE}"))
                .await
                .unwrap(),
        }
    }

    /// Where the rescue file must land: the temp dir when the database's own disk is full, beside
    /// the store's node-local files when the database is elsewhere.
    fn rescue_dir(&self, w: &World, tmp: &Path) -> PathBuf {
        match self {
            WriteFault::DiskFull(_) => tmp.to_path_buf(),
            WriteFault::ServerDown | WriteFault::RightsRevoked => w.path(support::backend::PG_STATE_DIR),
        }
    }
}

on_both_backends!(
    the_store_refusing_writes_after_the_provider_rotated_rescues_the_token,
    the_daemon_keeps_the_token_while_its_store_refuses_writes_and_commits_it_later,
    read_only_sink_directory_degrades_but_never_loses_the_token,
    a_read_only_store_refuses_before_spending_anything,
    a_store_that_is_not_tokends_is_refused_untouched,
);

async fn the_store_refusing_writes_after_the_provider_rotated_rescues_the_token(backend: Backend) {
    let w = World::on(backend, MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    let Some(fault) = WriteFault::prepare(&w, "disk_full", WriteFault::RightsRevoked).await else { return };
    std::fs::create_dir(w.path("tmp")).unwrap();
    w.authorize_and_import("c").await;
    let tmp = w.path("tmp");
    let env = [("TMPDIR", tmp.to_str().unwrap())];
    let refresh = w.tokend_env(&["refresh", "c"], None, &env);
    let fault_when_sent = async {
        assert!(wait_for(Duration::from_secs(5), || !w.mock.requests().is_empty()).await);
        fault.inject(&w).await;
    };
    let (run, ()) = tokio::join!(refresh, fault_when_sent);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("the provider issued a new token but it could not be stored"), "{}", run.stderr);
    if let WriteFault::RightsRevoked = fault {
        assert!(run.stderr.contains("permission denied for table tokend_credential"), "{}", run.stderr);
    }
    let rescue = run
        .stderr
        .split("the answer was saved to ")
        .nth(1)
        .and_then(|r| r.split(" — ").next())
        .expect("rescue path named");
    let rescue_dir = fault.rescue_dir(&w, &tmp);
    assert!(rescue.starts_with(rescue_dir.to_str().unwrap()), "want the rescue file in {rescue_dir:?}: {rescue}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(rescue).unwrap().permissions().mode() & 0o777, 0o600, "the rescue file is private");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(rescue).unwrap()).unwrap();
    let live = w.mock.live_refresh_token("c").unwrap();
    assert_eq!(saved["refresh_token"], live.as_str(), "the rescued token is the provider's live one");
    assert!(!run.stderr.contains(&live), "the token itself is not printed");

    // The store comes back; the operator follows the message.
    fault.repair(&w).await;
    let import = w.tokend(&["import", "c"], Some(&std::fs::read_to_string(rescue).unwrap())).await;
    assert_eq!(import.code, 0, "{}", import.stderr);
    assert_eq!(w.tokend(&["refresh", "c"], None).await.code, 0);
    assert_eq!(w.mock.reuses(), 0, "the chain was never broken");
}

/// With a key configured (README "Encryption at rest") the rescue file holds the answer sealed,
/// bound to the credential (src/seal.rs tests the binding): no token in clear on disk, and
/// `tokend import` opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_store_writes_its_rescue_file_sealed() {
    let w = World::new(MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    let Some(disk) = Tmpfs::mount(&w.path("db"), "1m", "disk_full_sealed") else { return };
    std::fs::create_dir(w.path("tmp")).unwrap();
    assert_eq!(w.tokend(&["key", "init", "tokend.key"], None).await.code, 0);
    w.write_config_with_daemon("key_file = \"tokend.key\"", ONE);
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(w.config_path(), text.replace("database = \"tokend.db\"", "database = \"db/tokend.db\"")).unwrap();
    w.authorize_and_import("c").await;
    let tmp = w.path("tmp");
    let env = [("TMPDIR", tmp.to_str().unwrap())];
    let refresh = w.tokend_env(&["refresh", "c"], None, &env);
    let fill_when_sent = async {
        assert!(wait_for(Duration::from_secs(5), || !w.mock.requests().is_empty()).await);
        fill(&disk.0);
    };
    let (run, ()) = tokio::join!(refresh, fill_when_sent);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let rescue = run
        .stderr
        .split("the answer was saved to ")
        .nth(1)
        .and_then(|r| r.split(" — ").next())
        .expect("rescue path named")
        .to_string();
    let saved = std::fs::read_to_string(&rescue).unwrap();
    let live = w.mock.live_refresh_token("c").unwrap();
    assert!(saved.starts_with("s1 "), "not sealed: {saved}");
    for token in w.mock.issued_tokens() {
        assert!(!saved.contains(&token), "{token} in clear in the rescue file");
    }
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let import = w.tokend(&["import", "c"], Some(&saved)).await;
    assert_eq!(import.code, 0, "{}", import.stderr);
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(w.mock.is_revoked(&live), "the rescued (live) token was the one spent next");
    assert_eq!(w.mock.reuses(), 0, "the chain was never broken");
}

async fn the_daemon_keeps_the_token_while_its_store_refuses_writes_and_commits_it_later(backend: Backend) {
    let w = World::on(backend, MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    let Some(fault) = WriteFault::prepare(&w, "daemon_disk_full", WriteFault::ServerDown).await else { return };
    w.authorize_and_import("c").await;
    let daemon = w.start_daemon_env(&[("TMPDIR", w.dir.path().to_str().unwrap())]).await;
    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(5), || !w.mock.requests().is_empty()).await);
    fault.inject(&w).await;
    assert!(
        wait_for(Duration::from_secs(5), || daemon.log_text().contains("ROTATED TOKEN NOT STORED")).await,
        "{}",
        daemon.log_text()
    );
    // Nothing is refreshed while the store cannot commit: the stored refresh token is spent, and
    // the live one is the answer in hand. Asked to refresh everything now, the daemon sends nothing.
    daemon.signal(Signal::SIGUSR1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.mock.requests().len(), 1, "a refresh was sent while the store could not commit");
    fault.repair(&w).await;
    assert!(
        wait_for(Duration::from_secs(15), || daemon
            .log_text()
            .contains("rescued token committed; the chain is intact"))
        .await,
        "{}",
        daemon.log_text()
    );
    let state = match fault {
        WriteFault::DiskFull(_) => {
            tokend::store::Store::open(&w.path("db/tokend.db")).unwrap().get("c").unwrap().unwrap()
        }
        WriteFault::ServerDown | WriteFault::RightsRevoked => w.store().get("c").unwrap().unwrap(),
    };
    assert_eq!(state.refresh_token.unwrap().expose(), w.mock.live_refresh_token("c").unwrap());
    assert_eq!(state.generation, 2, "committed once, on the generation that was spent");
    assert_eq!(w.mock.reuses(), 0);
}

async fn read_only_sink_directory_degrades_but_never_loses_the_token(backend: Backend) {
    let w = World::on(backend, MockSettings::default()).await;
    let Some(sinks) = Tmpfs::mount(&w.path("out"), "1m", "read_only_sinks") else { return };
    w.write_config(&format!("{ONE}[[credential.sink]]\npath = \"out/c.token\"\n"));
    w.authorize_and_import("c").await;
    std::fs::remove_file(w.path("out/c.token")).unwrap();
    sinks.remount("ro");
    let daemon = w.start_daemon().await;
    daemon.signal(Signal::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(5), || w.generation("c") == 2).await,
        "the commit does not depend on the sink"
    );
    assert!(
        wait_for(Duration::from_secs(2), || daemon.log_text().contains("Read-only file system")).await,
        "{}",
        daemon.log_text()
    );
    assert!(!w.path("out/c.token").exists());
    sinks.remount("rw");
    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(5), || w.path("out/c.token").exists()).await, "{}", daemon.log_text());
    let state = w.store().get("c").unwrap().unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || std::fs::read_to_string(w.path("out/c.token"))
            .is_ok_and(|t| t == state.access_token.expose()))
        .await
    );
}

/// A store that only takes reads: the SQLite file's file system remounted read-only, the
/// PostgreSQL database set to read-only transactions (`default_transaction_read_only`, what a
/// standby or a locked-down role gives). The refresh must stop before anything is sent.
async fn a_read_only_store_refuses_before_spending_anything(backend: Backend) {
    let w = World::on(backend, MockSettings::default()).await;
    let (names_the_store, _disk) = match backend {
        Backend::Sqlite => {
            let Some(disk) = Tmpfs::mount(&w.path("db"), "1m", "read_only_database") else { return };
            config_with_database_in_db_dir(&w);
            w.authorize_and_import("c").await;
            disk.remount("ro");
            ("db/tokend.db".to_string(), Some(disk))
        }
        Backend::Postgres => {
            w.write_config(ONE);
            w.authorize_and_import("c").await;
            let database = w.pg_database().to_string();
            let shown = w.store().describe();
            w.pg_client()
                .await
                .batch_execute(&format!("ALTER DATABASE {database} SET default_transaction_read_only = on"))
                .await
                .unwrap();
            (shown, None)
        }
    };
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains(&names_the_store), "names the database: {}", run.stderr);
    assert!(run.stderr.to_lowercase().contains("read"), "says why: {}", run.stderr);
    assert_eq!(w.mock.requests().len(), 0, "nothing was sent, so nothing can be lost");
    match backend {
        // A node opens a SQLite file read-write at start: the daemon refuses to start.
        Backend::Sqlite => {
            let daemon = w.tokend(&["run"], None).await;
            assert_eq!(daemon.code, 1, "{}", daemon.stderr);
            assert!(daemon.stderr.contains(&names_the_store), "{}", daemon.stderr);
            assert_eq!(w.mock.requests().len(), 0);
        }
        // A fleet node starts on a store it can read (README "Fleet": it rides out a store that
        // cannot commit), and refuses every refresh loudly until the store takes writes again.
        Backend::Postgres => {
            let daemon = w.start_daemon().await;
            daemon.signal(Signal::SIGUSR1);
            let refused = format!("database {names_the_store}: cannot execute");
            assert!(
                wait_for(Duration::from_secs(5), || daemon.log_text().contains(&refused)).await,
                "{}",
                daemon.log_text()
            );
            assert!(daemon.log_text().contains("read-only transaction"), "{}", daemon.log_text());
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(w.mock.requests().len(), 0, "a request left while the store could not commit");
            // Writable again: the node's next attempt commits, although its session began
            // read-only (a session keeps the default it started with, so the node must start a
            // new one, as it must after a failover from a standby).
            let admin = w.pg_client().await;
            // (The test's own session is read-only too: lift that first, in a statement of its own.)
            admin.batch_execute("SET default_transaction_read_only = off").await.unwrap();
            admin
                .batch_execute(&format!("ALTER DATABASE {} RESET default_transaction_read_only", w.pg_database()))
                .await
                .unwrap();
            assert!(wait_for(Duration::from_secs(20), || w.generation("c") == 2).await, "{}", daemon.log_text());
            assert_eq!(w.mock.reuses(), 0);
        }
    }
}

/// The store is somebody else's: a file that is not SQLite at the database path, a PostgreSQL
/// database another application uses (its own tables, none of tokend's). Every command refuses
/// with one line naming it, and leaves it as it was.
async fn a_store_that_is_not_tokends_is_refused_untouched(backend: Backend) {
    let w = World::on(backend, MockSettings::default()).await;
    w.write_config(ONE);
    let junk: Vec<u8> = (0..16_384u32).map(|i| (i * 7 % 251) as u8).collect();
    let (code, refusal) = match backend {
        Backend::Sqlite => {
            std::fs::write(w.path("tokend.db"), &junk).unwrap();
            (
                1,
                format!(
                    "database {}: is not a SQLite database (corrupt, or another file at this path); refusing to touch it",
                    w.path("tokend.db").display()
                ),
            )
        }
        Backend::Postgres => {
            w.pg_client()
                .await
                .batch_execute(
                    "DROP SCHEMA public CASCADE; CREATE SCHEMA public; \
                     CREATE TABLE orders (id int PRIMARY KEY, body bytea NOT NULL); \
                     INSERT INTO orders VALUES (1, '\\x00ff');",
                )
                .await
                .unwrap();
            (9, "has no tokend tables (a new database, or another application's): run `tokend migrate` first".into())
        }
    };
    let contents = async || match backend {
        Backend::Sqlite => std::fs::read(w.path("tokend.db")).unwrap(),
        Backend::Postgres => {
            let client = w.pg_client().await;
            let tables: Vec<String> = client
                .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(tables, ["orders"], "tables created in another application's database");
            client.query_one("SELECT body FROM orders WHERE id = 1", &[]).await.unwrap().get(0)
        }
    };
    let before = contents().await;
    for args in [&["list"][..], &["show", "c"], &["refresh", "c"], &["run"]] {
        let run = w.tokend(args, None).await;
        assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(&refusal), "{args:?}: {}", run.stderr);
        let errors = run.stderr.lines().filter(|l| !l.contains(" WARN ")).count();
        assert_eq!(errors, 1, "one line: {args:?}: {}", run.stderr);
    }
    assert_eq!(contents().await, before);
    if backend == Backend::Sqlite {
        assert_eq!(before, junk);
    }
    assert_eq!(w.mock.requests().len(), 0);
}
