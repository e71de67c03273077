//! The node <-> node protocol: one versioned message enum, msgpack-encoded
//! (rmp-serde) inside length-prefixed frames.

use serde::{Deserialize, Serialize};

use crate::command::{Command, Outcome};
use crate::meta::state::{MetaCmd, MetaReply};
use crate::meta::{RaftAnswer, RaftRpc};
use crate::replica::{PartitionSnapshot, ReplOp};

/// Version of this protocol; a frame of another version is refused.
pub const PROTOCOL_VERSION: u16 = 5;

/// One frame's content.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// Request id, echoed by the response.
    pub id: u64,
    /// Request or response.
    pub body: Body,
}

/// Request or response.
#[derive(Debug, Serialize, Deserialize)]
pub enum Body {
    /// A request.
    Request(Request),
    /// The answer to the request with the same id.
    Response(Response),
}

/// Liveness, identity and replication health of a member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    /// Member name.
    pub name: String,
    /// Start time of this process (ms since the Unix epoch): a restart is a new incarnation.
    pub incarnation: u64,
    /// Epoch of the sender's installed table.
    pub epoch: u64,
    /// The sender is leaving (graceful shutdown) and wants its partitions moved off.
    pub leaving: bool,
    /// The sender sees a majority of the expected members.
    pub quorum: bool,
    /// Increases with every heartbeat and out-of-sync report of the sender.
    pub seq: u64,
    /// Partitions the sender holds a role for (at `epoch`) but no loaded copy of.
    pub unloaded: Vec<u32>,
    /// The sender's wall clock (ms since the Unix epoch) when it sent this.
    pub wall_ms: u64,
    /// The sender's clock is off from the majority's by more than allowed.
    pub skewed: bool,
}

/// A collection-registry change broadcast to every member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum CollectionOp {
    /// Create unless it exists.
    Create {
        /// Name.
        name: String,
        /// Default TTL, ms.
        default_ttl_ms: u64,
        /// LRU limit.
        max_entries: u64,
    },
    /// Clear and remove.
    Delete {
        /// Name.
        name: String,
    },
}

/// One write of a primary's replication stream for a partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplItem {
    /// Partition.
    pub partition: u32,
    /// The primary's table epoch when it applied the write.
    pub epoch: u64,
    /// The primary's stream for the partition: a new one each time a node
    /// becomes (or starts as) its primary.
    pub stream: u64,
    /// Position in the stream: 1, 2, ... with no gaps; a backup applies
    /// `seq` only right after `seq - 1`.
    pub seq: u64,
    /// The writes, in order.
    pub ops: Vec<ReplOp>,
}

/// An error crossing the peer protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireError {
    /// `distcache.v1.ErrorReason` value.
    pub reason: i32,
    /// Message.
    pub message: String,
}

/// Requests between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Liveness + state; answered with the receiver's heartbeat.
    Heartbeat(Heartbeat),
    /// A Raft RPC of the metadata group.
    Raft(Box<RaftRpc>),
    /// Commit this metadata command (sent to the metadata leader).
    Meta(MetaCmd),
    /// Run a client's command on the receiver (its owner).
    Forward(Command),
    /// Apply these writes, in order, to backup copies (one frame of the
    /// sender's ordered replication stream to the receiver): answered with
    /// one result per item ([`Response::Replicated`]).
    Replicate {
        /// The sender: must be each item's partition's primary in the
        /// receiver's table.
        from: String,
        /// The writes, in the order the primary applied them.
        items: Vec<ReplItem>,
    },
    /// Replace the backup copy of `partition` with a snapshot, sent in
    /// chunks that each fit a frame: chunk 0 replaces the copy (and carries
    /// the locks), the next ones add entries, in order; the copy is in sync
    /// only after the last.
    Snapshot {
        /// The sender: must be the partition's primary in the receiver's table.
        from: String,
        /// Table epoch of the sender.
        epoch: u64,
        /// Partition.
        partition: u32,
        /// Index of this chunk (0, 1, ...).
        chunk: u32,
        /// The last chunk.
        last: bool,
        /// This chunk's part of the partition state.
        snapshot: PartitionSnapshot,
        /// The primary's replication stream and the sequence number of
        /// the last write the snapshot holds (the copy continues from it).
        stream: u64,
        /// See `stream`.
        seq: u64,
    },
    /// Digest of the receiver's copy of `partition`, with the replication
    /// position it is at ([`Response::Digest`]).
    Digest {
        /// Table epoch of the sender.
        epoch: u64,
        /// Partition.
        partition: u32,
    },
    /// Apply a collection-registry change.
    Collection(CollectionOp),
    /// The receiver's collections.
    ListCollections,
}

