//! Heartbeats: every round, this node's heartbeat to every member; their
//! answers record liveness, and a newer table is adopted.

use std::sync::atomic::Ordering;

use crate::net::message::{Heartbeat, Request, Response};
use crate::node::Node;

impl Node {
    pub(super) async fn heartbeat_round(&self) {
        self.cluster.apply_gone();
        let quorum = self.cluster.quorum();
        let hb = self.cluster.heartbeat(quorum);
        let timeout = self.cluster.config().heartbeat_interval * 2;
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
        let my_epoch = self.epoch();
        if self
            .rounds
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(10)
        {
            self.pull_collections().await;
        }
        let expected = self.cluster.members().len();
        let mut not_newer = 1;
        for (m, r) in futures::future::join_all(calls).await {
            if let Ok(Response::Heartbeat(theirs)) = r {
                let newer = theirs.epoch > my_epoch;
                self.cluster.record(theirs);
                if newer {
                    self.adopt_table_from(&m.peer).await;
                } else {
                    not_newer += 1;
                }
            }
        }
        if !self.cluster.is_current() && not_newer > expected / 2 {
            tracing::info!(epoch = my_epoch, "a majority has no newer table: serving");
            self.cluster.set_current(true);
        }
    }

    /// Installs `peer`'s table (it reported a newer epoch).
    async fn adopt_table_from(&self, peer: &str) {
        let timeout = self.cluster.config().request_timeout;
        if let Ok(Response::Table(Some(t))) =
            self.peers.call(peer, Request::GetTable, timeout).await
        {
            self.install(t);
        }
    }

    /// A peer's heartbeat: recorded, answered with this node's, and a newer
    /// table it reports is adopted.
    pub(super) async fn on_heartbeat(&self, hb: Heartbeat) -> Response {
        let c = &self.cluster;
        let newer = hb.epoch > self.epoch();
        let from = hb.name.clone();
        c.record(hb);
        let reply = Response::Heartbeat(c.heartbeat(c.quorum()));
        if newer && let Some(m) = c.members().into_iter().find(|m| m.name == from) {
            self.adopt_table_from(&m.peer).await;
        }
        reply
    }

    /// This node's table as a peer answer (None before the first install).
    pub(super) fn table_answer(&self) -> Response {
        let t = self.cluster.table();
        Response::Table((t.epoch > 0).then(|| (*t).clone()))
    }
}
