//! # distcache-client
//!
//! The wire contract of distcache and its smart Rust client.
//!
//! - [`proto`]: the gRPC API (`distcache.v1`), generated from
//!   `proto/distcache/v1/distcache.proto` at build time (protox, no system protoc).
//! - [`partition`]: the key -> partition function every client and node shares.
//! - [`Client`]: connects to seed endpoints, caches the partition table and
//!   routes each key to its owner; data calls from many tasks share a few
//!   Batch streams per node. [`Collection`] handles, [`LockGuard`]s with
//!   fencing tokens, typed [`Error`]s mirroring the seed's exception table.
//! - The `distcache` command-line tool (`src/bin/distcache.rs`).
//!
//! This crate is not the engine (that is `distcache-node`) and keeps no data.
//!
//! ```no_run
//! # async fn demo() -> distcache_client::Result<()> {
//! use std::time::Duration;
//! use distcache_client::{Client, LockOptions};
//!
//! let client = Client::connect(["127.0.0.1:7100"]).await?;
//! client.put("user:123", "alice").await?;
//! let sessions = client.collection("sessions").await?;
//! sessions.put_with_ttl("sess:abc", "u=123", Duration::from_secs(3600)).await?;
//! let lock = client.acquire_lock("resource-x", LockOptions::default()).await?;
//! // ... critical section, passing lock.fencing_token() to the protected store
//! lock.release().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]

mod client;
pub mod codec;
mod collection;
pub mod config;
mod conn;
pub mod error;
mod lock;
pub mod members;
mod mux;
pub mod partition;
mod router;
mod routing;

/// Generated gRPC messages, clients and servers of package `distcache.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("distcache.v1");

    /// Encoded file descriptor set of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/distcache_descriptor.bin"));
}

pub use client::Client;
pub use collection::{Collection, CollectionOptions};
pub use config::{ClientConfig, ClientTls};
pub use error::{Error, Result};
pub use lock::{DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_HOLD_TIMEOUT, LockGuard, LockOptions};
