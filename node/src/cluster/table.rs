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
}

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
