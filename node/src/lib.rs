//! # distcache-node
//!
//! The distcache engine: one process per pod, serving the `distcache.v1`
//! gRPC API.
//!
//! - [`storage`]: the partitioned store (entries with TTL, collections with
//!   LRU limits), never touching a socket.
//! - [`locking`]: per-key locks with fencing tokens, leases and fair queues.
//! - [`grpc`]: the services over a [`Node`], and the one error -> status map.
//! - [`server::serve`]: serves a bound listener until a shutdown future fires.
//! - [`cluster`]: membership providers, the epoch-fenced partition table,
//!   the rebalancer and the coordinator's step function.
//! - [`net`]: the node <-> node protocol (msgpack frames over TCP, a pool
//!   of multiplexed connections per peer).
//! - [`clock`]: wall/monotonic time, swappable for tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use distcache_node::{clock::SystemClock, config::NodeConfig, server, Node};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let node = Node::new(NodeConfig::default(), listener.local_addr()?, Arc::new(SystemClock::default()))?;
//! node.start(None).await;
//! server::serve(listener, node, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]

pub mod clock;
pub mod cluster;
pub mod command;
pub mod config;
pub mod error;
pub mod grpc;
pub mod listener;
pub mod locking;
pub mod meta;
pub mod metrics;
pub mod net;
mod node;
pub mod replica;
pub mod security;
pub mod server;
pub mod storage;

pub use error::{Error, Result};
pub use node::Node;
