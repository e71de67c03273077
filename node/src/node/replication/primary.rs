//! The primary's write path: log, apply, replicate to every in-sync backup,
//! and acknowledge only if no table install overlapped the write.
//!
//! What an acknowledged write guarantees: it was applied on the primary and
//! on every backup the primary holds in sync, at the same table epoch. A
//! backup that fails to answer in time makes that write fail (its outcome is
//! indeterminate: it may be on the primary), is reported out of sync to a
//! majority of members before any later write is acknowledged without it, and
//! is repaired by a snapshot; while it is out of sync the partition is not
//! "safe" and the coordinator never promotes it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::table::{Role, Table};
use crate::error::{Error, Result};
use crate::net::message::{Request, Response};
use crate::node::Node;
use crate::replica::{ReplOp, Written};

impl Node {
    /// Applies `f` (a write to partitions `parts`, all primary here) and
    /// replicates what it changed to the in-sync backups before returning.
    pub(in crate::node) async fn write<R>(
        &self,
        table: &Table,
        parts: Vec<u32>,
        planned: Vec<(u32, ReplOp)>,
        apply: impl FnOnce(Vec<(u32, ReplOp)>) -> Result<(R, Written)>,
    ) -> Result<R> {
        self.write_with(table, parts, || Ok(((), planned)), |(), ops| apply(ops))
            .await
    }

    /// [`Node::write`] whose writes are planned under the partition locks:
    /// `plan` reads the partition's current state and decides (a
    /// conditional write), returning what it decided and the writes to log,
    /// apply and replicate (none: nothing is written).
    pub(in crate::node) async fn write_with<D, R>(
        &self,
        table: &Table,
        mut parts: Vec<u32>,
        plan: impl FnOnce() -> Result<(D, Vec<(u32, ReplOp)>)>,
        apply: impl FnOnce(D, Vec<(u32, ReplOp)>) -> Result<(R, Written)>,
    ) -> Result<R> {
        let c = &self.cluster;
        self.require_write_quorum()?;
        parts.sort_unstable();
        parts.dedup();
        let mut guards = Vec::with_capacity(parts.len());
        let t0 = std::time::Instant::now();
        for &p in &parts {
            guards.push(c.part(p).repl.lock().await);
        }
        if t0.elapsed() > Duration::from_millis(500) {
            tracing::warn!(elapsed = ?t0.elapsed(), ?parts, "slow partition lock");
        }
        let now = c.table();
        let stamp = match c.installs().stamp() {
            Some(stamp) if now.epoch == table.epoch => stamp,
            _ => return Err(Error::Unavailable("partition table changed; retry".into())),
        };
        for &p in &parts {
            if table.role_of(c.me(), p) != Role::Primary {
                return Err(self.not_owner(p));
            }
        }
        // Planned under the locks (a conditional write sees the state no
        // other write can change before it is applied), then written ahead.
        let (decided, planned) = plan()?;
        self.log_ops(&planned).await?;
        let (r, written) = apply(decided, planned)?;
        // Consequences known only after applying (LRU evictions, lock states).
        let after: Vec<(u32, ReplOp)> = written
            .evicted
            .iter()
            .chain(
                written
                    .ops
                    .iter()
                    .filter(|(_, op)| matches!(op, ReplOp::Lock { .. })),
            )
            .cloned()
            .collect();
        self.log_ops(&after).await?;
        let t1 = std::time::Instant::now();
        let rep = self.replicate(table, written.ops).await;
        if t1.elapsed() > Duration::from_millis(500) {
            tracing::warn!(elapsed = ?t1.elapsed(), ok = rep.is_ok(), "slow replication");
        }
        rep?;
        // A table install that began while this write ran may have changed
        // the partition's backups under it (install does not wait for the
        // partition lock, and publishes the table only at its end): then the
        // replication above may have skipped a backup that the new table
        // relies on, so the write is not acknowledged (it is indeterminate,
        // like a failed replication).
        if !c.installs().still_valid(stamp) {
            return Err(Error::Unavailable(
                "the partition table changed during the write; it may or may not have been applied"
                    .into(),
            ));
        }
        drop(guards);
        if !written.evicted_elsewhere.is_empty() {
            self.replicate_evictions(written.evicted_elsewhere).await;
        }
        Ok(r)
    }

