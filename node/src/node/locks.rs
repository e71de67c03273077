//! Locks on the primary: replicating a lock's state after each change, and
//! the quorum rule for new grants. The lock commands themselves run through
//! the one command path (`commands.rs`).

use bytes::Bytes;

use crate::cluster::table::Table;
use crate::error::{Error, Result};
use crate::locking::Grant;
use crate::node::Node;
use crate::replica::{Ops, ReplOp, Written};

impl Node {
    /// A write (or a lock grant) is refused at once by a node that does not
    /// see a majority of the expected members.
    pub(in crate::node) fn require_write_quorum(&self) -> Result<()> {
        let now = std::time::Instant::now();
        if !self.cluster.quorum_at(now) {
            return Err(Error::QuorumLost(format!(
                "{} sees less than a majority of the expected members",
                self.name()
            )));
        }
        if !self.lease_valid_at(now) {
            return Err(Error::QuorumLost(format!(
                "{} holds no primary lease (no recent majority or metadata leader contact)",
                self.name()
            )));
        }
        Ok(())
    }

    /// Replicates a new grant; if that fails the grant is withdrawn here.
    pub(super) async fn replicate_grant(
        &self,
        table: &Table,
        p: u32,
        key: &Bytes,
        g: Grant,
    ) -> Result<()> {
        if let Err(e) = self.replicate_lock(table, p, key).await {
            let _ = self.locks.release(key, g.token);
            return Err(e);
        }
        Ok(())
    }

    /// Replicates `key`'s lock state (after a change on this primary).
    pub(super) async fn replicate_lock(&self, table: &Table, p: u32, key: &Bytes) -> Result<()> {
        self.write(table, &[p], Ops::new(), |_| {
            let state = self.locks.replica(key);
            let ops = smallvec::smallvec![(
                p,
                ReplOp::Lock {
                    key: key.clone(),
                    state,
                },
            )];
            Ok((
                (),
                Written {
                    ops,
                    ..Written::default()
                },
            ))
        })
        .await
    }
}
