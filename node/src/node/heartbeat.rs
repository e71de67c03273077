//! Heartbeats: every round, this node's heartbeat to every member. Their
//! answers record liveness, renew this node's lease (a majority answered)
//! and carry their wall clocks for the offset check. Tables are never taken
//! from heartbeats: only committed metadata changes them. Inbound
//! heartbeats are answered, never recorded.

use std::time::Instant;

use crate::net::message::{Request, Response};
use crate::node::Node;

impl Node {
    pub(super) async fn heartbeat_round(&self) {
        self.cluster.apply_gone();
        let quorum = self.cluster.quorum();
        let hb = self.cluster.heartbeat(quorum);
        let timeout = self.cluster.config().heartbeat_interval * 2;
        let sent = Instant::now();
        let sent_wall = hb.wall_ms;
        let members = self.cluster.members();
        let calls = members
            .iter()
            .filter(|&m| m.name != self.name())
            .cloned()
            .map(|m| {
                let hb = hb.clone();
                async move {
                    let r = self
                        .peers
                        .call(&m.peer, Request::Heartbeat(hb), timeout)
                        .await;
                    (m, r)
                }
            });
        for (m, r) in futures::future::join_all(calls).await {
            if let Ok(Response::Heartbeat(mut theirs)) = r
                && theirs.name == m.name
            {
                let count = self.store.partition_count();
                theirs.unloaded.retain(|p| *p < count);
                theirs.unloaded.truncate(count as usize);
                self.note_clock(&m.name, sent, sent_wall, theirs.wall_ms);
                self.cluster.record(theirs);
                self.cluster.record_answer(&m.name, sent);
            }
        }
        self.check_clock();
        let (came, went) = self.cluster.liveness_changes();
        for m in went {
            tracing::warn!(member = %m, timeout = ?self.cluster.config().failure_timeout, "member failed: no heartbeat answer within the failure timeout");
        }
        for m in came {
            tracing::info!(member = %m, "member answering heartbeats");
        }
        if !self.cluster.is_current() && self.lease_valid() && self.meta_caught_up() {
            tracing::info!(
                epoch = self.epoch(),
                "in contact with the metadata leader: serving"
            );
            self.cluster.set_current(true);
        }
    }

    /// A peer's heartbeat (its sender checked by the peer gate): answered
    /// with this node's. Nothing in it is kept: what this node knows of a
    /// member (alive, incarnation, leaving, clock) comes only from the
    /// member's answers to this node's own heartbeats, sent to the address
    /// the membership provider gives, so a frame in another member's name
    /// can neither drain it nor fail it over.
    pub(super) fn on_heartbeat(&self) -> Response {
        let c = &self.cluster;
        Response::Heartbeat(c.heartbeat(c.quorum()))
    }
}
