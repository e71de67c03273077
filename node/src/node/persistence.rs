//! Persistence: rebuilding a node from its write-ahead log, checkpoints,
//! and the one place writes and collection changes become log records.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cluster::table::{Role, Table};
use crate::error::Result;
use crate::net::message::CollectionOp;
use crate::node::Node;
use crate::replica::{PartitionSnapshot, ReplOp};
use crate::storage::wal::{Applying, WalRecord};

/// The log record of a collection-registry change.
pub(super) fn collection_record(op: &CollectionOp) -> WalRecord {
    match op {
        CollectionOp::Create {
            name,
            default_ttl_ms,
            max_entries,
        } => WalRecord::CreateCollection {
            name: name.clone(),
            default_ttl_ms: *default_ttl_ms,
            max_entries: *max_entries,
        },
        CollectionOp::Delete { name } => WalRecord::DeleteCollection { name: name.clone() },
    }
}

impl Node {
    /// Logs `ops` (grouped per partition, in order) and waits for the log.
    /// Keep what it returns until `ops` are applied ([`Applying`]; none
    /// when nothing was logged), and take no other log guard meanwhile.
    pub(in crate::node) async fn log_ops(
        &self,
        ops: &[(u32, ReplOp)],
    ) -> Result<Option<Applying<'_>>> {
        let Some(wal) = &self.wal else {
            return Ok(None);
        };
        if ops.is_empty() {
            return Ok(None);
        }
        let applying = wal.applying().await;
        wal.append_ops(ops).await?;
        Ok(Some(applying))
    }

    /// Logs a collection-registry change and waits for the log; keep what
    /// it returns until the change is applied (as [`Node::log_ops`]).
    pub(in crate::node) async fn log_collection(
        &self,
        op: &CollectionOp,
    ) -> Result<Option<Applying<'_>>> {
        let Some(wal) = &self.wal else {
            return Ok(None);
        };
        let applying = wal.applying().await;
        wal.append(&collection_record(op)).await?;
        Ok(Some(applying))
    }

    /// Logs a received snapshot of partition `p` and waits for the log;
    /// keep what it returns until the copy is installed (as [`Node::log_ops`]).
    pub(in crate::node) async fn log_snapshot(
        &self,
        p: u32,
        snapshot: &PartitionSnapshot,
    ) -> Result<Option<Applying<'_>>> {
        let Some(wal) = &self.wal else {
            return Ok(None);
        };
        let applying = wal.applying().await;
        let rec = WalRecord::Install {
            partition: p,
            snapshot: snapshot.clone(),
        };
        wal.append(&rec).await?;
        Ok(Some(applying))
    }

    /// Applies replicated (or replayed) ops to this node's copy of `p`.
    pub(in crate::node) fn apply_ops(&self, p: u32, ops: &[ReplOp]) {
        self.store.apply(p, ops);
        for op in ops {
            if let ReplOp::Lock { key, state } = op {
                self.locks.apply_replica(key, *state);
            }
        }
    }

    /// Replaces this node's copy of `p` (entries and locks) with `snapshot`.
    pub(in crate::node) fn install_copy(&self, p: u32, snapshot: &PartitionSnapshot) {
        self.store.install(p, snapshot);
        self.locks
            .install(p, &snapshot.locks, snapshot.lock_high_water);
    }

    /// The whole partition `p` (entries and locks) as a snapshot.
    pub(in crate::node) fn snapshot_of(&self, p: u32) -> PartitionSnapshot {
        let mut snapshot = self.store.snapshot(p);
        snapshot.locks = self.locks.snapshot(p);
        snapshot.lock_high_water = self.locks.high_water(p);
        snapshot
    }

    /// Logs what an install changed here (dropped partitions, the table)
    /// without waiting.
    pub(in crate::node) fn log_install(&self, dropped: &[u32], table: &Table) {
        if let Some(wal) = &self.wal {
            let mut recs: Vec<WalRecord> = dropped
                .iter()
                .map(|p| WalRecord::Drop { partition: *p })
                .collect();
            if let Ok(t) = rmp_serde::to_vec(table) {
                recs.push(WalRecord::Table(t.into()));
            }
            wal.append_nowait(&recs);
        }
    }

    /// Rebuilds state from recovered log records (in log order).
    pub(super) fn replay(&self, records: Vec<WalRecord>) {
        if records.is_empty() {
            return;
        }
        let mut table: Option<Table> = None;
        let count = self.store.partition_count();
        for r in records {
            let part = match &r {
                WalRecord::Ops { partition, .. }
                | WalRecord::Install { partition, .. }
                | WalRecord::Drop { partition } => Some(*partition),
                _ => None,
            };
            if part.is_some_and(|p| p >= count) {
                tracing::warn!(partition = ?part, count, "WAL record for a partition this node does not have; skipped");
                continue;
            }
            match r {
                WalRecord::Ops { partition, ops } => self.apply_ops(partition, &ops),
                WalRecord::Install {
                    partition,
                    snapshot,
                } => self.install_copy(partition, &snapshot),
                WalRecord::Drop { partition } => {
                    self.store.drop_partition(partition);
                    self.locks.install(partition, &[], 0);
                }
                WalRecord::CreateCollection {
                    name,
                    default_ttl_ms,
                    max_entries,
                } => {
                    let _ = self
                        .store
                        .get_or_create_collection(&name, default_ttl_ms, max_entries);
                }
                WalRecord::DeleteCollection { name } => {
                    let _ = self.store.delete_collection(&name);
                }
                WalRecord::Table(bytes) => match rmp_serde::from_slice::<Table>(&bytes) {
                    Ok(t) => table = Some(t),
                    Err(e) => tracing::warn!(error = %e, "WAL: unreadable table record ignored"),
                },
            }
        }
        if let Some(t) = table.filter(|t| t.partition_count == self.store.partition_count()) {
            // Everything this node held at that epoch is in its log: its
            // replicas are loaded. Peers with newer tables override it.
            let mut primaries = 0;
            for p in 0..t.partition_count {
                match t.role_of(self.cluster.me(), p) {
                    Role::Primary => {
                        primaries += 1;
                        self.store.index_partition(p);
                        self.cluster.part(p).loaded.store(true, Ordering::SeqCst);
                    }
                    Role::Backup => self.cluster.part(p).loaded.store(true, Ordering::SeqCst),
                    Role::None => {}
                }
            }
            self.store.set_primaries(primaries);
            self.locks.set_epoch(t.epoch);
            self.cluster.mark_restored();
            if self.cluster.members().len() > 1 {
                self.cluster.set_current(false);
            }
            tracing::info!(
                epoch = t.epoch,
                primaries,
                "partition table restored from the WAL"
            );
            self.cluster.set_table(Arc::new(t));
        }
    }

    /// Writes a checkpoint of the whole state and drops the log it replaces.
    pub async fn checkpoint(&self) -> Result<u64> {
        let Some(wal) = &self.wal else { return Ok(0) };
        let bytes = wal
            .checkpoint(|| {
                let mut recs = Vec::new();
                for m in self.store.list_collections() {
                    recs.push(collection_record(&CollectionOp::Create {
                        name: m.name.to_string(),
                        default_ttl_ms: m.default_ttl_ms,
                        max_entries: m.max_entries,
                    }));
                }
                for p in 0..self.store.partition_count() {
                    let snapshot = self.snapshot_of(p);
                    if !snapshot.collections.is_empty() || !snapshot.locks.is_empty() {
                        recs.push(WalRecord::Install {
                            partition: p,
                            snapshot,
                        });
                    }
                }
                if let Ok(t) = rmp_serde::to_vec(&*self.cluster.table()) {
                    recs.push(WalRecord::Table(t.into()));
                }
                recs
            })
            .await?;
        Ok(bytes)
    }
}
