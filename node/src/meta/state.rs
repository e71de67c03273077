//! The replicated metadata state machine: the partition table and each
//! partition's committed in-sync replica set (ISR). Every node applies the
//! same committed commands in the same order, so every node derives the same
//! state; nothing else changes who owns a partition.
//!
//! The rules enforced here (not only by the leader that proposes):
//! - a table is validated (row count, members, duplicates, backup count)
//!   before it is applied; its epoch is the previous one plus one (checked);
//! - a partition's primary in a new table must be in its committed ISR,
//!   unless the partition is fresh (never had owners) or listed as reset
//!   (its in-sync replicas are known gone: the reset is recorded as loss);
//! - the ISR of a new table is the old ISR restricted to the new replicas
//!   of the same incarnation: a restarted process (new incarnation) is in
//!   no ISR until its primary commits an [`MetaCmd::Expand`] for it;
//! - `Shrink`/`Expand` come from the partition's primary at the current
//!   epoch only.

use serde::{Deserialize, Serialize};

use crate::cluster::table::Table;

/// A metadata change, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCmd {
    /// A new partition table (proposed by the Raft leader). Its epoch is set
    /// on apply.
    Table {
        /// The epoch it was planned from: refused unless that is still the
        /// current one (a plan from stale state never lands on newer state).
        base: u64,
        /// The table.
        table: Table,
        /// Partitions restarted empty (or promoted uncleanly): their
        /// in-sync replicas are gone. Recorded as data loss.
        reset: Vec<u32>,
    },
    /// The primary of `partitions` stops waiting for `member` in them.
    Shrink {
        /// Table epoch the primary writes under.
        epoch: u64,
        /// Partitions (each must have `primary` as its primary).
        partitions: Vec<u32>,
        /// The partitions' primary (the proposer).
        primary: String,
        /// The backup leaving their ISRs.
        member: String,
    },
    /// An operator declared `member` (at the incarnation the table names)
    /// gone for good: in-sync places held only by it count as lost.
    Forget {
        /// Member name.
        member: String,
    },
    /// `member` caught up with the primary of `partition` (snapshot applied).
    Expand {
        /// Table epoch the primary writes under.
        epoch: u64,
        /// Partition.
        partition: u32,
        /// The partition's primary (the proposer).
        primary: String,
        /// The backup joining the ISR.
        member: String,
    },
}

/// The outcome of applying a [`MetaCmd`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MetaReply {
    /// Applied (or already true).
    #[default]
    Done,
    /// Refused, with the reason.
    Refused(String),
}

/// The committed metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MetaState {
    /// The partition table (epoch 0: none yet).
    pub table: Option<Table>,
    /// Per partition: the members holding every acknowledged write.
    pub isr: Vec<Vec<String>>,
    /// Partitions restarted empty or promoted uncleanly, ever.
    pub lost_total: u64,
    /// The partitions of the last such reset, with its epoch.
    pub last_loss: Option<(u64, Vec<u32>)>,
    /// Members (name, incarnation) declared gone by an operator.
    #[serde(default)]
    pub forgotten: Vec<(String, u64)>,
}

/// Fixed settings every node must share.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Partition count.
    pub partition_count: u32,
    /// Backups per partition.
    pub backup_count: u32,
}

