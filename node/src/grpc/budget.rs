//! A byte budget, shared by the whole node, for large responses being sent
//! on Batch streams. A response over [`SMALL_RESPONSE`] takes room from the
//! budget when the transport takes it from the stream, and gives it back
//! when the transport asks for the next one (the previous one was handed
//! on). A client that never reads its responses (an HTTP/2 window that never
//! opens) therefore holds at most one response of room; once the budget is
//! held, further large responses wait, so the node's memory for them stays
//! bounded whatever the number of streams. Small responses (the usual gets
//! and puts) never wait: a well-behaved client is not starved by the ones
//! that stall. Responses still queued in a stream hold no room: they share
//! the values' memory with the store.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::PollSemaphore;

/// Responses up to this size (bytes) pass without taking room.
pub const SMALL_RESPONSE: usize = 1 << 20;

/// The node-wide budget.
#[derive(Debug, Clone)]
pub struct ResponseBudget {
    permits: Arc<Semaphore>,
    max: u32,
}

impl ResponseBudget {
    /// A budget of `bytes` (at least 1 MiB).
    pub fn new(bytes: u64) -> Self {
        let max = u32::try_from(bytes.max(1 << 20)).unwrap_or(u32::MAX);
        ResponseBudget {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }
}

/// The responses of one stream: (response, its encoded size) from the
/// stream's task, each large one holding room until the next is taken.
#[derive(Debug)]
pub struct Budgeted<T> {
    rx: mpsc::Receiver<(T, usize)>,
    next: Option<(T, usize)>,
    held: Option<OwnedSemaphorePermit>,
    room: PollSemaphore,
    max: u32,
}

impl<T> Budgeted<T> {
    /// Wraps the receiving end of a stream's response queue.
    pub fn new(rx: mpsc::Receiver<(T, usize)>, budget: &ResponseBudget) -> Self {
        Budgeted {
            rx,
            next: None,
            held: None,
            room: PollSemaphore::new(budget.permits.clone()),
            max: budget.max,
        }
    }
}

impl<T: Unpin> Stream for Budgeted<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // Asked for the next: the previous one was taken by the transport.
        self.held = None;
        if self.next.is_none() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(item)) => self.next = Some(item),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        let len = self.next.as_ref().map_or(0, |(_, len)| *len);
        if len > SMALL_RESPONSE {
            let n = u32::try_from(len).unwrap_or(u32::MAX).clamp(1, self.max);
            match self.room.poll_acquire_many(cx, n) {
                Poll::Ready(permit) => self.held = permit,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(self.next.take().map(|(item, _)| item))
    }
}
