//! The control plane on this node: the metadata Raft group (start,
//! bootstrap, voters), proposals (forwarded to the leader), the leader's
//! table planning loop, following committed state, and primary leases.
//!
//! A node changes who owns what only when the committed state changes
//! ([`Node::follow_meta`] installs each committed table); no peer frame can
//! install a table by itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};

use crate::error::{Error, Result};
use crate::meta::network::MetaNetwork;
use crate::meta::state::{MetaCmd, MetaReply};
use crate::meta::store::MetaStore;
use crate::meta::{MetaNode, MetaRaft, RaftAnswer, RaftRpc, node_id};
use crate::net::message::{Request, Response};
use crate::node::Node;

/// Raft timings derived from the failure timeout: an election starts after
/// a fifth to a third of it without a leader (at most 1-2 s: a dead leader
/// is replaced well before its members' partitions fail over), heartbeats at
/// a fifth of that.
fn raft_config(failure_timeout: Duration) -> Result<Config> {
    let ft = failure_timeout.as_millis().max(200) as u64;
    let min = (ft / 5).clamp(50, 1_000);
    let config = Config {
        cluster_name: "distcache-meta".into(),
        election_timeout_min: min,
        election_timeout_max: (ft / 3).clamp(min + 20, 2_000),
        heartbeat_interval: (min / 5).max(10),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(200),
        max_in_snapshot_log_to_keep: 100,
        install_snapshot_timeout: 2_000,
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| Error::InvalidArgument(format!("raft config: {e}")))
}

/// How many voters a cluster of `n` configured members has.
fn voter_count(n: usize) -> usize {
    match n {
        0..=2 => n,
        3 | 4 => 3,
        _ => 5,
    }
}

impl Node {
    /// The metadata Raft handle, once started.
    pub fn raft(&self) -> Option<&MetaRaft> {
        self.meta.get()
    }

    /// Starts the metadata Raft group; bootstraps it when this node has no
    /// Raft state and is one of the first voters.
    pub(super) async fn start_meta(self: &Arc<Self>, store: MetaStore) -> Result<()> {
        let config = raft_config(self.cluster.config().failure_timeout)?;
        let fresh = !store.has_state();
        let weak = Arc::downgrade(self);
        let net = MetaNetwork {
            peers: self.peers.clone(),
            resolve: Arc::new(move |name: &str| {
                let node = weak.upgrade()?;
                node.cluster
                    .members()
                    .iter()
                    .find(|&m| m.name == name)
                    .cloned()
                    .map(|m| m.peer)
            }),
        };
        let (log, sm) = openraft::storage::Adaptor::new(store);
        let raft = MetaRaft::new(node_id(self.name()), Arc::new(config), net, log, sm)
            .await
            .map_err(|e| Error::Internal(format!("raft: {e}")))?;
        if !self.meta.set(raft) {
            return Err(Error::Internal("raft started twice".into()));
        }
        if fresh {
            let voters = self.wanted_voters();
            if voters.contains_key(&node_id(self.name())) {
                // Every first voter bootstraps with the same voter set (safe
                // in Raft: one identical initial configuration).
                if let Some(raft) = self.raft()
                    && let Err(e) = raft.initialize(voters).await
                {
                    tracing::debug!(error = %e, "raft initialize skipped");
                }
            }
        }
        Ok(())
    }

    /// The voters this cluster wants: the first N configured members.
    fn wanted_voters(&self) -> BTreeMap<u64, MetaNode> {
        let members = self.cluster.members();
        let n = voter_count(members.len());
        members
            .iter()
            .take(n)
            .cloned()
            .map(|m| {
                (
                    node_id(&m.name),
                    MetaNode {
                        name: m.name,
                        peer: m.peer,
                    },
                )
            })
            .collect()
    }

    /// The fixed shape of this cluster's metadata.
    pub(crate) fn shape(&self) -> crate::meta::state::Shape {
        crate::meta::state::Shape {
            partition_count: self.config.partition_count,
            backup_count: self.config.backup_count,
        }
    }

    /// Whether this node is the metadata leader now.
    pub fn is_meta_leader(&self) -> bool {
        self.raft().is_some_and(|r| {
            let m = r.metrics();
            let m = m.borrow();
            m.state == ServerState::Leader && m.current_leader == Some(m.id)
        })
    }