/// Responses between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// The receiver's heartbeat.
    Heartbeat(Heartbeat),
    /// The answer to a Raft RPC.
    Raft(Box<RaftAnswer>),
    /// A committed metadata command: the state machine's reply and the
    /// entry's log index.
    Meta {
        /// Reply.
        reply: MetaReply,
        /// Log index.
        index: u64,
    },
    /// Outcome of a forwarded command.
    Forwarded(Outcome),
    /// A backup copy's digest and its replication position.
    Digest {
        /// Digest of the copy.
        digest: u64,
        /// The stream it follows (0: none; it needs a snapshot).
        stream: u64,
        /// The last sequence number of that stream it applied.
        seq: u64,
    },
    /// One result per item of a [`Request::Replicate`], in order: `None`
    /// applied (or already held), else why it was refused.
    Replicated(Vec<Option<WireError>>),
    /// Collections: (name, default_ttl_ms, max_entries).
    Collections(Vec<(String, u64, u64)>),
    /// Refused.
    Error(WireError),
}

/// Bytes an encoding starts with: an answer or a heartbeat fits, so its
/// buffer is allocated once, not grown from a few bytes by doubling.
const ENCODE_START: usize = 256;

/// Encodes an envelope.
pub fn encode(env: &Envelope) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let mut out = Vec::with_capacity(ENCODE_START);
    encode_into(&mut out, env)?;
    Ok(out)
}

/// Appends the encoding of an envelope to `out` (a buffer kept for many
/// frames); the same bytes as [`encode`].
pub fn encode_into(out: &mut Vec<u8>, env: &Envelope) -> Result<(), rmp_serde::encode::Error> {
    rmp_serde::encode::write(out, env)
}

/// Decodes an envelope (the frame size was bounded before).
pub fn decode(buf: &[u8]) -> Result<Envelope, rmp_serde::decode::Error> {
    rmp_serde::from_slice(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn round_trip() {
        let env = Envelope {
            version: PROTOCOL_VERSION,
            id: 7,
            body: Body::Request(Request::Replicate {
                from: "n1".into(),
                items: vec![ReplItem {
                    partition: 9,
                    epoch: 3,
                    stream: 11,
                    seq: 1,
                    ops: vec![ReplOp::Put {
                        collection: "c".into(),
                        key: Bytes::from_static(b"k\xff"),
                        value: Bytes::from_static(b"v"),
                        expires_at: 5,
                    }],
                }],
            }),
        };
        let encoded = encode(&env).expect("encode");
        // The wire bytes are rmp-serde's own encoding (peers of earlier
        // builds read them), and a kept buffer gets the same bytes after
        // what it held.
        assert_eq!(encoded, rmp_serde::to_vec(&env).expect("to_vec"));
        let mut kept = b"old".to_vec();
        encode_into(&mut kept, &env).expect("encode_into");
        assert_eq!(&kept[..3], b"old");
        assert_eq!(kept[3..], encoded[..]);
        let back = decode(&encoded).expect("decode");
        assert_eq!(back.id, 7);
        let Body::Request(Request::Replicate { from, items }) = back.body else {
            panic!("not a Replicate: {:?}", back.body);
        };
        assert_eq!(from, "n1");
        assert_eq!(
            (
                items[0].partition,
                items[0].epoch,
                items[0].stream,
                items[0].seq
            ),
            (9, 3, 11, 1)
        );
    }

    #[test]
    fn garbage_and_deep_nesting_are_errors_not_panics() {
        for junk in [
            &b""[..],
            b"\xc1",
            b"\xff\xff\xff",
            &[0x91; 100_000][..],
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
        ] {
            assert!(decode(junk).is_err());
        }
    }
}
