//! The partition table: which member holds which partition, at which epoch.

use serde::{Deserialize, Serialize};

/// A member as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Stable name (identity).
    pub name: String,
    /// Client (gRPC) address.
    pub grpc: String,
    /// Peer (node <-> node) address.
    pub peer: String,
    /// Process start time (ms) of the incarnation the table refers to.
    pub incarnation: u64,
}

/// A member's role for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves reads and writes, replicates to the backups.
    Primary,
    /// Holds a synchronous copy.
    Backup,
    /// Holds nothing.
    None,
}

/// One epoch of the partition table. Only tables that won a majority vote
/// are installed; an epoch identifies exactly one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// Epoch: strictly increasing.
    pub epoch: u64,
    /// Member that proposed it.
    pub coordinator: String,
    /// Partition count.
    pub partition_count: u32,
    /// Configured backups per partition.
    pub backup_count: u32,
    /// Members referenced by `owners`.
    pub members: Vec<MemberInfo>,
    /// Per partition: member names, primary first, then backups in promotion order.
    pub owners: Vec<Vec<String>>,
    /// Aligned with `owners`: the epoch since which each replica has held
    /// its place without a break under the same primary incarnation (the
    /// primary: since it became primary). A primary's report that a backup
    /// is in sync counts from that epoch on, so a failover still trusts a
    /// dead primary's last word after tables that kept both in place.
    /// Empty in tables written before it existed: then it is this epoch.
    #[serde(default)]
    pub since: Vec<Vec<u64>>,
}

/// Placeholder in [`Table::since`] for "the epoch of this table", used while
/// a proposal's epoch is not chosen yet (see [`Table::seal_since`]).
pub const SINCE_THIS_EPOCH: u64 = u64::MAX;

impl Table {
    /// The empty table every node starts from (epoch 0, no owners).
    pub fn empty(partition_count: u32, backup_count: u32) -> Self {
        Table {
            epoch: 0,
            coordinator: String::new(),
            partition_count,
            backup_count,
            members: Vec::new(),
            owners: vec![Vec::new(); partition_count as usize],
            since: Vec::new(),
        }
    }

    /// Since when `m` has held its place in `p` without a break (see
    /// [`Table::since`]); this table's epoch when unknown.
    pub fn since_of(&self, p: u32, m: &str) -> u64 {
        let i = self.replicas(p).iter().position(|o| o == m);
        i.and_then(|i| self.since.get(p as usize)?.get(i).copied())
            .filter(|&e| e != SINCE_THIS_EPOCH && e <= self.epoch)
            .unwrap_or(self.epoch)
    }

    /// Fills `since` for these owners from the table they follow: a replica
    /// keeps its epoch when the partition's primary is the same incarnation
    /// and the replica held the same kind of place (primary, or backup) in
    /// `prev`; otherwise it starts at this table ([`SINCE_THIS_EPOCH`] until
    /// [`Table::seal_since`]).
    pub fn carry_since(&mut self, prev: &Table) {
        let inc = |t: &Table, m: &str| t.member(m).map(|i| i.incarnation);
        self.since = (0..self.partition_count)
            .map(|p| {
                let same_primary = match (self.primary(p), prev.primary(p)) {
                    (Some(a), Some(b)) => {
                        a == b && inc(self, a).is_some() && inc(self, a) == inc(prev, b)
                    }
                    _ => false,
                };
                self.replicas(p)
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let kept = same_primary
                            && match i {
                                0 => true,
                                _ => {
                                    prev.role(m, p) == Role::Backup && inc(self, m) == inc(prev, m)
                                }
                            };
                        if kept {
                            prev.since_of(p, m)
                        } else {
                            SINCE_THIS_EPOCH
                        }
                    })
                    .collect()
            })
            .collect();
    }

    /// Replaces the [`SINCE_THIS_EPOCH`] placeholders with this table's epoch.
    pub fn seal_since(&mut self) {
        let epoch = self.epoch;
        for e in self.since.iter_mut().flatten() {
            if *e == SINCE_THIS_EPOCH {
                *e = epoch;
            }
        }
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Replicas of `p`, primary first.
    pub fn replicas(&self, p: u32) -> &[String] {
        self.owners.get(p as usize).map_or(&[], |v| v.as_slice())
    }

    /// Primary of `p`.
    pub fn primary(&self, p: u32) -> Option<&str> {
        self.replicas(p).first().map(String::as_str)
    }

    /// Backups of `p`.
    pub fn backups(&self, p: u32) -> &[String] {
        self.replicas(p).get(1..).unwrap_or(&[])
    }

    /// `name`'s role for `p`.
    pub fn role(&self, name: &str, p: u32) -> Role {
        match self.replicas(p).iter().position(|m| m == name) {
            Some(0) => Role::Primary,
            Some(_) => Role::Backup,
            None => Role::None,
        }
    }

    /// The role of this incarnation of `me`: a restarted process (another
    /// incarnation than the table's) holds no role until a table names it.
    pub fn role_of(&self, me: &MemberInfo, p: u32) -> Role {
        match self.member(&me.name) {
            Some(m) if m.incarnation == me.incarnation => self.role(&me.name, p),
            _ => Role::None,
        }
    }

    /// (primaries, backups) held by `name`.
    pub fn counts(&self, name: &str) -> (u32, u32) {
        let mut c = (0, 0);
        for r in &self.owners {
            match r.iter().position(|m| m == name) {
                Some(0) => c.0 += 1,
                Some(_) => c.1 += 1,
                None => {}
            }
        }
        c
    }

    /// True when no partition has an owner yet.
    pub fn is_empty(&self) -> bool {
        self.owners.iter().all(Vec::is_empty)
    }
}

