//! The gRPC services of package `distcache.v1`, over a [`Node`].

use bytes::Bytes;
use distcache_client::config::BATCH_STREAMS_HEADER;
use distcache_client::proto::{self, command, command_result};
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use futures::{FutureExt, StreamExt, stream::FuturesUnordered};

use super::auth::{Access, Caller};
use super::budget::{Answers, Budgeted, ResponseBudget, SMALL_RESPONSE};
use super::convert;
use super::inbound::{Inbound, InboundBody};
use super::slots::Slots;
use super::status::{to_proto, to_status};
use crate::command::{Command, Origin, Outcome};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::storage::wal::{Deferred, Wal};
use std::future::Future;
use std::task::Poll;

/// Implements every distcache gRPC service.
#[derive(Debug, Clone)]
pub struct Api {
    pub(super) node: Arc<Node>,
    access: Access,
    budget: ResponseBudget,
    /// Room for large Batch requests being received (`Inbound`).
    requests: ResponseBudget,
}

impl Api {
    /// Services over `node`, open to every caller.
    pub fn new(node: Arc<Node>) -> Self {
        Api::with_access(node, Access::default())
    }

    /// Services over `node`, each call checked by `access`.
    pub fn with_access(node: Arc<Node>, access: Access) -> Self {
        let budget = ResponseBudget::new(node.config().batch_buffer_bytes);
        let requests = ResponseBudget::new(node.config().request_buffer_bytes);
        Api {
            node,
            access,
            budget,
            requests,
        }
    }

    /// The budget of large requests being received (for [`super::inbound::RequestRoom`]).
    pub fn requests(&self) -> ResponseBudget {
        self.requests.clone()
    }

    /// The caller of `req`, or UNAUTHENTICATED.
    pub(super) fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.access.caller(req).map_err(|e| self.status(e))
    }

    pub(super) fn status(&self, e: crate::error::Error) -> Status {
        to_status(&e, self.node.epoch())
    }

    pub(super) fn reply<T>(&self, r: Result<T>) -> Result<Response<T>, Status> {
        r.map(Response::new).map_err(|e| self.status(e))
    }
}

/// A Batch response message holds ready results up to about this size.
const BATCH_MESSAGE_BYTES: usize = 1 << 20;

/// Groups results into responses of about [`BATCH_MESSAGE_BYTES`] each.
fn coalesce(results: Vec<proto::CommandResult>) -> Vec<proto::BatchResponse> {
    let mut out = Vec::new();
    let (mut current, mut bytes) = (Vec::new(), 0usize);
    for r in results {
        let len = prost::Message::encoded_len(&r);
        if !current.is_empty() && bytes + len > BATCH_MESSAGE_BYTES {
            out.push(proto::BatchResponse {
                results: std::mem::take(&mut current),
            });
            bytes = 0;
        }
        bytes += len;
        current.push(r);
    }
    if !current.is_empty() {
        out.push(proto::BatchResponse { results: current });
    }
    out
}

/// The next finished command of `in_flight`. Whenever every command in it
/// waits and some wait for their log appends (queued on `deferred`), those
/// are written with one `write` and the commands polled again at once, so a
/// command never waits for its append beyond this poll: it has applied (and
/// released its partition) before the task waits for anything else.
fn next_done<'a, F: Future>(
    in_flight: &'a mut FuturesUnordered<F>,
    deferred: &'a Deferred,
    wal: Option<&'a Wal>,
) -> impl Future<Output = Option<F::Output>> + 'a {
    std::future::poll_fn(move |cx| {
        loop {
            match in_flight.poll_next_unpin(cx) {
                Poll::Pending => match wal {
                    Some(wal) if !deferred.is_empty() => wal.flush_deferred(deferred),
                    _ => return Poll::Pending,
                },
                done => return done,
            }
        }
    })
}

/// Most free command slots a Batch stream keeps (each a command future of a
/// few KiB).
const KEPT_SLOTS: usize = 64;

/// Depth of the response queue of one Batch stream.
const BATCH_OUT_DEPTH: usize = 64;

