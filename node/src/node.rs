//! A running node: construction, lifecycle and wiring. The node's work
//! lives in rooms named after what they own:
//!
//! - `commands`: runs one engine [`Command`](crate::command::Command)
//!   (local or forwarded), `routing`: partition -> here or the primary's
//!   address, and forwarding;
//! - `replication/`: `primary` (the replicated write path), `backup`
//!   (applying a primary's ops and snapshots), `sync` (snapshot transfers,
//!   anti-entropy);
//! - `collections`, `locks`: collection registry and lock commands;
//! - `scan`: collection-wide commands (size, keys, clear) across the cluster;
//! - `heartbeat`, `clock_offset`: liveness, lease answers and clock offsets;
//! - `control`: the metadata Raft group (proposals, the leader's loop,
//!   following committed state, primary leases); `coordinator`: planning
//!   the next table; `install`: installing a committed table;
//! - `peer_handler`: one match over peer requests that delegates;
//! - `observe`: the safety summary and the metrics gauges;
//! - `persistence`: WAL replay, checkpoints, and logging writes.

mod clock_offset;
mod collections;
mod commands;
mod control;
mod coordinator;
mod heartbeat;
mod install;
mod locks;
mod observe;
mod peer_handler;
mod persistence;
mod replication;
mod routing;
mod scan;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::cluster::membership::{FileProvider, MemberSpec, MembersProvider, StaticProvider};
use crate::cluster::table::MemberInfo;
use crate::cluster::{Cluster, ClusterConfig};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::locking::LockTable;
use crate::net::peer::{Admit, Handler, PeerLimits, PeerServer, Peers};
use crate::security::peer_tls::{PeerTls, PeerTlsFiles};
use crate::storage::wal::{self, Durability, Wal};
use crate::storage::{Limits, Store};
use replication::stream::Streams;

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
    pub peers: Arc<Peers>,
    /// Ordered replication streams to backups.
    streams: Streams,
    /// mTLS of the peer port (None: `--peer-insecure`).
    peer_tls: Option<Arc<PeerTls>>,
    /// The metadata Raft group (set by [`Node::start`]).
    meta: crate::meta::RaftCell,
    /// Its storage and state machine.
    meta_store: crate::meta::store::MetaStore,
    /// Peer -> its wall clock minus this node's, ms (last heartbeat answer).
    offsets: parking_lot::Mutex<std::collections::HashMap<String, i64>>,
    /// When this node last accepted the metadata leader's log.
    leader_contact: parking_lot::Mutex<Option<std::time::Instant>>,
    /// The write-ahead log, when `--wal-dir` is set.
    pub wal: Option<Arc<Wal>>,
    /// Prometheus metrics (`--metrics-listen`).
    pub metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// (partition, backup) snapshot transfers running.
    syncing: parking_lot::Mutex<HashSet<(u32, String)>>,
    /// Why a background loop stopped (it panicked): the node is failed.
    failure: Arc<parking_lot::Mutex<Option<String>>>,
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
        (Some(list), None) => Box::new(StaticProvider(Arc::new(MemberSpec::parse_list(list)?))),
        (None, Some(path)) => Box::new(FileProvider::new(path.clone())?),
        (None, None) => Box::new(StaticProvider(Arc::new(Vec::new()))),
    })
}

fn peer_limits(config: &NodeConfig) -> PeerLimits {
    let bytes = |b: u64| usize::try_from(b).unwrap_or(usize::MAX);
    PeerLimits {
        max_frame_bytes: bytes(config.peer_max_frame_bytes),
        frame_timeout: Duration::from_millis(config.peer_frame_timeout_ms),
        idle_timeout: Duration::from_secs(config.peer_idle_timeout_secs.max(1)),
        max_connections: config.peer_max_connections,
        max_connections_per_ip: config.peer_max_connections_per_ip,
        inflight_bytes: bytes(config.peer_inflight_bytes),
        ..PeerLimits::default()
    }
}

