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
use tonic::transport::Channel;

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
    /// Opens a Batch stream on `channel` and starts its task.
    pub(crate) async fn open(channel: Channel, max_message_bytes: usize) -> Result<Mux> {
        let (out_tx, out_rx) = mpsc::unbounded_channel::<BatchRequest>();
        let mut client = CacheClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let inbound = client
            .batch(UnboundedReceiverStream::new(out_rx))
            .await?
            .into_inner();
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(rx, out_tx, inbound));
        Ok(Mux { tx })
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
) {
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next_id: u64 = 1;
    let why = loop {
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
                let mut commands = Vec::with_capacity(16);
                let mut push = |p: Pending, commands: &mut Vec<Command>| {
                    let id = next_id;
                    next_id += 1;
                    pending.insert(id, p.reply);
                    commands.push(Command { id, op: Some(p.op) });
                };
                push(first, &mut commands);
                while commands.len() < MAX_COALESCE {
                    match rx.try_recv() {
                        Ok(p) => push(p, &mut commands),
                        Err(_) => break,
                    }
                }
                if out.send(BatchRequest { commands }).is_err() {
                    break "stream closed".to_string();
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
