//! The deadline queue: every timed job of every credential, ordered by due time. One timer waits
//! for the earliest entry; scheduling and cancelling are O(log n), so 100,000 credentials cost
//! no more per event than ten.

use rustc_hash::FxHashMap;
use std::collections::BTreeSet;
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
    /// Tell a human: `reauth_soon` before the re-authorization deadline, or a `needs_reauth`
    /// reminder while the credential is dead.
    Notice,
}

/// Deadline columns per name: `Maintenance` (the daemon's own key only) and `Notice`
/// (credentials only) never meet under one name, so they share a column — a fifth would cost
/// 100,000 × 8 bytes.
const JOBS: usize = 4;

impl Job {
    fn column(self) -> usize {
        match self {
            Job::Refresh => 0,
            Job::Expire => 1,
            Job::Cron => 2,
            Job::Maintenance | Job::Notice => 3,
        }
    }
}
/// A job with no deadline (a slot's deadlines are plain integers: an `Option` would double them).
const UNSET: i64 = i64::MIN;

/// Names are interned into small integer slots so the time index holds 16-byte keys: at
/// 100,000 credentials (a refresh and an expiry each) the keys are most of the queue's memory.
#[derive(Default)]
pub struct DeadlineQueue {
    by_time: BTreeSet<(i64, u32, Job)>,
    /// Fx hashing: the names come from the operator's configuration, not from an adversary.
    slot_of: FxHashMap<Arc<str>, u32>,
    slots: Vec<Slot>,
    /// Slots whose name has no deadline left, for reuse.
    free: Vec<u32>,
    /// Between [`Self::defer`] and [`Self::settle`]: deadlines not yet in `by_time`.
    deferred: Option<Vec<(i64, u32, Job)>>,
}

struct Slot {
    /// Shared with the caller (the credential's own name): no allocation of its own.
    name: Arc<str>,
    at: [i64; JOBS],
}

impl DeadlineQueue {
    /// Sets (or moves) `job` of `name` to `at_ms`.
    pub fn schedule(&mut self, name: &Arc<str>, job: Job, at_ms: i64) {
        let at_ms = at_ms.max(UNSET + 1);
        self.cancel(name, job);
        let slot = match self.slot_of.get(&**name) {
            Some(&slot) => slot,
            None => self.new_slot(name),
        };
        match &mut self.deferred {
            Some(deferred) => deferred.push((at_ms, slot, job)),
            None => {
                self.by_time.insert((at_ms, slot, job));
            }
        }
        self.slots[slot as usize].at[job.column()] = at_ms;
    }

    /// Collects deadlines until [`Self::settle`] instead of inserting them one by one: a time
    /// index built from sorted keys has full nodes. At 100,000 credentials it is built faster
    /// and holds about half the memory of one built key by key. Nothing is popped meanwhile.
    pub fn defer(&mut self) {
        self.deferred.get_or_insert_with(Vec::new);
    }

    pub fn settle(&mut self) {
        let Some(mut deferred) = self.deferred.take() else { return };
        // A deadline moved or cancelled meanwhile left its old key behind; the slot has the truth.
        deferred.retain(|(at, slot, job)| self.slots[*slot as usize].at[job.column()] == *at);
        if deferred.len() >= self.by_time.len() {
            // Rebuilt whole (a reload re-plans everything): sorted keys again give full nodes.
            deferred.extend(std::mem::take(&mut self.by_time));
            self.by_time = deferred.into_iter().collect();
        } else {
            self.by_time.extend(deferred);
        }
    }

    /// Room for `names` more names without growing (start-up knows how many credentials).
    pub fn reserve(&mut self, names: usize) {
        let more = names.saturating_sub(self.slot_of.len());
        self.slot_of.reserve(more);
        self.slots.reserve(more.saturating_sub(self.free.len()));
    }

