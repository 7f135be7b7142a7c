//! PostgreSQL group commit (src/store/postgres/batch.rs) on a real server: what one operation of
//! a batch does to the others. A batch is formed the way it forms in a daemon under load — the
//! store's writer is busy (here: its commit waits on a row lock this test holds) while the next
//! operations arrive, and those then go together into one transaction.

mod support;

use std::time::Duration;
use support::postgres::{PG_PASSWORD, PgServer};
use support::token;
use tokend::redact::Secret;
use tokend::store::postgres::{PgStore, PgTarget};
use tokend::store::{Begin, LeaseHolder, RefreshStore, StoreError, TokenState};

struct Fixture {
    pg: PgServer,
    db: String,
    store: PgStore,
    _local: tempfile::TempDir,
}

async fn fixture(name: &str, credentials: &[&str]) -> Fixture {
    let pg = PgServer::start();
    let db = pg.create_database(name).await;
    let local = tempfile::tempdir().unwrap();
    let target = PgTarget::parse(&pg.conninfo(&db), Some(&Secret::new(PG_PASSWORD))).unwrap();
    let store = PgStore::start(&target, &local.path().join("fleet")).unwrap();
    store.migrate().unwrap();
    for c in credentials {
        store.import(c, "oauth2", &token(&format!("{c}-a1"), &format!("{c}-r1")), 1).unwrap();
    }
    Fixture { pg, db, store, _local: local }
}

/// Lease + attempt for `name` at generation 1; the attempt's id.
async fn begin(store: &PgStore, name: &str) -> (LeaseHolder, i64) {
    let holder = LeaseHolder::new();
    match store.begin_refresh(name, &holder, Duration::from_secs(60), tokend::clock::now_ms()).await.unwrap() {
        Begin::Leased { attempt_id, state } => {
            assert_eq!(state.map(|s| s.generation), Some(1), "{name}");
            (holder, attempt_id)
        }
        other => panic!("{name}: {other:?}"),
    }
}

type Committing = tokio::task::JoinHandle<Result<TokenState, StoreError>>;

fn commit(store: &PgStore, name: &str, attempt: i64) -> Committing {
    let (store, name) = (store.clone(), name.to_string());
    tokio::spawn(async move {
        let answer = token(&format!("{name}-a2"), &format!("{name}-r2"));
        store.commit_rotation(&name, "oauth2", attempt, 1, &answer, tokend::clock::now_ms()).await
    })
}

/// Holds `blocker`'s row locked from another session until the returned client commits, and
/// starts the store's commit of `blocker`, which waits for it: the writer is busy, and what the
/// test submits next queues up for one batch.
async fn hold_the_writer(f: &Fixture, blocker_attempt: i64) -> (tokio_postgres::Client, Committing) {
    let lock = f.pg.client(&f.db).await;
    lock.batch_execute("BEGIN; SELECT 1 FROM tokend_credential WHERE name = 'blocker' FOR UPDATE").await.unwrap();
    let blocked = commit(&f.store, "blocker", blocker_attempt);
    let watch = f.pg.client(&f.db).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = watch
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'", &[])
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the store's commit of blocker never waited on the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (lock, blocked)
}

async fn generation(f: &Fixture, name: &str) -> i64 {
    f.pg.client(&f.db)
        .await
        .query_one("SELECT generation FROM tokend_credential WHERE name = $1", &[&name])
        .await
        .unwrap()
        .get(0)
}

