//! The deadline queue: every timed job of every credential, ordered by due time. One timer waits
//! for the earliest entry; scheduling and cancelling are O(log n), so 100,000 credentials cost
//! no more per event than ten.

use std::collections::{BTreeSet, HashMap};

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

#[derive(Default)]
pub struct DeadlineQueue {
    by_time: BTreeSet<(i64, String, Job)>,
    by_key: HashMap<(String, Job), i64>,
}

impl DeadlineQueue {
    /// Sets (or moves) `job` of `name` to `at_ms`.
    pub fn schedule(&mut self, name: &str, job: Job, at_ms: i64) {
        self.cancel(name, job);
        self.by_time.insert((at_ms, name.to_string(), job));
        self.by_key.insert((name.to_string(), job), at_ms);
    }

    pub fn cancel(&mut self, name: &str, job: Job) {
        if let Some(at) = self.by_key.remove(&(name.to_string(), job)) {
            self.by_time.remove(&(at, name.to_string(), job));
        }
    }

    pub fn cancel_all(&mut self, name: &str) {
        for job in [Job::Refresh, Job::Expire, Job::Cron, Job::Maintenance] {
            self.cancel(name, job);
        }
    }

    pub fn get(&self, name: &str, job: Job) -> Option<i64> {
        self.by_key.get(&(name.to_string(), job)).copied()
    }

    /// The earliest deadline.
    pub fn next_at(&self) -> Option<i64> {
        self.by_time.first().map(|(at, _, _)| *at)
    }

    /// Removes and returns every job due at or before `now_ms`, earliest first.
    pub fn pop_due(&mut self, now_ms: i64) -> Vec<(String, Job)> {
        let mut due = Vec::new();
        while let Some((at, _, _)) = self.by_time.first() {
            if *at > now_ms {
                break;
            }
            let (_, name, job) = self.by_time.pop_first().expect("checked non-empty");
            self.by_key.remove(&(name.clone(), job));
            due.push((name, job));
        }
        due
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
        assert_eq!(q.pop_due(20), vec![("a".to_string(), Job::Refresh), ("b".to_string(), Job::Refresh)]);
        q.cancel("a", Job::Expire);
        assert!(q.is_empty());
        assert_eq!(q.pop_due(i64::MAX), vec![]);
    }
}
