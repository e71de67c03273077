//! A running node: store, locks, cluster state, and the background tasks it
//! owns (expiry sweep, heartbeats, coordinator, backup sync, anti-entropy,
//! the peer server).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::cluster::membership::{FileProvider, MemberSpec, MembersProvider, StaticProvider};
use crate::cluster::table::{MemberInfo, Role, Table};
use crate::cluster::{Cluster, ClusterConfig, coordinator, rebalancer};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::locking::LockTable;
use crate::net::message::{Request, Response};
use crate::net::peer::{self, Handler, PeerLimits, Peers};
use crate::storage::wal::{self, Wal, WalRecord};
use crate::storage::{Limits, Store};

/// One distcache node. Create with [`Node::new`], start its background
/// tasks with [`Node::start`], stop them with [`Node::shutdown`].
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    /// Entries and collections.
    pub store: Store,
    /// Locks.
    pub locks: LockTable,
    /// Cluster state.
    pub cluster: Cluster,
    /// Outbound peer connections.
    pub peers: Peers,
    /// The write-ahead log, when `--wal-dir` is set.
    pub wal: Option<Arc<Wal>>,
    /// Prometheus metrics (`--metrics-listen`).
    pub metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    pub(crate) syncing: parking_lot::Mutex<HashSet<(u32, String)>>,
    pub(crate) rounds: std::sync::atomic::AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

/// The persisted incarnation of member `name` in `dir` (created on first
/// start): a restart with its log is the same replica, not a new one.
fn identity(dir: &std::path::Path, name: &str) -> Result<u64> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Internal(format!("wal dir {}: {e}", dir.display())))?;
    let path = dir.join("identity");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut parts = text.split_whitespace();
        if let (Some(n), Some(inc)) = (parts.next(), parts.next().and_then(|i| i.parse().ok())) {
            if n == name {
                return Ok(inc);
            }
            return Err(Error::InvalidArgument(format!(
                "WAL dir {} belongs to member {n:?}, not {name:?}",
                dir.display()
            )));
        }
    }
    let inc = now_ms();
    let tmp = dir.join("identity.tmp");
    std::fs::write(&tmp, format!("{name} {inc}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))?;
    Ok(inc)
}

fn provider(config: &NodeConfig) -> Result<Box<dyn MembersProvider>> {
    if config.members_configmap.is_some() {
        return Err(Error::InvalidArgument(
            "--members-configmap needs the async start (KubernetesProvider::start)".into(),
        ));
    }
    Ok(match (&config.members, &config.members_file) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidArgument(
                "give --members or --members-file, not both".into(),
            ));
        }
        (Some(list), None) => Box::new(StaticProvider(MemberSpec::parse_list(list)?)),
        (None, Some(path)) => Box::new(FileProvider::new(path.clone())?),
        (None, None) => Box::new(StaticProvider(Vec::new())),
    })
}

fn peer_limits(config: &NodeConfig) -> PeerLimits {
    PeerLimits {
        max_frame_bytes: usize::try_from(config.peer_max_frame_bytes).unwrap_or(usize::MAX),
        frame_timeout: Duration::from_millis(config.peer_frame_timeout_ms),
        ..PeerLimits::default()
    }
}

impl Node {
    /// A node serving gRPC on `bound` (the actual listen address, after binding).
    pub fn new(config: NodeConfig, bound: SocketAddr, clock: Arc<dyn Clock>) -> Result<Arc<Node>> {
        let provider = provider(&config)?;
        Node::with_provider(config, bound, clock, provider)
    }