/// The peer port's mTLS material, when configured.
fn peer_tls(config: &NodeConfig) -> Result<Option<Arc<PeerTls>>> {
    match (
        &config.peer_tls_cert,
        &config.peer_tls_key,
        &config.peer_tls_ca,
    ) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(PeerTls::load(PeerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        })?)),
        (None, None, None) => Ok(None),
        _ => Err(Error::InvalidArgument(
            "peer TLS needs all of --peer-tls-cert, --peer-tls-key and --peer-tls-ca".into(),
        )),
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
            max_answer_bytes: config.max_message_bytes,
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
        let memory = config.memory_limit();
        tracing::info!(
            max_bytes = memory.max_bytes,
            policy = ?memory.policy,
            "memory limit of entries (--max-memory; 0 = none)"
        );
        let peer_limits = peer_limits(&config);
        let peer_tls = peer_tls(&config)?;
        if peer_tls.is_none() && !listed.is_empty() {
            tracing::warn!(
                "--peer-insecure: the peer port is plaintext and unauthenticated; anyone who reaches it can speak for a member"
            );
        }
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
                let durability = Durability::from_fsync(config.wal_fsync);
                let w = Wal::open_with(
                    dir,
                    durability,
                    config.wal_max_segment_bytes,
                    config.wal_prepare_bytes,
                )?;
                (Some(Arc::new(w)), rec.records)
            }
            None => (None, Vec::new()),
        };
        let meta_store = crate::meta::store::MetaStore::open(
            config.wal_dir.as_deref(),
            crate::meta::state::Shape {
                partition_count: config.partition_count,
                backup_count: config.backup_count,
            },
        )?;
        let peers = Arc::new(Peers::new(
            peer_limits,
            bind_ip,
            peer_tls.clone(),
            shutdown.clone(),
        ));
        let tasks = TaskTracker::new();
        let streams = Streams::new(
            peers.clone(),
            me.name.clone(),
            cluster_config.replication_timeout,
            (config.peer_max_frame_bytes / 4).max(64 * 1024) as usize,
            (
                config.replication_queue_ops,
                config.replication_queue_bytes as usize,
                config.replication_frames_in_flight,
            ),
            tasks.clone(),
            shutdown.clone(),
        );
        let node = Arc::new(Node {
            store: Store::new(config.partition_count, clock.clone(), limits)
                .with_memory_limit(memory),
            locks: LockTable::new(config.partition_count, clock, shutdown.clone()),
            cluster: Cluster::new(me, provider, cluster_config, config.partition_count),
            peers,
            streams,
            peer_tls,
            meta: crate::meta::RaftCell::default(),
            meta_store,
            leader_contact: parking_lot::Mutex::new(None),
            offsets: parking_lot::Mutex::new(std::collections::HashMap::new()),
            config,
            shutdown,
            tasks,
            syncing: parking_lot::Mutex::new(HashSet::new()),
            failure: Arc::new(parking_lot::Mutex::new(None)),
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

    /// Starts the background tasks; `peer_listener` serves the node <-> node
    /// protocol (needed when the node has peers).
    pub async fn start(self: &Arc<Self>, peer_listener: Option<TcpListener>) {
        let weak = Arc::downgrade(self);
        self.peers.set_directory(Box::new(move |addr| {
            let node = weak.upgrade()?;
            node.cluster
                .members()
                .iter()
                .find(|&m| m.peer == addr)
                .cloned()
                .map(|m| m.name)
        }));
        if let Some(listener) = peer_listener {
            let node = self.clone();
            let handler: Handler = Arc::new(move |caller, req| {
                let node = node.clone();
                Box::pin(async move { node.handle_peer(caller, req).await })
            });
            let weak = Arc::downgrade(self);
            let admit: Admit = Arc::new(move |caller| match weak.upgrade() {
                Some(node) => node.admit_peer(caller),
                None => Err("shutting down".into()),
            });
            self.tasks.spawn(crate::net::peer_server::serve(
                listener,
                PeerServer {
                    handler,
                    admit,
                    tls: self.peer_tls.clone(),
                    limits: peer_limits(&self.config),
                },
                self.shutdown.clone(),
                self.tasks.clone(),
            ));
        }
        if let Some(tls) = self.peer_tls.clone() {
            self.every("peer-tls-reload", Duration::from_secs(2), move || {
                tls.reload_if_changed();
                async {}
            });
        }
        if let Err(e) = self.start_meta(self.meta_store.clone()).await {
            tracing::error!(error = %e, "metadata group failed to start");
            *self.failure.lock() = Some(format!("metadata group: {e}"));
        }
        self.tasks.spawn(self.clone().follow_meta());
        if self.cluster.members().len() == 1 {
            // A lone node leads its own metadata group: serve at once.
            self.lead_alone().await;
        }
        let node = self.clone();
        let period = Duration::from_millis(self.config.sweep_interval_ms);
        self.every("expiry-sweep", period, move || {
            let n = node.store.sweep(node.config.sweep_partitions);
            if n > 0 {
                tracing::debug!(removed = n, "expiry sweep");
            }
            async {}
        });
        let hb = self.cluster.config().heartbeat_interval;
        let node = self.clone();
        self.every("heartbeat", hb, move || {
            let node = node.clone();
            async move { node.heartbeat_round().await }
        });
        // Its own loop: a slow or unreachable leader never delays heartbeats.
        let node = self.clone();
        self.every("collections-pull", hb * 10, move || {
            let node = node.clone();
            async move { node.pull_collections().await }
        });
        let node = self.clone();
        self.every("meta-leader", hb, move || {
            let node = node.clone();
            async move { node.lead().await }
        });
        let node = self.clone();
        self.every("backup-sync", Duration::from_millis(100), move || {
            let node = node.clone();
            async move { node.sync_backups().await }
        });
        let node = self.clone();
        self.every(
            "anti-entropy",
            self.cluster.config().anti_entropy_interval,
            move || {
                let node = node.clone();
                async move { node.anti_entropy().await }
            },
        );
        if self.wal.is_some() {
            let node = self.clone();
            let period = Duration::from_secs(self.config.wal_checkpoint_interval_secs.max(1));
            self.every("wal-checkpoint", period, move || {
                let node = node.clone();
                async move {
                    match node.checkpoint().await {
                        Ok(bytes) => tracing::info!(bytes, "WAL checkpoint written"),
                        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                    }
                }
            });
        }
    }

    /// Runs `f` every `period` until shutdown (first run after one period).
    /// A round that panics stops the loop and marks the node failed
    /// ([`Node::failure`], reported by Health) instead of ending silently.
    fn every<F, Fut>(&self, name: &'static str, period: Duration, mut f: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        use futures::FutureExt;
        let shutdown = self.shutdown.clone();
        let failure = self.failure.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        if std::panic::AssertUnwindSafe(f()).catch_unwind().await.is_err() {
                            tracing::error!(task = name, "background task panicked; the node is failed");
                            *failure.lock() = Some(format!("background task {name} panicked"));
                            break;
                        }
                    }
                }
            }
        });
    }

    /// Resolves, with the reason, once this node must stop at once: its
    /// write-ahead log failed for good ([`Wal::poisoned`]). The process then
    /// exits as after a crash (fail-stop, as PostgreSQL does on a failed
    /// fsync): its partitions fail over to their in-sync backups instead of
    /// staying unwritable behind a primary that can acknowledge nothing, and
    /// a restart recovers from the log's complete records.
    pub async fn fatal(&self) -> String {
        let Some(wal) = self.wal.clone() else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if let Some(why) = wal.poisoned() {
                return why;
            }
        }
    }

    /// Why the node is failed (a background task panicked), if it is.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    /// Leaves the cluster gracefully: asks the coordinator to move this
    /// node's partitions away and waits (up to the leave timeout) until no
    /// partition lists it and the rest of the cluster is safe.
    pub async fn leave(&self) {
        let members = self.cluster.members();
        if members.len() <= 1 {
            return;
        }
        self.cluster.set_leaving();
        tracing::info!("leaving: handing partitions off");
        let deadline = tokio::time::Instant::now() + self.cluster.config().leave_timeout;
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
            let (p, b) = t.counts(&self.cluster.me().name);
            if p + b == 0 && !t.is_empty() {
                tracing::info!(epoch = t.epoch, "hand-off complete");
                return;
            }
            tokio::time::sleep(self.cluster.config().heartbeat_interval).await;
        }
        tracing::warn!("leave timed out; stopping with partitions still assigned");
    }

    /// Stops every background task and stream this node owns, and waits for them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        if let Some(raft) = self.raft() {
            let _ = raft.shutdown().await;
        }
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
        &self.cluster.me().name
    }

    /// Client-facing gRPC address.
    pub fn address(&self) -> &str {
        &self.cluster.me().grpc
    }

    /// Current partition table epoch.
    pub fn epoch(&self) -> u64 {
        self.cluster.table().epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    #[tokio::test]
    async fn a_background_loop_that_panics_marks_the_node_failed() {
        let bound: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let node = Node::new(
            NodeConfig::default(),
            bound,
            Arc::new(SystemClock::default()),
        )
        .expect("node");
        assert_eq!(node.failure(), None);
        let rounds = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = rounds.clone();
        node.every("doomed", Duration::from_millis(5), move || {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                assert!(n < 2, "third round panics");
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while node.failure().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let why = node.failure().expect("the node is failed");
        assert!(why.contains("doomed"), "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            rounds.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "the loop stopped after the panic"
        );
        node.shutdown().await;
    }
}
