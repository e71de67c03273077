//! Planning the next partition table (run by the metadata leader, and by
//! every node to report pending migrations): from the committed table and
//! in-sync sets and this node's view of who is alive.
//!
//! The rules the plan keeps (the state machine refuses a table that breaks
//! the first):
//! - a partition's primary moves only to a member of its committed in-sync
//!   set that is alive as the same process (incarnation) the table names;
//! - when no in-sync member is alive, the partition keeps an in-sync member
//!   as its (unreachable) primary: it is unavailable until one returns. It
//!   is restarted empty (reported as data loss) only when every in-sync
//!   member is known gone: restarted as another incarnation, no longer a
//!   configured member, or forgotten by an operator (`distcache cluster
//!   forget`); `--unclean-promotion` instead promotes a surviving
//!   replica that is not in sync.
//! - members whose clock is off are not made primaries of moved partitions.

use std::collections::HashSet;

use crate::cluster::table::{MemberInfo, Table};
use crate::cluster::{placement, rebalancer};
use crate::node::Node;

impl Node {
    /// The metadata leader (the cluster's coordinator), as this node knows it.
    pub fn coordinator(&self) -> Option<String> {
        self.meta_leader()
    }

    /// The table the leader would propose next with the partitions it would
    /// restart empty, or None if nothing changes.
    pub(super) fn plan(&self) -> Option<(Table, Vec<u32>)> {
        let c = &self.cluster;
        let meta = c.meta();
        let table = c.table();
        if meta.epoch() != table.epoch {
            // Not installed here yet: plan from what is committed only.
            return None;
        }
        let configured: HashSet<String> = c.members().iter().cloned().map(|m| m.name).collect();
        // Alive as the process the table names.
        let valid = |m: &str| {
            c.alive(m)
                && table.member(m).is_some_and(|info| {
                    c.incarnation(m) == Some(info.incarnation)
                        && !meta.is_forgotten(m, info.incarnation)
                })
        };
        // The process the table names is known to hold nothing any more.
        let gone = |m: &str| {
            !configured.contains(m)
                || table
                    .member(m)
                    .is_some_and(|info| meta.is_forgotten(m, info.incarnation))
                || (c.alive(m)
                    && table
                        .member(m)
                        .is_some_and(|info| c.incarnation(m) != Some(info.incarnation)))
        };
        let (alive, _) = c.liveness();
        let mut eligible: Vec<String> = alive
            .iter()
            .filter(|m| {
                !c.is_leaving(&m.name)
                    && !c.member_skewed(&m.name)
                    && c.incarnation(&m.name)
                        .is_some_and(|i| !meta.is_forgotten(&m.name, i))
            })
            .map(|m| m.name.clone())
            .collect();
        eligible.sort();
        let current: Vec<Vec<String>> = table
            .owners
            .iter()
            .map(|o| o.iter().filter(|m| valid(m)).cloned().collect())
            .collect();
        let target = rebalancer::assign(
            table.partition_count,
            c.config().backup_count,
            &eligible,
            &current,
        );
        let mut owners = Vec::with_capacity(table.owners.len());
        let mut reset = Vec::new();
        for (p, o) in table.owners.iter().enumerate() {
            let isr = meta.isr_of(p as u32);
            let in_sync = |m: &str| isr.iter().any(|x| x == m) && valid(m);
            if o.is_empty() {
                owners.push(target[p].clone());
                continue;
            }
            let primary = o.first().map(String::as_str).filter(|m| in_sync(m));
            let backups: Vec<&str> = o
                .iter()
                .skip(1)
                .map(String::as_str)
                .filter(|m| valid(m))
                .collect();
            if primary.is_none() && !backups.iter().any(|b| in_sync(b)) {
                // Nobody in sync is reachable.
                if isr.iter().all(|m| gone(m)) {
                    if !target[p].is_empty() {
                        reset.push(p as u32);
                        owners.push(target[p].clone());
                    } else {
                        owners.push(o.clone());
                    }
                } else if self.config.unclean_promotion && !backups.is_empty() {
                    reset.push(p as u32);
                    let mut row: Vec<String> = backups.iter().map(|b| b.to_string()).collect();
                    for m in &target[p] {
                        if !row.contains(m) {
                            row.push(m.clone());
                        }
                    }
                    owners.push(row);
                } else {
                    // Unavailable until an in-sync member returns: it stays
                    // (or becomes) the primary the table names.
                    let keep = isr
                        .iter()
                        .find(|m| Some(m.as_str()) == o.first().map(String::as_str))
                        .or_else(|| isr.iter().find(|m| !gone(m)));
                    let mut row: Vec<String> = keep.into_iter().cloned().collect();
                    for m in o {
                        if !row.contains(m) && !gone(m) {
                            row.push(m.clone());
                        }
                    }
                    owners.push(row);
                }
                continue;
            }
            let next =
                placement::next_owners_keeping(primary, &backups, &target[p], &in_sync, &in_sync);
            owners.push(next);
        }
        let names: HashSet<&String> = owners.iter().flatten().collect();
        let mut members: Vec<MemberInfo> = Vec::new();
        for m in c.members().iter().cloned() {
            if !names.contains(&m.name) {
                continue;
            }
            let incarnation = match c.incarnation(&m.name) {
                Some(i) => i,
                None => match table.member(&m.name) {
                    Some(info) => info.incarnation,
                    None => continue,
                },
            };
            members.push(MemberInfo {
                incarnation,
                name: m.name,
                grpc: m.grpc,
                peer: m.peer,
            });
        }
        // Rows may only name listed members.
        let listed: HashSet<String> = members.iter().map(|m| m.name.clone()).collect();
        for row in &mut owners {
            row.retain(|m| listed.contains(m));
        }
        if owners == table.owners && members == table.members && reset.is_empty() {
            return None;
        }
        let mut next = Table {
            epoch: 0,
            coordinator: c.me().name.clone(),
            partition_count: table.partition_count,
            backup_count: c.config().backup_count,
            members,
            owners,
            since: Vec::new(),
        };
        next.carry_since(&table);
        Some((next, reset))
    }
}
