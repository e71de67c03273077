//! Node configuration: every field is a flag with a `DISTCACHE_*` env var and
//! a named default.

use std::net::SocketAddr;

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
    /// Log filter (tracing EnvFilter syntax, e.g. `info,distcache_node=debug`).
    #[arg(long, env = "DISTCACHE_LOG", default_value = "info")]
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
            log: "info".into(),
        }
    }
}

impl NodeConfig {
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
        if self.sweep_interval_ms == 0 {
            return Err("sweep-interval-ms must be positive".into());
        }
        Ok(())
    }
}
