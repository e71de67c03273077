//! The cluster layer: membership, the epoch-fenced partition table, the
//! coordinator's step function and the rebalancer. The node (`crate::Node`)
//! drives them: heartbeats, votes, installs, replication and migration.

pub mod kubernetes;
pub mod membership;
pub mod placement;
pub mod rebalancer;
pub mod seqlock;
pub mod table;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::net::message::Heartbeat;
use membership::{MemberSpec, MembersProvider};
use seqlock::InstallSeq;
use table::{MemberInfo, Table};

/// Cluster timing and replication settings.
#[derive(Debug, Clone, Copy)]
pub struct ClusterConfig {
    /// Backups per partition.
    pub backup_count: u32,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// A member not heard from for this long is considered failed.
    pub failure_timeout: Duration,
    /// Timeout of forwarded and other peer requests.
    pub request_timeout: Duration,
    /// Timeout of one replication round trip.
    pub replication_timeout: Duration,
    /// Period of the anti-entropy digest comparison.
    pub anti_entropy_interval: Duration,
    /// Longest a graceful leave waits for the hand-off.
    pub leave_timeout: Duration,
}

/// Who reported a backup out of sync: (primary, its incarnation, its seq).
type UnsyncedReport = (String, u64, u64);

/// What this node knows of another member.
#[derive(Debug, Clone)]
pub struct View {
    /// When it was last heard from.
    pub last_seen: Instant,
    /// Its last heartbeat.
    pub hb: Heartbeat,
}

/// Replication state of one partition on this node.
#[derive(Debug, Default)]
pub struct PartState {
    /// Held across a write's local apply and its replication, and across a
    /// snapshot: orders the partition's writes on every replica.
    pub repl: tokio::sync::Mutex<()>,
    /// This node holds every acknowledged write of the partition (as its
    /// primary or an in-sync backup).
    pub loaded: AtomicBool,
    /// As primary: backups known to be in sync.
    pub synced: Mutex<HashSet<String>>,
    /// As backup: the primary's sequence number at the last snapshot.
    pub snap_seq: AtomicU64,
}

/// The cluster state of one node.
#[derive(Debug)]
pub struct Cluster {
    me: MemberInfo,
    config: ClusterConfig,
    provider: Box<dyn MembersProvider>,
    table: RwLock<Arc<Table>>,
    /// Highest epoch this node voted for.
    promised: Mutex<u64>,
    views: Mutex<HashMap<String, View>>,
    /// Member -> (incarnation, heartbeat seq, when) of a process known to be
    /// gone: for a failure timeout, heartbeats of older incarnations or of
    /// that process (same incarnation, later seq) are ignored. A restart with
    /// its WAL keeps the incarnation but counts its seq from 1 again, so it
    /// is heard at once.
    tombstones: Mutex<HashMap<String, (u64, u64, Instant)>>,
    /// (partition, backup) -> (primary, its incarnation, its heartbeat seq)
    /// reported out of sync.
    unsynced: Mutex<HashMap<(u32, String), UnsyncedReport>>,
    /// Per-partition replication state.
    parts: Box<[PartState]>,
    /// Heartbeat sequence number.
    seq: AtomicU64,
    /// Leaving gracefully.
    leaving: AtomicBool,
    /// The table came from this node's WAL (a restart): until the next
    /// install, the roles it lists may be stale.
    restored: AtomicBool,
    /// The table-install seqlock (see [`seqlock`]).
    installs: InstallSeq,
    /// Serializes table installs.
    install_lock: Mutex<()>,
    /// This node's table is known to be current (a newer one was installed,
    /// or a majority reported no newer epoch). A restarted node does not
    /// serve as primary before: the cluster may have failed its partitions
    /// over while it was down.
    current: AtomicBool,
}

