//! Reused heap slots for the commands a Batch stream runs at once.
//!
//! A command's future is a few KiB, above the allocator's per-thread cache,
//! so allocating one per command takes the allocator's slow paths (and, with
//! many commands alive at once waiting for their log append, its
//! consolidation). A [`Slots`] keeps the slots of finished commands and
//! puts the next commands into them in place (`Pin::set`): no allocation per
//! command once a stream's slots exist.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A heap slot a command future runs in; empty (`None`) when free.
pub type Slot<F> = Pin<Box<Option<F>>>;

/// Free slots of one stream, at most `most_kept` of them.
#[derive(Debug)]
pub struct Slots<F> {
    free: Vec<Slot<F>>,
    most_kept: usize,
}

impl<F: Future> Slots<F> {
    /// A pool that keeps at most `most_kept` free slots (the rest are
    /// freed as their commands finish).
    pub fn new(most_kept: usize) -> Self {
        Slots {
            free: Vec::new(),
            most_kept,
        }
    }

    /// `fut` in a free slot (or a new one), to be polled as an [`InSlot`].
    pub fn fill(&mut self, fut: F) -> InSlot<F> {
        let slot = match self.free.pop() {
            Some(mut slot) => {
                slot.as_mut().set(Some(fut));
                slot
            }
            None => Box::pin(Some(fut)),
        };
        InSlot { slot: Some(slot) }
    }

    /// Keeps a finished command's slot for the next command (up to
    /// `most_kept`; an extra slot is freed).
    pub fn give_back(&mut self, slot: Slot<F>) {
        if self.free.len() < self.most_kept {
            self.free.push(slot);
        }
    }

    /// Free slots kept.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.free.len()
    }
}

/// A command running in a slot: finishes with the command's output and the
/// slot, emptied (the command's future is dropped in place when it finishes).
#[derive(Debug)]
pub struct InSlot<F> {
    slot: Option<Slot<F>>,
}

impl<F: Future> Future for InSlot<F> {
    type Output = (F::Output, Slot<F>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // `InSlot` is `Unpin`: it only holds a pointer to the pinned slot.
        let this = self.get_mut();
        let Some(slot) = this.slot.as_mut() else {
            // Polled again after it finished: it stays finished.
            return Poll::Pending;
        };
        let Some(fut) = slot.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        let out = match fut.poll(cx) {
            Poll::Ready(out) => out,
            Poll::Pending => return Poll::Pending,
        };
        slot.as_mut().set(None);
        match this.slot.take() {
            Some(slot) => Poll::Ready((out, slot)),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts its drops, so a test sees a finished command dropped in place.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn command(n: u32, drops: &Arc<AtomicUsize>) -> impl Future<Output = u32> + use<> {
        let guard = Counted(drops.clone());
        async move {
            tokio::task::yield_now().await;
            let _g = guard;
            n * 2
        }
    }

    #[tokio::test]
    async fn finished_slots_are_reused_in_place_and_their_futures_dropped() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut slots = Slots::new(2);
        let (out, slot) = slots.fill(command(1, &drops)).await;
        assert_eq!(out, 2);
        assert!(slot.is_none(), "a finished command's slot is empty");
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the future was dropped when it finished"
        );
        let addr = &*slot as *const Option<_> as usize;
        slots.give_back(slot);
        assert_eq!(slots.kept(), 1);

        let (out, slot) = slots.fill(command(5, &drops)).await;
        assert_eq!(out, 10);
        assert_eq!(
            &*slot as *const Option<_> as usize, addr,
            "the next command ran in the same slot"
        );
        assert_eq!(slots.kept(), 0);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
        slots.give_back(slot);
    }

    #[tokio::test]
    async fn keeps_at_most_its_bound_and_a_dropped_command_is_dropped_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut slots = Slots::new(1);
        let a = slots.fill(command(1, &drops));
        let b = slots.fill(command(2, &drops));
        let pending = slots.fill(command(3, &drops));
        let ((x, sa), (y, sb)) = futures::join!(a, b);
        assert_eq!((x, y), (2, 4));
        slots.give_back(sa);
        slots.give_back(sb);
        assert_eq!(slots.kept(), 1, "a slot beyond the bound is freed");
        // A command dropped before it finishes (a stream that ends) is
        // dropped with its slot, once.
        let mut pending = pending;
        assert!((&mut pending).now_or_never().is_none());
        drop(pending);
        assert_eq!(drops.load(Ordering::SeqCst), 3);
    }
}