impl MetaState {
    /// The table's epoch (0 before the first).
    pub fn epoch(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| t.epoch)
    }

    /// Whether `m` is in `p`'s committed ISR.
    pub fn in_sync(&self, p: u32, m: &str) -> bool {
        self.isr
            .get(p as usize)
            .is_some_and(|s| s.iter().any(|x| x == m))
    }

    /// Members of `p`'s committed ISR.
    pub fn isr_of(&self, p: u32) -> &[String] {
        self.isr.get(p as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether `name` at `incarnation` was declared gone.
    pub fn is_forgotten(&self, name: &str, incarnation: u64) -> bool {
        self.forgotten
            .iter()
            .any(|(n, i)| n == name && *i == incarnation)
    }

    /// Applies one committed command.
    pub fn apply(&mut self, cmd: MetaCmd, shape: Shape) -> MetaReply {
        let r = match cmd {
            MetaCmd::Table { base, table, reset } => {
                if base == self.epoch() {
                    self.apply_table(table, &reset, shape)
                } else {
                    Err(format!(
                        "planned from epoch {base}, the current one is {}",
                        self.epoch()
                    ))
                }
            }
            MetaCmd::Shrink {
                epoch,
                partitions,
                primary,
                member,
            } => {
                // All or nothing: checked first, then applied.
                let mut probe = self.clone();
                let r = partitions
                    .iter()
                    .try_for_each(|&p| probe.change_isr(epoch, p, &primary, &member, false));
                if r.is_ok() {
                    *self = probe;
                }
                r
            }
            MetaCmd::Expand {
                epoch,
                partition,
                primary,
                member,
            } => self.change_isr(epoch, partition, &primary, &member, true),
            MetaCmd::Forget { member } => self.forget(&member),
        };
        match r {
            Ok(()) => MetaReply::Done,
            Err(why) => MetaReply::Refused(why),
        }
    }

    fn forget(&mut self, member: &str) -> Result<(), String> {
        let t = self.table.as_ref().ok_or("no table yet")?;
        let inc = t
            .member(member)
            .map(|m| m.incarnation)
            .ok_or_else(|| format!("{member} is not in the partition table"))?;
        if !self.is_forgotten(member, inc) {
            // Bounded: one entry per (member, incarnation) the table named.
            if self.forgotten.len() >= 1_024 {
                self.forgotten.remove(0);
            }
            self.forgotten.push((member.to_string(), inc));
        }
        Ok(())
    }

    fn change_isr(
        &mut self,
        epoch: u64,
        p: u32,
        primary: &str,
        member: &str,
        add: bool,
    ) -> Result<(), String> {
        let t = self.table.as_ref().ok_or("no table yet")?;
        if epoch != t.epoch {
            return Err(format!("epoch {epoch} is not the current {}", t.epoch));
        }
        if t.primary(p) != Some(primary) {
            return Err(format!("{primary} is not the primary of p{p}"));
        }
        if member == primary {
            return Err("the primary cannot change its own place".into());
        }
        let set = self
            .isr
            .get_mut(p as usize)
            .ok_or_else(|| format!("no partition {p}"))?;
        if add {
            if !t.backups(p).iter().any(|b| b == member) {
                return Err(format!("{member} is not a backup of p{p}"));
            }
            if !set.iter().any(|m| m == member) {
                set.push(member.to_string());
            }
        } else {
            set.retain(|m| m != member);
        }
        Ok(())
    }

    fn apply_table(&mut self, mut t: Table, reset: &[u32], shape: Shape) -> Result<(), String> {
        validate(&t, shape)?;
        let old = self
            .table
            .clone()
            .unwrap_or_else(|| Table::empty(shape.partition_count, shape.backup_count));
        t.epoch = old
            .epoch
            .checked_add(1)
            .ok_or("the epoch cannot advance any further")?;
        t.carry_since(&old);
        t.seal_since();
        let same = |m: &str| {
            let a = old.member(m).map(|i| i.incarnation);
            a.is_some() && a == t.member(m).map(|i| i.incarnation)
        };
        let mut isr = Vec::with_capacity(shape.partition_count as usize);
        let mut lost = Vec::new();
        for p in 0..shape.partition_count {
            let replicas = t.replicas(p);
            let kept: Vec<String> = self.isr_of(p).iter().filter(|m| same(m)).cloned().collect();
            let fresh = old.replicas(p).is_empty();
            if fresh {
                isr.push(replicas.to_vec());
                continue;
            }
            if reset.contains(&p) {
                lost.push(p);
                isr.push(replicas.to_vec());
                continue;
            }
            if let Some(pr) = t.primary(p)
                && !kept.iter().any(|m| m == pr)
            {
                return Err(format!("p{p}: new primary {pr} is not in its in-sync set"));
            }
            isr.push(
                replicas
                    .iter()
                    .filter(|m| kept.contains(m))
                    .cloned()
                    .collect(),
            );
        }
        if !lost.is_empty() {
            tracing::error!(
                epoch = t.epoch,
                partitions = ?lost,
                "DATA LOSS: partitions restarted without an in-sync replica"
            );
            self.lost_total = self.lost_total.saturating_add(lost.len() as u64);
            self.last_loss = Some((t.epoch, lost));
        }
        self.table = Some(t);
        self.isr = isr;
        Ok(())
    }
}

/// Checks a proposed table: one row per partition, every replica a listed
/// member, nobody twice in a row, no more replicas than a migration needs,
/// every member listed once.
pub fn validate(t: &Table, shape: Shape) -> Result<(), String> {
    if t.partition_count != shape.partition_count
        || t.owners.len() != shape.partition_count as usize
    {
        return Err(format!(
            "table has {} rows for {} partitions (expected {})",
            t.owners.len(),
            t.partition_count,
            shape.partition_count
        ));
    }
    if t.backup_count != shape.backup_count {
        return Err(format!(
            "table backup count {} is not the configured {}",
            t.backup_count, shape.backup_count
        ));
    }
    for (i, m) in t.members.iter().enumerate() {
        if t.members[..i].iter().any(|o| o.name == m.name) {
            return Err(format!("member {} listed twice", m.name));
        }
    }
    // A migration keeps the old replicas next to the target's until the new
    // ones are in sync: at most the old row, the target row and a primary.
    let max = 2 * (shape.backup_count as usize + 1) + 1;
    for (p, row) in t.owners.iter().enumerate() {
        if row.len() > max {
            return Err(format!("p{p} has {} replicas (at most {max})", row.len()));
        }
        for (i, m) in row.iter().enumerate() {
            if t.member(m).is_none() {
                return Err(format!("p{p}: {m} is not a member"));
            }
            if row[..i].contains(m) {
                return Err(format!("p{p}: {m} twice"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        partition_count: 2,
        backup_count: 1,
    };

    fn table(owners: &[&[&str]], inc: &[(&str, u64)]) -> Table {
        Table::for_test(0, owners, inc)
    }

    fn put(s: &mut MetaState, t: Table, reset: &[u32]) -> MetaReply {
        let base = s.epoch();
        s.apply(
            MetaCmd::Table {
                base,
                table: t,
                reset: reset.to_vec(),
            },
            SHAPE,
        )
    }

    fn isr(s: &mut MetaState, add: bool, p: u32, primary: &str, member: &str) -> MetaReply {
        let epoch = s.epoch();
        let (primary, member) = (primary.to_string(), member.to_string());
        let cmd = if add {
            MetaCmd::Expand {
                epoch,
                partition: p,
                primary,
                member,
            }
        } else {
            MetaCmd::Shrink {
                epoch,
                partitions: vec![p],
                primary,
                member,
            }
        };
        s.apply(cmd, SHAPE)
    }

    #[test]
    fn promotion_only_from_the_committed_in_sync_set() {
        let inc = [("a", 1), ("b", 1), ("c", 1)];
        let mut s = MetaState::default();
        assert_eq!(
            put(&mut s, table(&[&["a", "b"], &["b", "c"]], &inc), &[]),
            MetaReply::Done
        );
        assert_eq!(s.epoch(), 1);
        assert_eq!(s.isr_of(0), ["a", "b"], "fresh partitions start in sync");
        // a stops waiting for b: b may no longer be promoted for p0.
        assert_eq!(isr(&mut s, false, 0, "a", "b"), MetaReply::Done);
        let promote_b = table(&[&["b", "c"], &["b", "c"]], &inc);
        assert!(matches!(put(&mut s, promote_b, &[]), MetaReply::Refused(_)));
        assert_eq!(s.epoch(), 1, "a refused table changes nothing");
        // Only the primary may change the set, and only at the current epoch.
        assert!(matches!(
            isr(&mut s, true, 0, "b", "b"),
            MetaReply::Refused(_)
        ));
        let stale = MetaCmd::Expand {
            epoch: 0,
            partition: 0,
            primary: "a".into(),
            member: "b".into(),
        };
        assert!(matches!(s.apply(stale, SHAPE), MetaReply::Refused(_)));
        assert_eq!(isr(&mut s, true, 0, "a", "b"), MetaReply::Done);
        assert_eq!(
            put(&mut s, table(&[&["b", "c"], &["b", "c"]], &inc), &[]),
            MetaReply::Done
        );
        assert_eq!(s.isr_of(0), ["b"], "c must catch up before it counts");
    }

    #[test]
    fn a_table_planned_from_an_older_epoch_is_refused() {
        let inc = [("a", 1), ("b", 1)];
        let mut s = MetaState::default();
        put(&mut s, table(&[&["a", "b"], &["b", "a"]], &inc), &[]);
        put(&mut s, table(&[&["a", "b"], &["a", "b"]], &inc), &[]);
        let stale = MetaCmd::Table {
            base: 1,
            table: table(&[&["b", "a"], &["b", "a"]], &inc),
            reset: Vec::new(),
        };
        assert!(matches!(s.apply(stale, SHAPE), MetaReply::Refused(_)));
        assert_eq!(s.epoch(), 2);
        assert_eq!(
            s.table.as_ref().map(|t| t.owners[1].clone()),
            Some(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn a_restarted_process_leaves_every_in_sync_set() {
        let mut s = MetaState::default();
        let inc = [("a", 1), ("b", 1), ("c", 1)];
        put(&mut s, table(&[&["a", "b"], &["b", "a"]], &inc), &[]);
        // b restarted (new incarnation): p1 cannot keep b as primary, and
        // b is in no set.
        let inc2 = [("a", 1), ("b", 2), ("c", 1)];
        assert!(matches!(
            put(&mut s, table(&[&["a", "b"], &["b", "a"]], &inc2), &[]),
            MetaReply::Refused(_)
        ));
        assert_eq!(
            put(&mut s, table(&[&["a", "b"], &["a", "b"]], &inc2), &[]),
            MetaReply::Done
        );
        assert_eq!(s.isr_of(0), ["a"]);
        assert_eq!(s.isr_of(1), ["a"]);
        assert_eq!(s.lost_total, 0);
    }

    #[test]
    fn a_reset_is_recorded_as_loss_and_bad_tables_are_refused() {
        let mut s = MetaState::default();
        let inc = [("a", 1), ("b", 1)];
        put(&mut s, table(&[&["a"], &["b"]], &inc), &[]);
        let inc2 = [("a", 1), ("b", 2)];
        assert_eq!(
            put(&mut s, table(&[&["a"], &["b"]], &inc2), &[1]),
            MetaReply::Done
        );
        assert_eq!(s.lost_total, 1);
        assert_eq!(s.last_loss, Some((2, vec![1])));
        for bad in [
            table(&[&["a"]], &inc),
            table(&[&["a", "a"], &["b"]], &inc),
            table(&[&["a", "b", "a"], &["b"]], &inc),
            table(
                &[&["a", "b", "c", "d", "e", "f"], &["b"]],
                &[("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1), ("f", 1)],
            ),
            table(&[&["z"], &["b"]], &inc),
            table(&[&["a"], &["b"]], &[("a", 1), ("a", 2), ("b", 2)]),
        ] {
            assert!(matches!(put(&mut s, bad, &[]), MetaReply::Refused(_)));
        }
        let mut max = s.clone();
        if let Some(t) = max.table.as_mut() {
            t.epoch = u64::MAX;
        }
        assert!(matches!(
            put(&mut max, table(&[&["a"], &["b"]], &inc2), &[]),
            MetaReply::Refused(_)
        ));
    }
}
