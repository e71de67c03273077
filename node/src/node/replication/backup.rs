//! The backup side: ops and snapshots from a partition's primary, and the
//! digest anti-entropy compares.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::cluster::table::Role;
use crate::cluster::{Follows, tenure_stream};
use crate::error::{Error, Result};
use crate::net::message::{ReplItem, Response};
use crate::node::Node;
use crate::replica::{PartitionSnapshot, ReplOp};

/// Whether `item` is the next write of the stream a copy at `follows`
/// takes (`epoch`: this node's table epoch): Ok(true) apply it, Ok(false)
/// already held, Err refused (another stream, or a gap).
///
/// The first write (seq 1) of a new tenure's stream stamped at this node's
/// current epoch is also taken by a copy at exactly the position the
/// tenure was derived from ([`tenure_stream`]: the new primary's copy held
/// the same writes; this is how a demoted primary keeps following), and by a
/// copy that follows a stream contiguously: of another primary (a co-backup
/// after a promotion: both were in the in-sync set, so both hold every
/// acknowledged write), or a newer stream of the same primary (a restart from
/// its log). Older streams, stale epochs and later sequence numbers of
/// unknown streams are refused.
fn next_of(follows: &Follows, from: &str, item: &ReplItem, epoch: u64) -> Result<bool> {
    let p = item.partition;
    match follows {
        Follows::Stream {
            from: f,
            stream,
            seq,
        } if f == from && *stream == item.stream => {
            if item.seq <= *seq {
                Ok(false)
            } else if item.seq == *seq + 1 {
                Ok(true)
            } else {
                Err(Error::Unavailable(format!(
                    "partition {p}: write {} arrived after {seq} (a gap); needs a snapshot",
                    item.seq
                )))
            }
        }
        // The first write of a tenure derived from exactly this copy's
        // position: the new primary's copy held the same writes.
        Follows::Stream { stream, seq, .. } | Follows::Demoted { stream, seq }
            if item.seq == 1
                && item.epoch == epoch
                && item.stream == tenure_stream(from, (*stream, *seq), epoch) =>
        {
            Ok(true)
        }
        Follows::Stream {
            from: f, stream, ..
        } if item.seq == 1 && item.epoch == epoch && (f != from || item.stream > *stream) => {
            Ok(true)
        }
        Follows::Fresh if item.seq == 1 => Ok(true),
        _ => Err(Error::Unavailable(format!(
            "partition {p}: this copy does not follow {from}'s stream; needs a snapshot"
        ))),
    }
}

/// An error as a peer answer.
fn refused(e: &Error) -> Response {
    Response::Error(e.to_wire())
}

