//! The table-install seqlock: a write that overlaps a partition-table
//! install is never acknowledged.
//!
//! An install changes backups and sync state without waiting for partition
//! locks, and publishes the new table last. A write takes a [`Stamp`] before
//! it applies; if an install was in progress then, or one began before the
//! write finished replicating, the write is reported indeterminate instead
//! of acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};

/// Twice the number of completed installs, odd while one is in progress.
#[derive(Debug, Default)]
pub struct InstallSeq(AtomicU64);

/// The install count a write started under (always even).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64);

/// An install in progress; ends when dropped.
#[derive(Debug)]
pub struct Installing<'a>(&'a InstallSeq);

impl InstallSeq {
    /// Marks an install as begun (the count becomes odd) until the guard drops.
    pub fn begin_install(&self) -> Installing<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Installing(self)
    }

    /// The current stamp, or None while an install is in progress.
    pub fn stamp(&self) -> Option<Stamp> {
        let v = self.0.load(Ordering::SeqCst);
        v.is_multiple_of(2).then_some(Stamp(v))
    }

    /// No install began since `stamp` was taken.
    pub fn still_valid(&self, stamp: Stamp) -> bool {
        self.0.load(Ordering::SeqCst) == stamp.0
    }
}

impl Drop for Installing<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_taken_before_an_install_is_no_longer_valid() {
        let seq = InstallSeq::default();
        let stamp = seq.stamp().expect("no install running");
        assert!(seq.still_valid(stamp));
        {
            let _i = seq.begin_install();
            assert!(seq.stamp().is_none(), "no stamp while installing");
            assert!(!seq.still_valid(stamp));
        }
        assert!(!seq.still_valid(stamp));
        let later = seq.stamp().expect("install finished");
        assert!(seq.still_valid(later));
    }
}