    fn new_slot(&mut self, name: &Arc<str>) -> u32 {
        let fresh = Slot { name: name.clone(), at: [UNSET; JOBS] };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = fresh;
                slot
            }
            None => {
                self.slots.push(fresh);
                u32::try_from(self.slots.len() - 1).expect("fewer than 4 billion names")
            }
        };
        self.slot_of.insert(name.clone(), slot);
        slot
    }

    pub fn cancel(&mut self, name: &str, job: Job) {
        let Some(&slot) = self.slot_of.get(name) else { return };
        let at = std::mem::replace(&mut self.slots[slot as usize].at[job.column()], UNSET);
        if at != UNSET {
            self.by_time.remove(&(at, slot, job));
        }
        self.release_if_idle(slot);
    }

    pub fn cancel_all(&mut self, name: &str) {
        for job in [Job::Refresh, Job::Expire, Job::Cron, Job::Maintenance] {
            self.cancel(name, job);
        }
    }

    pub fn get(&self, name: &str, job: Job) -> Option<i64> {
        let slot = *self.slot_of.get(name)?;
        Some(self.slots[slot as usize].at[job.column()]).filter(|at| *at != UNSET)
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
        debug_assert!(self.deferred.is_none(), "popped between defer and settle");
        let mut due = Vec::new();
        while let Some((at, _, _)) = self.by_time.first() {
            if *at > now_ms {
                break;
            }
            let (_, slot, job) = self.by_time.pop_first().expect("checked non-empty");
            let entry = &mut self.slots[slot as usize];
            entry.at[job.column()] = UNSET;
            due.push((entry.name.clone(), job));
            self.release_if_idle(slot);
        }
        due
    }

    fn release_if_idle(&mut self, slot: u32) {
        let entry = &self.slots[slot as usize];
        if entry.at.iter().all(|at| *at == UNSET) {
            self.slot_of.remove(&entry.name);
            self.free.push(slot);
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

    impl DeadlineQueue {
        fn clone_pop_all(&self) -> Vec<(Arc<str>, Job)> {
            self.by_time.iter().map(|(_, slot, job)| (self.slots[*slot as usize].name.clone(), *job)).collect()
        }
    }

    #[test]
    fn orders_moves_and_cancels() {
        let mut q = DeadlineQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        q.schedule(&b, Job::Refresh, 20);
        q.schedule(&a, Job::Refresh, 30);
        q.schedule(&a, Job::Expire, 40);
        q.schedule(&a, Job::Refresh, 10); // moved earlier
        assert_eq!(q.len(), 3);
        assert_eq!(q.next_at(), Some(10));
        assert_eq!(q.next_of(Job::Expire), Some(40));
        assert_eq!(q.pop_due(20), vec![(Arc::from("a"), Job::Refresh), (Arc::from("b"), Job::Refresh)]);
        assert_eq!(q.get("a", Job::Expire), Some(40));
        q.cancel("a", Job::Expire);
        assert!(q.is_empty());
        assert!(q.slot_of.is_empty(), "names of finished credentials are not kept");
        assert_eq!(q.free.len(), 2, "their slots are free for reuse");
        q.schedule(&b, Job::Cron, 50);
        assert_eq!(q.slots.len(), 2, "a free slot was reused");
        assert_eq!(q.get("b", Job::Cron), Some(50));
        assert_eq!(q.get("a", Job::Cron), None);
        assert_eq!(q.pop_due(i64::MAX), vec![(b.clone(), Job::Cron)]);
    }

    #[test]
    fn deferred_deadlines_mean_what_immediate_ones_mean() {
        let names: Vec<Arc<str>> = (0..50).map(|i| Arc::from(format!("c{i}"))).collect();
        let fill = |q: &mut DeadlineQueue| {
            for (i, name) in names.iter().enumerate() {
                let i = i as i64;
                q.schedule(name, Job::Refresh, 1000 - i);
                q.schedule(name, Job::Expire, 2000 + i);
                if i % 3 == 0 {
                    q.schedule(name, Job::Refresh, 500 + i); // moved while deferred
                }
                if i % 5 == 0 {
                    q.cancel(name, Job::Expire); // cancelled while deferred
                }
                if i % 7 == 0 {
                    q.cancel_all(name); // slot freed, then reused by the next name
                }
            }
        };
        let mut immediate = DeadlineQueue::default();
        fill(&mut immediate);
        for already in [false, true] {
            let mut deferred = DeadlineQueue::default();
            if already {
                deferred.schedule(&names[1], Job::Cron, 1); // `settle` onto a non-empty index
                immediate.schedule(&names[1], Job::Cron, 1);
            }
            deferred.defer();
            fill(&mut deferred);
            deferred.settle();
            assert_eq!(deferred.len(), immediate.len());
            assert_eq!(deferred.pop_due(i64::MAX), immediate.clone_pop_all());
        }
    }
}
