//! Which engine fires per-token deadlines: tokio-cron-scheduler (the obvious crate) or
//! tokend's own deadline queue on one wall-clock timer? Measures, for each, in a process of its
//! own:
//! - lateness of N one-shot jobs due over the next 2 s (fire time − due time; negative = early);
//! - context switches of the whole process over 5 idle seconds (one job due in an hour).
//!
//! Run: `cargo bench --bench scheduler_probe` (add `-- 10000` for N; default 10,000).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokend::clock::now_ms;
use tokend::daemon::queue::{DeadlineQueue, Job};
use tokend::timer::WallTimer;

fn context_switches() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches") || line.starts_with("nonvoluntary_ctxt_switches") {
                total += line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

fn report(engine: &str, n: usize, mut lateness_ms: Vec<f64>, idle_switches: u64) {
    lateness_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| lateness_ms[((lateness_ms.len() - 1) as f64 * p) as usize];
    let early = lateness_ms.iter().filter(|l| **l < -1.0).count();
    println!(
        "{engine:<22} n={n:<6} fired={:<6} early(>1ms)={early:<6} lateness ms: min {:>8.1} p50 {:>8.1} p99 {:>8.1} max {:>8.1} | idle context switches in 5 s: {idle_switches}",
        lateness_ms.len(),
        pct(0.0),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}

async fn tokio_cron_scheduler(n: usize) {
    use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
    let scheduler = JobScheduler::new().await.unwrap();
    let fired = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let start = Instant::now() + Duration::from_secs(1);
    for i in 0..n {
        let due = start + Duration::from_micros((2_000_000 * i / n) as u64);
        let fired = fired.clone();
        let job = CronJob::new_one_shot_at_instant(due, move |_, _| {
            let late = Instant::now().checked_duration_since(due).map_or_else(
                || -(due.duration_since(Instant::now()).as_secs_f64() * 1000.0),
                |d| d.as_secs_f64() * 1000.0,
            );
            fired.lock().unwrap().push(late);
        })
        .unwrap();
        scheduler.add(job).await.unwrap();
    }
    scheduler.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while fired.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_job = CronJob::new_one_shot(Duration::from_secs(3600), |_, _| {}).unwrap();
    scheduler.add(idle_job).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = context_switches();
    std::thread::sleep(Duration::from_secs(5));
    let idle = context_switches() - before;
    let lateness = fired.lock().unwrap().clone();
    report("tokio-cron-scheduler", n, lateness, idle);
}

async fn deadline_queue(n: usize) {
    let mut queue = DeadlineQueue::default();
    let mut timer = WallTimer::new().unwrap();
    let start = now_ms() + 1000;
    let names: Vec<std::sync::Arc<str>> = (0..n).map(|i| format!("c{i}").into()).collect();
    for (i, name) in names.iter().enumerate() {
        queue.schedule(name, Job::Refresh, start + (2000 * i / n) as i64);
    }
    let mut due_of: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for name in &names {
        due_of.insert(name, queue.get(name, Job::Refresh).unwrap());
    }
    let mut lateness = Vec::with_capacity(n);
    while let Some(next) = queue.next_at() {
        timer.sleep_until(next).await.unwrap();
        let now = now_ms();
        for (name, _) in queue.pop_due(now) {
            lateness.push((now - due_of[&*name]) as f64);
        }
    }
    queue.schedule(&"idle".into(), Job::Refresh, now_ms() + 3_600_000);
    let idle_sleep = tokio::spawn(async move {
        let at = queue.next_at().unwrap();
        timer.sleep_until(at).await.unwrap();
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = context_switches();
    std::thread::sleep(Duration::from_secs(5));
    let idle = context_switches() - before;
    idle_sleep.abort();
    report("tokend deadline queue", n, lateness, idle);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let runtime = || tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    match args.iter().find(|a| a.starts_with("engine=")).map(String::as_str) {
        Some("engine=tcs") => runtime().block_on(tokio_cron_scheduler(n)),
        Some("engine=queue") => runtime().block_on(deadline_queue(n)),
        _ => {
            // Each engine in a fresh process, so one's leftover threads cannot disturb the other.
            for engine in ["engine=tcs", "engine=queue"] {
                let status = std::process::Command::new(std::env::current_exe().unwrap())
                    .arg(engine)
                    .arg(n.to_string())
                    .status()
                    .unwrap();
                assert!(status.success());
            }
        }
    }
}
