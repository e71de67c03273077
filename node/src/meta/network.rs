//! Raft RPCs over the peer protocol: one [`Request::Raft`] per RPC, to the
//! target's peer address, with Raft's own timeout.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{MetaNode, MetaTypes, NodeId, RaftAnswer, RaftRpc};
use crate::error::Error;
use crate::net::message::{Request, Response};
use crate::net::peer::Peers;

/// Resolves a member name to its current peer address (members may come
/// back on new addresses; Raft's stored address is only a fallback).
pub type Resolver = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Makes one [`MetaClient`] per target.
#[derive(Clone)]
pub struct MetaNetwork {
    /// The node's outbound peer connections.
    pub peers: Arc<Peers>,
    /// Current peer address of a member.
    pub resolve: Resolver,
}

/// Sends RPCs to one member.
pub struct MetaClient {
    peers: Arc<Peers>,
    resolve: Resolver,
    target: NodeId,
    name: String,
    addr: String,
}

impl RaftNetworkFactory<MetaTypes> for MetaNetwork {
    type Network = MetaClient;

    async fn new_client(&mut self, target: NodeId, node: &MetaNode) -> MetaClient {
        MetaClient {
            peers: self.peers.clone(),
            resolve: self.resolve.clone(),
            target,
            name: node.name.clone(),
            addr: node.peer.clone(),
        }
    }
}

type Rpc<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, MetaNode, RaftError<NodeId, E>>>;

impl MetaClient {
    async fn send<E: std::error::Error>(
        &self,
        rpc: RaftRpc,
        option: &RPCOption,
    ) -> Result<RaftAnswer, RPCError<NodeId, MetaNode, RaftError<NodeId, E>>> {
        let timeout = option.hard_ttl().max(Duration::from_millis(50));
        let addr = (self.resolve)(&self.name).unwrap_or_else(|| self.addr.clone());
        match self
            .peers
            .call(&addr, Request::Raft(Box::new(rpc)), timeout)
            .await
        {
            Ok(Response::Raft(answer)) => Ok(*answer),
            Ok(Response::Error(e)) => Err(RPCError::Network(NetworkError::new(&Error::Remote {
                reason: e.reason,
                message: e.message,
            }))),
            Ok(_) => Err(RPCError::Network(NetworkError::new(&Error::Internal(
                "unexpected answer to a raft rpc".into(),
            )))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>() -> RPCError<NodeId, MetaNode, RaftError<NodeId, E>> {
        RPCError::Network(NetworkError::new(&Error::Internal(
            "mismatched raft answer".into(),
        )))
    }
}

impl RaftNetwork<MetaTypes> for MetaClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<MetaTypes>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        match self.send(RaftRpc::Append(rpc), &option).await? {
            RaftAnswer::Append(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(Self::unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<MetaTypes>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.send(RaftRpc::Snapshot(rpc), &option).await? {
            RaftAnswer::Snapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(Self::unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>> {
        match self.send(RaftRpc::Vote(rpc), &option).await? {
            RaftAnswer::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(Self::unexpected()),
        }
    }
}
