//! Disk faults on real file systems: a small tmpfs that fills up, one remounted read-only, and a
//! database file that is not SQLite. Needs mount(2) (root in CI); without it each test says it
//! was skipped and why.

mod support;

use nix::sys::signal::Signal;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{World, wait_for};
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

/// The one-credential config with the database moved into `db/` (the tmpfs).
fn config_with_database_in_db_dir(w: &World) {
    w.write_config(ONE);
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(w.config_path(), text.replace("database = \"tokend.db\"", "database = \"db/tokend.db\"")).unwrap();
}

const ONE: &str = "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";

fn fill(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_after_the_provider_rotated_rescues_the_token() {
    let w = World::new(MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    let Some(disk) = Tmpfs::mount(&w.path("db"), "1m", "disk_full") else { return };
    std::fs::create_dir(w.path("tmp")).unwrap();
    config_with_database_in_db_dir(&w);
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
    assert!(run.stderr.contains("the provider issued a new token but it could not be stored"), "{}", run.stderr);
    let rescue = run
        .stderr
        .split("the answer was saved to ")
        .nth(1)
        .and_then(|r| r.split(" — ").next())
        .expect("rescue path named");
    assert!(rescue.starts_with(tmp.to_str().unwrap()), "the full disk could not hold it, the temp dir did: {rescue}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(rescue).unwrap().permissions().mode() & 0o777, 0o600, "the rescue file is private");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(rescue).unwrap()).unwrap();
    let live = w.mock.live_refresh_token("c").unwrap();
    assert_eq!(saved["refresh_token"], live.as_str(), "the rescued token is the provider's live one");
    assert!(!run.stderr.contains(&live), "the token itself is not printed");

    // Space comes back; the operator follows the message.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_keeps_the_token_when_its_disk_fills_and_commits_it_later() {
    let w = World::new(MockSettings { delay: Duration::from_millis(1500), ..MockSettings::default() }).await;
    let Some(disk) = Tmpfs::mount(&w.path("db"), "1m", "daemon_disk_full") else { return };
    config_with_database_in_db_dir(&w);
    w.authorize_and_import("c").await;
    let daemon = w.start_daemon_env(&[("TMPDIR", w.dir.path().to_str().unwrap())]).await;
    daemon.signal(Signal::SIGUSR1);
    assert!(wait_for(Duration::from_secs(5), || !w.mock.requests().is_empty()).await);
    fill(&disk.0);
    assert!(
        wait_for(Duration::from_secs(5), || daemon.log_text().contains("ROTATED TOKEN NOT STORED")).await,
        "{}",
        daemon.log_text()
    );
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || daemon
            .log_text()
            .contains("rescued token committed; the chain is intact"))
        .await,
        "{}",
        daemon.log_text()
    );
    let state = tokend::store::Store::open(&w.path("db/tokend.db")).unwrap().get("c").unwrap().unwrap();
    assert_eq!(state.refresh_token.unwrap().expose(), w.mock.live_refresh_token("c").unwrap());
    assert_eq!(w.mock.reuses(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_sink_directory_degrades_but_never_loses_the_token() {
    let w = World::new(MockSettings::default()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_database_refuses_before_spending_anything() {
    let w = World::new(MockSettings::default()).await;
    let Some(disk) = Tmpfs::mount(&w.path("db"), "1m", "read_only_database") else { return };
    config_with_database_in_db_dir(&w);
    w.authorize_and_import("c").await;
    disk.remount("ro");
    let run = w.tokend(&["refresh", "c"], None).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("db/tokend.db"), "names the database: {}", run.stderr);
    assert!(run.stderr.to_lowercase().contains("read"), "says why: {}", run.stderr);
    assert_eq!(w.mock.requests().len(), 0, "nothing was sent, so nothing can be lost");
    let daemon = w.tokend(&["run"], None).await;
    assert_eq!(daemon.code, 1, "{}", daemon.stderr);
    assert!(daemon.stderr.contains("db/tokend.db"), "{}", daemon.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_not_sqlite_is_refused_untouched() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(ONE);
    let junk: Vec<u8> = (0..16_384u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(w.path("tokend.db"), &junk).unwrap();
    for args in [&["list"][..], &["show", "c"], &["refresh", "c"], &["run"]] {
        let run = w.tokend(args, None).await;
        assert_eq!(run.code, 1, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!(
                "database {}: is not a SQLite database (corrupt, or another file at this path); refusing to touch it",
                w.path("tokend.db").display()
            )),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert_eq!(std::fs::read(w.path("tokend.db")).unwrap(), junk);
    assert_eq!(w.mock.requests().len(), 0);
}
