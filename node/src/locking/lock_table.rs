//! Per-key locks with fencing tokens, leases and a fair FIFO wait queue.
//!
//! Each key has a state: the holder (token + lease end, monotonic ms), the
//! per-key fencing counter, and a queue of waiters. Whenever the lock may have
//! become free (release, force release, lease expiry noticed by anyone) the
//! head waiter is granted the lock directly through its oneshot: waiters never
//! poll. A waiter sleeps until its grant, its acquire deadline, or the current
//! lease's end (when it wakes to hand the expired lock to the queue's head).
//!
//! Fencing tokens are `fence += 1` per grant, so a key's tokens strictly
//! increase. Lock states are kept after release to keep their counters.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use distcache_client::partition::lock_partition_for;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::replica::LockReplica;

/// A granted lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// Fencing token.
    pub token: u64,
    /// Lease length, ms.
    pub hold_ms: u64,
}

#[derive(Debug)]
struct Holder {
    token: u64,
    lease_until: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    hold_ms: u64,
    tx: oneshot::Sender<Grant>,
}

#[derive(Debug, Default)]
struct LockState {
    holder: Option<Holder>,
    fence: u64,
    last_expired: Option<u64>,
    waiters: VecDeque<Waiter>,
}

impl LockState {
    /// Expires a lapsed lease and, if the lock is free, grants it to the
    /// first waiter still waiting.
    fn progress(&mut self, now: u64, floor: u64) {
        if let Some(h) = self.holder.as_ref().filter(|h| h.lease_until <= now) {
            self.last_expired = Some(h.token);
            self.holder = None;
        }
        if self.holder.is_some() {
            return;
        }
        while let Some(w) = self.waiters.pop_front() {
            if w.tx.is_closed() {
                continue;
            }
            self.fence = (self.fence + 1).max(floor);
            let grant = Grant {
                token: self.fence,
                hold_ms: w.hold_ms,
            };
            if w.tx.send(grant).is_ok() {
                self.holder = Some(Holder {
                    token: grant.token,
                    lease_until: now.saturating_add(w.hold_ms),
                });
                return;
            }
        }
    }

    fn grant_now(&mut self, now: u64, hold_ms: u64, floor: u64) -> Grant {
        self.fence = (self.fence + 1).max(floor);
        self.holder = Some(Holder {
            token: self.fence,
            lease_until: now.saturating_add(hold_ms),
        });
        Grant {
            token: self.fence,
            hold_ms,
        }
    }
}

/// The locks of one partition, and the highest token ever granted in it:
/// released lock states are dropped (a key never used again costs nothing),
/// and a key used again gets a token above every earlier one of its
/// partition, so tokens per key still only increase.
#[derive(Debug, Default)]
struct PartLocks {
    keys: HashMap<Bytes, LockState>,
    high_water: u64,
}

impl PartLocks {
    /// Records `key`'s fence in the high-water mark and drops its state if
    /// it is idle (free, nobody queued, no expired lease to report).
    fn settle(&mut self, key: &[u8]) {
        let Some(st) = self.keys.get(key) else { return };
        self.high_water = self.high_water.max(st.fence);
        if st.holder.is_none() && st.waiters.is_empty() && st.last_expired.is_none() {
            self.keys.remove(key);
        }
    }
}

type Shard = Mutex<PartLocks>;

/// All locks of a node, sharded by lock partition.
#[derive(Debug)]
pub struct LockTable {
    shards: Box<[Shard]>,
    partition_count: u32,
    clock: Arc<dyn Clock>,
    next_waiter: AtomicU64,
    wait_rounds: AtomicU64,
    epoch: AtomicU64,
    shutdown: CancellationToken,
}

impl LockTable {
    /// An empty table. Waiters give up with `Unavailable` when `shutdown` fires.
    pub fn new(partition_count: u32, clock: Arc<dyn Clock>, shutdown: CancellationToken) -> Self {
        let partition_count = partition_count.max(1);
        LockTable {
            shards: (0..partition_count).map(|_| Mutex::default()).collect(),
            partition_count,
            clock,
            next_waiter: AtomicU64::new(1),
            wait_rounds: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            shutdown,
        }
    }

