//! The Batch-stream multiplexer: many concurrent callers share one
//! bidirectional stream per slot (the TiKV BatchCommands idea).
//!
//! One task owns each stream. Callers hand it a command and a oneshot; the
//! task assigns ids, coalesces whatever is queued into one `BatchRequest`,
//! and routes each `CommandResult` back by id. When the stream breaks every
//! pending caller gets `Unavailable`, the task ends, and the next call opens a
//! new stream. The task also ends when the last [`Mux`] handle is dropped.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::config::BATCH_STREAMS_HEADER;
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::proto::cache_client::CacheClient;
use crate::proto::{BatchRequest, BatchResponse, Command, command, command_result};

/// Most commands coalesced into one stream message.
const MAX_COALESCE: usize = 512;
/// Callers that may queue on one stream before `execute` waits.
const QUEUE_DEPTH: usize = 4096;

type Reply = oneshot::Sender<Result<command_result::Result>>;

struct Pending {
    op: command::Op,
    reply: Reply,
}

/// A handle on one Batch stream.
#[derive(Clone)]
pub(crate) struct Mux {
    tx: mpsc::Sender<Pending>,
}

impl Mux {
    /// Opens a Batch stream on `channel` and starts its task; also returns
    /// the Batch streams the node advises ([`BATCH_STREAMS_HEADER`], None
    /// when it gives no readable number).
    pub(crate) async fn open(
        channel: Conn,
        max_message_bytes: usize,
    ) -> Result<(Mux, Option<usize>)> {
        let (out_tx, out_rx) = mpsc::unbounded_channel::<BatchRequest>();
        let mut client = CacheClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let response = client.batch(UnboundedReceiverStream::new(out_rx)).await?;
        let advised = response
            .metadata()
            .get(BATCH_STREAMS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let inbound = response.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(rx, out_tx, inbound, max_message_bytes));
        Ok((Mux { tx }, advised))
    }

    /// True once the stream task has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends one command and waits for its result (no timeout here).
    pub(crate) async fn execute(&self, op: command::Op) -> Result<command_result::Result> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { op, reply })
            .await
            .map_err(|_| Error::Unavailable("batch stream closed".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("batch stream closed".into()))?
    }
}

async fn run(
    mut rx: mpsc::Receiver<Pending>,
    out: mpsc::UnboundedSender<BatchRequest>,
    mut inbound: tonic::Streaming<BatchResponse>,
    max_message_bytes: usize,
) {
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next_id: u64 = 1;
    let why = 'run: loop {
        tokio::select! {
            biased;
            msg = inbound.message() => match msg {
                Ok(Some(resp)) => {
                    for r in resp.results {
                        if let Some(reply) = pending.remove(&r.id) {
                            let res = match r.result {
                                Some(command_result::Result::Error(e)) => Err(Error::from_proto(e)),
                                Some(ok) => Ok(ok),
                                None => Err(Error::Internal("empty result".into())),
                            };
                            let _ = reply.send(res);
                        }
                    }
                }
                Ok(None) => break "stream ended by the node".to_string(),
                Err(status) => break format!("stream failed: {}", status.message()),
            },
            first = rx.recv() => {
                let Some(first) = first else { break String::new() };
                // One scheduler round first: callers made ready together
                // (a burst of requests, or answers that woke many callers)
                // queue behind this one and travel in the same message.
                tokio::task::yield_now().await;
                let mut carry = Some(first);
                while let Some(first) = carry.take() {
                    let mut batch = Coalesce::new(max_message_bytes);
                    let mut next = Some(first);
                    while let Some(p) = next.take() {
                        match batch.push(p, &mut next_id, &mut pending) {
                            Pushed::Yes => {}
                            Pushed::Full(p) => { carry = Some(p); break; }
                        }
                        if batch.has_room() {
                            next = rx.try_recv().ok();
                        }
                    }
                    if !batch.commands.is_empty()
                        && out.send(BatchRequest { commands: batch.commands }).is_err()
                    {
                        if let Some(p) = carry.take() {
                            let _ = p.reply.send(Err(Error::Unavailable("stream closed".into())));
                        }
                        break 'run "stream closed".to_string();
                    }
                }
            }
        }
    };
    if !why.is_empty() {
        tracing::debug!(%why, pending = pending.len(), "batch stream closed");
    }
    rx.close();
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(Error::Unavailable(why.clone())));
    }
    while let Ok(p) = rx.try_recv() {
        let _ = p.reply.send(Err(Error::Unavailable(why.clone())));
    }
}

/// Bytes of commands coalesced into one stream message, at most.
const COALESCE_BYTES: usize = 1 << 20;
/// Framing slack allowed per message.
const MESSAGE_SLACK: usize = 1024;

enum Pushed {
    Yes,
    Full(Pending),
}

/// One outgoing `BatchRequest` being filled.
struct Coalesce {
    commands: Vec<Command>,
    bytes: usize,
    max_message_bytes: usize,
}

impl Coalesce {
    fn new(max_message_bytes: usize) -> Self {
        Coalesce {
            commands: Vec::with_capacity(16),
            bytes: 0,
            max_message_bytes,
        }
    }

    fn has_room(&self) -> bool {
        self.commands.len() < MAX_COALESCE && self.bytes < COALESCE_BYTES
    }

    /// Adds `p` unless the message would grow past the limit; a command that
    /// alone exceeds the limit is answered with `LimitExceeded` at once.
    fn push(&mut self, p: Pending, next_id: &mut u64, pending: &mut HashMap<u64, Reply>) -> Pushed {
        let len = p.op.encoded_len() + 16;
        if len + MESSAGE_SLACK > self.max_message_bytes {
            let _ = p.reply.send(Err(Error::LimitExceeded(format!(
                "max-message-bytes exceeded: command of {len} bytes > {} bytes",
                self.max_message_bytes
            ))));
            return Pushed::Yes;
        }
        if !self.commands.is_empty() && self.bytes + len + MESSAGE_SLACK > self.max_message_bytes {
            return Pushed::Full(p);
        }
        let id = *next_id;
        *next_id += 1;
        pending.insert(id, p.reply);
        self.bytes += len;
        self.commands.push(Command { id, op: Some(p.op) });
        Pushed::Yes
    }
}
