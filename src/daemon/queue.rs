//! The deadline queue: every timed job of every credential, ordered by due time. One timer waits
//! for the earliest entry; scheduling and cancelling are O(log n), so 100,000 credentials cost
//! no more per event than ten.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// What happens at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Job {
    /// Refresh ahead of expiry (or retry after a failure).
    Refresh,
    /// The access token expires: if it was not replaced, take it out of the sinks.
    Expire,
    /// The credential's `refresh_cron` fires.
    Cron,
    /// Daemon housekeeping (`PRAGMA optimize`, pruning old attempt records).
    Maintenance,
}

const JOBS: usize = 4;

#[derive(Default)]
pub struct DeadlineQueue {
    by_time: BTreeSet<(i64, Arc<str>, Job)>,
    /// Each name's deadlines, indexed by `Job`. The name is allocated once here and shared by
    /// its entries in `by_time`: at 100,000 credentials the keys are most of the queue's memory.
    by_name: HashMap<Arc<str>, [Option<i64>; JOBS]>,
}

impl DeadlineQueue {
    /// Sets (or moves) `job` of `name` to `at_ms`.
    pub fn schedule(&mut self, name: &str, job: Job, at_ms: i64) {
        self.cancel(name, job);
        let key = self.by_name.get_key_value(name).map_or_else(|| Arc::from(name), |(key, _)| key.clone());
        self.by_time.insert((at_ms, key.clone(), job));
        self.by_name.entry(key).or_default()[job as usize] = Some(at_ms);
    }

    pub fn cancel(&mut self, name: &str, job: Job) {
        let Some((key, slots)) = self.by_name.get_key_value(name) else { return };
        let Some(at) = slots[job as usize] else { return };
        self.by_time.remove(&(at, key.clone(), job));
        self.clear_slot(name, job);
    }

    pub fn cancel_all(&mut self, name: &str) {
        for job in [Job::Refresh, Job::Expire, Job::Cron, Job::Maintenance] {
            self.cancel(name, job);
        }
    }

    pub fn get(&self, name: &str, job: Job) -> Option<i64> {
        self.by_name.get(name).and_then(|slots| slots[job as usize])
    }

    /// The earliest deadline of `job`, whoever it belongs to.
    pub fn next_of(&self, job: Job) -> Option<i64> {
        self.by_time.iter().find(|(_, _, j)| *j == job).map(|(at, _, _)| *at)
    }

    /// The earliest deadline.
    pub fn next_at(&self) -> Option<i64> {
        self.by_time.first().map(|(at, _, _)| *at)
    }

    /// Removes and returns every job due at or before `now_ms`, earliest first.
    pub fn pop_due(&mut self, now_ms: i64) -> Vec<(Arc<str>, Job)> {
        let mut due = Vec::new();
        while let Some((at, _, _)) = self.by_time.first() {
            if *at > now_ms {
                break;
            }
            let (_, name, job) = self.by_time.pop_first().expect("checked non-empty");
            self.clear_slot(&name, job);
            due.push((name, job));
        }
        due
    }

    fn clear_slot(&mut self, name: &str, job: Job) {
        if let Some(slots) = self.by_name.get_mut(name) {
            slots[job as usize] = None;
            if slots.iter().all(Option::is_none) {
                self.by_name.remove(name);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_time.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_moves_and_cancels() {
        let mut q = DeadlineQueue::default();
        q.schedule("b", Job::Refresh, 20);
        q.schedule("a", Job::Refresh, 30);
        q.schedule("a", Job::Expire, 40);
        q.schedule("a", Job::Refresh, 10); // moved earlier
        assert_eq!(q.len(), 3);
        assert_eq!(q.next_at(), Some(10));
        assert_eq!(q.next_of(Job::Expire), Some(40));
        assert_eq!(q.pop_due(20), vec![(Arc::from("a"), Job::Refresh), (Arc::from("b"), Job::Refresh)]);
        assert_eq!(q.get("a", Job::Expire), Some(40));
        q.cancel("a", Job::Expire);
        assert!(q.is_empty());
        assert!(q.by_name.is_empty(), "names of finished credentials are not kept");
        assert_eq!(q.pop_due(i64::MAX), vec![]);
    }
}
