//! Cluster metadata on Raft (openraft): membership, the partition table and
//! each partition's in-sync replica set are one replicated state machine
//! ([`state::MetaState`]). A node acts only on committed state; no peer
//! frame installs a table by itself.
//!
//! - `state`: the commands and the state machine's rules;
//! - `store`: log, vote and snapshot storage (persisted in `--wal-dir`);
//! - `network`: Raft RPCs over the peer protocol.

pub mod network;
pub mod state;
pub mod store;

use serde::{Deserialize, Serialize};

use state::{MetaCmd, MetaReply};

/// Raft node id of a member: a stable hash of its name.
pub type NodeId = u64;

/// What Raft knows of a member: its name and peer address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    /// Member name.
    pub name: String,
    /// Peer address.
    pub peer: String,
}

openraft::declare_raft_types!(
    /// The metadata group's Raft types.
    pub MetaTypes:
        D = MetaCmd,
        R = MetaReply,
        NodeId = NodeId,
        Node = MetaNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// A node's handle on its metadata group, set once at start.
#[derive(Default)]
pub struct RaftCell(std::sync::OnceLock<MetaRaft>);

impl RaftCell {
    /// The handle, once started.
    pub fn get(&self) -> Option<&MetaRaft> {
        self.0.get()
    }

    /// Sets the handle (false: it was set already).
    pub fn set(&self, raft: MetaRaft) -> bool {
        self.0.set(raft).is_ok()
    }
}

impl std::fmt::Debug for RaftCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "RaftCell(started)"
        } else {
            "RaftCell(not started)"
        })
    }
}

/// The metadata group's Raft handle.
pub type MetaRaft = openraft::Raft<MetaTypes>;

/// The Raft node id of member `name` (xxh3 of the name, never 0).
pub fn node_id(name: &str) -> NodeId {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()).max(1)
}

/// A Raft RPC carried by the peer protocol.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// AppendEntries (also the leader's heartbeat).
    Append(openraft::raft::AppendEntriesRequest<MetaTypes>),
    /// RequestVote.
    Vote(openraft::raft::VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    Snapshot(openraft::raft::InstallSnapshotRequest<MetaTypes>),
}

/// The answer to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftAnswer {
    /// To `Append`.
    Append(
        Result<openraft::raft::AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>>,
    ),
    /// To `Vote`.
    Vote(Result<openraft::raft::VoteResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    /// To `Snapshot`.
    Snapshot(
        Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
    ),
}
