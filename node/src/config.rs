//! Node configuration: every field is a flag with a `DISTCACHE_*` env var and
//! a named default.

use crate::cluster::membership::MemberSpec;
use crate::storage::MemoryPolicy;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7100";
/// Default largest key (64 KiB).
pub const DEFAULT_MAX_KEY_BYTES: u64 = 64 * 1024;
/// Default largest value (16 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 16 * 1024 * 1024;
/// Default largest gRPC message (64 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;
/// Default most keys in one batch operation.
pub const DEFAULT_MAX_BATCH_KEYS: u64 = 100_000;
/// Default expiry sweep period (ms).
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 1_000;
/// Default partitions visited per sweep.
pub const DEFAULT_SWEEP_PARTITIONS: usize = 16;
/// Default backups per partition.
pub const DEFAULT_BACKUP_COUNT: u32 = 1;
/// Default heartbeat period (ms).
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 300;
/// Default failure-detection timeout (ms).
pub const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 3_000;
/// Default peer request timeout (ms; seed: 10 s).
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Default replication round-trip timeout (ms).
pub const DEFAULT_REPLICATION_TIMEOUT_MS: u64 = 2_000;
/// Default anti-entropy period (s; seed: 60 s).
pub const DEFAULT_ANTI_ENTROPY_SECS: u64 = 60;
/// Default longest graceful hand-off (s).
pub const DEFAULT_LEAVE_TIMEOUT_SECS: u64 = 30;
/// Default largest wall-clock offset from the majority (CockroachDB's 500 ms).
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 500;
/// Default largest peer frame (80 MiB: a forwarded 64 MiB gRPC message
/// fits; snapshots are sent in chunks of a quarter of it).
pub const DEFAULT_PEER_MAX_FRAME_BYTES: u64 = 80 * 1024 * 1024;
/// Default most inbound peer connections at once.
pub const DEFAULT_PEER_MAX_CONNECTIONS: usize = 512;
/// Default most inbound peer connections from one IP address.
pub const DEFAULT_PEER_MAX_CONNECTIONS_PER_IP: usize = 64;
/// Default node-wide budget of inbound peer bytes being read or handled (256 MiB).
pub const DEFAULT_PEER_INFLIGHT_BYTES: u64 = 256 * 1024 * 1024;
/// Default of `--replication-queue-bytes`.
pub const DEFAULT_REPLICATION_QUEUE_BYTES: u64 = 256 * 1024 * 1024;
/// Default of `--replication-queue-ops`.
pub const DEFAULT_REPLICATION_QUEUE_OPS: usize = 65_536;
/// Default of `--replication-frames-in-flight`.
pub const DEFAULT_REPLICATION_FRAMES_IN_FLIGHT: usize = 4;
/// Default idle peer connection timeout (s).
pub const DEFAULT_PEER_IDLE_TIMEOUT_SECS: u64 = 120;
/// Default WAL segment size (64 MiB).
pub const DEFAULT_WAL_MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default of `--wal-prepare-bytes` (4 MiB).
pub const DEFAULT_WAL_PREPARE_BYTES: u64 = 4 * 1024 * 1024;
/// Default WAL checkpoint period (s; seed: 5 min).
pub const DEFAULT_WAL_CHECKPOINT_SECS: u64 = 300;
/// Default peer frame completion timeout (ms).
pub const DEFAULT_PEER_FRAME_TIMEOUT_MS: u64 = 10_000;
/// Default most client connections at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4_096;
/// Default most concurrent calls per client connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1_024;
/// Default idle client connection timeout (s).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 600;
/// Default longest lock lease (s): one day.
pub const DEFAULT_MAX_LOCK_HOLD_SECS: u64 = 86_400;
/// Default byte budget of queued Batch responses (256 MiB).
pub const DEFAULT_BATCH_BUFFER_BYTES: u64 = 256 * 1024 * 1024;
/// Default `--request-buffer-bytes` (256 MiB).
pub const DEFAULT_REQUEST_BUFFER_BYTES: u64 = 256 * 1024 * 1024;
/// Default most commands of one Batch stream in flight at once.
pub const DEFAULT_BATCH_IN_FLIGHT: usize = 4096;
/// Default most collections.
pub const DEFAULT_MAX_COLLECTIONS: u64 = 10_000;
/// Default lock lease when a request gives none (ms).
pub const DEFAULT_HOLD_MS: u64 = 60_000;
/// Default lock wait when a request gives none (ms).
pub const DEFAULT_ACQUIRE_MS: u64 = 30_000;

