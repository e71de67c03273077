//! Deferred appends (`--wal-fsync false` only): a task that runs many
//! commands at once (a client's Batch stream) can have their log appends
//! written together. Inside [`Deferred::scope`], an append is queued and
//! waits; the task calls [`Deferred::flush`] when every command it runs is
//! waiting, which writes the whole queue with one `write` and wakes them.
//! Each command still logs before it applies and is answered only after
//! its record is in the OS; only the number of system calls changes.

use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{Wal, WalError};

type Waiter = oneshot::Sender<Result<(), WalError>>;

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

    /// Writes every queued append, in queue order, with one `write`, and
    /// hands each waiter the outcome.
    pub fn flush(&self, wal: &Wal) {
        let queued = std::mem::take(&mut *self.queue.lock());
        if queued.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(queued.iter().map(|(b, _)| b.len()).sum());
        for (b, _) in &queued {
            buf.extend_from_slice(b);
        }
        let outcome = wal.write_now(&buf);
        for (_, waiter) in queued {
            let _ = waiter.send(outcome.clone());
        }
    }
}
