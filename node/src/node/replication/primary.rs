//! The primary's write path: under the partition lock log, apply, stamp
//! the partition's next sequence number and queue the write to every
//! in-sync backup's stream; then, without the lock, wait for the backups'
//! answers and acknowledge only if no table install overlapped the write.
//!
//! Backups apply a partition's writes strictly in sequence order (a gap is
//! refused, and the backup is then removed from the ISR and re-synced by
//! snapshot), so a backup that answered for write N holds every write of
//! the partition before N as well: the partition lock orders writes, it
//! does not have to be held across the round trip.
//!
//! What an acknowledged write guarantees: it was applied on the primary and
//! on every member of the partition's committed in-sync set (ISR), at the
//! same table epoch, while the primary held its lease. A backup that fails
//! to answer in time is removed from the ISR through the metadata group
//! (committed) before the write is acknowledged without it; if that commit
//! fails (no leader, minority side) the write fails as indeterminate. A
//! removed backup is repaired by a snapshot and rejoins the ISR only by the
//! primary's committed word; promotion picks only from the ISR.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::cluster::table::{Role, Table};
use crate::error::{Error, Result};
use crate::meta::state::{MetaCmd, MetaReply};
use crate::net::message::ReplItem;
use crate::node::Node;
use crate::replica::{Ops, ReplOp, Written};

use super::stream::Acked;

/// A partition lock or replication round trip this long is logged.
const SLOW: Duration = Duration::from_millis(500);

/// A queued write's answer to come: (partition, backup, answer).
pub(in crate::node) type Pending = (u32, String, tokio::sync::oneshot::Receiver<Acked>);

/// A backup to remove from a partition's in-sync set, and why: the reason
/// starts with `refused:` (the backup refused a write), `unanswered:` (no
/// answer in time, connection lost, heartbeats stopped) or `anti-entropy:`
/// (its copy diverged or follows another stream).
pub(in crate::node) type Removal = (u32, String, String);

/// `ops` grouped per partition, in partition order (each group in the
/// order given). A write's ops are usually of one partition: no map then.
fn per_partition(ops: Ops) -> SmallVec<[(u32, Vec<ReplOp>); 1]> {
    match ops.first() {
        Some(&(first, _)) if ops.iter().all(|(p, _)| *p == first) => {
            smallvec::smallvec![(first, ops.into_iter().map(|(_, op)| op).collect())]
        }
        _ => {
            let mut groups: BTreeMap<u32, Vec<ReplOp>> = BTreeMap::new();
            for (p, op) in ops {
                groups.entry(p).or_default().push(op);
            }
            groups.into_iter().collect()
        }
    }
}

