//! Installing a committed partition table: each partition's role change
//! here (promotion, demotion, drop).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cluster::Follows;
use crate::cluster::table::{Role, Table};
use crate::node::Node;

impl Node {
    /// Installs a committed table newer than the current one (called only
    /// with tables from the committed metadata).
    pub fn install(&self, new: Table) {
        let c = &self.cluster;
        let _one_at_a_time = c.install_lock();
        let old = c.table();
        if new.epoch <= old.epoch || new.partition_count != old.partition_count {
            return;
        }
        let mut primaries = 0;
        let mut dropped = Vec::new();
        // After a restart the old roles come from the WAL: the cluster may
        // have moved on without this node, so its backup copies are re-synced.
        let restarted = c.take_restored();
        // Writes overlapping this install are not acknowledged (see
        // cluster::seqlock); the install ends when `installing` drops.
        let installing = c.installs().begin_install();
        for p in 0..new.partition_count {
            let st = c.part(p);
            // In-flight in-sync changes were for the old epoch (refused
            // now, or already part of the committed sets this table carries).
            st.expanding.lock().clear();
            let (was, now) = (old.role_of(c.me(), p), new.role_of(c.me(), p));
            let fresh = old.replicas(p).is_empty();
            if was != now {
                tracing::debug!(partition = p, epoch = new.epoch, ?was, ?now, replicas = ?new.replicas(p), "role change");
            }
            match now {
                Role::Primary => {
                    primaries += 1;
                    // The coordinator promotes the best replica there is: from
                    // now on this node's copy is the partition.
                    st.loaded.store(true, Ordering::SeqCst);
                    if was != Role::Primary {
                        self.store.index_partition(p);
                        // A new tenure: a new stream, which no backup
                        // follows until it is sent a snapshot of it (or the
                        // partition is brand new).
                        *st.stream.lock() = (0, 0);
                    }
                    *st.follows.lock() = Follows::Nothing;
                }
                Role::Backup => {
                    if was == Role::Primary {
                        self.store.unindex_partition(p);
                    }
                    if fresh {
                        st.loaded.store(true, Ordering::SeqCst);
                        *st.follows.lock() = Follows::Fresh;
                    } else if was == Role::None || restarted {
                        st.loaded.store(false, Ordering::SeqCst);
                        *st.follows.lock() = Follows::Nothing;
                    } else if was == Role::Primary || old.primary(p) != new.primary(p) {
                        // The new primary's stream starts from its own copy:
                        // a copy that followed another primary (or was the
                        // primary) is re-synced from it.
                        let mut follows = st.follows.lock();
                        if !matches!(*follows, Follows::Stream { .. }) || was == Role::Primary {
                            *follows = Follows::Nothing;
                        }
                    }
                }
                Role::None => {
                    *st.follows.lock() = Follows::Nothing;
                    if was != Role::None {
                        st.loaded.store(false, Ordering::SeqCst);
                        self.store.drop_partition(p);
                        dropped.push(p);
                    }
                }
            }
        }
        self.store.set_primaries(primaries);
        let peers: Vec<&str> = new.members.iter().map(|m| m.peer.as_str()).collect();
        self.streams.retain(&peers);
        self.locks.set_epoch(new.epoch);
        tracing::debug!(epoch = new.epoch, primaries, "table installed");
        self.log_install(&dropped, &new);
        c.set_table(Arc::new(new));
        c.set_current(true);
        drop(installing);
    }
}
