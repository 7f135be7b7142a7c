//! Encryption at rest (README "Encryption at rest"): no token the provider ever issued is found
//! in the database, its WAL, its shared-memory file or a backup; a wrong, missing or exposed key,
//! and a damaged or moved value, are each a clear error with nothing sent and nothing lost; key
//! rotation survives SIGKILL anywhere; a systemd credential carries the key.

mod support;

use nix::sys::signal::Signal;
use rand::Rng;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{World, wait_for};
use tokend::dev::mock::MockSettings;
use tokend::seal::{Key, Keyring, Sealer};
use tokend::store::{NewToken, Store};

/// Exit code of a key problem (README "Exit codes").
const KEY_EXIT: i32 = 8;

fn credentials(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| {
            format!(
                "[[credential]]\nname = \"{name}\"\nprovider = \"nationbuilder\"\ntoken_url = \"{{mock}}/oauth/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"out/{name}.token\"\n\n"
            )
        })
        .collect()
}

fn key_from(path: &Path) -> Key {
    Key::from_text(&std::fs::read_to_string(path).unwrap(), path.display().to_string()).unwrap()
}

fn sealed_store(w: &World, keys: &[&str]) -> Store {
    let mut ring = keys.iter().map(|k| key_from(&w.path(k)));
    let first = ring.next().unwrap();
    Store::open_sealed(&w.path("tokend.db"), Sealer::with(Keyring::new(first, ring.collect()))).unwrap()
}

/// Every (file, token) pair where an issued token appears in clear.
fn tokens_in_clear(files: &[PathBuf], tokens: &[String]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for file in files {
        let bytes = std::fs::read(file).unwrap_or_default();
        for token in tokens {
            if bytes.windows(token.len()).any(|w| w == token.as_bytes()) {
                found.push((file.display().to_string(), token.clone()));
            }
        }
    }
    found
}

