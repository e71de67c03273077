//! The room a planned write reserves under the memory limit's reject
//! policy (see [`Room`]).

use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes a planned write's new entries take, counted in the store's
/// use when the write is planned (the reject policy): two writes planned
/// at the same moment never both fit in the same room. Applying the write
/// uses it up (`Store::apply_planned`); what a write does not apply (it
/// failed, or was never applied) is given back when the room is dropped.
#[derive(Debug)]
#[must_use = "the room is given back when dropped"]
pub struct Room<'a> {
    used: Option<&'a AtomicUsize>,
    bytes: usize,
}

impl<'a> Room<'a> {
    /// `bytes` just counted in `used`.
    pub(in crate::storage) fn of(used: &'a AtomicUsize, bytes: usize) -> Room<'a> {
        Room {
            used: Some(used),
            bytes,
        }
    }

    /// No room (nothing reserved: a write of no new entries, or a store
    /// without the reject policy).
    pub fn none() -> Room<'static> {
        Room {
            used: None,
            bytes: 0,
        }
    }

    /// Takes up to `n` reserved bytes for an entry being applied (they are
    /// its charge, already counted).
    pub(in crate::storage) fn take(&mut self, n: usize) -> usize {
        let t = n.min(self.bytes);
        self.bytes -= t;
        t
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if let Some(used) = self.used
            && self.bytes > 0
        {
            let d = self.bytes;
            let _ = used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(d))
            });
        }
    }
}
