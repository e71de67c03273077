//! The cluster layer: membership and liveness, the epoch-fenced partition
//! table, the placement step and the rebalancer, and the committed metadata
//! as last applied here. The node (`crate::Node`) drives them: heartbeats,
//! the metadata Raft group, installs, replication and migration.

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

use crate::meta::state::MetaState;
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
    /// As primary: backups written to besides the committed in-sync set
    /// (an `Expand` for them was proposed and is not known applied here):
    /// the committed set may already hold them. Cleared on table installs.
    pub expanding: Mutex<Vec<String>>,
    /// As backup: the snapshot being received in chunks (sender, epoch,
    /// next chunk index).
    pub receiving: Mutex<Option<(String, u64, u32)>>,
    /// As primary: this tenure's replication stream and the sequence
    /// number of its last write ((0, 0): none yet; a stream is taken at the
    /// first write). Changed only under `repl`.
    pub stream: Mutex<(u64, u64)>,
    /// As primary: when the last write was stamped (a write queued since
    /// less than the replication deadline may still be on its way to a
    /// backup, which then does not follow the stream yet). Changed only
    /// under `repl`.
    pub stamped_at: Mutex<Option<std::time::Instant>>,
    /// As primary: the stream position `(stream, seq)` this copy
    /// followed when it became primary (None: it followed none, e.g. a
    /// snapshot was cut off or it restarted). The tenure's stream id is
    /// derived from it ([`tenure_stream`]), so a replica at exactly that
    /// position (the demoted primary, a co-backup) can take the new stream
    /// from its first write without a snapshot. Changed only under `repl`
    /// or by an install.
    pub base: Mutex<Option<(u64, u64)>>,
    /// As backup: the stream this copy follows.
    pub follows: Mutex<Follows>,
}

/// The stream id of `primary`'s tenure that starts from stream position
/// `(stream, seq)` at table `epoch`: a copy at exactly that position holds
/// the same writes as the new primary's copy had, and may follow it from
/// its first write. Never 0. A primary has one tenure per epoch at most (a
/// tenure ends with an install), so ids do not repeat. The top bit is
/// clear, while [`Cluster::new_stream`] ids have it set: a restarted
/// primary's new stream is always newer than any derived one.
pub fn tenure_stream(primary: &str, (stream, seq): (u64, u64), epoch: u64) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(b"distcache-tenure\0");
    h.update(primary.as_bytes());
    h.update(&[0]);
    h.update(&stream.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(&epoch.to_le_bytes());
    (h.digest() & !NEW_STREAM_BIT).max(1)
}

/// Set in every id [`Cluster::new_stream`] hands out (see [`tenure_stream`]).
const NEW_STREAM_BIT: u64 = 1 << 63;

/// Which primary stream a backup copy follows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Follows {
    /// None: the copy takes no replicated write until a snapshot.
    #[default]
    Nothing,
    /// A brand-new partition (empty on every replica): the first stream
    /// that starts at seq 1 is followed.
    Fresh,
    /// A demoted primary's copy, at stream `stream` up to `seq` (its own
    /// stream, or the one it was promoted from if it wrote nothing): it
    /// takes only the first write of a tenure that starts from exactly this
    /// position ([`tenure_stream`]).
    Demoted {
        /// The stream.
        stream: u64,
        /// Its last write this copy holds.
        seq: u64,
    },
    /// `from`'s stream `stream`, applied up to `seq`.
    Stream {
        /// The primary.
        from: String,
        /// Its stream.
        stream: u64,
        /// Last applied.
        seq: u64,
    },
}

/// The first replication stream id of this process: its start time in
/// microseconds, so a restarted process does not reuse its old streams.
fn stream_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| (d.as_micros() as u64).max(1))
}

