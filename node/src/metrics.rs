//! Prometheus metrics of one node, served as text at `/metrics` on
//! `--metrics-listen` (see [`serve`]).
//!
//! Counters and the latency histogram are updated on the request path; the
//! gauges describing the cluster (epoch, roles, safety, quorum, entries) are
//! read from the node when scraped.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::{Error, Result};

/// Labels of the per-command counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// `get`, `put`, `delete`, `get_many`, `put_many`, `delete_many`.
    pub op: &'static str,
    /// `ok` or the error reason (`NOT_OWNER`, `QUORUM_LOST`, ...).
    pub result: &'static str,
}

/// Labels of the per-command latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The command.
    pub op: &'static str,
}

/// Labels of the partition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// `primary` or `backup`.
    pub role: &'static str,
}

/// Labels of the per-collection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectionLabels {
    /// The collection name.
    pub collection: String,
}

type Latency = Family<OpLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric one node exports.
pub struct Metrics {
    registry: Registry,
    commands: Family<CommandLabels, Counter>,
    latency: Latency,
    isr_removals: Counter,
    backup_resyncs: Counter,
    epoch: Gauge,
    members: Gauge,
    members_alive: Gauge,
    quorum: Gauge,
    safe: Gauge,
    without_backup: Gauge,
    migrations: Gauge,
    partitions: Family<RoleLabels, Gauge>,
    entries: Family<CollectionLabels, Gauge>,
    wal_failed: Gauge,
    partitions_lost: Gauge,
    clock_offset: Gauge,
    clock_skewed: Gauge,
    metadata_leader: Gauge,
    memory_used: Gauge,
    memory_limit: Gauge,
    memory_evicted: Gauge,
    batch_streams: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("distcache_node");
        let commands = Family::<CommandLabels, Counter>::default();
        let latency: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "commands",
            "Data commands served (unary and Batch), by command and result",
            commands.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "Time to serve one data command, replication included",
            latency.clone(),
        );
        let isr_removals = Counter::default();
        registry.register(
            "isr_removals",
            "Backups this node, as a primary, removed from partitions' in-sync sets (committed), per partition",
            isr_removals.clone(),
        );
        let backup_resyncs = Counter::default();
        registry.register(
            "backup_resyncs",
            "Snapshots this node, as a primary, sent to bring a backup (back) into a partition's in-sync set",
            backup_resyncs.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let epoch = gauge(
            &mut registry,
            "partition_table_epoch",
            "Epoch of this node's partition table",
        );
        let members = gauge(&mut registry, "members", "Members the cluster expects");
        let members_alive = gauge(
            &mut registry,
            "members_alive",
            "Members this node sees alive (itself included)",
        );
        let quorum = gauge(
            &mut registry,
            "quorum",
            "1 while this node sees a majority of the members (writes accepted)",
        );
        let safe = gauge(
            &mut registry,
            "cluster_safe",
            "1 when every partition has its in-sync backups and nothing migrates",
        );
        let without_backup = gauge(
            &mut registry,
            "partitions_without_backup",
            "Partitions without an in-sync backup",
        );
        let migrations = gauge(
            &mut registry,
            "migrations_running",
            "Partitions whose owners differ from the balanced target",
        );
        let wal_failed = gauge(
            &mut registry,
            "wal_failed",
            "1 when the WAL failed and writes are refused",
        );
        let partitions_lost = gauge(
            &mut registry,
            "partitions_lost",
            "Partitions restarted empty or promoted uncleanly since the cluster began (data loss)",
        );
        let clock_offset = gauge(
            &mut registry,
            "clock_offset_ms",
            "This node's wall-clock offset from the median of its peers, ms",
        );
        let clock_skewed = gauge(
            &mut registry,
            "clock_skewed",
            "1 when the clock offset exceeds --max-clock-offset-ms (the node is made no primary)",
        );
        let metadata_leader = gauge(
            &mut registry,
            "metadata_leader",
            "1 on the metadata (Raft) leader",
        );
        let memory_used = gauge(
            &mut registry,
            "memory_used_bytes",
            "Bytes of entries held (primary and backup copies; key + value + 96 per entry)",
        );
        let memory_limit = gauge(
            &mut registry,
            "memory_limit_bytes",
            "--max-memory (0 = none)",
        );
        let batch_streams = gauge(
            &mut registry,
            "batch_streams",
            "Batch streams open on this node (clients open as many per node as it advises: its worker threads)",
        );
        let memory_evicted = gauge(
            &mut registry,
            "memory_evicted_entries",
            "Entries evicted for --max-memory (policy evict-lru) since start",
        );
        let partitions = Family::<RoleLabels, Gauge>::default();
        registry.register(
            "partitions",
            "Partitions this node owns, by role",
            partitions.clone(),
        );
        let entries = Family::<CollectionLabels, Gauge>::default();
        registry.register(
            "entries",
            "Entries held on this node (primary and backup copies, expired ones not swept yet included), by collection",
            entries.clone(),
        );
        Metrics {
            registry,
            commands,
            latency,
            epoch,
            members,
            members_alive,
            quorum,
            safe,
            without_backup,
            migrations,
            partitions,
            entries,
            wal_failed,
            partitions_lost,
            clock_offset,
            clock_skewed,
            metadata_leader,
            memory_used,
            memory_limit,
            memory_evicted,
            batch_streams,
            isr_removals,
            backup_resyncs,
        }
    }
}