    /// Sets the partition-table epoch: tokens granted from now on are at
    /// least `epoch << 32`, so they exceed every token of earlier epochs even
    /// when the last grants before a failover were never replicated.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// The smallest token a grant in a partition with high-water mark `hw`
    /// may give: above every token of the partition and of earlier epochs.
    fn floor(&self, hw: u64) -> u64 {
        (self.epoch.load(Ordering::SeqCst) << 32).max(hw.saturating_add(1))
    }

    /// How many keys have lock state (held, queued for, or with an expired
    /// lease not reported yet); released keys hold none.
    pub fn states(&self) -> usize {
        self.shards.iter().map(|s| s.lock().keys.len()).sum()
    }

    /// The highest token granted in partition `p` (replicated in snapshots).
    pub fn high_water(&self, p: u32) -> u64 {
        self.shards[p as usize % self.shards.len()]
            .lock()
            .high_water
    }

    /// Whether this table holds any state for `key` (a key never locked has
    /// none, and a failed release or extend of it must not create one).
    pub fn knows(&self, key: &Bytes) -> bool {
        self.shard(key).lock().keys.contains_key(key)
    }

    /// The replicated form of `key`'s state.
    pub fn replica(&self, key: &Bytes) -> LockReplica {
        let now = self.clock.mono_ms();
        let shard = self.shard(key).lock();
        shard.keys.get(key).map_or(
            LockReplica {
                fence: 0,
                holder: None,
            },
            |st| to_replica(st, now),
        )
    }

    /// Sets `key`'s state from its primary (a backup applying replication).
    pub fn apply_replica(&self, key: &Bytes, r: LockReplica) {
        let now = self.clock.mono_ms();
        let mut shard = self.shard(key).lock();
        let st = shard.keys.entry(key.clone()).or_default();
        st.fence = st.fence.max(r.fence);
        st.holder = r.holder.map(|(token, left)| Holder {
            token,
            lease_until: now.saturating_add(left),
        });
        shard.settle(key);
    }

    /// Every lock of partition `p`.
    pub fn snapshot(&self, p: u32) -> Vec<(Bytes, LockReplica)> {
        let now = self.clock.mono_ms();
        let shard = self.shards[p as usize % self.shards.len()].lock();
        shard
            .keys
            .iter()
            .map(|(k, st)| (k.clone(), to_replica(st, now)))
            .collect()
    }

    /// Replaces partition `p`'s locks (a backup receiving a snapshot);
    /// `high_water` is the highest token granted in it (never lowered here).
    pub fn install(&self, p: u32, locks: &[(Bytes, LockReplica)], high_water: u64) {
        let now = self.clock.mono_ms();
        let mut shard = self.shards[p as usize % self.shards.len()].lock();
        shard.keys.retain(|_, st| !st.waiters.is_empty());
        shard.high_water = shard.high_water.max(high_water);
        for (k, r) in locks {
            let st = shard.keys.entry(k.clone()).or_default();
            st.fence = st.fence.max(r.fence);
            st.holder = r.holder.map(|(token, left)| Holder {
                token,
                lease_until: now.saturating_add(left),
            });
            shard.settle(k);
        }
    }

    fn shard(&self, key: &[u8]) -> &Shard {
        &self.shards[lock_partition_for(key, self.partition_count) as usize]
    }

    /// Takes the lock if it is free and nobody queues for it.
    pub fn try_acquire(&self, key: &Bytes, hold_ms: u64) -> Option<Grant> {
        let now = self.clock.mono_ms();
        let mut shard = self.shard(key).lock();
        let floor = self.floor(shard.high_water);
        let st = shard.keys.entry(key.clone()).or_default();
        st.progress(now, floor);
        while st.waiters.front().is_some_and(|w| w.tx.is_closed()) {
            st.waiters.pop_front();
        }
        let grant = (st.holder.is_none() && st.waiters.is_empty())
            .then(|| st.grant_now(now, hold_ms, floor));
        shard.settle(key);
        grant
    }

