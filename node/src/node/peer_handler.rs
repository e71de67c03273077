//! The peer protocol's one entry point: a match over requests that delegates
//! each to the room that owns it.

use crate::command::Origin;
use crate::net::message::{Request, Response};
use crate::node::Node;

impl Node {
    /// Answers one request from a peer.
    pub(super) async fn handle_peer(&self, req: Request) -> Response {
        match req {
            Request::Heartbeat(hb) => self.on_heartbeat(hb).await,
            Request::Raft(rpc) => self.on_raft(*rpc).await,
            Request::Meta(cmd) => self.on_meta(cmd).await,
            Request::Forward(cmd) => match self.run(cmd, Origin::Peer).await {
                Ok(outcome) => Response::Forwarded(outcome),
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::Replicate {
                epoch,
                partition,
                ops,
            } => self.on_replicate(epoch, partition, ops).await,
            Request::Snapshot {
                epoch,
                partition,
                snapshot,
            } => self.on_snapshot(epoch, partition, snapshot).await,
            Request::Digest { partition, .. } => self.on_digest(partition),
            Request::Collection(op) => match self.apply_collection(&op).await {
                Ok(()) => Response::Ok,
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::ListCollections => self.collections_answer(),
        }
    }
}
