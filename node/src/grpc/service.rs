//! The gRPC services of package `distcache.v1`, over a [`Node`].

use bytes::Bytes;
use distcache_client::proto::{self, command, command_result};
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use futures::{FutureExt, StreamExt, stream::FuturesUnordered};

use super::auth::{Access, Caller};
use super::budget::{Budgeted, ResponseBudget};
use super::convert;
use super::status::{to_proto, to_status};
use crate::command::{Command, Origin, Outcome};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::security::users::Role;
use crate::storage::CollectionMeta;

/// Implements every distcache gRPC service.
#[derive(Debug, Clone)]
pub struct Api {
    node: Arc<Node>,
    access: Access,
    budget: ResponseBudget,
}

impl Api {
    /// Services over `node`, open to every caller.
    pub fn new(node: Arc<Node>) -> Self {
        Api::with_access(node, Access::default())
    }

    /// Services over `node`, each call checked by `access`.
    pub fn with_access(node: Arc<Node>, access: Access) -> Self {
        let budget = ResponseBudget::new(node.config().batch_buffer_bytes);
        Api {
            node,
            access,
            budget,
        }
    }

    /// The caller of `req`, or UNAUTHENTICATED.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.access.caller(req).map_err(|e| self.status(e))
    }

    fn status(&self, e: crate::error::Error) -> Status {
        to_status(&e, self.node.epoch())
    }

    fn reply<T>(&self, r: Result<T>) -> Result<Response<T>, Status> {
        r.map(Response::new).map_err(|e| self.status(e))
    }
}

fn settings(m: &CollectionMeta) -> proto::CollectionSettings {
    proto::CollectionSettings {
        name: m.name.to_string(),
        default_ttl_ms: m.default_ttl_ms,
        max_entries: m.max_entries,
    }
}

/// Most collections in one List page.
const MAX_COLLECTIONS_PAGE: usize = 1_000;

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

/// Most commands of one Batch stream in flight at once.
const BATCH_IN_FLIGHT: usize = 4096;
/// Depth of the response queue of one Batch stream.
const BATCH_OUT_DEPTH: usize = 64;

impl Api {
    /// Runs a client's command and picks its answer out of the outcome (the
    /// one unary handler body).
    async fn unary<T>(
        &self,
        caller: Caller,
        cmd: Command,
        answer: impl FnOnce(Outcome) -> Option<T>,
    ) -> Result<Response<T>, Status> {
        caller.authorize(&cmd).map_err(|e| self.status(e))?;
        let outcome = self.node.run(cmd, Origin::Client).await;
        self.reply(outcome.and_then(|o| {
            let mismatch = convert::mismatch(&o);
            answer(o).ok_or(mismatch)
        }))
    }

    /// A unary data RPC: the same command and answer as on the Batch stream.
    async fn data<T>(
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

    type BatchStream = Budgeted<Result<proto::BatchResponse, Status>>;

    async fn batch(
        &self,
        req: Request<Streaming<proto::BatchRequest>>,
    ) -> Result<Response<Self::BatchStream>, Status> {
        self.caller(&req)?;
        let (access, creds) = (self.access.clone(), self.access.credentials(&req));
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(BATCH_OUT_DEPTH);
        let node = self.node.clone();
        self.node.tasks().spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut inbound_open = true;
            loop {
                tokio::select! {
                    _ = node.shutdown_token().cancelled() => break,
                    msg = inbound.message(), if inbound_open && in_flight.len() < BATCH_IN_FLIGHT => match msg {
                        Ok(Some(batch)) => {
                            for c in batch.commands {
                                let node = node.clone();
                                let caller = access.authenticate(&creds);
                                in_flight.push(async move {
                                    let result = match c.op.map(convert::command) {
                                        Some(cmd) => match caller.and_then(|c| c.authorize(&cmd)) {
                                            Ok(()) => node.run(cmd, Origin::Client).await.and_then(convert::result),
                                            Err(e) => Err(e),
                                        },
                                        None => Err(Error::InvalidArgument("command without op".into())),
                                    };
                                    let result = result.unwrap_or_else(|e| command_result::Result::Error(to_proto(&e, node.epoch())));
                                    proto::CommandResult { id: c.id, result: Some(result) }
                                });
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
                            break;
                        }
                    },
                    Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                        let mut ready = vec![first];
                        while let Some(Some(r)) = in_flight.next().now_or_never() {
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
                    else => break,
                }
            }
        });
        Ok(Response::new(Budgeted::new(rx, &self.budget)))
    }
}

#[tonic::async_trait]
impl proto::collections_server::Collections for Api {
    async fn get_or_create(
        &self,
        req: Request<proto::GetOrCreateCollectionRequest>,
    ) -> Result<Response<proto::GetOrCreateCollectionResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        // Getting an existing collection is a read; creating one is admin.
        let role = if self.node.store.collection(&r.name).is_ok() {
            Role::Read
        } else {
            Role::Admin
        };
        caller.require(&r.name, role).map_err(|e| self.status(e))?;
        let res = self
            .node
            .create_collection(&r.name, r.default_ttl_ms, r.max_entries)
            .await;
        self.reply(
            res.map(|(m, created)| proto::GetOrCreateCollectionResponse {
                settings: Some(settings(&m)),
                created,
            }),
        )
    }