/// An operation that fails (a server-side error in its statement), and a fenced commit that
/// loses, each leave their batch-mates' commits standing; every outcome reaches its caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_operation_and_a_fenced_loser_leave_their_batch_mates_committed() {
    let f = fixture("batch_mates", &["blocker", "ok1", "poison", "ok2", "fenced"]).await;
    let mut attempts = std::collections::HashMap::new();
    for name in ["blocker", "ok1", "poison", "ok2", "fenced"] {
        attempts.insert(name, begin(&f.store, name).await.1);
    }
    // While "fenced"'s request is out, an operator imports a new grant: generation 1 → 2.
    f.store.import("fenced", "oauth2", &token("human", "r-human"), 2).unwrap();
    // Any rotation of "poison" fails in the server, in the middle of the batch.
    f.pg.client(&f.db)
        .await
        .batch_execute(
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 IF NEW.name = 'poison' AND NEW.generation > OLD.generation THEN RAISE EXCEPTION 'poisoned row'; END IF;
                 RETURN NEW; END $$;
             CREATE TRIGGER poison BEFORE UPDATE ON tokend_credential FOR EACH ROW EXECUTE FUNCTION poison();",
        )
        .await
        .unwrap();

    let (lock, blocked) = hold_the_writer(&f, attempts["blocker"]).await;
    let (batches_before, ops_before) = f.store.batch_stats();
    let batch: Vec<(&str, Committing)> =
        ["ok1", "poison", "ok2", "fenced"].into_iter().map(|n| (n, commit(&f.store, n, attempts[n]))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.batch_execute("COMMIT").await.unwrap();

    assert_eq!(blocked.await.unwrap().unwrap().generation, 2);
    let mut results = std::collections::HashMap::new();
    for (name, handle) in batch {
        results.insert(name, handle.await.unwrap());
    }
    let (batches, ops) = f.store.batch_stats();
    assert_eq!(
        (batches - batches_before, ops - ops_before),
        (2, 5),
        "the four commits did not go into one batch after the blocked one"
    );
    for name in ["ok1", "ok2"] {
        let state = results[name].as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((state.generation, state.access_token.expose()), (2, format!("{name}-a2").as_str()));
        assert_eq!(state.attempts_in_flight, 0, "{name}");
        assert_eq!(generation(&f, name).await, 2, "{name} not in the store");
    }
    match &results["poison"] {
        Err(e) => assert!(e.to_string().contains("poisoned row"), "{e}"),
        Ok(s) => panic!("poison committed generation {}", s.generation),
    }
    assert_eq!(generation(&f, "poison").await, 1);
    match &results["fenced"] {
        Err(StoreError::Superseded { spent: 1, found: 2, .. }) => {}
        other => panic!("fenced: {other:?}"),
    }
    let client = f.pg.client(&f.db).await;
    let kept: String = client
        .query_one("SELECT answer->>'refresh_token' FROM tokend_rescue WHERE credential = 'fenced'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, "fenced-r2", "the losing answer was not kept");
    let closed: Vec<(String, Option<String>)> = client
        .query("SELECT credential, result FROM tokend_attempt WHERE credential <> 'blocker' ORDER BY credential", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        closed,
        vec![
            ("fenced".to_string(), Some("superseded: answer kept in tokend_rescue".to_string())),
            ("ok1".to_string(), Some("refreshed".to_string())),
            ("ok2".to_string(), Some("refreshed".to_string())),
            // Its rotation failed and was rolled back alone: the attempt stays open for the
            // daemon's retry of the commit.
            ("poison".to_string(), None),
        ]
    );
}

/// A batch whose COMMIT fails fails every operation in it, including those that did nothing
/// wrong themselves; nothing of it is stored, and each answer's retry (the daemon's, through
/// `import`) lands fenced once the store accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_fails_fails_every_member_and_their_retries_land() {
    let f = fixture("batch_commit_fails", &["blocker", "doomed", "innocent"]).await;
    let mut attempts = std::collections::HashMap::new();
    for name in ["blocker", "doomed", "innocent"] {
        attempts.insert(name, begin(&f.store, name).await.1);
    }
    // Checked at COMMIT (a deferred constraint trigger): the whole transaction fails there.
    f.pg.client(&f.db)
        .await
        .batch_execute(
            "CREATE FUNCTION doom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 IF NEW.name = 'doomed' THEN RAISE EXCEPTION 'doomed at commit'; END IF; RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER doom AFTER UPDATE ON tokend_credential DEFERRABLE INITIALLY DEFERRED
                 FOR EACH ROW EXECUTE FUNCTION doom();",
        )
        .await
        .unwrap();

    let (lock, blocked) = hold_the_writer(&f, attempts["blocker"]).await;
    let (batches_before, ops_before) = f.store.batch_stats();
    let doomed = commit(&f.store, "doomed", attempts["doomed"]);
    let innocent = commit(&f.store, "innocent", attempts["innocent"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.batch_execute("COMMIT").await.unwrap();

    assert_eq!(blocked.await.unwrap().unwrap().generation, 2);
    for (name, handle) in [("doomed", doomed), ("innocent", innocent)] {
        match handle.await.unwrap() {
            Err(e) => assert!(e.to_string().contains("doomed at commit"), "{name}: {e}"),
            Ok(s) => panic!("{name} reported committed (generation {}) by a batch that failed", s.generation),
        }
        assert_eq!(generation(&f, name).await, 1, "{name}: something of the failed batch was stored");
    }
    let (batches, ops) = f.store.batch_stats();
    assert_eq!((batches - batches_before, ops - ops_before), (1, 1), "only the blocker's batch committed");

    // The store accepts again: the daemon's retry (the answer kept in memory, through import)
    // is the fenced commit of the same attempt, not a plain import.
    f.pg.client(&f.db).await.batch_execute("DROP TRIGGER doom ON tokend_credential").await.unwrap();
    for name in ["doomed", "innocent"] {
        let state = f.store.import(name, "oauth2", &token(&format!("{name}-a2"), &format!("{name}-r2")), 2).unwrap();
        assert_eq!((state.generation, state.attempts_in_flight), (2, 0), "{name}");
    }
    let client = f.pg.client(&f.db).await;
    let results: Vec<Option<String>> = client
        .query("SELECT result FROM tokend_attempt WHERE credential IN ('doomed', 'innocent') ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(results, vec![Some("refreshed".to_string()), Some("refreshed".to_string())]);
}