impl Node {
    /// Applies `f` (a write to partitions `parts`, all primary here) and
    /// replicates what it changed to the in-sync backups before returning.
    pub(in crate::node) async fn write<R>(
        &self,
        table: &Table,
        parts: &[u32],
        planned: Ops,
        apply: impl FnOnce(Ops) -> Result<(R, Written)>,
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
        parts: &[u32],
        plan: impl FnOnce() -> Result<(D, Ops)>,
        apply: impl FnOnce(D, Ops) -> Result<(R, Written)>,
    ) -> Result<R> {
        let c = &self.cluster;
        self.require_write_quorum()?;
        // Inline for the usual few partitions: no allocation per write.
        let mut parts: SmallVec<[u32; 4]> = SmallVec::from_slice(parts);
        parts.sort_unstable();
        parts.dedup();
        let mut guards: SmallVec<[_; 4]> = SmallVec::with_capacity(parts.len());
        for &p in &parts {
            let repl = &c.part(p).repl;
            // The clock is read only when the lock has to be waited for.
            match repl.try_lock() {
                Ok(g) => guards.push(g),
                Err(_) => {
                    let t0 = Instant::now();
                    guards.push(repl.lock().await);
                    if t0.elapsed() > SLOW {
                        tracing::warn!(elapsed = ?t0.elapsed(), partition = p, "slow partition lock");
                    }
                }
            }
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
        let applying = self.log_ops(&planned).await?;
        let (r, written) = apply(decided, planned)?;
        drop(applying);
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
        // Stamped and queued to the backups under the partition locks (so
        // in the order applied); the round trip is waited for without them.
        let acks = self.enqueue(table, written.ops).await;
        drop(guards);
        let t1 = Instant::now();
        let rep = match acks {
            Ok(acks) => self.await_acks(table, acks).await,
            Err(e) => Err(e),
        };
        let done = Instant::now();
        if done.saturating_duration_since(t1) > SLOW {
            tracing::warn!(elapsed = ?done.saturating_duration_since(t1), ok = rep.is_ok(), "slow replication");
        }
        rep?;
        if !self.lease_valid_at(done) {
            // Applied here already: indeterminate, not QUORUM_LOST (which
            // clients may retry as "refused before anything was applied").
            return Err(Error::Unavailable(
                "this primary's lease lapsed during the write; it may or may not have been applied"
                    .into(),
            ));
        }
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
        if !written.evicted_elsewhere.is_empty() {
            Box::pin(self.replicate_evictions(written.evicted_elsewhere)).await;
        }
        Ok(r)
    }

    /// Stamps `ops` (applied here, partition locks held by the caller) with
    /// their partitions' next sequence numbers and queues them to every
    /// committed in-sync backup; the receivers yield the backups' answers.
    /// Every applied write takes a sequence number, sent or not, so a
    /// backup that misses one sees the gap.
    pub(in crate::node) async fn enqueue(&self, table: &Table, ops: Ops) -> Result<Vec<Pending>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        if table.backup_count == 0 {
            // Nothing to queue: only the numbers are taken (each written
            // partition once, as below), without grouping the ops.
            let mut taken: Vec<u32> = Vec::new();
            for &(p, _) in &ops {
                if !taken.contains(&p) {
                    self.next_seq(p, table.epoch);
                    if ops.len() > 1 {
                        taken.push(p);
                    }
                }
            }
            return Ok(Vec::new());
        }
        // Every write takes its number, backups or not: a copy's stream
        // position must account for every write it applied (a demoted
        // primary is followed on by its position).
        let stamped: SmallVec<[_; 1]> = per_partition(ops)
            .into_iter()
            .map(|(p, ops)| {
                let (stream, seq) = self.next_seq(p, table.epoch);
                (p, stream, seq, ops)
            })
            .collect();
        if table.backup_count == 0 {
            return Ok(Vec::new());
        }
        let meta = self.cluster.meta();
        if meta.epoch() != table.epoch {
            return Err(Error::Unavailable(
                "the partition table is changing; the write may or may not have been applied"
                    .into(),
            ));
        }
        let mut pending = Vec::new();
        for (p, stream, seq, ops) in stamped {
            let expanding = self.cluster.part(p).expanding.lock().clone();
            let targets: SmallVec<[&String; 2]> = table
                .backups(p)
                .iter()
                .filter(|b| meta.in_sync(p, b) || expanding.contains(*b))
                .collect();
            // The last backup takes the ops themselves, the others a copy.
            let last = targets.len().saturating_sub(1);
            let mut ops = Some(ops);
            for (i, b) in targets.into_iter().enumerate() {
                let Some(m) = table.member(b) else { continue };
                let ops = if i == last { ops.take() } else { ops.clone() };
                let item = ReplItem {
                    partition: p,
                    epoch: table.epoch,
                    stream,
                    seq,
                    ops: ops.unwrap_or_default(),
                };
                let rx = self.streams.send(&m.peer, item).await;
                pending.push((p, b.clone(), rx));
            }
        }
        Ok(pending)
    }

    /// The next sequence number of partition `p`'s stream (a new stream
    /// at the first write of this node's tenure as primary); call under
    /// the partition lock.
    pub(in crate::node) fn next_seq(&self, p: u32, epoch: u64) -> (u64, u64) {
        let st = self.cluster.part(p);
        *st.stamped_at.lock() = Some(std::time::Instant::now());
        let mut s = st.stream.lock();
        if s.0 == 0 {
            *s = (self.cluster.tenure_stream_of(p, epoch), 0);
        }
        s.1 += 1;
        *s
    }

    /// How long a write waits for its backups' answers: a frame's own
    /// timeout, plus as long again queued behind others.
    pub(in crate::node) fn ack_wait(&self) -> Duration {
        self.cluster.config().replication_timeout * 2
    }