fn store_files(w: &World) -> Vec<PathBuf> {
    ["tokend.db", "tokend.db-wal", "tokend.db-shm"].iter().map(|f| w.path(f)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_issued_token_is_in_the_database_its_wal_shm_or_a_backup() {
    let w = World::new(MockSettings { expires_in: 4, ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let names = ["nb", "nudge", "wa"];
    // A store written in plaintext first, as before encryption existed.
    w.write_config(&credentials(&names));
    for name in names {
        w.authorize_and_import(name).await;
    }
    let plain = tokens_in_clear(&store_files(&w), &w.mock.issued_tokens());
    assert!(!plain.is_empty(), "the plaintext store should hold its tokens in clear (the scan must be able to fail)");
    let check = w.tokend(&["check"], None).await;
    assert!(check.stdout.contains("encryption: none — tokens are stored in plaintext"), "{}", check.stdout);

    let init = w.tokend(&["key", "init", "tokend.key"], None).await;
    assert_eq!(init.code, 0, "{}", init.stderr);
    assert!(init.stdout.contains("systemd-creds encrypt --name=tokend-key"), "{}", init.stdout);
    assert!(init.stdout.contains("LoadCredentialEncrypted=tokend-key:/etc/credstore.encrypted/tokend-key"));
    assert_eq!(std::fs::metadata(w.path("tokend.key")).unwrap().permissions().mode() & 0o777, 0o600);
    w.write_config_with_daemon("key_file = \"tokend.key\"", &credentials(&names));

    // The first start with a key encrypts the store in place, then refreshes as usual.
    let mut daemon = w.start_daemon().await;
    assert!(daemon.log_text().contains("store encrypted; old pages removed"), "{}", daemon.log_text());
    assert!(wait_for(Duration::from_secs(30), || w.mock.refreshes() >= 9).await, "{}", daemon.log_text());
    // A backup beside the running daemon, and the files as they are while it runs (WAL in use).
    let backup = w.tokend(&["backup", "backup.db"], None).await;
    assert_eq!(backup.code, 0, "{}", backup.stderr);
    assert!(backup.stdout.contains("encrypted, key id"), "{}", backup.stdout);
    // The store cannot be re-keyed under the running daemon, which holds the old key.
    assert_eq!(w.tokend(&["key", "init", "next.key"], None).await.code, 0);
    let rotate = w.tokend(&["key", "rotate", "--new", "next.key"], None).await;
    assert!(rotate.code != 0 && rotate.stderr.contains("tokend is running on it"), "{}", rotate.stderr);
    let mut files = store_files(&w);
    files.push(w.path("backup.db"));
    assert!(w.path("tokend.db-wal").exists(), "the WAL should be in use while the daemon runs");
    let issued = w.mock.issued_tokens();
    assert!(issued.len() >= 24, "{} tokens issued", issued.len());
    assert_eq!(tokens_in_clear(&files, &issued), vec![], "tokens in clear while running");

    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await, 0);
    let issued = w.mock.issued_tokens();
    assert_eq!(tokens_in_clear(&files, &issued), vec![], "tokens in clear after the run");
    // The tokens are all there, behind the key: the sinks hold the stored access tokens.
    let store = sealed_store(&w, &["tokend.key"]);
    for name in names {
        let state = store.get(name).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(w.path(&format!("out/{name}.token"))).unwrap(), state.access_token.expose());
        assert_eq!(w.mock.live_refresh_token(name).as_deref(), state.refresh_token.as_ref().map(|t| t.expose()));
    }
    assert_eq!(w.mock.reuses(), 0);
    let check = w.tokend(&["check"], None).await;
    assert!(check.stdout.contains("stored values: 6 sealed with key"), "{}", check.stdout);
}

/// Imports `names` with a key, returning the world (config with `key_file = "tokend.key"`).
async fn encrypted_world(names: &[&str]) -> World {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    assert_eq!(w.tokend(&["key", "init", "tokend.key"], None).await.code, 0);
    w.write_config_with_daemon("key_file = \"tokend.key\"", &credentials(names));
    for name in names {
        w.authorize_and_import(name).await;
    }
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_key_stops_everything_before_a_request() {
    let w = encrypted_world(&["nb"]).await;
    let before = sealed_store(&w, &["tokend.key"]).get("nb").unwrap().unwrap();
    assert_eq!(w.tokend(&["key", "init", "other.key"], None).await.code, 0);
    w.write_config_with_daemon("key_file = \"other.key\"", &credentials(&["nb"]));
    for args in [&["run"][..], &["refresh", "nb"], &["show", "nb"], &["check"]] {
        let run = w.tokend(args, None).await;
        assert_eq!(run.code, KEY_EXIT, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("wrong key") && run.stderr.contains("other.key"), "{args:?}: {}", run.stderr);
    }
    let run = w.tokend(&["run"], None).await;
    assert!(run.stderr.contains("nothing was sent to any provider"), "{}", run.stderr);

    w.write_config(&credentials(&["nb"]));
    let run = w.tokend(&["run"], None).await;
    assert_eq!(run.code, KEY_EXIT, "{}", run.stderr);
    assert!(run.stderr.contains("no key is configured"), "{}", run.stderr);

    w.write_config_with_daemon("key_env = \"TOKEND_TEST_KEY\"", &credentials(&["nb"]));
    let run = w.tokend(&["refresh", "nb"], None).await;
    assert_eq!(run.code, KEY_EXIT, "{}", run.stderr);
    assert!(run.stderr.contains("key_env TOKEND_TEST_KEY: the environment variable is not set"), "{}", run.stderr);

    assert_eq!(w.mock.requests().len(), 0, "a request was sent without the right key");
    assert_eq!(sealed_store(&w, &["tokend.key"]).get("nb").unwrap().unwrap(), before, "the store changed");
    // With the right key (here through key_env) everything works again.
    let key = std::fs::read_to_string(w.path("tokend.key")).unwrap();
    let run = w.tokend_env(&["refresh", "nb"], None, &[("TOKEND_TEST_KEY", key.trim())]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(w.mock.refreshes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_or_moved_ciphertext_is_refused_and_nothing_is_sent() {
    let w = encrypted_world(&["a", "b"]).await;
    // Generation 2 of "a", keeping its generation-1 refresh token's ciphertext.
    let raw = || rusqlite::Connection::open(w.path("tokend.db")).unwrap();
    let column = |name: &str, col: &str| -> String {
        raw().query_row(&format!("SELECT {col} FROM credential WHERE name = ?1"), [name], |r| r.get(0)).unwrap()
    };
    let set = |name: &str, col: &str, value: &str| {
        raw().execute(&format!("UPDATE credential SET {col} = ?2 WHERE name = ?1"), [name, value]).unwrap();
    };
    let old_refresh = column("a", "refresh_token");
    assert_eq!(w.tokend(&["refresh", "a"], None).await.code, 0);
    let requests = w.mock.requests().len();
    let good_refresh = column("a", "refresh_token");
    let good_access = column("a", "access_token");

    let cases: [(&str, &str, String, &str); 4] = [
        ("b's refresh token in a's row", "refresh_token", column("b", "refresh_token"), "copied from another row"),
        ("a's own older generation", "refresh_token", old_refresh, "generation 2"),
        ("the access token in the refresh column", "refresh_token", good_access.clone(), "refresh_token"),
        ("truncated", "refresh_token", good_refresh[..good_refresh.len() - 6].to_string(), "truncated"),
    ];
    for (what, col, value, expect) in cases {
        set("a", col, &value);
        for args in [&["refresh", "a"][..], &["show", "a"]] {
            let run = w.tokend(args, None).await;
            assert_eq!(run.code, KEY_EXIT, "{what}, {args:?}: {}", run.stderr);
            assert!(
                run.stderr.contains("credential \"a\" refresh_token") && run.stderr.contains(expect),
                "{what}: {}",
                run.stderr
            );
        }
        assert_eq!(w.mock.requests().len(), requests, "{what}: a request was sent");
        // The daemon keeps "a" out of the provider's way and goes on with "b".
        set("a", col, &good_refresh);
    }
    // Nothing lost: the real value back, "a" refreshes with its live token; "b" was untouched.
    let run = w.tokend(&["refresh", "a"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(w.tokend(&["refresh", "b"], None).await.code, 0);
    assert_eq!(w.mock.reuses(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_others_can_read_or_own_is_refused() {
    let w = encrypted_world(&["nb"]).await;
    let key = w.path("tokend.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [&["check"][..], &["run"], &["refresh", "nb"]] {
        let run = w.tokend(args, None).await;
        assert_eq!(run.code, KEY_EXIT, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("has mode 0644: other users could read the key"), "{}", run.stderr);
        assert!(run.stderr.contains(&format!("key_file {}", key.display())), "{}", run.stderr);
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Another user's key file (65534: nobody).
    std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
    let run = w.tokend(&["refresh", "nb"], None).await;
    assert_eq!(run.code, KEY_EXIT, "{}", run.stderr);
    assert!(run.stderr.contains("is owned by uid 65534, not by tokend's user"), "{}", run.stderr);
    std::os::unix::fs::chown(&key, Some(0), None).unwrap();
    assert_eq!(w.mock.requests().len(), 0);
    assert_eq!(w.tokend(&["refresh", "nb"], None).await.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restores_onto_a_new_host_with_the_key_and_not_without() {
    let w = encrypted_world(&["nb"]).await;
    let access = w.show("nb").await.stdout;
    assert_eq!(w.tokend(&["backup", "backup.db"], None).await.code, 0);
    let again = w.tokend(&["backup", "backup.db"], None).await;
    assert_ne!(again.code, 0, "a backup must not overwrite a file");
    assert_eq!(std::fs::metadata(w.path("backup.db")).unwrap().permissions().mode() & 0o777, 0o600);

    // "New host": another directory with the configuration and the key, no database.
    let host = World::new(MockSettings::default()).await;
    std::fs::create_dir(host.path("out")).unwrap();
    let backup = w.path("backup.db").display().to_string();
    assert_eq!(host.tokend(&["key", "init", "tokend.key"], None).await.code, 0);
    host.write_config_with_daemon("key_file = \"tokend.key\"", &credentials(&["nb"]));
    let wrong = host.tokend(&["restore", &backup], None).await;
    assert_eq!(wrong.code, KEY_EXIT, "{}", wrong.stderr);
    assert!(!host.path("tokend.db").exists(), "a failed restore left a database behind");
    std::fs::copy(w.path("tokend.key"), host.path("tokend.key")).unwrap();
    let run = host.tokend(&["restore", &backup], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(host.show("nb").await.stdout, access);
    let over = host.tokend(&["restore", &backup], None).await;
    assert!(over.code != 0 && over.stderr.contains("already holds a store"), "{}", over.stderr);
}

/// SIGKILL at random points of `tokend key rotate`, alternating between two keys: after each
/// kill every value still opens with one of the two keys, the rerun finishes, and in the end the
/// chains are live at the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_killed_at_random_points_completes_on_rerun() {
    const CREDENTIALS: usize = 200;
    const KILLS: usize = 50;
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    assert_eq!(w.tokend(&["key", "init", "a.key"], None).await.code, 0);
    assert_eq!(w.tokend(&["key", "init", "b.key"], None).await.code, 0);
    let names: Vec<String> = (0..CREDENTIALS).map(|i| format!("c{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let config = |key: &str| w.write_config_with_daemon(&format!("key_file = \"{key}\""), &credentials(&refs));
    config("a.key");
    let tokens: Vec<NewToken> = names
        .iter()
        .map(|name| {
            let answer = w.mock.authorize(name);
            support::token(answer["access_token"].as_str().unwrap(), answer["refresh_token"].as_str().unwrap())
        })
        .collect();
    {
        let mut store = sealed_store(&w, &["a.key"]);
        let rows: Vec<(&str, &str, &NewToken)> =
            names.iter().zip(&tokens).map(|(n, t)| (n.as_str(), "nationbuilder", t)).collect();
        store.import_many(&rows, 1000).unwrap();
    }
    let expect_intact = |keys: &[&str], context: &str| {
        let store = sealed_store(&w, keys);
        let states = store.list().unwrap_or_else(|e| panic!("{context}: {e}"));
        assert_eq!(states.len(), CREDENTIALS, "{context}");
        for ((state, name), token) in states.iter().zip(&names).zip(&tokens) {
            assert_eq!((&state.name, state.generation), (name, 1), "{context}");
            assert_eq!(state.access_token, token.access_token, "{context}: {name}");
            assert_eq!(state.refresh_token, token.refresh_token, "{context}: {name}");
        }
        store.key_use().unwrap()
    };
    let rotate = |new: &str| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"));
        command
            .args(["key", "rotate", "--new", new, "--batch", "1"])
            .env("TOKEND_CONFIG", w.config_path())
            .current_dir(w.path(""))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };
    // How long a whole rotation takes here: the kills land anywhere in it.
    let started = std::time::Instant::now();
    let out = rotate("b.key").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = started.elapsed();
    config("b.key");
    let (mut from, mut to) = ("b.key", "a.key");
    let mut rng = rand::rng();
    let mut mid_rotation = 0;
    for kill in 0..KILLS {
        let mut child = rotate(to).spawn().unwrap();
        let at = whole.mul_f64(rng.random_range(0.0..1.0));
        std::thread::sleep(at);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        let using = expect_intact(&[to, from], &format!("kill {kill} at {at:?}"));
        if using.sealed.len() == 2 {
            mid_rotation += 1;
        }
        let out = rotate(to).output().unwrap();
        assert!(out.status.success(), "rerun after kill {kill}: {}", String::from_utf8_lossy(&out.stderr));
        config(to);
        let using = expect_intact(&[to], &format!("after the rerun of kill {kill}"));
        assert_eq!((using.plaintext, using.sealed.len()), (0, 1), "kill {kill}");
        std::mem::swap(&mut from, &mut to);
    }
    assert!(mid_rotation >= KILLS / 5, "only {mid_rotation} of {KILLS} kills landed mid-rotation (whole: {whole:?})");
    support::record_figures(
        "encryption_rotation_kills",
        &format!("{KILLS} kills, {mid_rotation} mid-rotation (values under both keys), whole rotation {whole:?}"),
    );
    // The chains are live: refreshing spends exactly the tokens the provider issued.
    for name in ["c000", "c099", "c199"] {
        let run = w.tokend(&["refresh", name], None).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    assert_eq!((w.mock.refreshes(), w.mock.reuses()), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_creds_round_trip() {
    let Ok(version) = std::process::Command::new("systemd-creds").arg("--version").output() else {
        // CI installs systemd (.ci/run); elsewhere the key_file tests above cover the key path.
        eprintln!("systemd-creds not installed: skipped");
        return;
    };
    assert!(version.status.success());
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let init = w.tokend(&["key", "init", "tokend.key"], None).await;
    // The exact command `tokend key init` prints, with the credential written here instead of
    // /etc/credstore.encrypted. `--with-key=host`: this machine has no TPM2 (the printed command
    // lets systemd-creds pick the TPM2 where there is one).
    let line = init.stdout.lines().find(|l| l.trim_start().starts_with("systemd-creds encrypt")).unwrap();
    let mut argv: Vec<String> = line
        .split_whitespace()
        .map(|a| a.replace("/etc/credstore.encrypted", &w.dir.path().display().to_string()))
        .collect();
    argv.insert(2, "--with-key=host".into());
    let encrypted = w.path("tokend-key");
    assert_eq!(argv.last().unwrap(), &encrypted.display().to_string());
    let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sealed = std::fs::read(&encrypted).unwrap();
    let key_text = std::fs::read_to_string(w.path("tokend.key")).unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains(key_text.trim()), "the credential holds the key in clear");
    std::fs::remove_file(w.path("tokend.key")).unwrap();

    // What LoadCredentialEncrypted= does at start: decrypt into the service's credentials
    // directory. (No booted systemd here: systemd-creds decrypt does the same decryption.)
    let creds = w.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    let out = std::process::Command::new("systemd-creds")
        .args(["decrypt", "--name=tokend-key"])
        .arg(&encrypted)
        .arg(creds.join("tokend-key"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.write_config_with_daemon("key_credential = \"tokend-key\"", &credentials(&["nb"]));
    let env = [("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())];
    let answer = w.mock.authorize("nb");
    let run = w.tokend_env(&["import", "nb"], Some(&answer.to_string()), &env).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = w.tokend_env(&["refresh", "nb"], None, &env).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let check = w.tokend_env(&["check"], None, &env).await;
    assert!(check.stdout.contains("encryption: key_credential \"tokend-key\""), "{}", check.stdout);
    // Outside the service the credential is not there: a listing works without it (it shows no
    // token), anything that needs a token is a clear error naming the key source.
    let list = w.tokend(&["list", "--json"], None).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(list.stdout.contains("\"generation\": 2"), "{}", list.stdout);
    // Outside the service the credential is not there: a clear error naming it.
    let run = w.tokend(&["show", "nb"], None).await;
    assert_eq!(run.code, KEY_EXIT, "{}", run.stderr);
    assert!(run.stderr.contains("key_credential \"tokend-key\": $CREDENTIALS_DIRECTORY is not set"), "{}", run.stderr);
    assert_eq!(tokens_in_clear(&store_files(&w), &w.mock.issued_tokens()), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_key_sources_or_a_path_in_a_credential_name_are_config_errors() {
    let w = World::new(MockSettings::default()).await;
    w.write_config_with_daemon("key_file = \"k\"\nkey_env = \"K\"", &credentials(&["nb"]));
    let run = w.tokend(&["check"], None).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("[daemon]: field \"key_credential\": give only one of key_credential, key_file, key_env"),
        "{}",
        run.stderr
    );
    w.write_config_with_daemon("key_credential = \"../etc/key\"", &credentials(&["nb"]));
    let run = w.tokend(&["check"], None).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("must be a bare credential name"), "{}", run.stderr);
    assert!(!w.path("tokend.db").exists(), "check created a database");
}
