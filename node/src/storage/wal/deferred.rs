//! Deferred appends: a task that runs many commands at once (a client's
//! Batch stream) can have their log appends handed over together. Inside
//! [`Deferred::scope`], an append is queued and waits; the task calls
//! [`Wal::flush_deferred`](super::Wal::flush_deferred) when every command
//! it runs is waiting, which hands
//! the whole queue to the log as one unit (`--wal-fsync false`: one
//! `write`; `true`: one job of the writer thread's group commit) and each
//! waiter gets the outcome. Each command still logs before it applies and
//! is answered only after its record is written (and fsynced, if on); only
//! the number of system calls and thread hand-offs changes.

use std::future::Future;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::Shared;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::WalError;

/// Who waits for an append's outcome.
pub(super) type Waiter = oneshot::Sender<Result<(), WalError>>;

/// The outcome of one flush, shared by every append it carries.
pub(super) type Outcome = Shared<oneshot::Receiver<Result<(), WalError>>>;

tokio::task_local! {
    static DEFERRED: Arc<Deferred>;
}

/// One task's queue of appends waiting to be written.
#[derive(Debug, Default)]
pub struct Deferred {
    queue: Mutex<Queue>,
}

/// The queued appends framed back to back, and the outcome they share (one
/// channel per flush, not per append).
#[derive(Debug, Default)]
struct Queue {
    bytes: Vec<u8>,
    outcome: Option<(Waiter, Outcome)>,
}

impl Deferred {
    /// Runs `fut` with its log appends queued on `self`.
    pub async fn scope<F: Future>(self: Arc<Self>, fut: F) -> F::Output {
        DEFERRED.scope(self, fut).await
    }

    /// Whether appends wait to be written.
    pub fn is_empty(&self) -> bool {
        self.queue.lock().outcome.is_none()
    }

    /// If the current task runs in a [`Deferred::scope`], `frame` appends
    /// its records to the queue's bytes (a framing error leaves them as
    /// they were) and the outcome of the flush that will carry them is
    /// returned; else None.
    pub(super) fn queue_with(
        frame: impl FnOnce(&mut Vec<u8>) -> Result<(), WalError>,
    ) -> Option<Result<Outcome, WalError>> {
        DEFERRED
            .try_with(|d| {
                let mut q = d.queue.lock();
                let before = q.bytes.len();
                if let Err(e) = frame(&mut q.bytes) {
                    q.bytes.truncate(before);
                    return Err(e);
                }
                let (_, outcome) = q.outcome.get_or_insert_with(|| {
                    let (tx, rx) = oneshot::channel();
                    (tx, rx.shared())
                });
                Ok(outcome.clone())
            })
            .ok()
    }

    /// Takes every queued append: their bytes back to back, in queue
    /// order, and who waits for them (see [`Wal::flush_deferred`]).
    pub(super) fn take(&self) -> Option<(Vec<u8>, Waiter)> {
        let mut q = self.queue.lock();
        let (waiter, _) = q.outcome.take()?;
        Some((std::mem::take(&mut q.bytes), waiter))
    }

    /// Hands every queued append to `write` (their bytes back to back, in
    /// queue order) and their waiter its outcome. The queue keeps its
    /// buffer (up to [`KEPT_BUFFER`]) for the next appends: no allocation
    /// per flush.
    pub(super) fn write_with(&self, write: impl FnOnce(&[u8]) -> Result<(), WalError>) {
        let mut q = self.queue.lock();
        let Some((waiter, _)) = q.outcome.take() else {
            return;
        };
        let outcome = write(&q.bytes);
        q.bytes.clear();
        q.bytes.shrink_to(KEPT_BUFFER);
        drop(q);
        let _ = waiter.send(outcome);
    }
}

/// Most bytes a queue keeps allocated between flushes: a usual group (tens
/// of records) fits, and a node with many open Batch streams keeps at most
/// this much per stream (a larger group's buffer is freed after its flush).
const KEPT_BUFFER: usize = 16 << 10;