impl Cluster {
    /// A node's cluster state, with an empty table.
    pub fn new(
        me: MemberInfo,
        provider: Box<dyn MembersProvider>,
        config: ClusterConfig,
        partition_count: u32,
    ) -> Self {
        Cluster {
            me,
            config,
            provider,
            table: RwLock::new(Arc::new(Table::empty(partition_count, config.backup_count))),
            promised: Mutex::new(0),
            views: Mutex::new(HashMap::new()),
            tombstones: Mutex::new(HashMap::new()),
            unsynced: Mutex::new(HashMap::new()),
            parts: (0..partition_count).map(|_| PartState::default()).collect(),
            seq: AtomicU64::new(1),
            leaving: AtomicBool::new(false),
            restored: AtomicBool::new(false),
            installs: InstallSeq::default(),
            install_lock: Mutex::new(()),
            current: AtomicBool::new(true),
        }
    }

    /// This member.
    pub fn me(&self) -> &MemberInfo {
        &self.me
    }

    /// Settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Replication state of partition `p` (`p` < the partition count).
    pub fn part(&self, p: u32) -> &PartState {
        &self.parts[p as usize]
    }

    /// The next heartbeat / report sequence number of this node.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Marks this node as leaving gracefully.
    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    /// The table-install seqlock.
    pub fn installs(&self) -> &InstallSeq {
        &self.installs
    }