impl Node {
    /// Applies one frame of `from`'s replication stream, answered item by
    /// item. Each item is applied only if it is the next write of the
    /// stream its partition's copy follows (a write already held is
    /// answered Ok again); the frame's accepted writes are logged with one
    /// WAL append, then applied in order, under their partitions' locks.
    pub(in crate::node) async fn on_replicate(&self, from: &str, items: Vec<ReplItem>) -> Response {
        let mut results: Vec<Option<Error>> = Vec::with_capacity(items.len());
        // One wait for the whole frame, however many of its items are ahead.
        let deadline = self.catch_up_deadline();
        for item in &items {
            self.catch_up_to(item.epoch, deadline).await;
            results.push(self.stream_check(from, item.epoch, item.partition).err());
        }
        let mut parts: Vec<u32> = items
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| i.partition)
            .collect();
        parts.sort_unstable();
        parts.dedup();
        let mut guards = Vec::with_capacity(parts.len());
        for &p in &parts {
            guards.push(self.cluster.part(p).repl.lock().await);
        }
        // Decide every item against the partitions' positions as the
        // earlier items of this frame leave them.
        let mut at: std::collections::HashMap<u32, Follows> = parts
            .iter()
            .map(|&p| (p, self.cluster.part(p).follows.lock().clone()))
            .collect();
        let mut accepted = Vec::new();
        let epoch = self.cluster.table().epoch;
        for (i, item) in items.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let p = item.partition;
            if !self.cluster.part(p).loaded.load(Ordering::SeqCst) {
                results[i] = Some(Error::Unavailable(format!(
                    "backup copy of partition {p} not in sync"
                )));
                continue;
            }
            let Some(follows) = at.get_mut(&p) else {
                continue;
            };
            match next_of(follows, from, item, epoch) {
                Ok(true) => {
                    match follows {
                        // The usual case: the next write of the stream it follows.
                        Follows::Stream {
                            from: f,
                            stream,
                            seq,
                        } if f == from && *stream == item.stream => *seq = item.seq,
                        _ => {
                            *follows = Follows::Stream {
                                from: from.to_string(),
                                stream: item.stream,
                                seq: item.seq,
                            }
                        }
                    }
                    accepted.push(i);
                }
                Ok(false) => {}
                Err(e) => {
                    // A gap in the stream this copy follows breaks it: it
                    // takes nothing more until a snapshot. A write of some
                    // other stream (stale, or forged) changes nothing.
                    let broken = match &*follows {
                        Follows::Stream {
                            from: f, stream, ..
                        } => f == from && *stream == item.stream,
                        Follows::Fresh | Follows::Demoted { .. } => true,
                        Follows::Nothing => false,
                    };
                    if broken {
                        tracing::debug!(partition = p, seq = item.seq, error = %e, "replication gap: re-sync needed");
                        *follows = Follows::Nothing;
                    }
                    results[i] = Some(e);
                }
            }
        }
        // The ops to log (none without a log: nothing to copy).
        let logged: Vec<(u32, ReplOp)> = match self.wal {
            Some(_) => accepted
                .iter()
                .flat_map(|&i| {
                    let item = &items[i];
                    item.ops.iter().map(move |o| (item.partition, o.clone()))
                })
                .collect(),
            None => Vec::new(),
        };
        let applying = match self.log_ops(&logged).await {
            Ok(applying) => applying,
            Err(e) => {
                // Nothing of the frame is applied; the positions stay.
                for &i in &accepted {
                    results[i] = Some(Error::Unavailable(format!("backup WAL: {e}")));
                }
                for (p, follows) in at.iter_mut() {
                    if !matches!(follows, Follows::Nothing) {
                        *follows = self.cluster.part(*p).follows.lock().clone();
                    }
                }
                accepted.clear();
                None
            }
        };
        for &i in &accepted {
            let item = &items[i];
            tracing::trace!(partition = item.partition, seq = item.seq, ops = ?item.ops, "replicated ops applied");
            self.apply_ops(item.partition, &item.ops);
        }
        drop(applying);
        for (p, follows) in at {
            *self.cluster.part(p).follows.lock() = follows;
        }
        drop(guards);
        Response::Replicated(
            results
                .into_iter()
                .map(|r| r.map(|e| e.to_wire()))
                .collect(),
        )
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
        (stream, seq): (u64, u64),
    ) -> Response {
        self.catch_up_to(epoch, self.catch_up_deadline()).await;
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
            let applying = match self.log_snapshot(p, &snapshot).await {
                Ok(applying) => applying,
                Err(e) => {
                    *st.receiving.lock() = None;
                    return refused(&e);
                }
            };
            self.install_copy(p, &snapshot);
            drop(applying);
            // From here the copy follows the stream the snapshot was cut
            // from (it takes writes once the last chunk made it loaded).
            *st.follows.lock() = Follows::Stream {
                from: from.to_string(),
                stream,
                seq,
            };
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
            let applying = match self.log_ops(&logged).await {
                Ok(applying) => applying,
                Err(e) => {
                    *st.receiving.lock() = None;
                    return refused(&e);
                }
            };
            self.apply_ops(p, &ops);
            drop(applying);
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

    /// The digest of this node's copy of `p` and the stream position it is at.
    pub(in crate::node) async fn on_digest(&self, p: u32) -> Response {
        if p < self.store.partition_count() {
            let st = self.cluster.part(p);
            let _g = st.repl.lock().await;
            let (stream, seq) = match &*st.follows.lock() {
                Follows::Stream { stream, seq, .. } => (*stream, *seq),
                Follows::Fresh | Follows::Nothing | Follows::Demoted { .. } => (0, 0),
            };
            Response::Digest {
                digest: self.store.digest(p),
                stream,
                seq,
            }
        } else {
            refused(&self.not_owner(p))
        }
    }

    /// A primary that sends a newer epoch than this node's installed one is
    /// ahead by an install in flight (the commit reaches members one by one):
    /// wait briefly for this node to install it rather than refuse the write
    /// (a refusal costs the write and a full resync of this backup). Only a
    /// few epochs ahead are waited for: a far-off epoch is refused at once.
    async fn catch_up_to(&self, epoch: u64, deadline: tokio::time::Instant) {
        let mine = self.epoch();
        if epoch <= mine || epoch - mine > 16 {
            return;
        }
        while self.epoch() < epoch && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// How long [`Node::catch_up_to`] waits, at most, for one request.
    fn catch_up_deadline(&self) -> tokio::time::Instant {
        let patience =
            (self.cluster.config().replication_timeout / 2).min(Duration::from_millis(250));
        tokio::time::Instant::now() + patience
    }

    /// A replicated write of `p` is taken only from its primary in this
    /// node's table, by a backup of it, at this node's epoch or an earlier
    /// one (a write queued before an install that kept the primary; the
    /// stream position, checked next, ties it to the primary's tenure).
    fn stream_check(&self, from: &str, epoch: u64, p: u32) -> Result<()> {
        let mine = self.cluster.table().epoch;
        if epoch > mine {
            return self.backup_check(from, epoch, p);
        }
        self.backup_check(from, mine, p)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(stream: u64, seq: u64) -> ReplItem {
        ReplItem {
            partition: 3,
            epoch: 1,
            stream,
            seq,
            ops: Vec::new(),
        }
    }

    #[test]
    fn a_copy_takes_only_the_next_write_of_the_stream_it_follows() {
        let at = Follows::Stream {
            from: "a".into(),
            stream: 7,
            seq: 10,
        };
        let next = |f: &Follows, from: &str, i: ReplItem| next_of(f, from, &i, 1);
        assert!(matches!(next(&at, "a", item(7, 11)), Ok(true)));
        for held in [1, 9, 10] {
            assert!(matches!(next(&at, "a", item(7, held)), Ok(false)));
        }
        // N+2 before N+1: a gap.
        let gap = next(&at, "a", item(7, 12)).expect_err("a gap");
        assert!(gap.to_string().contains("gap"), "{gap}");
        assert!(next(&at, "a", item(7, u64::MAX)).is_err());
        // Later writes of another stream, or of another sender's.
        assert!(next(&at, "a", item(8, 11)).is_err());
        assert!(next(&at, "b", item(7, 11)).is_err());
        // The first write of a new tenure at this epoch: another primary
        // (a promotion), or a newer stream of the same one (a restart)...
        assert!(matches!(next(&at, "b", item(3, 1)), Ok(true)));
        assert!(matches!(next(&at, "a", item(8, 1)), Ok(true)));
        // ... but not an older stream of it, nor one stamped at another epoch.
        assert!(next(&at, "a", item(6, 1)).is_err());
        assert!(next_of(&at, "b", &item(3, 1), 2).is_err());
        // A brand-new partition follows the first stream from 1 only.
        assert!(matches!(next(&Follows::Fresh, "a", item(9, 1)), Ok(true)));
        assert!(next(&Follows::Fresh, "a", item(9, 2)).is_err());
        // Nothing: only a snapshot helps.
        assert!(next(&Follows::Nothing, "a", item(7, 11)).is_err());
        assert!(next(&Follows::Nothing, "a", item(7, 1)).is_err());
    }

    #[test]
    fn a_demoted_primary_follows_only_a_tenure_derived_from_its_exact_position() {
        // "a" was primary, wrote up to 10 of stream 7; "b" (its backup)
        // was promoted at 7/10 (it had every write) or at 7/9 (one short).
        let demoted = Follows::Demoted { stream: 7, seq: 10 };
        let first = |base: (u64, u64), epoch: u64| ReplItem {
            stream: tenure_stream("b", base, epoch),
            ..item(0, 1)
        };
        assert!(matches!(
            next_of(&demoted, "b", &first((7, 10), 1), 1),
            Ok(true)
        ));
        // The new primary lacks write 10 (the demoted copy holds a write
        // the new stream does not): refused, it is re-synced.
        let short = next_of(&demoted, "b", &first((7, 9), 1), 1).expect_err("one short");
        assert!(short.to_string().contains("does not follow"), "{short}");
        // Another epoch, another sender, a later write, or any other new
        // stream (the co-backup rule does not apply to a demoted copy).
        assert!(next_of(&demoted, "b", &first((7, 10), 1), 2).is_err());
        assert!(next_of(&demoted, "c", &first((7, 10), 1), 1).is_err());
        let later = ReplItem {
            seq: 2,
            ..first((7, 10), 1)
        };
        assert!(next_of(&demoted, "b", &later, 1).is_err());
        assert!(next_of(&demoted, "b", &item(99, 1), 1).is_err());
        // A co-backup at the same position takes it too.
        let co = Follows::Stream {
            from: "a".into(),
            stream: 7,
            seq: 10,
        };
        assert!(matches!(next_of(&co, "b", &first((7, 10), 1), 1), Ok(true)));
        // Derived ids differ by primary, position and epoch, are never 0,
        // and are older than any new stream (a restarted primary's).
        let ids = [
            tenure_stream("b", (7, 10), 1),
            tenure_stream("c", (7, 10), 1),
            tenure_stream("b", (7, 9), 1),
            tenure_stream("b", (8, 10), 1),
            tenure_stream("b", (7, 10), 2),
        ];
        for (i, x) in ids.iter().enumerate() {
            assert_ne!(*x, 0);
            assert_eq!(*x >> 63, 0, "a derived id with the new-stream bit");
            assert!(ids[i + 1..].iter().all(|y| y != x), "{ids:?}");
        }
    }
}
