//! Storage: the partitioned store with TTL and LRU. Never sees a socket.

mod store;
pub mod wal;

pub use store::{
    CollectionMeta, ENTRY_OVERHEAD, Limits, MAX_COLLECTION_NAME_BYTES, MemoryLimit, MemoryPolicy,
    Room, Store,
};