impl Metrics {
    /// Counts `n` (partition, backup) removals from in-sync sets.
    pub fn isr_removed(&self, n: u64) {
        self.isr_removals.inc_by(n);
    }

    /// Counts one backup brought into an in-sync set by a snapshot.
    pub fn backup_resynced(&self) {
        self.backup_resyncs.inc();
    }

    /// Counts one open Batch stream until the guard is dropped.
    pub fn batch_stream(&self) -> OpenStream {
        self.batch_streams.inc();
        OpenStream(self.batch_streams.clone())
    }

    /// Counts one served command (`error`: how it failed, if it did).
    pub fn command(&self, op: &'static str, error: Option<&Error>, took: Duration) {
        let result = error.map_or("ok", |e| e.reason().as_str_name());
        self.commands
            .get_or_create(&CommandLabels { op, result })
            .inc();
        self.latency
            .get_or_create(&OpLabels { op })
            .observe(took.as_secs_f64());
    }

    /// Sets the gauges from `g` and encodes every metric in the Prometheus
    /// text format.
    pub fn render(&self, g: &Gauges) -> String {
        self.epoch.set(i64::try_from(g.epoch).unwrap_or(i64::MAX));
        self.members.set(g.members as i64);
        self.members_alive.set(g.members_alive as i64);
        self.quorum.set(i64::from(g.quorum));
        self.safe.set(i64::from(g.safe));
        self.without_backup.set(i64::from(g.without_backup));
        self.migrations.set(i64::from(g.migrations));
        self.partitions
            .get_or_create(&RoleLabels { role: "primary" })
            .set(i64::from(g.primaries));
        self.partitions
            .get_or_create(&RoleLabels { role: "backup" })
            .set(i64::from(g.backups));
        self.entries.clear();
        for (collection, n) in &g.entries {
            self.entries
                .get_or_create(&CollectionLabels {
                    collection: collection.to_string(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.wal_failed.set(i64::from(g.wal_failed));
        self.partitions_lost
            .set(i64::try_from(g.partitions_lost).unwrap_or(i64::MAX));
        self.clock_offset.set(g.clock_offset_ms);
        self.clock_skewed.set(i64::from(g.clock_skewed));
        self.metadata_leader.set(i64::from(g.metadata_leader));
        let (used, limit, evicted) = g.memory;
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.memory_used.set(big(used));
        self.memory_limit.set(big(limit));
        self.memory_evicted.set(big(evicted));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// One open Batch stream in `distcache_node_batch_streams` (see
/// [`Metrics::batch_stream`]).
#[derive(Debug)]
pub struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A node's state as the gauges show it (read by the node at scrape time).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Partition table epoch.
    pub epoch: u64,
    /// Members the cluster expects.
    pub members: usize,
    /// Members seen alive.
    pub members_alive: usize,
    /// Sees a majority.
    pub quorum: bool,
    /// Every partition has its in-sync backups and nothing migrates.
    pub safe: bool,
    /// Partitions without an in-sync backup.
    pub without_backup: u32,
    /// Partitions whose owners differ from the balanced target.
    pub migrations: u32,
    /// Partitions this node is primary of.
    pub primaries: u32,
    /// Partitions this node is a backup of.
    pub backups: u32,
    /// Entries held, per collection.
    pub entries: Vec<(std::sync::Arc<str>, u64)>,
    /// The WAL refuses writes.
    pub wal_failed: bool,
    /// (bytes of entries held, --max-memory, entries evicted for it).
    pub memory: (u64, u64, u64),
    /// Partitions restarted empty (data loss), cluster-wide.
    pub partitions_lost: u64,
    /// Wall-clock offset from the peers' median, ms.
    pub clock_offset_ms: i64,
    /// The offset is beyond the allowed one.
    pub clock_skewed: bool,
    /// This node leads the metadata group.
    pub metadata_leader: bool,
}

/// Binds `addr` for the metrics endpoint (`--metrics-listen`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen for metrics on {addr}: {e}")))
}