impl Api {
    /// Runs a client's command and picks its answer out of the outcome (the
    /// one unary handler body). A large answer waits for room in the
    /// response budget and holds it until its bytes are written, as a Batch
    /// stream's does.
    async fn unary<T: prost::Message>(
        &self,
        caller: Caller,
        cmd: Command,
        answer: impl FnOnce(Outcome) -> Option<T>,
    ) -> Result<Response<T>, Status> {
        caller.authorize(&cmd).map_err(|e| self.status(e))?;
        let outcome = self.node.run(cmd, Origin::Client).await;
        let mut response = self.reply(outcome.and_then(|o| {
            // Only the variant's name is kept for the error: formatting the
            // outcome (values included) on every call cost a 16 MiB answer
            // seconds of CPU and a 64 MiB string.
            let kind = o.kind();
            answer(o).ok_or_else(|| convert::mismatch(kind))
        }))?;
        let len = response.get_ref().encoded_len();
        if len > SMALL_RESPONSE {
            let handoff = self.budget.hold(len).await;
            response.extensions_mut().insert(handoff);
        }
        Ok(response)
    }

    /// A unary data RPC: the same command and answer as on the Batch stream.
    async fn data<T: prost::Message>(
        &self,
        caller: Caller,
        op: command::Op,
        pick: impl FnOnce(command_result::Result) -> Option<T>,
    ) -> Result<Response<T>, Status> {
        self.unary(caller, convert::command(op), |o| {
            convert::result(o).ok().and_then(pick)
        })
        .await
    }
}