    /// Waits in the key's FIFO queue for up to `acquire_timeout`.
    pub async fn acquire(
        &self,
        key: &Bytes,
        hold_ms: u64,
        acquire_timeout: Duration,
    ) -> Result<Grant> {
        let deadline = tokio::time::Instant::now() + acquire_timeout;
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let now = self.clock.mono_ms();
            let mut shard = self.shard(key).lock();
            let floor = self.floor(shard.high_water);
            let st = shard.keys.entry(key.clone()).or_default();
            st.waiters.push_back(Waiter { id, hold_ms, tx });
            st.progress(now, floor);
            shard.settle(key);
        }
        let mut wait = WaitGuard {
            table: self,
            key,
            id,
            rx,
            done: false,
        };
        loop {
            self.wait_rounds.fetch_add(1, Ordering::Relaxed);
            // Register for clock jumps before looking at the state, so a jump
            // in between is not missed.
            let jumps = self.clock.jumps().map(|n| n.notified());
            tokio::pin!(jumps);
            if let Some(n) = jumps.as_mut().as_pin_mut() {
                n.enable();
            }
            let lease_left = {
                let now = self.clock.mono_ms();
                let mut shard = self.shard(key).lock();
                let floor = self.floor(shard.high_water);
                let st = shard.keys.entry(key.clone()).or_default();
                st.progress(now, floor);
                let left = st
                    .holder
                    .as_ref()
                    .map(|h| Duration::from_millis(h.lease_until.saturating_sub(now)));
                shard.settle(key);
                left
            };
            tokio::select! {
                grant = &mut wait.rx => {
                    return match grant {
                        Ok(g) => { wait.done = true; Ok(g) }
                        Err(_) => Err(Error::Internal("lock waiter dropped".into())),
                    };
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return wait.give_up();
                }
                _ = self.shutdown.cancelled() => {
                    return Err(Error::Unavailable("node is shutting down".into()));
                }
                _ = async {
                    match lease_left {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = async {
                    match jumps.as_mut().as_pin_mut() {
                        Some(n) => n.await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// Releases the lock held with `token`.
    pub fn release(&self, key: &Bytes, token: u64) -> Result<()> {
        let now = self.clock.mono_ms();
        let mut shard = self.shard(key).lock();
        let floor = self.floor(shard.high_water);
        let Some(st) = shard.keys.get_mut(key) else {
            return Err(Error::LockNotHeld(show(key)));
        };
        let outcome = match &st.holder {
            Some(h) if h.token == token && h.lease_until > now => {
                st.holder = None;
                Ok(())
            }
            _ => {
                st.progress(now, floor);
                if st.last_expired == Some(token) {
                    Err(Error::LockHoldTimeout(show(key)))
                } else {
                    Err(Error::LockNotHeld(show(key)))
                }
            }
        };
        st.progress(now, floor);
        shard.settle(key);
        outcome
    }

    /// Renews the lease held with `token` to `hold_ms` from now.
    pub fn extend(&self, key: &Bytes, token: u64, hold_ms: u64) -> Result<Grant> {
        let now = self.clock.mono_ms();
        let mut shard = self.shard(key).lock();
        let floor = self.floor(shard.high_water);
        let Some(st) = shard.keys.get_mut(key) else {
            return Err(Error::LockNotHeld(show(key)));
        };
        st.progress(now, floor);
        let outcome = match &mut st.holder {
            Some(h) if h.token == token => {
                h.lease_until = now.saturating_add(hold_ms);
                Ok(Grant { token, hold_ms })
            }
            _ if st.last_expired == Some(token) => Err(Error::LockHoldTimeout(show(key))),
            _ => Err(Error::LockNotHeld(show(key))),
        };
        shard.settle(key);
        outcome
    }

    /// Releases the lock whoever holds it; true if it was held.
    pub fn force_release(&self, key: &Bytes) -> bool {
        let now = self.clock.mono_ms();
        let mut shard = self.shard(key).lock();
        let floor = self.floor(shard.high_water);
        let Some(st) = shard.keys.get_mut(key) else {
            return false;
        };
        st.progress(now, floor);
        let was_held = st.holder.take().is_some();
        // A forced release also forgets an expired lease: the lock is free.
        st.last_expired = None;
        st.progress(now, floor);
        shard.settle(key);
        was_held
    }

    /// How many times waiters looked at lock state while waiting (one per
    /// wake-up); stays near one per acquire because waiters never poll.
    pub fn wait_rounds(&self) -> u64 {
        self.wait_rounds.load(Ordering::Relaxed)
    }

    /// The current holder's token, if the lock is held.
    pub fn holder(&self, key: &Bytes) -> Option<u64> {
        let now = self.clock.mono_ms();
        let mut shard = self.shard(key).lock();
        let floor = self.floor(shard.high_water);
        let st = shard.keys.get_mut(key)?;
        st.progress(now, floor);
        let token = st.holder.as_ref().map(|h| h.token);
        shard.settle(key);
        token
    }
}

fn to_replica(st: &LockState, now: u64) -> LockReplica {
    LockReplica {
        fence: st.fence,
        holder: st
            .holder
            .as_ref()
            .filter(|h| h.lease_until > now)
            .map(|h| (h.token, h.lease_until - now)),
    }
}

/// A lock key as shown in errors.
pub fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Leaves the queue when an acquire ends without a grant (timeout, or the
/// caller went away); a grant that raced in is kept or handed back.
struct WaitGuard<'a> {
    table: &'a LockTable,
    key: &'a Bytes,
    id: u64,
    rx: oneshot::Receiver<Grant>,
    done: bool,
}

impl WaitGuard<'_> {
    fn give_up(&mut self) -> Result<Grant> {
        let mut shard = self.table.shard(self.key).lock();
        if let Some(st) = shard.keys.get_mut(self.key) {
            let before = st.waiters.len();
            st.waiters.retain(|w| w.id != self.id);
            if st.waiters.len() < before {
                self.done = true;
                shard.settle(self.key);
                return Err(Error::LockAcquireTimeout(show(self.key)));
            }
        }
        // Not queued any more: we were granted just now; keep the grant.
        match self.rx.try_recv() {
            Ok(g) => {
                self.done = true;
                Ok(g)
            }
            Err(_) => {
                self.done = true;
                Err(Error::LockAcquireTimeout(show(self.key)))
            }
        }
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let now = self.table.clock.mono_ms();
        let mut shard = self.table.shard(self.key).lock();
        let floor = self.table.floor(shard.high_water);
        let Some(st) = shard.keys.get_mut(self.key) else {
            return;
        };
        st.waiters.retain(|w| w.id != self.id);
        if let Ok(g) = self.rx.try_recv()
            && st.holder.as_ref().is_some_and(|h| h.token == g.token)
        {
            st.holder = None;
            st.progress(now, floor);
        }
        shard.settle(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn table(clock: Arc<ManualClock>) -> LockTable {
        LockTable::new(271, clock, CancellationToken::new())
    }

    fn k(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn released_keys_leave_no_state_and_tokens_still_increase_per_key() {
        let clock = ManualClock::new(0);
        let t = table(clock.clone());
        // Tokens increase per partition (so per key).
        let mut last: HashMap<u32, u64> = HashMap::new();
        for i in 0..1_000_000u32 {
            let key = Bytes::from(format!("job-{i}"));
            let g = t.try_acquire(&key, 1_000).expect("free");
            let before = last.insert(lock_partition_for(&key, 271), g.token);
            assert!(before.is_none_or(|b| g.token > b), "tokens never go back");
            t.release(&key, g.token).expect("release");
        }
        assert_eq!(t.states(), 0, "a million released keys keep no state");
        // A reused key gets a larger token than its earlier ones.
        let a1 = t.try_acquire(&k("a"), 1_000).expect("free");
        t.release(&k("a"), a1.token).expect("release");
        assert_eq!(t.states(), 0);
        let a2 = t.try_acquire(&k("a"), 1_000).expect("free");
        assert!(a2.token > a1.token);
        // A backup that installs a snapshot keeps the partition's high water.
        let p = lock_partition_for(b"a", 271);
        let backup = table(clock);
        backup.install(p, &[], t.high_water(p));
        let b = backup.try_acquire(&k("a"), 1_000).expect("free");
        assert!(
            b.token > a2.token,
            "promoted backup continues above {}",
            a2.token
        );
        // Replicated releases are reclaimed on the backup too.
        backup.apply_replica(
            &k("z"),
            LockReplica {
                fence: 5,
                holder: None,
            },
        );
        assert!(!backup.knows(&k("z")));
    }

    #[test]
    fn a_snapshot_logged_before_high_water_existed_still_reads() {
        #[derive(serde::Serialize)]
        struct OldSnapshot {
            collections: Vec<(String, Vec<crate::replica::SnapshotEntry>)>,
            locks: Vec<(Bytes, LockReplica)>,
        }
        let old = OldSnapshot {
            collections: Vec::new(),
            locks: vec![(
                k("l"),
                LockReplica {
                    fence: 9,
                    holder: None,
                },
            )],
        };
        let bytes = rmp_serde::to_vec(&old).expect("encode");
        let snap: crate::replica::PartitionSnapshot =
            rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(snap.locks.len(), 1);
        assert_eq!(snap.lock_high_water, 0);
    }

    #[test]
    fn tokens_increase_and_release_rules_hold() {
        let clock = ManualClock::new(0);
        let t = table(clock.clone());
        let g1 = t.try_acquire(&k("a"), 1_000).expect("free");
        assert!(t.try_acquire(&k("a"), 1_000).is_none());
        assert_eq!(
            t.release(&k("a"), g1.token + 7),
            Err(Error::LockNotHeld("a".into()))
        );
        t.release(&k("a"), g1.token).expect("release");
        let g2 = t.try_acquire(&k("a"), 1_000).expect("free again");
        assert!(g2.token > g1.token);
        clock.advance(1_000);
        assert_eq!(
            t.release(&k("a"), g2.token),
            Err(Error::LockHoldTimeout("a".into()))
        );
        let g3 = t
            .try_acquire(&k("a"), 1_000)
            .expect("expired lease frees the lock");
        assert!(g3.token > g2.token);
        assert!(t.extend(&k("a"), g3.token, 5_000).is_ok());
        clock.advance(4_000);
        assert_eq!(t.holder(&k("a")), Some(g3.token));
        assert!(t.force_release(&k("a")));
        assert_eq!(t.holder(&k("a")), None);
    }

    #[tokio::test]
    async fn waiter_gets_expired_lease_with_a_new_token() {
        let clock = ManualClock::new(0);
        let t = Arc::new(table(clock.clone()));
        let g1 = t.try_acquire(&k("x"), 500).expect("free");
        let t2 = t.clone();
        let waiter =
            tokio::spawn(async move { t2.acquire(&k("x"), 500, Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        clock.advance(500);
        let g2 = waiter.await.expect("join").expect("granted");
        assert!(g2.token > g1.token);
        assert_eq!(
            t.release(&k("x"), g1.token),
            Err(Error::LockHoldTimeout("x".into()))
        );
        assert_eq!(t.holder(&k("x")), Some(g2.token));
    }

    #[tokio::test]
    async fn acquire_times_out_and_leaves_the_queue() {
        let clock = ManualClock::new(0);
        let t = table(clock);
        let _g = t.try_acquire(&k("y"), 60_000).expect("free");
        let e = t.acquire(&k("y"), 1_000, Duration::from_millis(30)).await;
        assert_eq!(e, Err(Error::LockAcquireTimeout("y".into())));
        // The timed-out waiter does not block a later try.
        t.force_release(&k("y"));
        assert!(t.try_acquire(&k("y"), 1_000).is_some());
    }
}

#[cfg(test)]
mod replica_tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn tokens_jump_with_the_epoch_and_replicas_carry_state() {
        let clock = ManualClock::new(0);
        let a = LockTable::new(271, clock.clone(), CancellationToken::new());
        a.set_epoch(1);
        let g = a.try_acquire(&Bytes::from("k"), 5_000).expect("free");
        assert_eq!(g.token, 1 << 32);
        let r = a.replica(&Bytes::from("k"));
        assert_eq!(r.holder, Some((g.token, 5_000)));
        // A backup takes the state, is promoted in epoch 2: next token is larger.
        let b = LockTable::new(271, clock.clone(), CancellationToken::new());
        b.apply_replica(&Bytes::from("k"), r);
        assert!(
            b.try_acquire(&Bytes::from("k"), 1_000).is_none(),
            "lease still held"
        );
        b.set_epoch(2);
        clock.advance(5_000);
        let g2 = b.try_acquire(&Bytes::from("k"), 1_000).expect("lease over");
        assert!(g2.token > g.token && g2.token >= 2 << 32);
    }
}
