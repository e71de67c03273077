//! The peer protocol's one entry point: who may say what, then a match over
//! requests that delegates each to the room that owns it.
//!
//! Every request is checked against what this node knows, whatever the
//! transport proved: a connection speaks only for current members (with
//! mTLS the ones its certificate names, with `--peer-insecure` the ones at
//! its source IP); a heartbeat, Raft message, in-sync change, replication
//! or snapshot claiming another member's name is refused; Raft terms are
//! bounded; replication is taken only from the partition's primary in this
//! node's table. Nothing a peer sends installs a table: only entries the
//! metadata group committed do.

use std::net::SocketAddr;

use crate::cluster::membership::MemberSpec;
use crate::command::Origin;
use crate::error::Error;
use crate::meta::state::MetaCmd;
use crate::meta::{RaftRpc, node_id};
use crate::net::message::{Request, Response};
use crate::net::peer::{Caller, Identity};
use crate::node::Node;

/// Highest Raft term accepted at all: no arithmetic on terms can wrap
/// (2^48 elections, one per 50 ms, take 445,000 years).
pub(crate) const MAX_TERM: u64 = 1 << 48;
/// Largest step of a Raft term above this node's current one.
pub(crate) const MAX_TERM_STEP: u64 = 1 << 20;
/// Largest metadata snapshot received (the table and in-sync sets of 65,536
/// partitions fit many times over).
const MAX_META_SNAPSHOT_BYTES: u64 = 64 << 20;

fn refused(why: String) -> Response {
    Response::Error(Error::InvalidArgument(why).to_wire())
}

impl Node {
    /// Whether `caller` may speak for member `name`: a current member other
    /// than this node, named by the caller's certificate (mTLS) or reached
    /// at the caller's source IP (`--peer-insecure`; a member whose peer
    /// address is a host name matches any source).
    pub(crate) fn speaks_for(&self, caller: &Caller, name: &str) -> bool {
        let members = self.cluster.members();
        members
            .iter()
            .find(|m| m.name == name)
            .is_some_and(|m| self.speaks_for_member(caller, m))
    }

    /// [`Node::speaks_for`] for a member already looked up.
    fn speaks_for_member(&self, caller: &Caller, m: &MemberSpec) -> bool {
        if m.name == self.name() {
            return false;
        }
        match &caller.identity {
            Identity::Certified(names) => names.contains(&m.name),
            Identity::Address(ip) => match m.peer.parse::<SocketAddr>() {
                Ok(a) => a.ip() == *ip,
                Err(_) => true,
            },
        }
    }

    /// The gate before a connection's first frame: it must speak for some
    /// current member.
    pub(crate) fn admit_peer(&self, caller: &Caller) -> Result<(), String> {
        let members = self.cluster.members();
        if members.iter().any(|m| self.speaks_for_member(caller, m)) {
            return Ok(());
        }
        Err(match &caller.identity {
            Identity::Certified(names) => format!(
                "certificate names {names:?}, not a current member: refused before any frame"
            ),
            Identity::Address(ip) => format!(
                "source address {ip} is no current member's peer address: refused before any frame"
            ),
        })
    }

    /// Answers one request from a peer.
    pub(super) async fn handle_peer(&self, caller: Caller, req: Request) -> Response {
        if let Err(why) = self.check_peer(&caller, &req) {
            tracing::warn!(peer = %caller.addr, %why, "peer request refused");
            return refused(why);
        }
        match req {
            Request::Heartbeat(_) => self.on_heartbeat(),
            Request::Raft(rpc) => self.on_raft(*rpc).await,
            Request::Meta(cmd) => self.on_meta(cmd).await,
            Request::Forward(cmd) => match self.run(cmd, Origin::Peer).await {
                Ok(outcome) => Response::Forwarded(outcome),
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::Replicate { from, items } => self.on_replicate(&from, items).await,
            Request::Snapshot {
                from,
                epoch,
                partition,
                chunk,
                last,
                snapshot,
                stream,
                seq,
            } => {
                self.on_snapshot(
                    &from,
                    epoch,
                    partition,
                    (chunk, last),
                    snapshot,
                    (stream, seq),
                )
                .await
            }
            Request::Digest { partition, .. } => self.on_digest(partition).await,
            Request::Collection(op) => match self.apply_collection(&op).await {
                Ok(()) => Response::Ok,
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::ListCollections => self.collections_answer(),
        }
    }

    /// Who may send what (the content is checked by each handler and, for
    /// metadata, by the state machine).
    fn check_peer(&self, caller: &Caller, req: &Request) -> Result<(), String> {
        let claim = |name: &str| {
            if self.speaks_for(caller, name) {
                Ok(())
            } else {
                Err(format!("the connection cannot speak for {name:?}"))
            }
        };
        match req {
            Request::Heartbeat(hb) => claim(&hb.name),
            Request::Raft(rpc) => self.check_raft(caller, rpc),
            Request::Meta(cmd) => match cmd {
                MetaCmd::Table { .. } => Err(
                    "tables are planned by the metadata leader, never proposed by a peer".into(),
                ),
                MetaCmd::Shrink { primary, .. } | MetaCmd::Expand { primary, .. } => claim(primary),
                MetaCmd::Forget { member } => {
                    if self.cluster.alive(member) {
                        Err(format!("{member} is alive: it cannot be forgotten"))
                    } else {
                        Ok(())
                    }
                }
            },
            Request::Replicate { from, .. } | Request::Snapshot { from, .. } => claim(from),
            Request::Forward(_)
            | Request::Digest { .. }
            | Request::Collection(_)
            | Request::ListCollections => self.admit_peer(caller),
        }
    }

    /// A Raft message comes from the member its vote names, with a term in
    /// bounds; a snapshot's bytes are bounded.
    fn check_raft(&self, caller: &Caller, rpc: &RaftRpc) -> Result<(), String> {
        let vote = match rpc {
            RaftRpc::Append(r) => &r.vote,
            RaftRpc::Vote(r) => &r.vote,
            RaftRpc::Snapshot(r) => &r.vote,
        };
        let sender = vote.leader_id.node_id;
        let named = self
            .cluster
            .members()
            .iter()
            .find(|&m| node_id(&m.name) == sender)
            .cloned()
            .ok_or_else(|| format!("Raft message from node id {sender}, no current member"))?;
        if !self.speaks_for_member(caller, &named) {
            return Err(format!(
                "the connection cannot speak for {:?} (Raft sender)",
                named.name
            ));
        }
        let term = vote.leader_id.term;
        let current = self.raft().map_or(0, |r| r.metrics().borrow().current_term);
        if term > MAX_TERM || (current > 0 && term > current.saturating_add(MAX_TERM_STEP)) {
            return Err(format!(
                "Raft term {term} is far above this node's {current}: refused"
            ));
        }
        match rpc {
            RaftRpc::Append(r) => {
                if r.entries.iter().any(|e| e.log_id.leader_id.term > term) {
                    return Err("Raft entries from a term after the sender's".into());
                }
            }
            RaftRpc::Snapshot(r) => {
                let end = r.offset.saturating_add(r.data.len() as u64);
                if end > MAX_META_SNAPSHOT_BYTES {
                    return Err(format!(
                        "metadata snapshot bytes up to {end}, above {MAX_META_SNAPSHOT_BYTES}"
                    ));
                }
            }
            RaftRpc::Vote(_) => {}
        }
        Ok(())
    }
}