#[tonic::async_trait]
impl proto::cache_server::Cache for Api {
    async fn get(
        &self,
        req: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::Get(req.into_inner()),
            |r| match r {
                command_result::Result::Get(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn put(
        &self,
        req: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::Put(req.into_inner()),
            |r| match r {
                command_result::Result::Put(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn delete(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::Delete(req.into_inner()),
            |r| match r {
                command_result::Result::Delete(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn put_if_absent(
        &self,
        req: Request<proto::PutIfAbsentRequest>,
    ) -> Result<Response<proto::PutIfAbsentResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::PutIfAbsent(req.into_inner()),
            |r| match r {
                command_result::Result::PutIfAbsent(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn compare_and_set(
        &self,
        req: Request<proto::CompareAndSetRequest>,
    ) -> Result<Response<proto::CompareAndSetResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::CompareAndSet(req.into_inner()),
            |r| match r {
                command_result::Result::CompareAndSet(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn increment(
        &self,
        req: Request<proto::IncrementRequest>,
    ) -> Result<Response<proto::IncrementResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::Increment(req.into_inner()),
            |r| match r {
                command_result::Result::Increment(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn get_many(
        &self,
        req: Request<proto::GetManyRequest>,
    ) -> Result<Response<proto::GetManyResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::GetMany(req.into_inner()),
            |r| match r {
                command_result::Result::GetMany(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn put_many(
        &self,
        req: Request<proto::PutManyRequest>,
    ) -> Result<Response<proto::PutManyResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::PutMany(req.into_inner()),
            |r| match r {
                command_result::Result::PutMany(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn delete_many(
        &self,
        req: Request<proto::DeleteManyRequest>,
    ) -> Result<Response<proto::DeleteManyResponse>, Status> {
        self.data(
            self.caller(&req)?,
            command::Op::DeleteMany(req.into_inner()),
            |r| match r {
                command_result::Result::DeleteMany(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn keys(
        &self,
        req: Request<proto::KeysRequest>,
    ) -> Result<Response<proto::KeysResponse>, Status> {
        let caller = self.caller(&req)?;
        let cmd = convert::keys(req.into_inner()).map_err(|e| self.status(e))?;
        self.unary(caller, cmd, |o| match o {
            Outcome::KeysPage { keys, last, more } => Some(proto::KeysResponse {
                keys,
                next_page_token: if more {
                    convert::page_token(last)
                } else {
                    Bytes::new()
                },
            }),
            _ => None,
        })
        .await
    }

    async fn size(
        &self,
        req: Request<proto::SizeRequest>,
    ) -> Result<Response<proto::SizeResponse>, Status> {
        let caller = self.caller(&req)?;
        let cmd = Command::Size {
            collection: req.into_inner().collection,
            partitions: None,
        };
        self.unary(caller, cmd, |o| match o {
            Outcome::Count(size) => Some(proto::SizeResponse { size }),
            _ => None,
        })
        .await
    }

    async fn clear(
        &self,
        req: Request<proto::ClearRequest>,
    ) -> Result<Response<proto::ClearResponse>, Status> {
        let caller = self.caller(&req)?;
        let cmd = Command::Clear {
            collection: req.into_inner().collection,
            partitions: None,
        };
        self.unary(caller, cmd, |o| match o {
            Outcome::Cleared(removed) => Some(proto::ClearResponse { removed }),
            _ => None,
        })
        .await
    }

    /// Empty: the stream's answers travel in the response's extensions
    /// ([`Answers`]) to the body that encodes them ([`super::budget::AnswerBody`]).
    type BatchStream = futures::stream::Empty<Result<proto::BatchResponse, Status>>;

    async fn batch(
        &self,
        req: Request<Streaming<proto::BatchRequest>>,
    ) -> Result<Response<Self::BatchStream>, Status> {
        self.caller(&req)?;
        let (access, creds) = (self.access.clone(), self.access.credentials(&req));
        let max = usize::try_from(self.node.config().max_message_bytes).unwrap_or(usize::MAX);
        let mut inbound = match req
            .extensions()
            .get::<InboundBody>()
            .and_then(InboundBody::take)
        {
            Some(body) => Requests::Own(Inbound::new(body, &self.requests, max)),
            None => Requests::Tonic(req.into_inner()),
        };
        let (tx, rx) = mpsc::channel(BATCH_OUT_DEPTH);
        let node = self.node.clone();
        let most_in_flight = node.config().batch_in_flight;
        // With `--wal-fsync false` the log appends of the commands this
        // stream runs wait in `deferred` until every command waits, then go
        // to the OS with one `write` (`next_done`).
        let deferred = Arc::new(Deferred::default());
        let scope = deferred.clone();
        let open = node.metrics.batch_stream();
        self.node.tasks().spawn(scope.scope(async move {
            let _open = open;
            let admit = |c: proto::Command| {
                let node = node.clone();
                let caller = access.authenticate(&creds);
                async move {
                    let result = match c.op.map(convert::command) {
                        Some(cmd) => match caller.and_then(|c| c.authorize(&cmd)) {
                            Ok(()) => node.run(cmd, Origin::Client).await.and_then(convert::result),
                            Err(e) => Err(e),
                        },
                        None => Err(Error::InvalidArgument("command without op".into())),
                    };
                    let result = result.unwrap_or_else(|e| command_result::Result::Error(to_proto(&e, node.epoch())));
                    proto::CommandResult { id: c.id, result: Some(result) }
                }
            };
            let mut in_flight = FuturesUnordered::new();
            // Finished commands' slots, reused by the next commands (no
            // allocation of a command's future per command).
            let mut slots = Slots::new(most_in_flight.min(KEPT_SLOTS));
            let mut inbound_open = true;
            'stream: loop {
                // The client closed its side and every command is answered:
                // the response stream ends (the shutdown branch below keeps
                // `select!` from ever reaching its `else`).
                if !inbound_open && in_flight.is_empty() {
                    break;
                }
                tokio::select! {
                    _ = node.shutdown_token().cancelled() => break,
                    Some(first) = next_done(&mut in_flight, &deferred, node.wal.as_deref()), if !in_flight.is_empty() => {
                        let (first, slot) = first;
                        slots.give_back(slot);
                        let mut ready = vec![first];
                        while let Some(Some((r, slot))) = next_done(&mut in_flight, &deferred, node.wal.as_deref()).now_or_never() {
                            slots.give_back(slot);
                            ready.push(r);
                        }
                        // Ready results coalesced into messages of about
                        // BATCH_MESSAGE_BYTES (one result may be larger), each
                        // with its size for the node's response budget.
                        let mut sent = true;
                        for resp in coalesce(ready) {
                            let len = prost::Message::encoded_len(&resp);
                            if tx.send((Ok(resp), len)).await.is_err() {
                                sent = false;
                                break;
                            }
                        }
                        if !sent {
                            break;
                        }
                    }
                    msg = inbound.message(), if inbound_open && in_flight.len() < most_in_flight => {
                        // This message and every one already received
                        // behind it (their commands are then polled, and
                        // their log appends written, together).
                        let mut msg = Some(msg);
                        while let Some(m) = msg.take() {
                            match m {
                                Ok(Some(batch)) => {
                                    for c in batch.commands {
                                        in_flight.push(slots.fill(admit(c)));
                                    }
                                    if in_flight.len() < most_in_flight {
                                        msg = inbound.message().now_or_never();
                                    }
                                }
                                Ok(None) => inbound_open = false,
                                Err(status) => {
                                    if status.code() == tonic::Code::OutOfRange {
                                        tracing::warn!(error = %status.message(), "batch stream refused a message");
                                    } else {
                                        tracing::debug!(error = %status.message(), "batch stream ended");
                                    }
                                    let _ = tx.send((Err(status), 0)).await;
                                    break 'stream;
                                }
                            }
                        }
                    }
                    else => break,
                }
            }
        }));
        let answers = Answers::new(Budgeted::new(rx, &self.budget));
        let mut response = Response::new(futures::stream::empty());
        response.extensions_mut().insert(answers);
        // How many Batch streams a client should open here: one per worker
        // thread (this stream's commands run on one thread at a time).
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        response
            .metadata_mut()
            .insert(BATCH_STREAMS_HEADER, MetadataValue::from(workers.max(1)));
        Ok(response)
    }
}

/// A Batch stream's requests: decoded by the node ([`Inbound`]) when the
/// stream came through [`super::inbound::RequestRoom`], else by tonic.
enum Requests {
    Own(Inbound<proto::BatchRequest>),
    Tonic(Streaming<proto::BatchRequest>),
}

impl Requests {
    /// The next message; `None` once the client closed its side. Cancel safe.
    async fn message(&mut self) -> std::result::Result<Option<proto::BatchRequest>, Status> {
        match self {
            Requests::Own(inbound) => inbound.message().await,
            Requests::Tonic(streaming) => streaming.message().await,
        }
    }
}

#[tonic::async_trait]
impl proto::locks_server::Locks for Api {
    async fn acquire(
        &self,
        req: Request<proto::AcquireLockRequest>,
    ) -> Result<Response<proto::LockGrant>, Status> {
        let caller = self.caller(&req)?;
        let cmd = convert::acquire(req.into_inner());
        let key = cmd.key().cloned().unwrap_or_default();
        self.unary(caller, cmd, |o| match o {
            Outcome::Granted(g) => Some(convert::grant(key, g)),
            _ => None,
        })
        .await
    }

    async fn try_acquire(
        &self,
        req: Request<proto::TryAcquireLockRequest>,
    ) -> Result<Response<proto::TryAcquireLockResponse>, Status> {
        let caller = self.caller(&req)?;
        let cmd = convert::try_acquire(req.into_inner());
        let key = cmd.key().cloned().unwrap_or_default();
        self.unary(caller, cmd, |o| match o {
            Outcome::MaybeGranted(g) => Some(proto::TryAcquireLockResponse {
                acquired: g.is_some(),
                grant: g.map(|g| convert::grant(key, g)),
            }),
            _ => None,
        })
        .await
    }

    async fn release(
        &self,
        req: Request<proto::ReleaseLockRequest>,
    ) -> Result<Response<proto::ReleaseLockResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let cmd = Command::Release {
            key: r.key,
            token: r.fencing_token,
        };
        self.unary(caller, cmd, |o| {
            matches!(o, Outcome::Released).then_some(proto::ReleaseLockResponse {})
        })
        .await
    }

    async fn extend(
        &self,
        req: Request<proto::ExtendLockRequest>,
    ) -> Result<Response<proto::LockGrant>, Status> {
        let caller = self.caller(&req)?;
        let cmd = convert::extend(req.into_inner());
        let key = cmd.key().cloned().unwrap_or_default();
        self.unary(caller, cmd, |o| match o {
            Outcome::Granted(g) => Some(convert::grant(key, g)),
            _ => None,
        })
        .await
    }

    async fn force_release(
        &self,
        req: Request<proto::ForceReleaseLockRequest>,
    ) -> Result<Response<proto::ForceReleaseLockResponse>, Status> {
        let caller = self.caller(&req)?;
        let cmd = Command::ForceRelease {
            key: req.into_inner().key,
        };
        self.unary(caller, cmd, |o| match o {
            Outcome::ForceReleased(released) => Some(proto::ForceReleaseLockResponse { released }),
            _ => None,
        })
        .await
    }
}
