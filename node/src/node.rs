//! A running node: store, locks, identity and the background tasks it owns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::locking::LockTable;
use crate::storage::{Limits, Store};

/// One distcache node. Create with [`Node::new`], start its background
/// tasks with [`Node::start`], stop them with [`Node::shutdown`].
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    name: String,
    address: String,
    /// Entries and collections.
    pub store: Store,
    /// Locks.
    pub locks: LockTable,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// A node serving on `bound` (the actual listen address, after binding).
    pub fn new(config: NodeConfig, bound: SocketAddr, clock: Arc<dyn Clock>) -> Arc<Node> {
        let address = config
            .advertise
            .clone()
            .unwrap_or_else(|| bound.to_string());
        let name = config.name.clone().unwrap_or_else(|| address.clone());
        let shutdown = CancellationToken::new();
        let limits = Limits {
            max_key_bytes: config.max_key_bytes,
            max_value_bytes: config.max_value_bytes,
            max_batch_keys: config.max_batch_keys,
        };
        Arc::new(Node {
            store: Store::new(config.partition_count, clock.clone(), limits),
            locks: LockTable::new(config.partition_count, clock, shutdown.clone()),
            name,
            address,
            config,
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    /// Starts the background tasks (expiry sweep).
    pub fn start(self: &Arc<Self>) {
        let node = self.clone();
        let period = Duration::from_millis(self.config.sweep_interval_ms);
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = node.shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let n = node.store.sweep(node.config.sweep_partitions);
                        if n > 0 {
                            tracing::debug!(removed = n, "expiry sweep");
                        }
                    }
                }
            }
        });
    }

    /// Stops every background task and stream this node owns, and waits for them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
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
        &self.name
    }

    /// Client-facing gRPC address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Current partition table epoch (a lone node's table never changes).
    pub fn epoch(&self) -> u64 {
        1
    }
}