    /// Serializes table installs while the guard lives.
    pub fn install_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.install_lock.lock()
    }

    /// Whether this node's table is known to be current.
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::SeqCst)
    }

    /// Sets whether this node's table is known to be current.
    pub fn set_current(&self, current: bool) {
        self.current.store(current, Ordering::SeqCst);
    }

    /// Records that the table came from this node's WAL.
    pub fn mark_restored(&self) {
        self.restored.store(true, Ordering::SeqCst);
    }

    /// Whether the table came from the WAL (cleared by this call).
    pub fn take_restored(&self) -> bool {
        self.restored.swap(false, Ordering::SeqCst)
    }

    /// Votes for a proposed epoch: granted if it is above every epoch
    /// promised or installed here; otherwise the highest of those.
    pub fn vote(&self, epoch: u64) -> Result<u64, u64> {
        let mut promised = self.promised.lock();
        let current = self.table().epoch;
        if epoch > *promised && epoch > current {
            *promised = epoch;
            Ok(epoch)
        } else {
            Err((*promised).max(current))
        }
    }

    /// Reserves the epoch of this coordinator's next proposal: above every
    /// epoch promised, installed or `seen`.
    pub fn reserve_epoch(&self, seen: u64) -> u64 {
        let mut promised = self.promised.lock();
        let next = (*promised).max(self.table().epoch).max(seen) + 1;
        *promised = next;
        next
    }

    /// Raises the promised epoch to at least `epoch`.
    pub fn raise_promise(&self, epoch: u64) {
        let mut promised = self.promised.lock();
        *promised = (*promised).max(epoch);
    }

    /// The installed table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().clone()
    }

    pub(crate) fn set_table(&self, t: Arc<Table>) {
        *self.table.write() = t;
    }

    /// Configured members (expected cluster); never empty.
    pub fn members(&self) -> Vec<MemberSpec> {
        let list = self.provider.members();
        if list.is_empty() {
            vec![MemberSpec {
                name: self.me.name.clone(),
                grpc: self.me.grpc.clone(),
                peer: self.me.peer.clone(),
            }]
        } else {
            list
        }
    }

    /// Whether `name` is alive (this node, or heard from within the timeout).
    pub fn alive(&self, name: &str) -> bool {
        name == self.me.name
            || self
                .views
                .lock()
                .get(name)
                .is_some_and(|v| v.last_seen.elapsed() < self.config.failure_timeout)
    }

    /// Last heartbeat of `name` if alive.
    pub fn view(&self, name: &str) -> Option<Heartbeat> {
        self.views
            .lock()
            .get(name)
            .filter(|v| v.last_seen.elapsed() < self.config.failure_timeout)
            .map(|v| v.hb.clone())
    }

    /// (alive configured members, expected size).
    pub fn liveness(&self) -> (Vec<MemberSpec>, usize) {
        let members = self.members();
        let expected = members.len();
        let alive = members
            .into_iter()
            .filter(|m| self.alive(&m.name))
            .collect();
        (alive, expected)
    }

    /// Sees a majority of the expected members.
    pub fn quorum(&self) -> bool {
        let (alive, expected) = self.liveness();
        alive.len() > expected / 2
    }

    /// Records a heartbeat from a peer; clears out-of-sync reports it supersedes.
    pub fn record(&self, hb: Heartbeat) {
        if hb.name == self.me.name {
            return;
        }
        {
            let mut tombs = self.tombstones.lock();
            if let Some((inc, seq, when)) = tombs.get(&hb.name) {
                let old_process =
                    hb.incarnation < *inc || (hb.incarnation == *inc && hb.seq > *seq);
                if old_process && when.elapsed() < self.config.failure_timeout {
                    return;
                }
                tombs.remove(&hb.name);
            }
        }
        {
            let mut unsynced = self.unsynced.lock();
            unsynced.retain(|(p, b), (primary, inc, seq)| {
                *primary != hb.name
                    || (*inc == hb.incarnation
                        && (*seq >= hb.seq || hb.unsynced.contains(&(*p, b.clone()))))
            });
        }
        self.views.lock().insert(
            hb.name.clone(),
            View {
                last_seen: Instant::now(),
                hb,
            },
        );
    }

    /// Takes the provider's reports of members whose process is gone: their
    /// current incarnation stops counting as alive now. Returns how many.
    pub fn apply_gone(&self) -> usize {
        let gone = self.provider.take_gone();
        for name in &gone {
            if name == &self.me.name {
                continue;
            }
            if let Some(v) = self.views.lock().remove(name) {
                tracing::info!(member = %name, incarnation = v.hb.incarnation, "member gone (reported by the membership provider)");
                self.tombstones
                    .lock()
                    .insert(name.clone(), (v.hb.incarnation, v.hb.seq, Instant::now()));
            }
        }
        gone.len()
    }

    /// Records that `primary` marked these backups out of sync at `seq`.
    pub fn record_unsynced(
        &self,
        primary: &str,
        incarnation: u64,
        seq: u64,
        pairs: &[(u32, String)],
    ) {
        let mut u = self.unsynced.lock();
        for (p, b) in pairs {
            u.insert((*p, b.clone()), (primary.to_string(), incarnation, seq));
            let st = &self.parts[*p as usize];
            if *b == self.me.name && seq >= st.snap_seq.load(Ordering::SeqCst) {
                st.loaded.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Whether `m` holds every acknowledged write of `p` under `table`, as far
    /// as this node can tell.
    pub fn in_sync(&self, table: &Table, p: u32, m: &str) -> bool {
        self.sync_problem(table, p, m).is_none()
    }

    /// Why `m` is not known to be in sync for `p` (None: it is).
    pub fn sync_problem(&self, table: &Table, p: u32, m: &str) -> Option<&'static str> {
        if !self.alive(m) {
            return Some("not alive");
        }
        // A member the table does not list for `p` holds no copy the
        // primary replicates to, whatever its reports say.
        if table.role(m, p) == table::Role::None {
            return Some("not a replica");
        }
        let primary = table.primary(p);
        // A report counts while its reporter is still the partition's
        // primary; after that the current primary's own reports decide.
        if let Some((reporter, inc, _)) = self.unsynced.lock().get(&(p, m.to_string()))
            && Some(reporter.as_str()) == primary
            && table
                .member(reporter)
                .is_some_and(|r| r.incarnation == *inc)
        {
            return Some("reported out of sync");
        }
        if m == self.me.name {
            // Holding the data is not enough: a primary elsewhere may have
            // acknowledged writes without this copy (its report decides).
            if !self.parts[p as usize].loaded.load(Ordering::SeqCst) {
                return Some("not loaded here");
            }
        } else {
            let Some(hb) = self.view(m) else {
                return Some("no heartbeat");
            };
            if hb.epoch != table.epoch {
                return Some("other epoch");
            }
            if hb.unloaded.contains(&p) {
                return Some("reports itself not loaded");
            }
        }
        if primary == Some(m) {
            return None;
        }
        // The primary's own report has the last word. It vouches for `m` only
        // if made while `m` already held its place without a break under
        // this primary (the table's `since`): later tables kept both in
        // place, the primary keeps such a backup in its synced set, and it
        // reports a backup out of sync before acknowledging any write
        // without it. A primary that has not reported since has not
        // vouched (a dead primary's last report still counts).
        match primary {
            Some(pr) if pr == self.me.name => (!self.parts[p as usize].synced.lock().contains(m))
                .then_some("not in my synced set"),
            Some(pr) => match self.view(pr) {
                Some(phb)
                    if phb.epoch < table.since_of(p, m)
                        || phb.epoch > table.epoch
                        || table.member(pr).map(|i| i.incarnation) != Some(phb.incarnation) =>
                {
                    Some("primary has not reported since this replica's place began")
                }
                Some(phb) if phb.unsynced.contains(&(p, m.to_string())) => {
                    Some("primary reports it unsynced")
                }
                _ => None,
            },
            None => None,
        }
    }

    /// Whether `m` holds a loaded copy of `p` (by its own report, made while
    /// it held its place in `table`), vouched for or not.
    pub fn holds_copy(&self, table: &Table, p: u32, m: &str) -> bool {
        if m == self.me.name {
            return self.parts[p as usize].loaded.load(Ordering::SeqCst);
        }
        self.view(m).is_some_and(|h| {
            h.epoch >= table.since_of(p, m) && h.epoch <= table.epoch && !h.unloaded.contains(&p)
        })
    }

    /// This node's heartbeat.
    pub fn heartbeat(&self, quorum: bool) -> Heartbeat {
        let table = self.table();
        let mut unsynced = Vec::new();
        let mut unloaded = Vec::new();
        for p in 0..table.partition_count {
            match table.role_of(&self.me, p) {
                table::Role::None => {}
                role => {
                    let st = &self.parts[p as usize];
                    if !st.loaded.load(Ordering::SeqCst) {
                        unloaded.push(p);
                    }
                    if role == table::Role::Primary {
                        let synced = st.synced.lock();
                        for b in table.backups(p) {
                            if !synced.contains(b) {
                                unsynced.push((p, b.clone()));
                            }
                        }
                    }
                }
            }
        }
        Heartbeat {
            name: self.me.name.clone(),
            incarnation: self.me.incarnation,
            epoch: table.epoch,
            leaving: self.leaving.load(Ordering::SeqCst),
            quorum,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            unsynced,
            unloaded,
        }
    }

    /// Incarnation of `name` as last heard (this node's own for itself).
    pub fn incarnation(&self, name: &str) -> Option<u64> {
        if name == self.me.name {
            return Some(self.me.incarnation);
        }
        self.view(name).map(|h| h.incarnation)
    }

    /// Leaving flag of `name`.
    pub fn is_leaving(&self, name: &str) -> bool {
        if name == self.me.name {
            return self.leaving.load(Ordering::SeqCst);
        }
        self.view(name).is_some_and(|h| h.leaving)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::MemberSpec;
    use crate::cluster::table::Table;

    /// A provider reporting `gone` once.
    #[derive(Debug)]
    struct Gone(Mutex<Vec<String>>);

    impl MembersProvider for Gone {
        fn members(&self) -> Vec<MemberSpec> {
            ["a", "b", "c"]
                .iter()
                .map(|n| MemberSpec {
                    name: n.to_string(),
                    grpc: format!("{n}:1"),
                    peer: format!("{n}:2"),
                })
                .collect()
        }
        fn take_gone(&self) -> Vec<String> {
            std::mem::take(&mut self.0.lock())
        }
    }

    fn cluster(gone: &[&str]) -> Cluster {
        let config = ClusterConfig {
            backup_count: 1,
            heartbeat_interval: Duration::from_millis(100),
            failure_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(1),
            replication_timeout: Duration::from_secs(1),
            anti_entropy_interval: Duration::from_secs(60),
            leave_timeout: Duration::from_secs(1),
        };
        let me = MemberInfo {
            name: "a".into(),
            grpc: "a:1".into(),
            peer: "a:2".into(),
            incarnation: 1,
        };
        let provider = Gone(Mutex::new(gone.iter().map(|s| s.to_string()).collect()));
        Cluster::new(me, Box::new(provider), config, 4)
    }

    fn hb(name: &str, incarnation: u64, seq: u64, epoch: u64) -> Heartbeat {
        Heartbeat {
            name: name.into(),
            incarnation,
            epoch,
            leaving: false,
            quorum: true,
            seq,
            unsynced: Vec::new(),
            unloaded: Vec::new(),
        }
    }

    #[test]
    fn a_gone_process_is_dead_at_once_and_its_restart_is_heard() {
        let c = cluster(&["b"]);
        c.record(hb("b", 5, 10, 1));
        assert!(c.alive("b"));
        assert_eq!(c.apply_gone(), 1);
        assert!(
            !c.alive("b"),
            "dead without waiting for the heartbeat timeout"
        );
        c.record(hb("b", 5, 11, 1));
        assert!(!c.alive("b"), "the old process's late heartbeat is ignored");
        c.record(hb("b", 4, 1, 1));
        assert!(!c.alive("b"), "an older incarnation is ignored");
        c.record(hb("b", 5, 1, 1));
        assert!(
            c.alive("b"),
            "a restart with its WAL (same incarnation, seq from 1) is heard"
        );
        c.record(hb("b", 5, 12, 1));
        assert!(
            c.alive("b"),
            "the tombstone is gone once the restart was heard"
        );
        assert_eq!(c.apply_gone(), 0);
    }

    #[test]
    fn a_backup_copy_here_needs_the_primarys_word() {
        let c = cluster(&[]);
        let mut t = Table::empty(4, 1);
        t.epoch = 7;
        for (name, inc) in [("a", 1), ("b", 5)] {
            t.members.push(MemberInfo {
                name: name.into(),
                grpc: format!("{name}:1"),
                peer: format!("{name}:2"),
                incarnation: inc,
            });
        }
        t.owners[0] = vec!["b".into(), "a".into()];
        c.parts[0].loaded.store(true, Ordering::SeqCst);
        c.record(hb("b", 5, 1, 6));
        assert_eq!(
            c.sync_problem(&t, 0, "a"),
            Some("primary has not reported since this replica's place began"),
            "no `since`: only a report at this epoch counts"
        );
        // Both held their places since epoch 5: the primary's report at 6
        // (it may have died since) still vouches.
        t.since = vec![vec![5, 5], vec![], vec![], vec![]];
        assert_eq!(c.sync_problem(&t, 0, "a"), None);
        // A place that began at 7 needs a report made at 7.
        t.since[0] = vec![5, 7];
        assert_eq!(
            c.sync_problem(&t, 0, "a"),
            Some("primary has not reported since this replica's place began")
        );
        // A member the table does not list for a partition is never in sync.
        t.owners[1] = vec!["a".into()];
        assert_eq!(c.sync_problem(&t, 1, "b"), Some("not a replica"));
        let mut report = hb("b", 5, 2, 7);
        report.unsynced = vec![(0, "a".into())];
        c.record(report);
        assert_eq!(
            c.sync_problem(&t, 0, "a"),
            Some("primary reports it unsynced"),
            "loaded here is not enough"
        );
        c.record(hb("b", 5, 3, 7));
        assert_eq!(c.sync_problem(&t, 0, "a"), None);
        c.parts[0].loaded.store(false, Ordering::SeqCst);
        assert_eq!(c.sync_problem(&t, 0, "a"), Some("not loaded here"));
    }
}
