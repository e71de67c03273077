//! What the node reports about itself: the safety summary Health and the
//! operator read, and the gauges its metrics show.

use crate::cluster::table::Role;
use crate::metrics::Gauges;
use crate::node::Node;

impl Node {
    /// Whether every partition has its in-sync backups and no migration is
    /// pending; with the counts (partitions without an in-sync backup,
    /// partitions whose owners differ from the balanced target).
    pub fn safety(&self) -> (bool, u32, u32) {
        let (safe, without, migrating, _) = self.safety_detail();
        (safe, without, migrating)
    }

    /// [`Node::safety`] with a few examples of partitions lacking a backup.
    pub fn safety_detail(&self) -> (bool, u32, u32, Vec<String>) {
        let c = &self.cluster;
        let t = c.table();
        if t.is_empty() {
            return (false, t.partition_count, 0, vec!["no table".into()]);
        }
        let mut examples = Vec::new();
        let (alive, _) = c.liveness();
        let eligible = alive.iter().filter(|m| !c.is_leaving(&m.name)).count();
        let want = (c.config().backup_count as usize).min(eligible.saturating_sub(1));
        let mut without = 0;
        for p in 0..t.partition_count {
            let synced = t.backups(p).iter().filter(|b| c.in_sync(&t, p, b)).count();
            let primary_ok = t.primary(p).is_some_and(|m| c.alive(m));
            if synced < want || !primary_ok {
                without += 1;
                if examples.len() < 3 {
                    let why: Vec<String> = t
                        .backups(p)
                        .iter()
                        .map(|b| format!("{b}: {}", c.sync_problem(&t, p, b).unwrap_or("ok")))
                        .collect();
                    examples.push(format!(
                        "p{p} primary {:?} [{}]",
                        t.primary(p),
                        why.join(", ")
                    ));
                }
            }
        }
        // Every node runs the coordinator's planning on its own view.
        let migrating = self.plan().map_or(0, |(next, _)| {
            next.owners
                .iter()
                .zip(&t.owners)
                .filter(|(a, b)| a != b)
                .count() as u32
        });
        // A node that is not in touch with the metadata leader (or has not
        // applied what it holds) may be behind: it never calls itself safe.
        let in_touch = self.lease_valid() && self.meta_caught_up();
        if !in_touch && examples.len() < 3 {
            examples.push("no recent contact with the metadata leader".into());
        }
        (
            without == 0 && migrating == 0 && c.quorum() && in_touch,
            without,
            migrating,
            examples,
        )
    }

    /// The node's state for the metrics gauges.
    pub fn gauges(&self) -> Gauges {
        let c = &self.cluster;
        let t = c.table();
        let (alive, expected) = c.liveness();
        let (safe, without_backup, migrations) = self.safety();
        let (mut primaries, mut backups) = (0, 0);
        for p in 0..t.partition_count {
            match t.role_of(c.me(), p) {
                Role::Primary => primaries += 1,
                Role::Backup => backups += 1,
                Role::None => {}
            }
        }
        Gauges {
            epoch: t.epoch,
            members: expected,
            members_alive: alive.len(),
            quorum: c.quorum(),
            safe,
            without_backup,
            migrations,
            primaries,
            backups,
            entries: self.store.held_entries().into_iter().collect(),
            wal_failed: self.wal.as_ref().is_some_and(|w| w.failure().is_some()),
            partitions_lost: c.meta().lost_total,
            memory: self.store.memory(),
            clock_offset_ms: self.clock_offset_ms().unwrap_or(0),
            clock_skewed: c.is_skewed(),
            metadata_leader: self.is_meta_leader(),
        }
    }

    /// Every metric, in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.metrics.render(&self.gauges())
    }
}
