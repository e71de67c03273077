//! Per-backup replication streams: every write this node applies as a
//! primary is queued, in the order it was applied, to one stream per backup
//! process; the stream sends whatever has queued up as one frame, waits for
//! the backup's per-item answers and hands each to the write waiting for it.
//! One frame is in flight per backup at a time, so the backup sees the
//! items in queue order; under load the queue grows while a frame is in
//! flight and the next frame carries all of it (coalescing), with no timer
//! (the stream yields once to the scheduler before it gathers a frame).
//! Each stream has a connection of its own, which it writes and reads
//! itself (the backup answers its frames in order, on the connection's
//! reading task): no pool, no writer or reader task in between.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::message::{ReplItem, Request, Response, WireError};
use crate::net::peer::{Direct, Peers};
use crate::replica::ReplOp;

/// Most items in one replication frame.
const MAX_ITEMS: usize = 4096;

/// What became of one queued item.
#[derive(Debug)]
pub enum Acked {
    /// The backup applied it (or already held it).
    Applied,
    /// The backup refused it (gap, other stream, not a backup...).
    Refused(WireError),
    /// No answer (connection, timeout, queue full, shutdown).
    Lost(String),
}

struct Queued {
    item: ReplItem,
    bytes: usize,
    done: oneshot::Sender<Acked>,
    /// The stream's queued-bytes count (this item's bytes are in it until
    /// its frame is answered).
    held: Arc<AtomicUsize>,
}

/// One backup's queue: its sender and the bytes it holds.
type Queue = (mpsc::Sender<Queued>, Arc<AtomicUsize>);

/// The streams of one node, keyed by the backup's peer address.
pub struct Streams {
    peers: Arc<Peers>,
    me: String,
    timeout: Duration,
    max_batch_bytes: usize,
    queue: usize,
    queue_bytes: usize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    senders: parking_lot::Mutex<HashMap<String, Queue>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("backups", &self.senders.lock().len())
            .field("queue_bytes", &self.queue_bytes)
            .finish()
    }
}

/// Bytes an item takes in a frame, about.
fn item_bytes(ops: &[ReplOp]) -> usize {
    ops.iter()
        .map(|op| match op {
            ReplOp::Put {
                collection,
                key,
                value,
                ..
            } => collection.len() + key.len() + value.len() + 24,
            ReplOp::Delete { collection, key } => collection.len() + key.len() + 16,
            ReplOp::Clear { collection } => collection.len() + 16,
            ReplOp::Lock { key, .. } => key.len() + 48,
        })
        .sum::<usize>()
        + 32
}

