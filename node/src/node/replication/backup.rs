//! The backup side: ops and snapshots from a partition's primary, and the
//! digest anti-entropy compares.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::cluster::table::Role;
use crate::error::{Error, Result};
use crate::net::message::Response;
use crate::node::Node;
use crate::replica::{PartitionSnapshot, ReplOp};

/// An error as a peer answer.
fn refused(e: &Error) -> Response {
    Response::Error(e.to_wire())
}

impl Node {
    /// Applies a primary's ops to this backup copy of `p` (logged first).
    pub(in crate::node) async fn on_replicate(
        &self,
        epoch: u64,
        p: u32,
        ops: Vec<ReplOp>,
    ) -> Response {
        if let Err(e) = self.backup_check(epoch, p) {
            return refused(&e);
        }
        let _g = self.cluster.part(p).repl.lock().await;
        let logged: Vec<(u32, ReplOp)> = ops.iter().map(|o| (p, o.clone())).collect();
        if let Err(e) = self.log_ops(&logged).await {
            return refused(&e);
        }
        tracing::trace!(partition = p, epoch, ops = ?ops, "replicated ops applied");
        self.apply_ops(p, &ops);
        Response::Ok
    }

    /// Replaces this backup copy of `p` with the primary's snapshot.
    pub(in crate::node) async fn on_snapshot(
        &self,
        epoch: u64,
        p: u32,
        snapshot: PartitionSnapshot,
    ) -> Response {
        self.catch_up_to(epoch).await;
        let t = self.cluster.table();
        if epoch != t.epoch || t.role_of(self.cluster.me(), p) != Role::Backup {
            return refused(&self.not_owner(p));
        }
        let st = self.cluster.part(p);
        let _g = st.repl.lock().await;
        if let Err(e) = self.log_snapshot(p, &snapshot).await {
            return refused(&e);
        }
        tracing::trace!(partition = p, epoch, "snapshot installed");
        self.install_copy(p, &snapshot);
        st.loaded.store(true, Ordering::SeqCst);
        Response::Ok
    }

    /// The digest of this node's copy of `p`.
    pub(in crate::node) fn on_digest(&self, p: u32) -> Response {
        if p < self.store.partition_count() {
            Response::Digest(self.store.digest(p))
        } else {
            refused(&self.not_owner(p))
        }
    }

    /// A primary that sends a newer epoch than this node's installed one is
    /// ahead by an install in flight (the commit reaches members one by one):
    /// wait briefly for this node to install it rather than refuse the write
    /// (a refusal costs the write and a full resync of this backup).
    async fn catch_up_to(&self, epoch: u64) {
        if epoch <= self.epoch() {
            return;
        }
        let patience =
            (self.cluster.config().replication_timeout / 2).min(Duration::from_millis(250));
        let deadline = tokio::time::Instant::now() + patience;
        while self.epoch() < epoch && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn backup_check(&self, epoch: u64, p: u32) -> Result<()> {
        let t = self.cluster.table();
        if epoch != t.epoch {
            return Err(Error::Unavailable(format!(
                "epoch {epoch} is not this node's {}",
                t.epoch
            )));
        }
        if t.role_of(self.cluster.me(), p) != Role::Backup {
            return Err(self.not_owner(p));
        }
        if !self.cluster.part(p).loaded.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(format!(
                "backup copy of partition {p} not in sync"
            )));
        }
        Ok(())
    }
}
