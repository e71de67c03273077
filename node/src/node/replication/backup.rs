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
        from: &str,
        epoch: u64,
        p: u32,
        ops: Vec<ReplOp>,
    ) -> Response {
        self.catch_up_to(epoch).await;
        if let Err(e) = self.backup_check(from, epoch, p) {
            return refused(&e);
        }
        if !self.cluster.part(p).loaded.load(Ordering::SeqCst) {
            return refused(&Error::Unavailable(format!(
                "backup copy of partition {p} not in sync"
            )));
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

    /// One chunk of the primary's snapshot of `p`: chunk 0 replaces this
    /// backup copy, the next ones (strictly in order, from the same primary
    /// at the same epoch) add entries; the copy counts as loaded after the
    /// last. Anything out of order is refused and the primary starts over.
    pub(in crate::node) async fn on_snapshot(
        &self,
        from: &str,
        epoch: u64,
        p: u32,
        (chunk, last): (u32, bool),
        snapshot: PartitionSnapshot,
    ) -> Response {
        self.catch_up_to(epoch).await;
        if let Err(e) = self.backup_check(from, epoch, p) {
            return refused(&e);
        }
        let st = self.cluster.part(p);
        let _g = st.repl.lock().await;
        let expected = {
            let mut receiving = st.receiving.lock();
            let expected = match receiving.as_ref() {
                Some((f, e, next)) if f == from && *e == epoch => *next,
                _ => 0,
            };
            if chunk != 0 && chunk != expected {
                *receiving = None;
                None
            } else {
                *receiving = (!last).then(|| (from.to_string(), epoch, chunk.saturating_add(1)));
                Some(())
            }
        };
        if expected.is_none() {
            return refused(&Error::Unavailable(format!(
                "snapshot chunk {chunk} of partition {p} out of order"
            )));
        }
        if chunk == 0 {
            st.loaded.store(false, Ordering::SeqCst);
            if let Err(e) = self.log_snapshot(p, &snapshot).await {
                *st.receiving.lock() = None;
                return refused(&e);
            }
            self.install_copy(p, &snapshot);
        } else {
            let ops: Vec<ReplOp> = snapshot
                .collections
                .into_iter()
                .flat_map(|(collection, entries)| {
                    entries
                        .into_iter()
                        .map(move |(key, value, expires_at)| ReplOp::Put {
                            collection: collection.clone(),
                            key,
                            value,
                            expires_at,
                        })
                })
                .collect();
            let logged: Vec<(u32, ReplOp)> = ops.iter().map(|o| (p, o.clone())).collect();
            if let Err(e) = self.log_ops(&logged).await {
                *st.receiving.lock() = None;
                return refused(&e);
            }
            self.apply_ops(p, &ops);
        }
        tracing::trace!(
            partition = p,
            epoch,
            chunk,
            last,
            "snapshot chunk installed"
        );
        if last {
            st.loaded.store(true, Ordering::SeqCst);
        }
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
    /// (a refusal costs the write and a full resync of this backup). Only a
    /// few epochs ahead are waited for: a far-off epoch is refused at once.
    async fn catch_up_to(&self, epoch: u64) {
        let mine = self.epoch();
        if epoch <= mine || epoch - mine > 16 {
            return;
        }
        let patience =
            (self.cluster.config().replication_timeout / 2).min(Duration::from_millis(250));
        let deadline = tokio::time::Instant::now() + patience;
        while self.epoch() < epoch && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Replication of `p` is taken only from its primary in this node's
    /// table, at this node's epoch, by a backup of it.
    fn backup_check(&self, from: &str, epoch: u64, p: u32) -> Result<()> {
        let t = self.cluster.table();
        if p >= t.partition_count {
            return Err(Error::InvalidArgument(format!("no partition {p}")));
        }
        if epoch != t.epoch {
            if epoch > t.epoch.saturating_add(16) {
                tracing::warn!(
                    from,
                    epoch,
                    mine = t.epoch,
                    "replication at a far-off epoch refused"
                );
            }
            return Err(Error::Unavailable(format!(
                "epoch {epoch} is not this node's {}",
                t.epoch
            )));
        }
        if t.primary(p) != Some(from) {
            tracing::warn!(
                from,
                partition = p,
                "replication from a member that is not the primary refused"
            );
            return Err(Error::InvalidArgument(format!(
                "{from} is not the primary of partition {p}"
            )));
        }
        if t.role_of(self.cluster.me(), p) != Role::Backup {
            return Err(self.not_owner(p));
        }
        Ok(())
    }
}