    async fn list(
        &self,
        req: Request<proto::ListCollectionsRequest>,
    ) -> Result<Response<proto::ListCollectionsResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => MAX_COLLECTIONS_PAGE,
            n => (n as usize).min(MAX_COLLECTIONS_PAGE),
        };
        // In name order, after the page token, only what the caller may see.
        let mut visible = self
            .node
            .store
            .list_collections()
            .into_iter()
            .filter(|m| *m.name > *r.page_token.as_str() && caller.sees(&m.name));
        let collections: Vec<proto::CollectionSettings> =
            visible.by_ref().take(size).map(|m| settings(&m)).collect();
        let next_page_token = match (visible.next(), collections.last()) {
            (Some(_), Some(last)) => last.name.clone(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListCollectionsResponse {
            collections,
            next_page_token,
        }))
    }

    async fn exists(
        &self,
        req: Request<proto::CollectionExistsRequest>,
    ) -> Result<Response<proto::CollectionExistsResponse>, Status> {
        let caller = self.caller(&req)?;
        let name = req.into_inner().name;
        caller
            .require(&name, Role::Read)
            .map_err(|e| self.status(e))?;
        let exists = self.node.store.collection(&name).is_ok();
        Ok(Response::new(proto::CollectionExistsResponse { exists }))
    }

    async fn delete(
        &self,
        req: Request<proto::DeleteCollectionRequest>,
    ) -> Result<Response<proto::DeleteCollectionResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        caller
            .require(&r.name, Role::Admin)
            .map_err(|e| self.status(e))?;
        let res = self.node.delete_collection(&r.name).await;
        self.reply(res.map(|deleted| proto::DeleteCollectionResponse { deleted }))
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

impl Api {
    fn members(&self) -> Vec<proto::Member> {
        let t = self.node.cluster.table();
        self.node
            .cluster
            .members()
            .into_iter()
            .map(|m| {
                let (primaries, backups) = t.counts(&m.name);
                proto::Member {
                    alive: self.node.cluster.alive(&m.name),
                    name: m.name,
                    address: m.grpc,
                    peer_address: m.peer,
                    primaries,
                    backups,
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl proto::cluster_server::Cluster for Api {
    async fn members(
        &self,
        req: Request<proto::MembersRequest>,
    ) -> Result<Response<proto::MembersResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(proto::MembersResponse {
            members: self.members(),
        }))
    }

    async fn partition_table(
        &self,
        req: Request<proto::PartitionTableRequest>,
    ) -> Result<Response<proto::PartitionTableResponse>, Status> {
        self.caller(&req)?;
        let t = self.node.cluster.table();
        let partitions = t
            .owners
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.is_empty())
            .map(|(p, o)| proto::PartitionOwners {
                partition: p as u32,
                primary: o[0].clone(),
                backups: o[1..].to_vec(),
            })
            .collect();
        let members = t
            .members
            .iter()
            .map(|m| {
                let (primaries, backups) = t.counts(&m.name);
                proto::Member {
                    name: m.name.clone(),
                    address: m.grpc.clone(),
                    peer_address: m.peer.clone(),
                    alive: self.node.cluster.alive(&m.name),
                    primaries,
                    backups,
                }
            })
            .collect();
        Ok(Response::new(proto::PartitionTableResponse {
            epoch: t.epoch,
            partition_count: t.partition_count,
            partitions,
            members,
        }))
    }

    async fn health(
        &self,
        req: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        self.caller(&req)?;
        let c = &self.node.cluster;
        let t = c.table();
        let (safe, without, migrating, examples) = self.node.safety_detail();
        let quorum = c.quorum();
        let wal_failure = self.node.wal.as_ref().and_then(|w| w.failure());
        let problem = if let Some(why) = self.node.failure() {
            format!("node failed: {why}")
        } else if let Some(why) = wal_failure {
            format!("WAL failed, writes refused: {why}")
        } else if !quorum {
            "quorum lost: writes are refused".to_string()
        } else if t.is_empty() {
            "no partition table yet".to_string()
        } else if without > 0 {
            format!(
                "partitions without an in-sync backup, e.g. {}",
                examples.join("; ")
            )
        } else {
            String::new()
        };
        Ok(Response::new(proto::HealthResponse {
            member: self.node.name().to_string(),
            epoch: t.epoch,
            partition_count: t.partition_count,
            backup_count: c.config().backup_count,
            safe: safe && self.node.failure().is_none(),
            quorum,
            partitions_without_backup: without,
            migrations_running: migrating,
            problem,
        }))
    }
}