/// The cluster state of one node.
#[derive(Debug)]
pub struct Cluster {
    me: MemberInfo,
    config: ClusterConfig,
    provider: Box<dyn MembersProvider>,
    /// The member list while the provider lists none: this node alone.
    alone: Arc<Vec<MemberSpec>>,
    table: RwLock<Arc<Table>>,
    /// This node's wall clock is off from the majority's by more than
    /// the allowed offset (see `Node::check_clock`).
    skewed: AtomicBool,
    views: Mutex<HashMap<String, View>>,
    /// Member -> (incarnation, heartbeat seq, when) of a process known to be
    /// gone: for a failure timeout, heartbeats of that incarnation or older
    /// ones are ignored (a restart from its WAL keeps the incarnation: it is
    /// heard once the timeout passed, after its partitions failed over).
    tombstones: Mutex<HashMap<String, (u64, u64, Instant)>>,
    /// The committed metadata (table and in-sync sets) last applied here,
    /// with its log index.
    meta: RwLock<(u64, Arc<MetaState>)>,
    /// Member -> when the last heartbeat it answered was sent.
    answered: Mutex<HashMap<String, Instant>>,
    /// The members found alive at the last [`Cluster::liveness_changes`].
    up: Mutex<HashSet<String>>,
    /// Per-partition replication state.
    parts: Box<[PartState]>,
    /// Heartbeat sequence number.
    seq: AtomicU64,
    /// The next replication stream id (see [`PartState::stream`]).
    streams: AtomicU64,
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
        let alone = Arc::new(vec![MemberSpec {
            name: me.name.clone(),
            grpc: me.grpc.clone(),
            peer: me.peer.clone(),
        }]);
        Cluster {
            me,
            config,
            provider,
            alone,
            table: RwLock::new(Arc::new(Table::empty(partition_count, config.backup_count))),
            skewed: AtomicBool::new(false),
            views: Mutex::new(HashMap::new()),
            tombstones: Mutex::new(HashMap::new()),
            meta: RwLock::new((0, Arc::new(MetaState::default()))),
            answered: Mutex::new(HashMap::new()),
            up: Mutex::new(HashSet::new()),
            parts: (0..partition_count).map(|_| PartState::default()).collect(),
            seq: AtomicU64::new(1),
            streams: AtomicU64::new(stream_base()),
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

    /// A replication stream id never used before by this process, nor
    /// (practically) by an earlier one: the base is the start time.
    pub fn new_stream(&self) -> u64 {
        self.streams.fetch_add(1, Ordering::Relaxed) | NEW_STREAM_BIT
    }

    /// Partition `p`'s stream for this node's tenure as its primary, taken
    /// at the tenure's first write or snapshot (at table `epoch`): derived
    /// from the position it was promoted at (see [`PartState::base`]), else
    /// a new id. Call under the partition's `repl` lock.
    pub fn tenure_stream_of(&self, p: u32, epoch: u64) -> u64 {
        match &*self.part(p).base.lock() {
            Some(at) => tenure_stream(&self.me.name, *at, epoch),
            None => self.new_stream(),
        }
    }

    /// The next heartbeat / report sequence number of this node.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Whether this node's clock is reported off from the majority's.
    pub fn is_skewed(&self) -> bool {
        self.skewed.load(Ordering::SeqCst)
    }

    /// Sets whether this node's clock is off from the majority's.
    pub fn set_skewed(&self, skewed: bool) {
        self.skewed.store(skewed, Ordering::SeqCst);
    }

    /// Whether member `name` reports its clock off (this node: its own view).
    pub fn member_skewed(&self, name: &str) -> bool {
        if name == self.me.name {
            return self.is_skewed();
        }
        self.view(name).is_some_and(|h| h.skewed)
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

    /// The installed table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().clone()
    }

    pub(crate) fn set_table(&self, t: Arc<Table>) {
        *self.table.write() = t;
    }

    /// Configured members (expected cluster); never empty.
    pub fn members(&self) -> Arc<Vec<MemberSpec>> {
        let list = self.provider.members();
        if list.is_empty() {
            self.alone.clone()
        } else {
            list
        }
    }

    /// Whether `name` is alive (this node, or heard from within the timeout).
    pub fn alive(&self, name: &str) -> bool {
        self.alive_in(&self.views.lock(), name, Instant::now())
    }

    /// [`Cluster::alive`] at `now` over `views` (one lock and one clock
    /// read for a whole member list).
    fn alive_in(&self, views: &HashMap<String, View>, name: &str, now: Instant) -> bool {
        name == self.me.name
            || views.get(name).is_some_and(|v| {
                now.saturating_duration_since(v.last_seen) < self.config.failure_timeout
            })
    }

    /// Whether `name` has missed several heartbeats in a row (not yet failed):
    /// requests to it are not waited for.
    pub fn suspect(&self, name: &str) -> bool {
        name != self.me.name
            && self
                .views
                .lock()
                .get(name)
                .is_none_or(|v| v.last_seen.elapsed() > self.config.heartbeat_interval * 4)
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
            .iter()
            .filter(|m| self.alive(&m.name))
            .cloned()
            .collect();
        (alive, expected)
    }

    /// The other members whose liveness changed since the last call:
    /// (now alive, no longer alive), for the heartbeat round's log lines.
    /// Holds one name per configured member at most.
    pub fn liveness_changes(&self) -> (Vec<String>, Vec<String>) {
        let members = self.members();
        let mut up = self.up.lock();
        let (mut came, mut went) = (Vec::new(), Vec::new());
        for m in members.iter().filter(|m| m.name != self.me.name) {
            match (self.alive(&m.name), up.contains(&m.name)) {
                (true, false) => {
                    up.insert(m.name.clone());
                    came.push(m.name.clone());
                }
                (false, true) => {
                    up.remove(&m.name);
                    went.push(m.name.clone());
                }
                _ => {}
            }
        }
        up.retain(|n| members.iter().any(|m| &m.name == n));
        (came, went)
    }

    /// Sees a majority of the expected members.
    pub fn quorum(&self) -> bool {
        self.quorum_at(Instant::now())
    }

    /// [`Cluster::quorum`] as of `now` (a caller that makes several
    /// checks reads the clock once).
    pub fn quorum_at(&self, now: Instant) -> bool {
        let members = self.members();
        let views = self.views.lock();
        let alive = members
            .iter()
            .filter(|m| self.alive_in(&views, &m.name, now))
            .count();
        alive > members.len() / 2
    }

    /// Records a heartbeat from a peer; clears out-of-sync reports it supersedes.
    pub fn record(&self, hb: Heartbeat) {
        if hb.name == self.me.name {
            return;
        }
        {
            let mut tombs = self.tombstones.lock();
            if let Some((inc, _, when)) = tombs.get(&hb.name) {
                // The reported process and anything restarted from its disk
                // (same incarnation, WAL) stay unheard for a failure timeout:
                // its partitions fail over, and it comes back as a replica to
                // re-sync, never as an in-sync one by name.
                let old_process = hb.incarnation <= *inc;
                if old_process && when.elapsed() < self.config.failure_timeout {
                    return;
                }
                tombs.remove(&hb.name);
            }
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

    /// The committed metadata last applied here.
    pub fn meta(&self) -> Arc<MetaState> {
        self.meta.read().1.clone()
    }

    /// Replaces the committed metadata with the one applied at log `index`
    /// (never with an older one).
    pub(crate) fn set_meta(&self, index: u64, m: Arc<MetaState>) {
        let mut cur = self.meta.write();
        if index >= cur.0 {
            *cur = (index, m);
        }
    }

    /// A primary's lease: how long a majority's answers and the metadata
    /// leader's contact keep it serving writes (half the failure timeout,
    /// so it lapses before the rest of the cluster fails the primary over).
    pub fn lease(&self) -> Duration {
        self.config.failure_timeout / 2
    }

    /// Records that `name` answered the heartbeat sent at `sent`.
    pub fn record_answer(&self, name: &str, sent: Instant) {
        let mut a = self.answered.lock();
        let e = a.entry(name.to_string()).or_insert(sent);
        if *e < sent {
            *e = sent;
        }
    }

    /// Whether a majority of the members (this node included) answered a
    /// heartbeat sent within `window` before `now`.
    pub fn majority_answered_within(&self, window: Duration, now: Instant) -> bool {
        let members = self.members();
        let answered = self.answered.lock();
        let n = members
            .iter()
            .filter(|m| {
                m.name == self.me.name
                    || answered
                        .get(&m.name)
                        .is_some_and(|t| now.saturating_duration_since(*t) < window)
            })
            .count();
        n > members.len() / 2
    }

    /// Whether `m` is in the committed in-sync set of `p` under `table`.
    pub fn in_sync(&self, table: &Table, p: u32, m: &str) -> bool {
        self.sync_problem(table, p, m).is_none()
    }

    /// Why `m` is not in sync for `p` (None: it is).
    pub fn sync_problem(&self, table: &Table, p: u32, m: &str) -> Option<&'static str> {
        let meta = self.meta();
        if meta.epoch() != table.epoch {
            return Some("table not yet committed here");
        }
        if !meta.in_sync(p, m) {
            return Some("not in the committed in-sync set");
        }
        if !self.alive(m) {
            return Some("not alive");
        }
        None
    }

    /// This node's heartbeat.
    pub fn heartbeat(&self, quorum: bool) -> Heartbeat {
        let table = self.table();
        let mut unloaded = Vec::new();
        for p in 0..table.partition_count {
            match table.role_of(&self.me, p) {
                table::Role::None => {}
                _ => {
                    if !self.parts[p as usize].loaded.load(Ordering::SeqCst) {
                        unloaded.push(p);
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
            unloaded,
            wall_ms: crate::clock::system_wall_ms(),
            skewed: self.skewed.load(Ordering::SeqCst),
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

    /// A provider reporting `gone` once.
    #[derive(Debug)]
    struct Gone(Mutex<Vec<String>>);

    impl MembersProvider for Gone {
        fn members(&self) -> Arc<Vec<MemberSpec>> {
            Arc::new(
                ["a", "b", "c"]
                    .iter()
                    .map(|n| MemberSpec {
                        name: n.to_string(),
                        grpc: format!("{n}:1"),
                        peer: format!("{n}:2"),
                    })
                    .collect(),
            )
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
            unloaded: Vec::new(),
            wall_ms: 0,
            skewed: false,
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
            !c.alive("b"),
            "a restart from its WAL (same incarnation) is not heard within the timeout"
        );
        c.record(hb("b", 6, 1, 1));
        assert!(c.alive("b"), "a new incarnation is heard at once");
        c.record(hb("b", 6, 2, 1));
        assert!(
            c.alive("b"),
            "the tombstone is gone once the new process was heard"
        );
        assert_eq!(c.apply_gone(), 0);
    }

    #[test]
    fn liveness_changes_are_reported_once_each() {
        let c = cluster(&["b"]);
        assert_eq!(c.liveness_changes(), (vec![], vec![]), "nobody heard yet");
        c.record(hb("b", 5, 10, 1));
        c.record(hb("c", 2, 10, 1));
        assert_eq!(c.liveness_changes(), (vec!["b".into(), "c".into()], vec![]));
        assert_eq!(
            c.liveness_changes(),
            (vec![], vec![]),
            "no change, no report"
        );
        assert_eq!(c.apply_gone(), 1);
        assert_eq!(c.liveness_changes(), (vec![], vec!["b".into()]));
        assert_eq!(c.liveness_changes(), (vec![], vec![]));
        c.record(hb("b", 6, 1, 1));
        assert_eq!(c.liveness_changes(), (vec!["b".into()], vec![]));
    }
}