impl Streams {
    /// Streams sending as member `me` through `peers`; a frame waits
    /// `timeout` for its answer; frames carry up to `max_batch_bytes` (one
    /// larger item travels alone); `(items, bytes)` wait per backup at most.
    pub fn new(
        peers: Arc<Peers>,
        me: String,
        timeout: Duration,
        max_batch_bytes: usize,
        (queue, queue_bytes): (usize, usize),
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Streams {
        Streams {
            peers,
            me,
            timeout,
            max_batch_bytes,
            queue: queue.max(1),
            queue_bytes,
            tasks,
            shutdown,
            senders: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Queues `item` to the backup at `addr` (behind everything queued to
    /// it before); the receiver yields the backup's answer. Waits while the
    /// backup's queue is full, `timeout` at most (then the item is lost:
    /// the backup will refuse the items after it as a gap).
    pub async fn send(&self, addr: &str, item: ReplItem) -> oneshot::Receiver<Acked> {
        let (done, rx) = oneshot::channel();
        let bytes = item_bytes(&item.ops);
        let (tx, held) = self.sender(addr);
        let before = held.fetch_add(bytes, Ordering::SeqCst);
        if before > 0 && before + bytes > self.queue_bytes {
            held.fetch_sub(bytes, Ordering::SeqCst);
            let _ = done.send(Acked::Lost(format!(
                "replication queue to {addr} holds {before} bytes (--replication-queue-bytes)"
            )));
            return rx;
        }
        let queued = Queued {
            item,
            bytes,
            done,
            held: held.clone(),
        };
        match tx.try_send(queued) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(q)) => {
                // Rare (the queue is full): boxed, so the common path's
                // future (part of every write's) stays small.
                if let Err(e) = Box::pin(tx.send_timeout(q, self.timeout)).await {
                    let q = match e {
                        mpsc::error::SendTimeoutError::Timeout(q)
                        | mpsc::error::SendTimeoutError::Closed(q) => q,
                    };
                    q.held.fetch_sub(q.bytes, Ordering::SeqCst);
                    let _ = q.done.send(Acked::Lost(format!(
                        "replication queue to {addr} full for {:?}",
                        self.timeout
                    )));
                }
            }
            Err(mpsc::error::TrySendError::Closed(q)) => {
                q.held.fetch_sub(q.bytes, Ordering::SeqCst);
                let _ = q.done.send(Acked::Lost("node shutting down".into()));
            }
        }
        rx
    }

    /// Drops the streams to addresses not in `keep` (their tasks end once
    /// their queues are sent).
    pub fn retain(&self, keep: &[&str]) {
        self.senders
            .lock()
            .retain(|addr, _| keep.contains(&addr.as_str()));
    }

    fn sender(&self, addr: &str) -> Queue {
        let mut senders = self.senders.lock();
        if let Some((tx, held)) = senders.get(addr)
            && !tx.is_closed()
        {
            return (tx.clone(), held.clone());
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let held = Arc::new(AtomicUsize::new(0));
        senders.insert(addr.to_string(), (tx.clone(), held.clone()));
        let stream = Stream {
            peers: self.peers.clone(),
            me: self.me.clone(),
            addr: addr.to_string(),
            timeout: self.timeout,
            max_batch_bytes: self.max_batch_bytes,
            conn: None,
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(stream.run(rx, shutdown));
        (tx, held)
    }
}

/// One backup's stream (its task).
struct Stream {
    peers: Arc<Peers>,
    me: String,
    addr: String,
    timeout: Duration,
    max_batch_bytes: usize,
    /// The stream's own connection to the backup (opened when needed,
    /// dropped after any error).
    conn: Option<Direct>,
}

impl Stream {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                q = rx.recv() => match q {
                    Some(q) => q,
                    None => break,
                },
            };
            // Let the writes being applied right now (on this and the
            // other worker threads) queue behind the first one, so they
            // travel in the same frame: measured 3.5 -> 4.1 items a frame
            // and about 10 % more replicated writes a second.
            tokio::task::yield_now().await;
            let mut bytes = first.bytes;
            let mut batch = vec![first];
            while batch.len() < MAX_ITEMS {
                match rx.try_recv() {
                    Ok(q) if bytes + q.bytes <= self.max_batch_bytes => {
                        bytes += q.bytes;
                        batch.push(q);
                    }
                    Ok(q) => {
                        self.send(batch).await;
                        bytes = q.bytes;
                        batch = vec![q];
                    }
                    Err(_) => break,
                }
            }
            self.send(batch).await;
        }
        // Whatever is still queued is answered as lost.
        rx.close();
        while let Ok(q) = rx.try_recv() {
            q.held.fetch_sub(q.bytes, Ordering::SeqCst);
            let _ = q.done.send(Acked::Lost("node shutting down".into()));
        }
    }

    /// One request on the stream's own connection (opened first if it has
    /// none), all within the stream's timeout.
    async fn call(&mut self, req: Request) -> crate::error::Result<Response> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let open = self.peers.direct(&self.addr);
                match tokio::time::timeout(self.timeout, open).await {
                    Ok(c) => c?,
                    Err(_) => {
                        return Err(crate::error::Error::Unavailable(format!(
                            "connect to peer {} timed out",
                            self.addr
                        )));
                    }
                }
            }
        };
        let conn = self.conn.insert(conn);
        conn.call(req, self.timeout).await
    }

    /// Sends one frame and hands out its answers.
    async fn send(&mut self, batch: Vec<Queued>) {
        let bytes: usize = batch.iter().map(|q| q.bytes).sum();
        let held = batch.first().map(|q| q.held.clone());
        let (items, waiters): (Vec<ReplItem>, Vec<oneshot::Sender<Acked>>) =
            batch.into_iter().map(|q| (q.item, q.done)).unzip();
        let n = items.len();
        let req = Request::Replicate {
            from: self.me.clone(),
            items,
        };
        let answer = self.call(req).await;
        if let Some(held) = held {
            held.fetch_sub(bytes, Ordering::SeqCst);
        }
        match answer {
            Ok(Response::Replicated(results)) if results.len() == n => {
                for (done, r) in waiters.into_iter().zip(results) {
                    let _ = done.send(match r {
                        None => Acked::Applied,
                        Some(e) => Acked::Refused(e),
                    });
                }
            }
            Ok(Response::Error(e)) => {
                for done in waiters {
                    let _ = done.send(Acked::Refused(e.clone()));
                }
            }
            other => {
                // Whatever went wrong, the connection is not trusted again.
                self.conn = None;
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => format!("unexpected answer from {}", self.addr),
                };
                for done in waiters {
                    let _ = done.send(Acked::Lost(why.clone()));
                }
            }
        }
    }
}