    /// locks held by the caller); a failure marks the backup out of sync.
    pub(in crate::node) async fn replicate(
        &self,
        table: &Table,
        ops: Vec<(u32, ReplOp)>,
    ) -> Result<()> {
        if table.backup_count == 0 || ops.is_empty() {
            return Ok(());
        }
        let mut per_part: BTreeMap<u32, Vec<ReplOp>> = BTreeMap::new();
        for (p, op) in ops {
            per_part.entry(p).or_default().push(op);
        }
        let mut calls = Vec::new();
        for (p, ops) in per_part {
            let synced = self.cluster.part(p).synced.lock().clone();
            for b in table.backups(p).iter().filter(|b| synced.contains(*b)) {
                let Some(m) = table.member(b) else { continue };
                let req = Request::Replicate {
                    epoch: table.epoch,
                    partition: p,
                    ops: ops.clone(),
                };
                let (addr, name) = (m.peer.clone(), b.clone());
                calls.push(async move {
                    let r = self
                        .peers
                        .call(&addr, req, self.cluster.config().replication_timeout)
                        .await;
                    (p, name, r)
                });
            }
        }
        if calls.is_empty() {
            return Ok(());
        }
        let mut failed = Vec::new();
        for (p, b, r) in futures::future::join_all(calls).await {
            match r {
                Ok(Response::Ok) => {}
                Ok(Response::Error(e)) => {
                    tracing::debug!(partition = p, backup = %b, reason = e.reason, msg = %e.message, "replication refused");
                    failed.push((p, b));
                }
                Ok(_) | Err(_) => failed.push((p, b)),
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        self.report_unsynced(failed.clone()).await;
        Err(Error::Unavailable(format!(
            "replication to {} failed; the write may or may not have been applied",
            failed
                .iter()
                .map(|(p, b)| format!("{b}/p{p}"))
                .collect::<Vec<_>>()
                .join(",")
        )))
    }

    /// Replicates LRU evictions that landed in other partitions than the
    /// write's, each under its partition's lock (after the write's locks are
    /// released, so locks are never taken out of order). A failure marks the
    /// backup out of sync; anti-entropy repairs it.
    async fn replicate_evictions(&self, ops: Vec<(u32, ReplOp)>) {
        let mut per_part: BTreeMap<u32, Vec<(u32, ReplOp)>> = BTreeMap::new();
        for (p, op) in ops {
            per_part.entry(p).or_default().push((p, op));
        }
        for (p, ops) in per_part {
            let _g = self.cluster.part(p).repl.lock().await;
            let table = self.cluster.table();
            if table.role_of(self.cluster.me(), p) == Role::Primary
                && self.log_ops(&ops).await.is_ok()
            {
                let _ = self.replicate(&table, ops).await;
            }
        }
    }

    /// Marks backups out of sync and tells a majority before returning.
    pub(in crate::node) async fn report_unsynced(&self, pairs: Vec<(u32, String)>) {
        let c = &self.cluster;
        // Numbered before the backups leave the synced sets, so any snapshot
        // taken after carries a larger number and outranks this report.
        let seq = c.next_seq();
        for (p, b) in &pairs {
            c.part(*p).synced.lock().remove(b);
        }
        // (Not recorded here: as primary, this node's synced sets are the truth.)
        let (alive, _) = c.liveness();
        let calls = alive.iter().filter(|m| m.name != self.name()).map(|m| {
            let req = Request::Unsynced {
                name: self.name().to_string(),
                incarnation: c.me().incarnation,
                seq,
                pairs: pairs.clone(),
            };
            async move {
                self.peers
                    .call(&m.peer, req, c.config().replication_timeout)
                    .await
            }
        });
        futures::future::join_all(calls).await;
    }
}