/// How one node runs.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeConfig {
    /// gRPC address to listen on (clients and plain gRPC tools).
    #[arg(long, env = "DISTCACHE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Member name: the node's stable identity (default: the advertised address).
    #[arg(long, env = "DISTCACHE_NAME")]
    pub name: Option<String>,
    /// gRPC address advertised to clients (default: the listen address).
    #[arg(long, env = "DISTCACHE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Number of partitions (must match across the cluster).
    #[arg(long, env = "DISTCACHE_PARTITION_COUNT", default_value_t = distcache_client::partition::DEFAULT_PARTITION_COUNT)]
    pub partition_count: u32,
    /// Largest key accepted, bytes.
    #[arg(long, env = "DISTCACHE_MAX_KEY_BYTES", default_value_t = DEFAULT_MAX_KEY_BYTES)]
    pub max_key_bytes: u64,
    /// Largest value accepted, bytes.
    #[arg(long, env = "DISTCACHE_MAX_VALUE_BYTES", default_value_t = DEFAULT_MAX_VALUE_BYTES)]
    pub max_value_bytes: u64,
    /// Largest gRPC message accepted or sent, bytes.
    #[arg(long, env = "DISTCACHE_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: u64,
    /// Most keys in one get_many/put_many/delete_many.
    #[arg(long, env = "DISTCACHE_MAX_BATCH_KEYS", default_value_t = DEFAULT_MAX_BATCH_KEYS)]
    pub max_batch_keys: u64,
    /// Period of the background expiry sweep, ms.
    #[arg(long, env = "DISTCACHE_SWEEP_INTERVAL_MS", default_value_t = DEFAULT_SWEEP_INTERVAL_MS)]
    pub sweep_interval_ms: u64,
    /// Partitions the sweep visits per period (bounds its work).
    #[arg(long, env = "DISTCACHE_SWEEP_PARTITIONS", default_value_t = DEFAULT_SWEEP_PARTITIONS)]
    pub sweep_partitions: usize,
    /// Cluster members, `NAME=GRPC_ADDR/PEER_ADDR` separated by commas (none: a lone node).
    #[arg(long, env = "DISTCACHE_MEMBERS")]
    pub members: Option<String>,
    /// File of members (same syntax, one or more per line), re-read when it changes.
    #[arg(long, env = "DISTCACHE_MEMBERS_FILE")]
    pub members_file: Option<PathBuf>,
    /// Member list from the Kubernetes API: `NAMESPACE/NAME` of the ConfigMap
    /// the operator publishes (watched; used instead of --members/--members-file).
    #[arg(long, env = "DISTCACHE_MEMBERS_CONFIGMAP")]
    pub members_configmap: Option<String>,
    /// Peer address other members reach this one at (with
    /// --members-configmap; default: the advertised host with the peer port).
    #[arg(long, env = "DISTCACHE_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Peer (node <-> node) listen address (default: this member's peer address).
    #[arg(long, env = "DISTCACHE_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Backups per partition (synchronous copies on other members).
    #[arg(long, env = "DISTCACHE_BACKUP_COUNT", default_value_t = DEFAULT_BACKUP_COUNT)]
    pub backup_count: u32,
    /// Heartbeat period, ms.
    #[arg(long, env = "DISTCACHE_HEARTBEAT_INTERVAL_MS", default_value_t = DEFAULT_HEARTBEAT_INTERVAL_MS)]
    pub heartbeat_interval_ms: u64,
    /// A member silent this long is considered failed, ms.
    #[arg(long, env = "DISTCACHE_FAILURE_TIMEOUT_MS", default_value_t = DEFAULT_FAILURE_TIMEOUT_MS)]
    pub failure_timeout_ms: u64,
    /// Timeout of forwarded and other peer requests, ms.
    #[arg(long, env = "DISTCACHE_REQUEST_TIMEOUT_MS", default_value_t = DEFAULT_REQUEST_TIMEOUT_MS)]
    pub request_timeout_ms: u64,
    /// Timeout of one replication round trip to a backup, ms.
    #[arg(long, env = "DISTCACHE_REPLICATION_TIMEOUT_MS", default_value_t = DEFAULT_REPLICATION_TIMEOUT_MS)]
    pub replication_timeout_ms: u64,
    /// Period of the anti-entropy digest comparison, seconds.
    #[arg(long, env = "DISTCACHE_ANTI_ENTROPY_INTERVAL_SECS", default_value_t = DEFAULT_ANTI_ENTROPY_SECS)]
    pub anti_entropy_interval_secs: u64,
    /// Longest a graceful shutdown waits to hand its partitions off, seconds.
    #[arg(long, env = "DISTCACHE_LEAVE_TIMEOUT_SECS", default_value_t = DEFAULT_LEAVE_TIMEOUT_SECS)]
    pub leave_timeout_secs: u64,
    /// When every in-sync replica of a partition is unreachable, promote a
    /// surviving replica that is not in sync instead of waiting (trades
    /// acknowledged writes for availability; reported as data loss).
    #[arg(long, env = "DISTCACHE_UNCLEAN_PROMOTION")]
    pub unclean_promotion: bool,
    /// Largest offset of this node's wall clock from the majority's before
    /// it is reported and no longer made a primary, ms.
    #[arg(long, env = "DISTCACHE_MAX_CLOCK_OFFSET_MS", default_value_t = DEFAULT_MAX_CLOCK_OFFSET_MS)]
    pub max_clock_offset_ms: u64,
    /// Largest peer frame accepted, bytes (buffered as it arrives, never
    /// allocated up front; must exceed --max-message-bytes by 1 MiB).
    #[arg(long, env = "DISTCACHE_PEER_MAX_FRAME_BYTES", default_value_t = DEFAULT_PEER_MAX_FRAME_BYTES)]
    pub peer_max_frame_bytes: u64,
    /// Bytes of inbound peer frames being read or handled at once, node-wide
    /// (reading waits while they are spent).
    #[arg(long, env = "DISTCACHE_PEER_INFLIGHT_BYTES", default_value_t = DEFAULT_PEER_INFLIGHT_BYTES)]
    pub peer_inflight_bytes: u64,
    /// Replicated writes queued for one backup at most (a write waits, under
    /// its partition's lock, while the queue is full).
    #[arg(long, env = "DISTCACHE_REPLICATION_QUEUE_OPS", default_value_t = DEFAULT_REPLICATION_QUEUE_OPS)]
    pub replication_queue_ops: usize,
    /// Bytes of replicated writes queued for one backup at most; past it a
    /// write is not queued (the backup then refuses the next one as a gap
    /// and is re-synced by snapshot).
    #[arg(long, env = "DISTCACHE_REPLICATION_QUEUE_BYTES", default_value_t = DEFAULT_REPLICATION_QUEUE_BYTES)]
    pub replication_queue_bytes: u64,
    /// Replication frames sent to one backup before the first of them is
    /// answered (1 = wait for each answer), 1-1024.
    #[arg(long, env = "DISTCACHE_REPLICATION_FRAMES_IN_FLIGHT", default_value_t = DEFAULT_REPLICATION_FRAMES_IN_FLIGHT)]
    pub replication_frames_in_flight: usize,
    /// Most inbound peer connections at once (more wait in the listen backlog).
    #[arg(long, env = "DISTCACHE_PEER_MAX_CONNECTIONS", default_value_t = DEFAULT_PEER_MAX_CONNECTIONS)]
    pub peer_max_connections: usize,
    /// Most inbound peer connections from one IP address (more are closed).
    #[arg(long, env = "DISTCACHE_PEER_MAX_CONNECTIONS_PER_IP", default_value_t = DEFAULT_PEER_MAX_CONNECTIONS_PER_IP)]
    pub peer_max_connections_per_ip: usize,
    /// An inbound peer connection that sends nothing for this long is closed, s.
    #[arg(long, env = "DISTCACHE_PEER_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_PEER_IDLE_TIMEOUT_SECS)]
    pub peer_idle_timeout_secs: u64,
    /// This member's peer certificate (PEM, names the member as a DNS
    /// subject alternative name, signed by --peer-tls-ca): mutual TLS on
    /// the peer port. Re-read when it changes.
    #[arg(long, env = "DISTCACHE_PEER_TLS_CERT", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    pub peer_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --peer-tls-cert; re-read when it changes.
    #[arg(long, env = "DISTCACHE_PEER_TLS_KEY", requires = "peer_tls_cert")]
    pub peer_tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): the issuer of every member's certificate;
    /// re-read when it changes.
    #[arg(long, env = "DISTCACHE_PEER_TLS_CA", requires = "peer_tls_cert")]
    pub peer_tls_ca: Option<PathBuf>,
    /// Plaintext, unauthenticated peer port: anyone who reaches it can
    /// speak for a member at the source address it connects from. Logged
    /// as a warning; for tests and trusted networks only.
    #[arg(
        long,
        env = "DISTCACHE_PEER_INSECURE",
        conflicts_with = "peer_tls_cert"
    )]
    pub peer_insecure: bool,
    /// Most bytes of entries this node holds (primary and backup copies,
    /// accounted per entry: key + value + 96); 0 = no limit. Default: 75 %
    /// of the container's memory limit (cgroup), else of the machine's RAM.
    #[arg(long, env = "DISTCACHE_MAX_MEMORY")]
    pub max_memory: Option<u64>,
    /// What a write does at --max-memory: `reject` (refused with
    /// MEMORY_LIMIT; reads and deletes work) or `evict-lru` (least recently
    /// used entries evicted, replicated as deletes).
    #[arg(long, env = "DISTCACHE_MAX_MEMORY_POLICY", value_enum, default_value_t = MemoryPolicy::Reject)]
    pub max_memory_policy: MemoryPolicy,
    /// Directory of the write-ahead log (none: pure in-memory).
    #[arg(long, env = "DISTCACHE_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// fsync the log before acknowledging a write (group commit shares fsyncs).
    #[arg(long, env = "DISTCACHE_WAL_FSYNC", default_value_t = true, action = clap::ArgAction::Set)]
    pub wal_fsync: bool,
    /// Log segment size before rotation, bytes.
    #[arg(long, env = "DISTCACHE_WAL_MAX_SEGMENT_BYTES", default_value_t = DEFAULT_WAL_MAX_SEGMENT_BYTES)]
    pub wal_max_segment_bytes: u64,
    /// With fsync on: synced zeros kept written ahead of the log's end, so
    /// each group commit overwrites space instead of growing the file
    /// (a faster fdatasync); 0 prepares nothing. At most 1 GiB.
    #[arg(long, env = "DISTCACHE_WAL_PREPARE_BYTES", default_value_t = DEFAULT_WAL_PREPARE_BYTES,
          value_parser = clap::value_parser!(u64).range(0..=1 << 30))]
    pub wal_prepare_bytes: u64,
    /// Period of the log checkpoint (compaction), seconds.
    #[arg(long, env = "DISTCACHE_WAL_CHECKPOINT_INTERVAL_SECS", default_value_t = DEFAULT_WAL_CHECKPOINT_SECS)]
    pub wal_checkpoint_interval_secs: u64,
    /// Start even when the log is damaged mid-way, keeping only the records before the damage.
    #[arg(long, env = "DISTCACHE_WAL_SKIP_CORRUPT")]
    pub wal_skip_corrupt: bool,
    /// A started peer frame must complete within this, ms (slow senders are cut off).
    #[arg(long, env = "DISTCACHE_PEER_FRAME_TIMEOUT_MS", default_value_t = DEFAULT_PEER_FRAME_TIMEOUT_MS)]
    pub peer_frame_timeout_ms: u64,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); none by default.
    #[arg(long, env = "DISTCACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) of the client port: TLS on (with --tls-key);
    /// re-read when the file changes.
    #[arg(long, env = "DISTCACHE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert; re-read when the file changes.
    #[arg(long, env = "DISTCACHE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs client certificates: clients must present one.
    #[arg(long, env = "DISTCACHE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Users and their grants (JSON, see README "Security"); re-read when it
    /// changes. Without it the client port is open to anyone who reaches it.
    #[arg(long, env = "DISTCACHE_USERS_FILE")]
    pub users_file: Option<PathBuf>,
    /// Most client connections at once; more wait in the listen backlog.
    #[arg(long, env = "DISTCACHE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (calls) per client connection.
    #[arg(long, env = "DISTCACHE_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// A client connection that sends nothing for this long is closed (s; 0 = never).
    #[arg(long, env = "DISTCACHE_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,
    /// HTTP/2 keepalive ping period toward clients (s; 0 = off); a client that
    /// does not answer within 20 s is disconnected.
    #[arg(long, env = "DISTCACHE_KEEPALIVE_SECS", default_value_t = 0)]
    pub keepalive_secs: u64,
    /// Bytes of large responses (over 1 MiB, Batch or unary) the node holds
    /// encoded for all clients at once, until written to their connections;
    /// a large response waits for room.
    #[arg(long, env = "DISTCACHE_BATCH_BUFFER_BYTES", default_value_t = DEFAULT_BATCH_BUFFER_BYTES)]
    pub batch_buffer_bytes: u64,
    /// Bytes of large requests (over 1 MiB each, Batch or unary) the node
    /// receives for all clients at once, from a message's first byte until
    /// it is decoded; a large request waits for room (HTTP/2 flow control
    /// holds its client back).
    #[arg(long, env = "DISTCACHE_REQUEST_BUFFER_BYTES", default_value_t = DEFAULT_REQUEST_BUFFER_BYTES)]
    pub request_buffer_bytes: u64,
    /// Most commands of one Batch stream the node runs at once; the stream
    /// reads no further message until one finishes.
    #[arg(long, env = "DISTCACHE_BATCH_IN_FLIGHT", default_value_t = DEFAULT_BATCH_IN_FLIGHT)]
    pub batch_in_flight: usize,
    /// Longest lock lease a client may ask for (s).
    #[arg(long, env = "DISTCACHE_MAX_LOCK_HOLD_SECS", default_value_t = DEFAULT_MAX_LOCK_HOLD_SECS)]
    pub max_lock_hold_secs: u64,
    /// Most collections (creating one more is refused with LIMIT_EXCEEDED).
    #[arg(long, env = "DISTCACHE_MAX_COLLECTIONS", default_value_t = DEFAULT_MAX_COLLECTIONS)]
    pub max_collections: u64,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,distcache_node=debug`).
    #[arg(long, env = "DISTCACHE_LOG", default_value = "info,openraft=warn")]
    pub log: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            name: None,
            advertise: None,
            partition_count: distcache_client::partition::DEFAULT_PARTITION_COUNT,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_batch_keys: DEFAULT_MAX_BATCH_KEYS,
            sweep_interval_ms: DEFAULT_SWEEP_INTERVAL_MS,
            sweep_partitions: DEFAULT_SWEEP_PARTITIONS,
            members: None,
            members_file: None,
            members_configmap: None,
            peer_advertise: None,
            peer_listen: None,
            backup_count: DEFAULT_BACKUP_COUNT,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            failure_timeout_ms: DEFAULT_FAILURE_TIMEOUT_MS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            replication_timeout_ms: DEFAULT_REPLICATION_TIMEOUT_MS,
            anti_entropy_interval_secs: DEFAULT_ANTI_ENTROPY_SECS,
            leave_timeout_secs: DEFAULT_LEAVE_TIMEOUT_SECS,
            unclean_promotion: false,
            max_clock_offset_ms: DEFAULT_MAX_CLOCK_OFFSET_MS,
            peer_max_frame_bytes: DEFAULT_PEER_MAX_FRAME_BYTES,
            max_memory: Some(0),
            max_memory_policy: MemoryPolicy::Reject,
            peer_inflight_bytes: DEFAULT_PEER_INFLIGHT_BYTES,
            replication_queue_ops: DEFAULT_REPLICATION_QUEUE_OPS,
            replication_queue_bytes: DEFAULT_REPLICATION_QUEUE_BYTES,
            replication_frames_in_flight: DEFAULT_REPLICATION_FRAMES_IN_FLIGHT,
            peer_max_connections: DEFAULT_PEER_MAX_CONNECTIONS,
            peer_max_connections_per_ip: DEFAULT_PEER_MAX_CONNECTIONS_PER_IP,
            peer_idle_timeout_secs: DEFAULT_PEER_IDLE_TIMEOUT_SECS,
            peer_tls_cert: None,
            peer_tls_key: None,
            peer_tls_ca: None,
            // In-process nodes (tests, embedding) talk plaintext on
            // loopback unless given certificates; the binary requires
            // one or the other (`validate`).
            peer_insecure: true,
            peer_frame_timeout_ms: DEFAULT_PEER_FRAME_TIMEOUT_MS,
            wal_dir: None,
            wal_fsync: true,
            wal_max_segment_bytes: DEFAULT_WAL_MAX_SEGMENT_BYTES,
            wal_prepare_bytes: DEFAULT_WAL_PREPARE_BYTES,
            wal_checkpoint_interval_secs: DEFAULT_WAL_CHECKPOINT_SECS,
            wal_skip_corrupt: false,
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            users_file: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            keepalive_secs: 0,
            max_lock_hold_secs: DEFAULT_MAX_LOCK_HOLD_SECS,
            batch_buffer_bytes: DEFAULT_BATCH_BUFFER_BYTES,
            request_buffer_bytes: DEFAULT_REQUEST_BUFFER_BYTES,
            batch_in_flight: DEFAULT_BATCH_IN_FLIGHT,
            max_collections: DEFAULT_MAX_COLLECTIONS,
            log: "info,openraft=warn".into(),
        }
    }
}

/// 75 % of the memory this process may use: the cgroup (v2) limit, else
/// the machine's RAM; 0 (no limit) when neither can be read.
pub fn default_max_memory() -> u64 {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let ram = || {
        std::fs::read_to_string("/proc/meminfo")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|kib| kib.saturating_mul(1024))
    };
    cgroup.or_else(ram).map_or(0, |b| b / 4 * 3)
}

impl NodeConfig {
    /// The memory limit in force (`--max-memory`, or its default).
    pub fn memory_limit(&self) -> crate::storage::MemoryLimit {
        crate::storage::MemoryLimit {
            max_bytes: self.max_memory.unwrap_or_else(default_max_memory),
            policy: self.max_memory_policy,
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.partition_count == 0 || self.partition_count > 65_536 {
            return Err("partition-count must be between 1 and 65536".into());
        }
        if self.max_value_bytes + self.max_key_bytes + 1024 > self.max_message_bytes {
            return Err(
                "max-message-bytes must exceed max-value-bytes + max-key-bytes + 1024".into(),
            );
        }
        if self.peer_max_frame_bytes < self.max_message_bytes + (1 << 20) {
            return Err("peer-max-frame-bytes must exceed max-message-bytes by 1 MiB".into());
        }
        if self.peer_inflight_bytes < self.peer_max_frame_bytes {
            return Err("peer-inflight-bytes must be at least peer-max-frame-bytes".into());
        }
        if self.replication_queue_ops == 0 {
            return Err("replication-queue-ops must be at least 1".into());
        }
        if !(1..=1024).contains(&self.replication_frames_in_flight) {
            return Err("replication-frames-in-flight must be 1-1024".into());
        }
        if self.replication_queue_bytes < self.max_message_bytes {
            return Err("replication-queue-bytes must be at least max-message-bytes".into());
        }
        if self.batch_in_flight == 0 {
            return Err("batch-in-flight must be at least 1".into());
        }
        if self.peer_max_connections == 0 || self.peer_max_connections_per_ip == 0 {
            return Err("peer connection limits must be positive".into());
        }
        let has_peers = self.members.is_some()
            || self.members_file.is_some()
            || self.members_configmap.is_some();
        if has_peers && !self.peer_insecure && self.peer_tls_cert.is_none() {
            return Err("a member of a cluster needs peer TLS (--peer-tls-cert, --peer-tls-key, --peer-tls-ca) or the explicit --peer-insecure".into());
        }
        if self.heartbeat_interval_ms == 0 || self.failure_timeout_ms <= self.heartbeat_interval_ms
        {
            return Err("failure-timeout-ms must exceed heartbeat-interval-ms (> 0)".into());
        }
        if self.anti_entropy_interval_secs == 0 {
            return Err("anti-entropy-interval-secs must be positive".into());
        }
        if self.sweep_interval_ms == 0 {
            return Err("sweep-interval-ms must be positive".into());
        }
        if self.members_configmap.is_some() {
            if self.members.is_some() || self.members_file.is_some() {
                return Err("give one of --members, --members-file, --members-configmap".into());
            }
            if self.name.is_none() {
                return Err("--members-configmap needs --name (the pod name)".into());
            }
        }
        Ok(())
    }

    /// The gRPC address advertised to clients.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        self.advertise.clone().unwrap_or_else(|| bound.to_string())
    }

    /// This member as other members should reach it (for providers that
    /// learn the others' addresses from elsewhere, like Kubernetes).
    pub fn me(&self, bound: SocketAddr) -> Result<MemberSpec, String> {
        let grpc = self.advertised(bound);
        let peer = match (&self.peer_advertise, self.peer_listen) {
            (Some(p), _) => p.clone(),
            (None, Some(listen)) => {
                let host = grpc.rsplit_once(':').map_or(grpc.as_str(), |(h, _)| h);
                format!("{host}:{}", listen.port())
            }
            (None, None) => {
                return Err("--members-configmap needs --peer-advertise or --peer-listen".into());
            }
        };
        Ok(MemberSpec {
            name: self.name.clone().unwrap_or_else(|| grpc.clone()),
            grpc,
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::NodeConfig;

    /// The defaults pass; a limit of zero (which would stall a stream or a
    /// queue for good) is refused with the flag's name.
    #[test]
    fn zero_limits_are_refused_by_name() {
        assert_eq!(NodeConfig::default().validate(), Ok(()));
        let zero_in_flight = NodeConfig {
            batch_in_flight: 0,
            ..NodeConfig::default()
        };
        let e = zero_in_flight.validate().expect_err("refused");
        assert!(e.contains("batch-in-flight"), "{e}");
        let zero_queue = NodeConfig {
            replication_queue_ops: 0,
            ..NodeConfig::default()
        };
        let e = zero_queue.validate().expect_err("refused");
        assert!(e.contains("replication-queue-ops"), "{e}");
        for frames in [0, 1025] {
            let bad = NodeConfig {
                replication_frames_in_flight: frames,
                ..NodeConfig::default()
            };
            let e = bad.validate().expect_err("refused");
            assert!(e.contains("replication-frames-in-flight"), "{e}");
        }
    }
}
