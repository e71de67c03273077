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

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::WalError;

/// Who waits for an append's outcome.
pub(super) type Waiter = oneshot::Sender<Result<(), WalError>>;

tokio::task_local! {
    static DEFERRED: Arc<Deferred>;
}

/// One task's queue of appends waiting to be written.
#[derive(Debug, Default)]
pub struct Deferred {
    queue: Mutex<Vec<(Vec<u8>, Waiter)>>,
}

impl Deferred {
    /// Runs `fut` with its log appends queued on `self`.
    pub async fn scope<F: Future>(self: Arc<Self>, fut: F) -> F::Output {
        DEFERRED.scope(self, fut).await
    }

    /// Whether appends wait to be written.
    pub fn is_empty(&self) -> bool {
        self.queue.lock().is_empty()
    }

    /// Queues `bytes` if the current task runs in a [`Deferred::scope`];
    /// else gives them back.
    pub(super) fn queue(
        bytes: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<(), WalError>>, Vec<u8>> {
        match DEFERRED.try_with(Arc::clone) {
            Ok(d) => {
                let (tx, rx) = oneshot::channel();
                d.queue.lock().push((bytes, tx));
                Ok(rx)
            }
            Err(_) => Err(bytes),
        }
    }

    /// Takes every queued append: their bytes back to back, in queue
    /// order, and their waiters (see [`Wal::flush_deferred`]).
    pub(super) fn take(&self) -> Option<(Vec<u8>, Vec<Waiter>)> {
        let queued = std::mem::take(&mut *self.queue.lock());
        if queued.is_empty() {
            return None;
        }
        let mut buf = Vec::with_capacity(queued.iter().map(|(b, _)| b.len()).sum());
        let mut waiters = Vec::with_capacity(queued.len());
        for (b, w) in queued {
            buf.extend_from_slice(&b);
            waiters.push(w);
        }
        Some((buf, waiters))
    }
}
