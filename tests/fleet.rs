//! Fleet mode on a real PostgreSQL server the test starts itself (tests/support/postgres.rs):
//! every CLI command against a PostgreSQL store, `tokend run` refreshing against the mock, and
//! the one-line errors for a store that cannot be used.

mod support;

use nix::sys::signal::Signal;
use std::time::Duration;
use support::postgres::{PG_PASSWORD, PgServer, daemon_lines};
use support::{World, wait_for};
use tokend::dev::mock::MockSettings;

const NUDGE_AND_NB: &str = "[[credential]]\nname = \"n\"\nprovider = \"nudge\"\nbase_url = \"{mock}\"\nclient_id = \"nid\"\nclient_secret = \"ns\"\n[[credential.sink]]\npath = \"out/n.token\"\n\n[[credential]]\nname = \"nb\"\nprovider = \"nationbuilder\"\nslug = \"x\"\ntoken_url = \"{mock}/oauth/token\"\nclient_id = \"i\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"out/nb.json\"\nformat = \"json\"\n\n[[credential]]\nname = \"key\"\nprovider = \"wildapricot\"\ntoken_url = \"{mock}/auth/token\"\napi_key = \"k-1\"\n";

async fn generation(pg: &PgServer, db: &str, name: &str) -> Option<i64> {
    pg.client(db)
        .await
        .query_opt("SELECT generation FROM tokend_credential WHERE name = $1", &[&name])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

fn no_password_in(run: &support::Run) {
    assert!(
        !run.stdout.contains(PG_PASSWORD) && !run.stderr.contains(PG_PASSWORD),
        "the database password leaked: {}{}",
        run.stdout,
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cli_command_works_on_postgres() {
    let pg = PgServer::start();
    let db = pg.create_database("cli").await;
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config_daemon_only(&daemon_lines(&pg, &db, w.dir.path(), "state"), NUDGE_AND_NB);

    // A database without tokend's tables: one line, exit 8, nothing sent anywhere.
    let run = w.tokend(&["list"], None).await;
    assert_eq!(run.code, 8, "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("has no tokend tables") && run.stderr.contains("tokend migrate"), "{}", run.stderr);
    let run = w.tokend(&["refresh", "n"], None).await;
    assert_eq!(run.code, 8, "{}", run.stderr);
    assert!(w.mock.requests().is_empty(), "a provider was contacted without a usable store");

    let run = w.tokend(&["migrate"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("schema version 0 -> 1"), "{}", run.stdout);
    let run = w.tokend(&["migrate"], None).await;
    assert!(run.stdout.contains("schema version 1, up to date"), "{}", run.stdout);

    let run = w.tokend(&["check"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    no_password_in(&run);

    // import, list, show
    let answer = w.authorize_and_import("n").await;
    w.authorize_and_import("nb").await;
    assert_eq!(generation(&pg, &db, "n").await, Some(1));
    assert!(!w.path("tokend.db").exists() && !w.path("state/tokend.db").exists(), "no SQLite file on the side");
    let row = w.row("n").await;
    assert_eq!((row["status"].as_str(), row["generation"].as_i64()), (Some("active"), Some(1)));
    let show = w.show("n").await;
    assert_eq!(show.stdout.trim(), answer["access_token"].as_str().unwrap());

    // refresh: the fenced commit moves the generation on, the sink follows
    let run = w.tokend(&["refresh", "n"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("refreshed n: generation 2"), "{}", run.stdout);
    assert_eq!(generation(&pg, &db, "n").await, Some(2));
    assert_eq!(w.mock.reuses(), 0);
    let sink = std::fs::read_to_string(w.path("out/n.token")).unwrap();
    assert_eq!(sink.trim(), w.show("n").await.stdout.trim());
    assert_ne!(sink.trim(), answer["access_token"].as_str().unwrap());

    // authorize (API key: the first token goes through the refresh path's fenced insert)
    let run = w.tokend(&["authorize", "key"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("authorized key: generation 1"), "{}", run.stdout);
    assert_eq!(generation(&pg, &db, "key").await, Some(1));

    // revoke at the provider, forget locally, remove
    let run = w.tokend(&["revoke", "n"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(w.row("n").await["status"], "revoked");
    assert_eq!(w.show("n").await.code, 5);
    let run = w.tokend(&["revoke", "nb", "--forget"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(w.row("nb").await["status"], "no_token");
    let run = w.tokend(&["remove", "key"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(generation(&pg, &db, "key").await, None);
    let run = w.tokend(&["remove", "key"], None).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
    no_password_in(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokend_run_refreshes_against_the_mock_on_postgres() {
    let pg = PgServer::start();
    let db = pg.create_database("run").await;
    let w = World::new(MockSettings { expires_in: 3, ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    // The URL form this time (the other tests use libpq's key=value form).
    let lines = daemon_lines(&pg, &db, w.dir.path(), "state").replace(&pg.conninfo(&db), &pg.url(&db));
    w.write_config_daemon_only(&lines, NUDGE_AND_NB);
    assert_eq!(w.tokend(&["migrate"], None).await.code, 0);
    w.authorize_and_import("n").await;
    w.authorize_and_import("nb").await;
    let mut daemon = w.start_daemon().await;
    let mut reached = false;
    for _ in 0..200 {
        if generation(&pg, &db, "n").await >= Some(4) && generation(&pg, &db, "nb").await >= Some(4) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reached, "not refreshed three times in 10 s of 3 s tokens: {}", daemon.log_text());
    // The sink catches up with the store (the store is ahead by at most one in-flight rotation).
    let current = w.show("nb").await.stdout.trim().to_string();
    assert!(
        wait_for(Duration::from_secs(3), || {
            std::fs::read(w.path("out/nb.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| {
                    v["access_token"].as_str().is_some_and(|t| t == current) || v["generation"].as_i64() > Some(4)
                })
        })
        .await,
        "sink never held the stored token"
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0, "{}", daemon.log_text());
    assert_eq!(w.mock.reuses(), 0, "a spent refresh token was sent again");
    let log = daemon.log_text();
    assert!(!log.contains(PG_PASSWORD), "the database password is in the log");
    assert!(w.path("state/fleet.lock").exists(), "the node's lock lives in its state_dir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_store_is_one_line_and_exit_8() {
    let pg = PgServer::start();
    let db = pg.create_database("bad").await;
    let w = World::new(MockSettings::default()).await;
    let good = daemon_lines(&pg, &db, w.dir.path(), "state");
    let body = "[[credential]]\nname = \"n\"\nprovider = \"nudge\"\nbase_url = \"{mock}\"\nclient_id = \"nid\"\nclient_secret = \"ns\"\n";
    w.write_config_daemon_only(&good, body);
    assert_eq!(w.tokend(&["migrate"], None).await.code, 0);
    w.authorize_and_import("n").await;
    let requests = w.mock.requests().len();

    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong password", good.clone(), "password authentication failed"),
        (
            "unreachable server",
            good.replace(&pg.socket_dir().display().to_string(), "/nonexistent-pg-dir"),
            "/nonexistent-pg-dir",
        ),
        ("no such database", good.replace(&format!("dbname={db}"), "dbname=nosuch"), "nosuch"),
    ];
    for (what, lines, expected) in cases {
        if what == "wrong password" {
            std::fs::write(w.path("pg-password"), "not-the-password\n").unwrap();
        } else {
            std::fs::write(w.path("pg-password"), format!("{PG_PASSWORD}\n")).unwrap();
        }
        w.write_config_daemon_only(&lines, body);
        for args in [&["list"][..], &["refresh", "n"], &["run"]] {
            let run = w.tokend(args, None).await;
            assert_eq!(run.code, 8, "{what}, {args:?}: {}", run.stderr);
            // `run` logs the configuration's own warnings first (its inline client secret).
            let errors = run.stderr.lines().filter(|l| !l.contains(" WARN ")).count();
            assert_eq!(errors, 1, "{what}, {args:?}: {}", run.stderr);
            assert!(run.stderr.contains(expected), "{what}, {args:?}: {}", run.stderr);
            no_password_in(&run);
        }
    }
    std::fs::write(w.path("pg-password"), format!("{PG_PASSWORD}\n")).unwrap();
    w.write_config_daemon_only(&good, body);

    // A schema from a newer tokend: refused by every command, `tokend migrate` included.
    pg.client(&db).await.batch_execute("INSERT INTO tokend_schema (version) VALUES (99)").await.unwrap();
    for args in [&["list"][..], &["run"], &["migrate"]] {
        let run = w.tokend(args, None).await;
        assert_eq!(run.code, 8, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("schema version 99 is newer than this tokend knows (1)"), "{}", run.stderr);
    }
    // A bad connection string is a configuration error naming the field.
    w.write_config_daemon_only("database = \"postgres://tokend@localhost\"\n", body);
    let run = w.tokend(&["check"], None).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("field \"database\"") && run.stderr.contains("names no database"), "{}", run.stderr);
    assert_eq!(w.mock.requests().len(), requests, "a provider was contacted");
}