impl Table {
    /// A test table: `owners` rows (primary first), members `name:1`/`name:2`
    /// with the given incarnations (unit tests and fuzz targets).
    #[doc(hidden)]
    pub fn for_test(epoch: u64, owners: &[&[&str]], incarnations: &[(&str, u64)]) -> Table {
        let mut t = Table::empty(owners.len() as u32, 1);
        t.epoch = epoch;
        t.owners = owners
            .iter()
            .map(|o| o.iter().map(|m| m.to_string()).collect())
            .collect();
        t.members = incarnations
            .iter()
            .map(|(n, i)| MemberInfo {
                name: n.to_string(),
                grpc: format!("{n}:1"),
                peer: format!("{n}:2"),
                incarnation: *i,
            })
            .collect();
        t
    }
}

#[cfg(test)]
mod since_tests {
    use super::*;

    fn table(epoch: u64, owners: &[&[&str]], incarnations: &[(&str, u64)]) -> Table {
        Table::for_test(epoch, owners, incarnations)
    }

    #[test]
    fn since_carries_over_only_unbroken_places_under_the_same_primary() {
        let inc = [("a", 1), ("b", 1), ("c", 1), ("d", 1)];
        let mut t1 = table(3, &[&["a", "b"], &["a", "b"], &["a", "b"]], &inc);
        t1.since = vec![vec![2, 2]; 3];
        // p0 unchanged; p1 gains c; p2 swaps primary and backup.
        let mut t2 = table(9, &[&["a", "b"], &["a", "b", "c"], &["b", "a"]], &inc);
        t2.carry_since(&t1);
        t2.seal_since();
        assert_eq!(t2.since, vec![vec![2, 2], vec![2, 2, 9], vec![9, 9]]);
        assert_eq!(t2.since_of(1, "c"), 9);
        assert_eq!(t2.since_of(0, "d"), 9, "not a replica: this epoch");

        // A restarted primary (new incarnation) starts every place afresh.
        let inc2 = [("a", 2), ("b", 1), ("c", 1), ("d", 1)];
        let mut t3 = table(10, &[&["a", "b"], &["a", "b", "c"], &["b", "a"]], &inc2);
        t3.carry_since(&t2);
        t3.seal_since();
        assert_eq!(t3.since[0], vec![10, 10]);
        assert_eq!(
            t3.since[2],
            vec![9, 10],
            "primary b unchanged, its restarted backup a starts afresh"
        );

        // A table without `since` (older format) counts from its own epoch.
        let old = table(4, &[&["a", "b"], &["a", "b"], &["a", "b"]], &inc);
        let mut t4 = table(5, &[&["a", "b"], &["a", "b"], &["a", "b"]], &inc);
        t4.carry_since(&old);
        t4.seal_since();
        assert_eq!(t4.since, vec![vec![4, 4]; 3]);
    }
}
