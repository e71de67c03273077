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
                    if was != Role::Primary {
                        self.store.index_partition(p);
                        // A new tenure, whose stream is derived from the
                        // position this copy followed (if it followed one
                        // contiguously): a replica at exactly that position
                        // holds the same writes and follows the new stream
                        // from its first write; any other needs a snapshot
                        // (or the partition is brand new).
                        let base = match &*st.follows.lock() {
                            Follows::Stream { stream, seq, .. }
                                if was == Role::Backup
                                    && !restarted
                                    && st.loaded.load(Ordering::SeqCst) =>
                            {
                                Some((*stream, *seq))
                            }
                            _ => None,
                        };
                        *st.base.lock() = base;
                        *st.stream.lock() = (0, 0);
                    }
                    // The coordinator promotes the best replica there is: from
                    // now on this node's copy is the partition.
                    st.loaded.store(true, Ordering::SeqCst);
                    *st.follows.lock() = Follows::Nothing;
                }
                Role::Backup => {
                    if was == Role::Primary {
                        self.store.unindex_partition(p);
                        // The demoted primary's copy is at its own stream's
                        // last write (or, if it wrote nothing, where it was
                        // promoted): it follows the new primary's stream
                        // only if that tenure starts from this very position.
                        let at = *st.stream.lock();
                        let own = if at.0 != 0 { Some(at) } else { *st.base.lock() };
                        *st.follows.lock() = match own {
                            Some((stream, seq)) if !restarted && !fresh => {
                                Follows::Demoted { stream, seq }
                            }
                            _ => Follows::Nothing,
                        };
                        *st.base.lock() = None;
                    }
                    if fresh {
                        st.loaded.store(true, Ordering::SeqCst);
                        *st.follows.lock() = Follows::Fresh;
                    } else if was == Role::None || restarted {
                        st.loaded.store(false, Ordering::SeqCst);
                        *st.follows.lock() = Follows::Nothing;
                    } else if was != Role::Primary && old.primary(p) != new.primary(p) {
                        // The new primary's stream starts from its own copy:
                        // a co-backup that followed the old primary takes it
                        // from its first write (see `next_of`), any other
                        // copy is re-synced.
                        let mut follows = st.follows.lock();
                        if !matches!(*follows, Follows::Stream { .. }) {
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
