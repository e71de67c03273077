//! Clock offsets: every heartbeat answer carries the peer's wall clock
//! (corrected by half the round trip); a node whose clock is off by more
//! than `--max-clock-offset-ms` from a majority of the members is skewed. A skewed member is
//! reported in Health and metrics and is not made a primary. Leases and
//! failure detection use monotonic clocks only.

use std::time::Instant;

use crate::node::Node;

impl Node {
    /// Records one peer's wall-clock reading, taken between `sent` and now
    /// (this node's wall clock at sending was `sent_wall_ms`).
    pub(super) fn note_clock(&self, peer: &str, sent: Instant, sent_wall_ms: u64, theirs: u64) {
        let rtt = sent.elapsed().as_millis() as i64;
        let mine = sent_wall_ms as i64 + rtt / 2;
        let offset = theirs as i64 - mine;
        self.offsets.lock().insert(peer.to_string(), offset);
    }

    /// This node's offset from the cluster's median clock (its own reading
    /// counted as one), ms; None before any peer was heard.
    pub fn clock_offset_ms(&self) -> Option<i64> {
        let (alive, _) = self.cluster.liveness();
        let offsets = self.offsets.lock();
        let mut v: Vec<i64> = alive
            .iter()
            .filter_map(|m| offsets.get(&m.name).copied())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.push(0);
        v.sort_unstable();
        // Peers' clocks minus mine: mine is off by minus the median.
        Some(-v[v.len() / 2])
    }

    /// Updates the skewed flag: this node is skewed when its clock differs
    /// by more than the allowed offset from a majority of the members.
    pub(super) fn check_clock(&self) {
        let max = self.config.max_clock_offset_ms as i64;
        let (alive, expected) = self.cluster.liveness();
        let disagree = {
            let offsets = self.offsets.lock();
            alive
                .iter()
                .filter_map(|m| offsets.get(&m.name))
                .filter(|o| o.abs() > max)
                .count()
        };
        let skewed = disagree > expected / 2;
        if skewed != self.cluster.is_skewed() {
            if skewed {
                tracing::error!(
                    offset_ms = self.clock_offset_ms().unwrap_or(0),
                    max_ms = max,
                    "this node's clock is off from the cluster's: it will not be made a primary"
                );
            } else {
                tracing::info!("this node's clock is back within the allowed offset");
            }
            self.cluster.set_skewed(skewed);
        }
    }
}
