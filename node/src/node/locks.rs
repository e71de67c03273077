//! Locks on the primary: replicating a lock's state after each change, and
//! the quorum rule for new grants. The lock commands themselves run through
//! the one command path (`commands.rs`).

use bytes::Bytes;

use crate::cluster::table::Table;
use crate::error::{Error, Result};
use crate::locking::Grant;
use crate::node::Node;
use crate::replica::{ReplOp, Written};

impl Node {
    /// A lock is granted only by a primary that sees a majority.
    pub(super) fn require_quorum(&self) -> Result<()> {
        if self.cluster.quorum() {
            Ok(())
        } else {
            Err(Error::QuorumLost("no majority".into()))
        }
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
        self.write(table, vec![p], Vec::new(), |_| {
            let state = self.locks.replica(key);
            let ops = vec![(
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