    /// The metadata leader as Raft's membership records it.
    fn leader_node(&self) -> Option<MetaNode> {
        let r = self.raft()?;
        let m = r.metrics();
        let m = m.borrow();
        let leader = m.current_leader?;
        m.membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.clone())
    }

    /// The name of the metadata leader, as this node knows it.
    pub fn meta_leader(&self) -> Option<String> {
        self.leader_node().map(|n| n.name)
    }

    /// The metadata group's voters (names).
    pub(crate) fn meta_voters(&self) -> Vec<String> {
        let Some(r) = self.raft() else {
            return Vec::new();
        };
        let m = r.metrics();
        let m = m.borrow();
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        let mut names: Vec<String> = m
            .membership_config
            .nodes()
            .filter(|(id, _)| voters.contains(id))
            .map(|(_, n)| n.name.clone())
            .collect();
        names.sort();
        names
    }

    /// The leader's current peer address (from the member list; Raft's
    /// stored address when the list lacks it).
    fn leader_peer(&self) -> Option<String> {
        let leader = self.leader_node()?;
        Some(
            self.cluster
                .members()
                .iter()
                .find(|&m| m.name == leader.name)
                .cloned()
                .map_or(leader.peer, |m| m.peer),
        )
    }

    /// Commits `cmd` through the leader (this node or a peer); returns the
    /// state machine's reply and the entry's log index.
    pub(crate) async fn propose(&self, cmd: MetaCmd) -> Result<(MetaReply, u64)> {
        self.propose_within(cmd, self.cluster.config().request_timeout)
            .await
    }

    /// [`Node::propose`], giving up after `timeout`.
    pub(crate) async fn propose_within(
        &self,
        cmd: MetaCmd,
        timeout: Duration,
    ) -> Result<(MetaReply, u64)> {
        let raft = self
            .raft()
            .ok_or_else(|| Error::Unavailable("metadata group not started".into()))?;
        if self.is_meta_leader() {
            return match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
                Ok(Ok(r)) => Ok((r.data, r.log_id.index)),
                Ok(Err(e)) => Err(Error::Unavailable(format!("metadata commit failed: {e}"))),
                Err(_) => Err(Error::Unavailable("metadata commit timed out".into())),
            };
        }
        let peer = self
            .leader_peer()
            .ok_or_else(|| Error::Unavailable("no metadata leader known".into()))?;
        match self.peers.call(&peer, Request::Meta(cmd), timeout).await? {
            Response::Meta { reply, index } => Ok((reply, index)),
            Response::Error(e) => Err(Error::Remote {
                reason: e.reason,
                message: e.message,
            }),
            _ => Err(Error::Internal("unexpected answer to a proposal".into())),
        }
    }

    /// A peer's proposal: committed if this node leads.
    pub(super) async fn on_meta(&self, cmd: MetaCmd) -> Response {
        if !self.is_meta_leader() {
            return Response::Error(Error::Unavailable("not the metadata leader".into()).to_wire());
        }
        match self.propose(cmd).await {
            Ok((reply, index)) => Response::Meta { reply, index },
            Err(e) => Response::Error(e.to_wire()),
        }
    }

    /// A Raft RPC from a peer.
    pub(super) async fn on_raft(&self, rpc: RaftRpc) -> Response {
        let Some(raft) = self.raft() else {
            return Response::Error(
                Error::Unavailable("metadata group not started".into()).to_wire(),
            );
        };
        let answer = match rpc {
            RaftRpc::Append(req) => {
                let r = raft.append_entries(req).await;
                // Any answer but "your vote is stale" comes from a current leader.
                if matches!(&r, Ok(a) if !matches!(a, openraft::raft::AppendEntriesResponse::HigherVote(_)))
                {
                    *self.leader_contact.lock() = Some(Instant::now());
                }
                RaftAnswer::Append(r)
            }
            RaftRpc::Vote(req) => RaftAnswer::Vote(raft.vote(req).await),
            RaftRpc::Snapshot(req) => RaftAnswer::Snapshot(raft.install_snapshot(req).await),
        };
        Response::Raft(Box::new(answer))
    }

    /// Waits until this node applied the log up to `index` (bounded), and
    /// makes that state the one its write path reads: a primary that just
    /// committed a backup into an in-sync set replicates its next write to it.
    pub(crate) async fn applied_up_to(&self, index: u64) -> bool {
        let mut rx = self.meta_store.subscribe();
        let wait = rx.wait_for(|a| a.index >= index);
        let done = matches!(
            tokio::time::timeout(self.cluster.config().request_timeout, wait).await,
            Ok(Ok(_))
        );
        let applied = self.meta_store.applied();
        self.cluster.set_meta(applied.index, applied.state);
        done
    }

    /// Installs every committed table as it is applied here.
    pub(super) async fn follow_meta(self: Arc<Self>) {
        let mut rx = self.meta_store.subscribe();
        loop {
            let applied = rx.borrow_and_update().clone();
            self.cluster.set_meta(applied.index, applied.state.clone());
            if let Some(t) = applied.state.table.clone()
                && t.epoch > self.epoch()
            {
                tracing::info!(
                    epoch = t.epoch,
                    members = t.members.len(),
                    "installing committed partition table"
                );
                self.install(t);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                changed = rx.changed() => if changed.is_err() { break },
            }
        }
    }

    /// The leader's round: Raft membership follows the configured members,
    /// and a new table is proposed when the plan differs from the committed one.
    pub(super) async fn lead(&self) {
        if let Some(raft) = self.raft()
            && let Err(fatal) = &raft.metrics().borrow().running_state
        {
            let mut failure = self.failure.lock();
            if failure.is_none() {
                tracing::error!(error = %fatal, "the metadata group stopped; the node is failed");
                *failure = Some(format!("metadata group stopped: {fatal}"));
            }
            return;
        }
        if !self.is_meta_leader() || !self.meta_caught_up() {
            return;
        }
        self.sync_raft_members().await;
        if let Some((table, reset)) = self.plan() {
            let base = self.cluster.meta().epoch();
            let cmd = MetaCmd::Table { base, table, reset };
            // Dry run on the committed state: a table the state machine
            // would refuse is not proposed (it would only fill the log).
            let mut dry = (*self.cluster.meta()).clone();
            if let MetaReply::Refused(why) = dry.apply(cmd.clone(), self.shape()) {
                tracing::error!(reason = %why, "planned table breaks a metadata rule; not proposed");
                return;
            }
            match self.propose(cmd).await {
                Ok((MetaReply::Done, _)) => {}
                Ok((MetaReply::Refused(why), _)) => {
                    tracing::error!(reason = %why, "planned table refused by the state machine")
                }
                Err(e) => tracing::debug!(error = %e, "table proposal failed"),
            }
        }
    }

    /// Adds configured members as learners, makes the first N the voters,
    /// and removes members no longer configured.
    async fn sync_raft_members(&self) {
        let Some(raft) = self.raft() else { return };
        let membership = raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        let known: BTreeSet<u64> = m.nodes().map(|(id, _)| *id).collect();
        let wanted_voters = self.wanted_voters();
        let configured: BTreeMap<u64, MetaNode> = self
            .cluster
            .members()
            .iter()
            .cloned()
            .map(|s| {
                (
                    node_id(&s.name),
                    MetaNode {
                        name: s.name,
                        peer: s.peer,
                    },
                )
            })
            .collect();
        for (id, node) in &configured {
            if !known.contains(id) {
                tracing::info!(member = %node.name, "adding raft learner");
                if let Err(e) = raft.add_learner(*id, node.clone(), false).await {
                    tracing::debug!(error = %e, "add learner failed");
                }
                return;
            }
        }
        let voters: BTreeSet<u64> = m.voter_ids().collect();
        let want: BTreeSet<u64> = wanted_voters.keys().copied().collect();
        if m.get_joint_config().len() > 1 {
            return;
        }
        if voters != want {
            tracing::info!(?want, ?voters, "changing raft voters");
            if let Err(e) = raft
                .change_membership(ChangeMembers::ReplaceAllVoters(want), true)
                .await
            {
                tracing::debug!(error = %e, "voter change failed");
            }
            return;
        }
        let stale: BTreeSet<u64> = known
            .iter()
            .filter(|id| !configured.contains_key(id) && !voters.contains(id))
            .copied()
            .collect();
        if !stale.is_empty()
            && let Err(e) = raft
                .change_membership(ChangeMembers::RemoveNodes(stale), true)
                .await
        {
            tracing::debug!(error = %e, "learner removal failed");
        }
    }

    /// Whether this node may acknowledge writes as a primary now: a majority
    /// of the members answered its heartbeats within the lease, and it is in
    /// contact with the metadata leader (it is the leader, or the leader's
    /// log reached it within the failure timeout: a leader election does
    /// not stop the majority's writes, while a node the leader cannot reach
    /// is failed over only after that timeout). Monotonic clocks only.
    pub(crate) fn lease_valid(&self) -> bool {
        self.lease_valid_at(Instant::now())
    }

    /// [`Node::lease_valid`] as of `now` (one clock read for a caller's
    /// several checks; a contact recorded after `now` counts as recent).
    pub(crate) fn lease_valid_at(&self, now: Instant) -> bool {
        let expected = self.cluster.members().len();
        if expected <= 1 {
            return true;
        }
        if !self
            .cluster
            .majority_answered_within(self.cluster.lease(), now)
        {
            return false;
        }
        if self.is_meta_leader() {
            // The leader: its own quorum of heartbeat answers above.
            return true;
        }
        let window = self.cluster.config().failure_timeout;
        self.leader_contact
            .lock()
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }
}

impl Node {
    /// A lone member: waits (bounded) until it leads its metadata group and
    /// its first table is committed and installed, so it serves at once.
    pub(super) async fn lead_alone(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.is_meta_leader() {
                self.lead().await;
                if self.epoch() > 0
                    && self.cluster.meta().epoch() == self.epoch()
                    && self.plan().is_none()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::warn!("a lone member did not commit its first table in time");
    }

    /// Whether this node's committed state has caught up with the log it
    /// holds (after a restart: before it serves as a primary).
    pub(crate) fn meta_caught_up(&self) -> bool {
        let Some(raft) = self.raft() else {
            return false;
        };
        let last = raft.metrics().borrow().last_log_index.unwrap_or(0);
        self.meta_store.applied().index >= last
    }
}