    /// Waits for the backups' answers to queued writes; a backup that
    /// refused or did not answer is removed from the ISR (committed) before
    /// this returns Ok.
    pub(in crate::node) async fn await_acks(
        &self,
        table: &Table,
        acks: Vec<Pending>,
    ) -> Result<()> {
        if acks.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.ack_wait();
        let mut failed: Vec<Removal> = Vec::new();
        let mut unreachable: Vec<String> = Vec::new();
        for (p, b, rx) in acks {
            let why = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Acked::Applied)) => continue,
                Ok(Ok(Acked::Refused(e))) => {
                    tracing::debug!(partition = p, backup = %b, reason = e.reason, msg = %e.message, "replication refused");
                    // The backup's own words, cut short (a peer's text).
                    let said: String = e.message.chars().take(200).collect();
                    failed.push((p, b, format!("refused: {said}")));
                    continue;
                }
                Ok(Ok(Acked::Lost(why))) => {
                    tracing::debug!(partition = p, backup = %b, %why, "replication lost");
                    format!("unanswered: {why}")
                }
                Ok(Err(_)) => "unanswered: stream ended".to_string(),
                Err(_) => "unanswered: no answer in time".to_string(),
            };
            if !unreachable.contains(&b) {
                unreachable.push(b.clone());
            }
            failed.push((p, b, why));
        }
        let mut shrink = failed.clone();
        for b in &unreachable {
            for (p, m) in self.isr_places(table, b) {
                if !shrink.iter().any(|(q, n, _)| *q == p && *n == m) {
                    shrink.push((p, m, "unanswered: on another partition".into()));
                }
            }
        }
        if failed.is_empty() || Box::pin(self.shrink_isr(table, &shrink)).await {
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "replication to {} failed; the write may or may not have been applied",
            failed
                .iter()
                .map(|(p, b, _)| format!("{b}/p{p}"))
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
            let g = self.cluster.part(p).repl.lock().await;
            let table = self.cluster.table();
            if table.role_of(self.cluster.me(), p) == Role::Primary
                && self.log_ops(&ops).await.is_ok()
            {
                let acks = self.enqueue(&table, ops.into()).await;
                drop(g);
                if let Ok(acks) = acks {
                    let _ = self.await_acks(&table, acks).await;
                }
            }
        }
    }

    /// Removes backups from their partitions' committed in-sync sets (one
    /// committed command per backup), each `(partition, backup, why)`; true
    /// when every removal was committed (or already true). The reasons are
    /// logged with the removal: a backup that was refused, did not answer or
    /// diverged (see [`Removal`] for their prefixes).
    pub(in crate::node) async fn shrink_isr(&self, table: &Table, pairs: &[Removal]) -> bool {
        if !self.lease_valid() {
            // Cut off from the majority: nothing can commit; fail the write
            // now rather than wait for a commit that cannot happen.
            return false;
        }
        let timeout = self.cluster.config().replication_timeout;
        let mut per_member: BTreeMap<&str, (Vec<u32>, Vec<&str>)> = BTreeMap::new();
        for (p, b, why) in pairs {
            let (parts, whys) = per_member.entry(b.as_str()).or_default();
            parts.push(*p);
            // A few distinct reasons are enough to tell what happened.
            if whys.len() < 3 && !whys.contains(&why.as_str()) {
                whys.push(why);
            }
        }
        let calls = per_member.into_iter().map(|(b, (partitions, whys))| {
            let n = partitions.len();
            let why = whys.join("; ");
            let cmd = MetaCmd::Shrink {
                epoch: table.epoch,
                partitions,
                primary: self.name().to_string(),
                member: b.to_string(),
            };
            async move {
                match self.propose_within(cmd, timeout).await {
                    Ok((MetaReply::Done, _)) => {
                        tracing::info!(backup = %b, partitions = n, why = %why, "backup left the in-sync sets");
                        self.metrics.isr_removed(n as u64);
                        true
                    }
                    Ok((MetaReply::Refused(why), _)) => {
                        tracing::debug!(backup = %b, reason = %why, "in-sync removal refused");
                        false
                    }
                    Err(e) => {
                        tracing::debug!(backup = %b, error = %e, "in-sync removal not committed");
                        false
                    }
                }
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    /// Every partition this node is primary of under `table` in whose
    /// committed ISR `member` is: when a backup stops answering, it leaves
    /// all of them at once, so later writes do not each wait for it.
    pub(in crate::node) fn isr_places(&self, table: &Table, member: &str) -> Vec<(u32, String)> {
        let meta = self.cluster.meta();
        (0..table.partition_count)
            .filter(|&p| {
                table.role_of(self.cluster.me(), p) == Role::Primary && meta.in_sync(p, member)
            })
            .map(|p| (p, member.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::per_partition;
    use crate::replica::{Ops, ReplOp};

    fn del(key: &str) -> ReplOp {
        ReplOp::Delete {
            collection: "c".into(),
            key: Bytes::copy_from_slice(key.as_bytes()),
        }
    }

    /// One partition's ops stay one group, in order; ops of several
    /// partitions are grouped per partition in partition order, each group
    /// keeping the order it was given (the order the backups apply).
    #[test]
    fn ops_are_grouped_per_partition_keeping_their_order() {
        let one: Ops = [(7, del("a")), (7, del("b")), (7, del("c"))]
            .into_iter()
            .collect();
        let groups = per_partition(one);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0], (7, vec![del("a"), del("b"), del("c")]));

        let mixed: Ops = [(9, del("a")), (2, del("b")), (9, del("c")), (2, del("d"))]
            .into_iter()
            .collect();
        let groups: Vec<_> = per_partition(mixed).into_iter().collect();
        assert_eq!(
            groups,
            vec![(2, vec![del("b"), del("d")]), (9, vec![del("a"), del("c")]),]
        );
        assert!(per_partition(Ops::new()).is_empty());
    }
}
