//! Micro-benchmarks of the hot pieces, so regressions show: answer parsing, the deadline queue,
//! and the rotation commit (alone, and group-committed 64 at a time).
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

criterion_group!(benches, parsing, queue, commits);
criterion_main!(benches);
