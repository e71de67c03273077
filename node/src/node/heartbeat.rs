//! Heartbeats: every round, this node's heartbeat to every member. Their
//! answers record liveness, renew this node's lease (a majority answered)
//! and carry their wall clocks for the offset check. Tables are never taken
//! from heartbeats: only committed metadata changes them.

use std::time::Instant;

use crate::net::message::{Heartbeat, Request, Response};
use crate::node::Node;

impl Node {
    pub(super) async fn heartbeat_round(&self) {
        self.cluster.apply_gone();
        let quorum = self.cluster.quorum();
        let hb = self.cluster.heartbeat(quorum);
        let timeout = self.cluster.config().heartbeat_interval * 2;
        let sent = Instant::now();
        let sent_wall = hb.wall_ms;
        let calls = self
            .cluster
            .members()
            .into_iter()
            .filter(|m| m.name != self.name())
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
        if !self.cluster.is_current() && self.lease_valid() && self.meta_caught_up() {
            tracing::info!(
                epoch = self.epoch(),
                "in contact with the metadata leader: serving"
            );
            self.cluster.set_current(true);
        }
    }

    /// A peer's heartbeat: recorded and answered with this node's. Only
    /// configured members are heard (a made-up name is refused, nothing
    /// kept), and the partition list it carries is bounded.
    pub(super) async fn on_heartbeat(&self, mut hb: Heartbeat) -> Response {
        let c = &self.cluster;
        if hb.name == self.name() || !c.members().iter().any(|m| m.name == hb.name) {
            tracing::debug!(name = %hb.name, "heartbeat from a non-member refused");
            return Response::Error(
                crate::error::Error::InvalidArgument(format!(
                    "{:?} is not a member of this cluster",
                    hb.name
                ))
                .to_wire(),
            );
        }
        let count = self.store.partition_count();
        hb.unloaded.retain(|p| *p < count);
        hb.unloaded.truncate(count as usize);
        c.record(hb);
        Response::Heartbeat(c.heartbeat(c.quorum()))
    }
}
