//! Micro-benchmarks of the hot pieces, so regressions show: answer parsing, the deadline queue,
//! the rotation commit (alone, and group-committed 64 at a time), sealing / opening a token, and
//! the pieces of a socket API token answer.
//!
//!   cargo bench --bench micro

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use tokend::committer::Committer;
use tokend::daemon::queue::{DeadlineQueue, Job};
use tokend::redact::Secret;
use tokend::store::{Begin, LeaseHolder, NewToken, RefreshStore, Store};

const ANSWER: &[u8] = br#"{"access_token":"2YotnFZFEjr1zCsicMWpAA2YotnFZFEjr1zCsicMWpAA","refresh_token":"tGzv3JOkF0XG5Qx2TlKWIAtGzv3JOkF0XG5Qx2TlKWIA","token_type":"Bearer","expires_in":86400,"scope":"default","created_at":1632773996}"#;

fn token(i: u64) -> NewToken {
    NewToken {
        access_token: Secret::new(format!("access-{i:032}")),
        refresh_token: Some(Secret::new(format!("refresh-{i:032}"))),
        token_type: "Bearer".into(),
        scope: Some("default".into()),
        expires_in: Some(3600),
        created_at: 1_700_000_000,
        extra: None,
        refresh_token_expires_at: None,
    }
}

fn parsing(c: &mut Criterion) {
    c.bench_function("parse_token_json (NationBuilder answer)", |b| {
        b.iter(|| tokend::provider::parse_token_json(black_box(ANSWER)).unwrap())
    });
}

fn queue(c: &mut Criterion) {
    let names: Vec<std::sync::Arc<str>> = (0..100_000).map(|i| format!("c{i}").into()).collect();
    c.bench_function("deadline queue: schedule 100k, pop all", |b| {
        b.iter_batched(
            DeadlineQueue::default,
            |mut q| {
                for (i, n) in names.iter().enumerate() {
                    q.schedule(n, Job::Refresh, (i as i64 * 7919) % 100_000);
                }
                black_box(q.pop_due(i64::MAX).len())
            },
            BatchSize::LargeInput,
        )
    });
    let mut full = DeadlineQueue::default();
    for (i, n) in names.iter().enumerate() {
        full.schedule(n, Job::Refresh, i as i64);
    }
    c.bench_function("deadline queue: move one deadline among 100k", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % names.len();
            full.schedule(&names[i], Job::Refresh, black_box(i as i64 + 1));
        })
    });
}

fn commits(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("bench.db")).unwrap();
    let names: Vec<String> = (0..64).map(|i| format!("c{i}")).collect();
    let rows: Vec<(String, NewToken)> = names.iter().enumerate().map(|(i, n)| (n.clone(), token(i as u64))).collect();
    let refs: Vec<(&str, &str, &NewToken)> = rows.iter().map(|(n, t)| (n.as_str(), "oauth2", t)).collect();
    store.import_many(&refs, 1_700_000_000).unwrap();
    let holder = LeaseHolder::new();
    let mut group = c.benchmark_group("rotation commit (durable, fsync)");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut n = 0u64;
    group.bench_function("begin + commit + release, one at a time", |b| {
        b.iter(|| {
            n += 1;
            let Begin::Leased { state, attempt_id } =
                store.begin_refresh("c0", &holder, Duration::from_secs(60), 1).unwrap()
            else {
                panic!("lease")
            };
            let generation = state.map_or(0, |s| s.generation);
            store.commit_rotation("c0", "oauth2", attempt_id, generation, &token(n), 2).unwrap();
            store.release_lease("c0", &holder).unwrap();
        })
    });
    let committer = Committer::open(&dir.path().join("bench.db")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    group.bench_function("64 concurrent commits through the committer (group commit)", |b| {
        b.iter(|| {
            n += 1;
            let token = token(n);
            let commits = names.iter().map(|name| committer.commit_rotation(name, "oauth2", 0, 0, &token, 3));
            let results = rt.block_on(futures_util::future::join_all(commits));
            assert!(results.iter().all(Result::is_ok));
        })
    });
    group.finish();
}

/// Encryption at rest: what each stored token costs (README "Encryption at rest").
fn sealing(c: &mut Criterion) {
    use tokend::seal::{Column, Key, Keyring, Sealer};
    let sealer = Sealer::with(Keyring::new(Key::from_text(&Key::generate_text(), "bench").unwrap(), vec![]));
    // A NationBuilder-sized token, and a 1 KiB JWT-sized one.
    for len in [43, 1024] {
        let token = "t".repeat(len);
        let sealed = sealer.seal("c0", Column::RefreshToken, 7, &token).unwrap();
        c.bench_function(&format!("seal a {len}-byte token"), |b| {
            b.iter(|| sealer.seal(black_box("c0"), Column::RefreshToken, 7, black_box(&token)).unwrap())
        });
        c.bench_function(&format!("open a {len}-byte token"), |b| {
            b.iter(|| sealer.open(black_box("c0"), Column::RefreshToken, 7, black_box(&sealed)).unwrap())
        });
    }
}

/// The pieces of a `GET …/token` answer before the snapshot (src/socket/snapshot.rs): a SQLite
/// point read, the hand-off of a read to tokio's blocking pool and back, and the answer built as
/// a JSON tree (then) or serialized from a struct (now).
fn token_answer(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("bench.db")).unwrap();
    let rows: Vec<(String, NewToken)> = (0..10_001).map(|i| (format!("c{i}"), token(i))).collect();
    let refs: Vec<(&str, &str, &NewToken)> = rows.iter().map(|(n, t)| (n.as_str(), "oauth2", t)).collect();
    store.import_many(&refs, 1_700_000_000).unwrap();
    c.bench_function("socket: store.get of one token among 10,001 (SQLite point read)", |b| {
        b.iter(|| store.get(black_box("c0")).unwrap().unwrap())
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    c.bench_function("socket: spawn_blocking(nothing) awaited, on a 2-worker runtime", |b| {
        b.iter(|| rt.block_on(async { tokio::task::spawn_blocking(|| black_box(1)).await.unwrap() }))
    });
    c.bench_function("socket: rt.block_on(an empty future), to subtract from the line above", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });
    let state = store.get("c0").unwrap().unwrap();
    c.bench_function("socket: token answer as a serde_json::Value tree, then bytes", |b| {
        b.iter(|| {
            let value = serde_json::json!({
                "name": state.name,
                "access_token": state.access_token.expose(),
                "token_type": state.token_type,
                "expires_at": state.expires_at.map(tokend::clock::rfc3339),
                "expires_in": state.expires_at.map(|at| at - 1_700_000_000),
                "scope": state.scope,
                "generation": state.generation,
            });
            serde_json::to_vec(&value).unwrap()
        })
    });
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        name: &'a str,
        access_token: &'a str,
        token_type: &'a str,
        expires_at: Option<String>,
        expires_in: Option<i64>,
        scope: Option<&'a str>,
        generation: i64,
    }
    c.bench_function("socket: token answer serialized from a struct", |b| {
        b.iter(|| {
            let mut bytes = Vec::with_capacity(512);
            let answer = Answer {
                name: &state.name,
                access_token: state.access_token.expose(),
                token_type: &state.token_type,
                expires_at: state.expires_at.map(tokend::clock::rfc3339),
                expires_in: state.expires_at.map(|at| at - 1_700_000_000),
                scope: state.scope.as_deref(),
                generation: state.generation,
            };
            serde_json::to_writer(&mut bytes, &answer).unwrap();
            bytes
        })
    });
}

criterion_group!(benches, parsing, queue, commits, sealing, token_answer);
criterion_main!(benches);