    /// A node whose member list comes from `provider`.
    pub fn with_provider(
        config: NodeConfig,
        bound: SocketAddr,
        clock: Arc<dyn Clock>,
        provider: Box<dyn MembersProvider>,
    ) -> Result<Arc<Node>> {
        let listed = provider.members();
        let grpc = config.advertised(bound);
        let name = config.name.clone().unwrap_or_else(|| grpc.clone());
        let peer_addr = match listed.iter().find(|m| m.name == name) {
            Some(m) => m.peer.clone(),
            None if listed.is_empty() => String::new(),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "member name {name:?} is not in the member list (set --name)"
                )));
            }
        };
        let grpc = listed
            .iter()
            .find(|m| m.name == name)
            .map_or(grpc, |m| m.grpc.clone());
        let incarnation = match &config.wal_dir {
            Some(dir) => identity(dir, &name)?,
            None => now_ms(),
        };
        let shutdown = CancellationToken::new();
        let limits = Limits {
            max_key_bytes: config.max_key_bytes,
            max_value_bytes: config.max_value_bytes,
            max_batch_keys: config.max_batch_keys,
        };
        let cluster_config = ClusterConfig {
            backup_count: config.backup_count,
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
            failure_timeout: Duration::from_millis(config.failure_timeout_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            replication_timeout: Duration::from_millis(config.replication_timeout_ms),
            anti_entropy_interval: Duration::from_secs(config.anti_entropy_interval_secs),
            leave_timeout: Duration::from_secs(config.leave_timeout_secs),
        };
        let peer_limits = peer_limits(&config);
        let bind_ip = peer_addr.parse::<SocketAddr>().ok().map(|a| a.ip());
        let me = MemberInfo {
            name,
            grpc,
            peer: peer_addr,
            incarnation,
        };
        let (wal, recovered) = match &config.wal_dir {
            Some(dir) => {
                let started = std::time::Instant::now();
                let rec = wal::recover(dir, config.wal_skip_corrupt)?;
                tracing::info!(
                    records = rec.records.len(),
                    truncated = rec.truncated_bytes,
                    elapsed = ?started.elapsed(),
                    "WAL read"
                );
                let w = Wal::open(dir, config.wal_fsync, config.wal_max_segment_bytes)?;
                (Some(Arc::new(w)), rec.records)
            }
            None => (None, Vec::new()),
        };
        let node = Arc::new(Node {
            store: Store::new(config.partition_count, clock.clone(), limits),
            locks: LockTable::new(config.partition_count, clock, shutdown.clone()),
            cluster: Cluster::new(me, provider, cluster_config, config.partition_count),
            peers: Peers::new(peer_limits, bind_ip, shutdown.clone()),
            config,
            shutdown,
            tasks: TaskTracker::new(),
            syncing: parking_lot::Mutex::new(HashSet::new()),
            rounds: std::sync::atomic::AtomicU64::new(0),
            wal,
            metrics: crate::metrics::Metrics::default(),
        });
        let started = std::time::Instant::now();
        let n = recovered.len();
        node.replay(recovered);
        if node.wal.is_some() {
            tracing::info!(records = n, elapsed = ?started.elapsed(), "WAL replayed");
        }
        Ok(node)
    }

    /// Rebuilds state from recovered log records (in log order).
    fn replay(&self, records: Vec<WalRecord>) {
        if records.is_empty() {
            return;
        }
        let mut table: Option<Table> = None;
        let count = self.store.partition_count();
        for r in records {
            let part = match &r {
                WalRecord::Ops { partition, .. }
                | WalRecord::Install { partition, .. }
                | WalRecord::Drop { partition } => Some(*partition),
                _ => None,
            };
            if part.is_some_and(|p| p >= count) {
                tracing::warn!(partition = ?part, count, "WAL record for a partition this node does not have; skipped");
                continue;
            }
            match r {
                WalRecord::Ops { partition, ops } => {
                    self.store.apply(partition, &ops);
                    for op in &ops {
                        if let crate::storage::ReplOp::Lock { key, state } = op {
                            self.locks.apply_replica(key, *state);
                        }
                    }
                }
                WalRecord::Install {
                    partition,
                    snapshot,
                } => {
                    self.store.install(partition, &snapshot);
                    self.locks.install(partition, &snapshot.locks);
                }
                WalRecord::Drop { partition } => {
                    self.store.drop_partition(partition);
                    self.locks.install(partition, &[]);
                }
                WalRecord::CreateCollection {
                    name,
                    default_ttl_ms,
                    max_entries,
                } => {
                    let _ = self
                        .store
                        .get_or_create_collection(&name, default_ttl_ms, max_entries);
                }
                WalRecord::DeleteCollection { name } => {
                    let _ = self.store.delete_collection(&name);
                }
                WalRecord::Table(bytes) => match rmp_serde::from_slice::<Table>(&bytes) {
                    Ok(t) => table = Some(t),
                    Err(e) => tracing::warn!(error = %e, "WAL: unreadable table record ignored"),
                },
            }
        }
        if let Some(t) = table.filter(|t| t.partition_count == self.store.partition_count()) {
            // Everything this node held at that epoch is in its log: its
            // replicas are loaded. Peers with newer tables override it.
            let mut primaries = 0;
            for p in 0..t.partition_count {
                match t.role_of(&self.cluster.me, p) {
                    Role::Primary => {
                        primaries += 1;
                        self.store.index_partition(p);
                        self.cluster.parts[p as usize]
                            .loaded
                            .store(true, Ordering::SeqCst);
                    }
                    Role::Backup => self.cluster.parts[p as usize]
                        .loaded
                        .store(true, Ordering::SeqCst),
                    Role::None => {}
                }
            }
            self.store.set_primaries(primaries);
            self.locks.set_epoch(t.epoch);
            *self.cluster.promised.lock() = t.epoch;
            self.cluster.restored.store(true, Ordering::SeqCst);
            if self.cluster.members().len() > 1 {
                self.cluster.current.store(false, Ordering::SeqCst);
            }
            tracing::info!(
                epoch = t.epoch,
                primaries,
                "partition table restored from the WAL"
            );
            self.cluster.set_table(Arc::new(t));
        }
    }

    /// Writes a checkpoint of the whole state and drops the log it replaces.
    pub async fn checkpoint(&self) -> Result<u64> {
        let Some(wal) = &self.wal else { return Ok(0) };
        wal.checkpoint(|| {
            let mut recs = Vec::new();
            for m in self.store.list_collections() {
                recs.push(WalRecord::CreateCollection {
                    name: m.name.to_string(),
                    default_ttl_ms: m.default_ttl_ms,
                    max_entries: m.max_entries,
                });
            }
            for p in 0..self.store.partition_count() {
                let mut snapshot = self.store.snapshot(p);
                snapshot.locks = self.locks.snapshot(p);
                if !snapshot.collections.is_empty() || !snapshot.locks.is_empty() {
                    recs.push(WalRecord::Install {
                        partition: p,
                        snapshot,
                    });
                }
            }
            if let Ok(t) = rmp_serde::to_vec(&*self.cluster.table()) {
                recs.push(WalRecord::Table(t.into()));
            }
            recs
        })
        .await
    }

    /// Starts the background tasks; `peer_listener` serves the node <-> node
    /// protocol (needed when the node has peers).
    pub fn start(self: &Arc<Self>, peer_listener: Option<TcpListener>) {
        if self.cluster.members().len() == 1 {
            // A lone node is its own quorum and coordinator: serve at once.
            if let Some(mut t) = self.plan() {
                t.epoch = 1;
                self.install(t);
            }
        }
        let node = self.clone();
        let period = Duration::from_millis(self.config.sweep_interval_ms);
        self.every(period, move || {
            let n = node.store.sweep(node.config.sweep_partitions);
            if n > 0 {
                tracing::debug!(removed = n, "expiry sweep");
            }
            async {}
        });
        let hb = self.cluster.config.heartbeat_interval;
        let node = self.clone();
        self.every(hb, move || {
            let node = node.clone();
            async move { node.heartbeat_round().await }
        });
        let node = self.clone();
        self.every(hb, move || {
            let node = node.clone();
            async move { node.coordinate().await }
        });
        let node = self.clone();
        self.every(Duration::from_millis(100), move || {
            let node = node.clone();
            async move { node.sync_backups().await }
        });
        let node = self.clone();
        self.every(self.cluster.config.anti_entropy_interval, move || {
            let node = node.clone();
            async move { node.anti_entropy().await }
        });
        if self.wal.is_some() {
            let node = self.clone();
            let period = Duration::from_secs(self.config.wal_checkpoint_interval_secs.max(1));
            self.every(period, move || {
                let node = node.clone();
                async move {
                    match node.checkpoint().await {
                        Ok(bytes) => tracing::info!(bytes, "WAL checkpoint written"),
                        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                    }
                }
            });
        }
        if let Some(listener) = peer_listener {
            let node = self.clone();
            let handler: Handler = Arc::new(move |req| {
                let node = node.clone();
                Box::pin(async move { node.handle_peer(req).await })
            });
            self.tasks.spawn(peer::serve(
                listener,
                handler,
                peer_limits(&self.config),
                self.shutdown.clone(),
                self.tasks.clone(),
            ));
        }
    }

    /// Runs `f` every `period` until shutdown (first run after one period).
    fn every<F, Fut>(&self, period: Duration, mut f: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => f().await,
                }
            }
        });
    }

    /// Leaves the cluster gracefully: asks the coordinator to move this
    /// node's partitions away and waits (up to the leave timeout) until no
    /// partition lists it and the rest of the cluster is safe.
    pub async fn leave(&self) {
        let members = self.cluster.members();
        if members.len() <= 1 {
            return;
        }
        self.cluster.leaving.store(true, Ordering::SeqCst);
        tracing::info!("leaving: handing partitions off");
        let deadline = tokio::time::Instant::now() + self.cluster.config.leave_timeout;
        while tokio::time::Instant::now() < deadline {
            self.heartbeat_round().await;
            let (alive, _) = self.cluster.liveness();
            let heirs = alive
                .iter()
                .filter(|m| m.name != self.name() && !self.cluster.is_leaving(&m.name))
                .count();
            if heirs == 0 || !self.cluster.quorum() {
                tracing::warn!(
                    heirs,
                    "leaving without hand-off: no member can take the partitions"
                );
                return;
            }
            let t = self.cluster.table();
            let (p, b) = t.counts(&self.cluster.me.name);
            if p + b == 0 && !t.is_empty() {
                tracing::info!(epoch = t.epoch, "hand-off complete");
                return;
            }
            tokio::time::sleep(self.cluster.config.heartbeat_interval).await;
        }
        tracing::warn!("leave timed out; stopping with partitions still assigned");
    }

    /// Stops every background task and stream this node owns, and waits for them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(wal) = &self.wal {
            wal.close();
        }
    }

    /// Fires when shutdown begins.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Tracker owning per-connection tasks (Batch streams).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Member name.
    pub fn name(&self) -> &str {
        &self.cluster.me.name
    }

    /// Client-facing gRPC address.
    pub fn address(&self) -> &str {
        &self.cluster.me.grpc
    }

    /// Current partition table epoch.
    pub fn epoch(&self) -> u64 {
        self.cluster.table().epoch
    }

    // ------------------------------------------------------------ heartbeats

    async fn heartbeat_round(&self) {
        self.cluster.apply_gone();
        let quorum = self.cluster.quorum();
        let hb = self.cluster.heartbeat(quorum);
        let timeout = self.cluster.config.heartbeat_interval * 2;
        let calls = self
            .cluster
            .members()
            .into_iter()
            .filter(|m| m.name != self.cluster.me.name)
            .map(|m| {
                let hb = hb.clone();
                async move {
                    let r = self
                        .peers
                        .call(&m.peer, Request::Heartbeat(hb), timeout)
                        .await;
                    (m, r)
                }
            });
        let my_epoch = self.epoch();
        if self
            .rounds
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(10)
        {
            self.pull_collections().await;
        }
        let expected = self.cluster.members().len();
        let mut not_newer = 1;
        for (m, r) in futures::future::join_all(calls).await {
            if let Ok(Response::Heartbeat(theirs)) = r {
                let newer = theirs.epoch > my_epoch;
                self.cluster.record(theirs);
                if newer {
                    self.adopt_table_from(&m.peer).await;
                } else {
                    not_newer += 1;
                }
            }
        }
        if !self.cluster.current.load(Ordering::SeqCst) && not_newer > expected / 2 {
            tracing::info!(epoch = my_epoch, "a majority has no newer table: serving");
            self.cluster.current.store(true, Ordering::SeqCst);
        }
    }

    async fn adopt_table_from(&self, peer: &str) {
        let timeout = self.cluster.config.request_timeout;
        if let Ok(Response::Table(Some(t))) =
            self.peers.call(peer, Request::GetTable, timeout).await
        {
            self.install(t);
        }
    }

    // ------------------------------------------------------------ coordinator

    /// The coordinator of this node's view: the oldest live member.
    pub fn coordinator(&self) -> Option<String> {
        let (alive, _) = self.cluster.liveness();
        alive
            .iter()
            .filter_map(|m| {
                self.cluster
                    .incarnation(&m.name)
                    .map(|i| (i, m.name.clone()))
            })
            .min()
            .map(|(_, n)| n)
    }

    /// The owners this coordinator wants next, or None if nothing changes.
    fn plan(&self) -> Option<Table> {
        let c = &self.cluster;
        let table = c.table();
        let (alive, _) = c.liveness();
        let valid = |m: &str| {
            c.alive(m)
                && table
                    .member(m)
                    .is_some_and(|info| c.incarnation(m) == Some(info.incarnation))
        };
        let mut eligible: Vec<String> = alive
            .iter()
            .filter(|m| !c.is_leaving(&m.name) && c.incarnation(&m.name).is_some())
            .map(|m| m.name.clone())
            .collect();
        eligible.sort();
        let current: Vec<Vec<String>> = table
            .owners
            .iter()
            .map(|o| o.iter().filter(|m| valid(m)).cloned().collect())
            .collect();
        let target = rebalancer::assign(
            table.partition_count,
            c.config.backup_count,
            &eligible,
            &current,
        );
        let mut owners = Vec::with_capacity(table.owners.len());
        for (p, o) in table.owners.iter().enumerate() {
            let primary = o.first().map(String::as_str).filter(|m| valid(m));
            let mut backups: Vec<&str> = o
                .iter()
                .skip(1)
                .map(String::as_str)
                .filter(|m| valid(m))
                .collect();
            // A replica holding a loaded copy (not vouched for yet, maybe
            // complete): kept through migrations, and on a failover with no
            // backup known in sync it beats one whose snapshot never came.
            let loaded = |m: &str| c.holds_copy(&table, p as u32, m);
            if primary.is_none() {
                backups.sort_by_key(|m| !loaded(m));
            }
            let fresh = o.is_empty();
            let in_sync = |m: &str| fresh || c.in_sync(&table, p as u32, m);
            let next =
                coordinator::next_owners_keeping(primary, &backups, &target[p], &in_sync, &loaded);
            owners.push(next);
        }
        let names: HashSet<&String> = owners.iter().flatten().collect();
        let members: Vec<MemberInfo> = c
            .members()
            .into_iter()
            .filter(|m| names.contains(&m.name))
            .filter_map(|m| {
                Some(MemberInfo {
                    incarnation: c.incarnation(&m.name)?,
                    name: m.name,
                    grpc: m.grpc,
                    peer: m.peer,
                })
            })
            .collect();
        if owners == table.owners && members == table.members {
            return None;
        }
        Some(Table {
            epoch: 0,
            coordinator: c.me.name.clone(),
            partition_count: table.partition_count,
            backup_count: c.config.backup_count,
            members,
            owners,
            since: Vec::new(),
        })
        .map(|mut t| {
            t.carry_since(&table);
            t
        })
    }

    async fn coordinate(&self) {
        let c = &self.cluster;
        if !c.quorum() || self.coordinator().as_deref() != Some(c.me.name.as_str()) {
            return;
        }
        let Some(mut next) = self.plan() else { return };
        let (alive, expected) = c.liveness();
        let highest_seen = alive
            .iter()
            .filter_map(|m| c.view(&m.name).map(|h| h.epoch))
            .max()
            .unwrap_or(0);
        {
            let mut promised = c.promised.lock();
            next.epoch = (*promised).max(c.table().epoch).max(highest_seen) + 1;
            *promised = next.epoch;
        }
        next.seal_since();
        let timeout = c.config.heartbeat_interval * 4;
        let others: Vec<MemberSpec> = alive.into_iter().filter(|m| m.name != c.me.name).collect();
        let votes = futures::future::join_all(others.iter().map(|m| {
            let t = next.clone();
            async move { self.peers.call(&m.peer, Request::Propose(t), timeout).await }
        }))
        .await;
        let mut granted = 1;
        for v in votes {
            match v {
                Ok(Response::Vote { granted: true, .. }) => granted += 1,
                Ok(Response::Vote { promised, .. }) => {
                    let mut p = c.promised.lock();
                    *p = (*p).max(promised);
                }
                _ => {}
            }
        }
        if granted <= expected / 2 {
            tracing::debug!(epoch = next.epoch, granted, expected, "proposal lost");
            return;
        }
        tracing::info!(
            epoch = next.epoch,
            members = next.members.len(),
            "installing partition table"
        );
        self.install(next.clone());
        let _ = futures::future::join_all(others.iter().map(|m| {
            let t = next.clone();
            async move { self.peers.call(&m.peer, Request::Commit(t), timeout).await }
        }))
        .await;
    }

    /// Installs a committed table newer than the current one.
    pub fn install(&self, new: Table) {
        let c = &self.cluster;
        let _one_at_a_time = c.install_lock.lock();
        let old = c.table();
        if new.epoch <= old.epoch || new.partition_count != old.partition_count {
            return;
        }
        let mut primaries = 0;
        let mut dropped = Vec::new();
        // After a restart the old roles come from the WAL: the cluster may
        // have moved on without this node, so its backup copies are re-synced.
        let restarted = c.restored.swap(false, Ordering::SeqCst);
        // Odd while installing (see Cluster::installs).
        c.installs.fetch_add(1, Ordering::SeqCst);
        for p in 0..new.partition_count {
            let st = &c.parts[p as usize];
            let (was, now) = (old.role_of(&c.me, p), new.role_of(&c.me, p));
            let fresh = old.replicas(p).is_empty();
            if was != now {
                tracing::debug!(partition = p, epoch = new.epoch, ?was, ?now, replicas = ?new.replicas(p), "role change");
            }
            match now {
                Role::Primary => {
                    primaries += 1;
                    // The coordinator promotes the best replica there is: from
                    // now on this node's copy is the partition.
                    st.loaded.store(true, Ordering::SeqCst);
                    if was != Role::Primary {
                        self.store.index_partition(p);
                        st.synced.lock().clear();
                    } else {
                        // Keep in-sync backups that stay backups.
                        let keep: HashSet<&String> = new.backups(p).iter().collect();
                        st.synced.lock().retain(|b| keep.contains(b));
                    }
                }
                Role::Backup => {
                    st.synced.lock().clear();
                    if was == Role::Primary {
                        self.store.unindex_partition(p);
                    }
                    if fresh {
                        st.loaded.store(true, Ordering::SeqCst);
                    } else if was == Role::None || restarted {
                        st.loaded.store(false, Ordering::SeqCst);
                    }
                }
                Role::None => {
                    st.synced.lock().clear();
                    if was != Role::None {
                        st.loaded.store(false, Ordering::SeqCst);
                        self.store.drop_partition(p);
                        dropped.push(p);
                    }
                }
            }
        }
        self.store.set_primaries(primaries);
        self.locks.set_epoch(new.epoch);
        {
            let mut promised = c.promised.lock();
            *promised = (*promised).max(new.epoch);
        }
        tracing::debug!(epoch = new.epoch, primaries, "table installed");
        if let Some(wal) = &self.wal {
            let mut recs: Vec<WalRecord> = dropped
                .iter()
                .map(|p| WalRecord::Drop { partition: *p })
                .collect();
            if let Ok(t) = rmp_serde::to_vec(&new) {
                recs.push(WalRecord::Table(t.into()));
            }
            wal.append_nowait(&recs);
        }
        c.set_table(Arc::new(new));
        c.current.store(true, Ordering::SeqCst);
        // Even again: the install is complete (see Cluster::installs).
        c.installs.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether every partition has its in-sync backups and no migration is
    /// pending; with the counts (partitions without an in-sync backup,
    /// partitions whose owners differ from the balanced target).
    pub fn safety(&self) -> (bool, u32, u32) {
        let (safe, without, migrating, _) = self.safety_detail();
        (safe, without, migrating)
    }

    /// [`Node::safety`] with a few examples of partitions lacking a backup.
    pub fn safety_detail(&self) -> (bool, u32, u32, Vec<String>) {
        let c = &self.cluster;
        let t = c.table();
        if t.is_empty() {
            return (false, t.partition_count, 0, vec!["no table".into()]);
        }
        let mut examples = Vec::new();
        let (alive, _) = c.liveness();
        let eligible = alive.iter().filter(|m| !c.is_leaving(&m.name)).count();
        let want = (c.config.backup_count as usize).min(eligible.saturating_sub(1));
        let mut without = 0;
        for p in 0..t.partition_count {
            let synced = t.backups(p).iter().filter(|b| c.in_sync(&t, p, b)).count();
            let primary_ok = t.primary(p).is_some_and(|m| c.alive(m));
            if synced < want || !primary_ok {
                without += 1;
                if examples.len() < 3 {
                    let why: Vec<String> = t
                        .backups(p)
                        .iter()
                        .map(|b| format!("{b}: {}", c.sync_problem(&t, p, b).unwrap_or("ok")))
                        .collect();
                    examples.push(format!(
                        "p{p} primary {:?} [{}]",
                        t.primary(p),
                        why.join(", ")
                    ));
                }
            }
        }
        // Every node runs the coordinator's planning on its own view.
        let migrating = self.plan().map_or(0, |next| {
            next.owners
                .iter()
                .zip(&t.owners)
                .filter(|(a, b)| a != b)
                .count() as u32
        });
        (
            without == 0 && migrating == 0 && c.quorum(),
            without,
            migrating,
            examples,
        )
    }
}
