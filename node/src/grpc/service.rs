//! The gRPC services of package `distcache.v1`, over a [`Node`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distcache_client::proto::{self, command, command_result};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::status::{to_proto, to_status};
use crate::config::{DEFAULT_ACQUIRE_MS, DEFAULT_HOLD_MS};
use crate::error::Result;
use crate::node::Node;
use crate::storage::CollectionMeta;

/// Implements every distcache gRPC service.
#[derive(Debug, Clone)]
pub struct Api {
    node: Arc<Node>,
}

impl Api {
    /// Services over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Api { node }
    }

    fn status(&self, e: crate::error::Error) -> Status {
        to_status(&e, self.node.epoch())
    }

    fn reply<T>(&self, r: Result<T>) -> Result<Response<T>, Status> {
        r.map(Response::new).map_err(|e| self.status(e))
    }
}

fn pairs(entries: Vec<proto::KeyValue>) -> Vec<(Bytes, Bytes)> {
    entries.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

fn kvs(entries: Vec<(Bytes, Bytes)>) -> Vec<proto::KeyValue> {
    entries
        .into_iter()
        .map(|(key, value)| proto::KeyValue { key, value })
        .collect()
}

fn settings(m: &CollectionMeta) -> proto::CollectionSettings {
    proto::CollectionSettings {
        name: m.name.to_string(),
        default_ttl_ms: m.default_ttl_ms,
        max_entries: m.max_entries,
    }
}

fn or_default(ms: u64, default: u64) -> u64 {
    if ms == 0 { default } else { ms }
}

/// Runs one data command against the node.
fn run_command(node: &Node, op: command::Op) -> command_result::Result {
    let s = &node.store;
    let res = match op {
        command::Op::Get(r) => s.get(&r.collection, &r.key).map(|v| {
            command_result::Result::Get(proto::GetResponse {
                found: v.is_some(),
                value: v.unwrap_or_default(),
            })
        }),
        command::Op::Put(r) => s
            .put(&r.collection, r.key, r.value, r.ttl_ms)
            .map(|()| command_result::Result::Put(proto::PutResponse {})),
        command::Op::Delete(r) => s
            .delete(&r.collection, &r.key)
            .map(|deleted| command_result::Result::Delete(proto::DeleteResponse { deleted })),
        command::Op::GetMany(r) => s
            .get_many(&r.collection, &r.keys)
            .map(|e| command_result::Result::GetMany(proto::GetManyResponse { entries: kvs(e) })),
        command::Op::PutMany(r) => s
            .put_many(&r.collection, pairs(r.entries), r.ttl_ms)
            .map(|()| command_result::Result::PutMany(proto::PutManyResponse {})),
        command::Op::DeleteMany(r) => s.delete_many(&r.collection, &r.keys).map(|deleted| {
            command_result::Result::DeleteMany(proto::DeleteManyResponse { deleted })
        }),
    };
    res.unwrap_or_else(|e| command_result::Result::Error(to_proto(&e, node.epoch())))
}

/// Depth of the response queue of one Batch stream.
const BATCH_OUT_DEPTH: usize = 64;

#[tonic::async_trait]
impl proto::cache_server::Cache for Api {
    async fn get(
        &self,
        req: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .get(&r.collection, &r.key)
                .map(|v| proto::GetResponse {
                    found: v.is_some(),
                    value: v.unwrap_or_default(),
                }),
        )
    }

    async fn put(
        &self,
        req: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .put(&r.collection, r.key, r.value, r.ttl_ms)
                .map(|()| proto::PutResponse {}),
        )
    }

    async fn delete(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .delete(&r.collection, &r.key)
                .map(|deleted| proto::DeleteResponse { deleted }),
        )
    }

    async fn get_many(
        &self,
        req: Request<proto::GetManyRequest>,
    ) -> Result<Response<proto::GetManyResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .get_many(&r.collection, &r.keys)
                .map(|e| proto::GetManyResponse { entries: kvs(e) }),
        )
    }

    async fn put_many(
        &self,
        req: Request<proto::PutManyRequest>,
    ) -> Result<Response<proto::PutManyResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .put_many(&r.collection, pairs(r.entries), r.ttl_ms)
                .map(|()| proto::PutManyResponse {}),
        )
    }

    async fn delete_many(
        &self,
        req: Request<proto::DeleteManyRequest>,
    ) -> Result<Response<proto::DeleteManyResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .delete_many(&r.collection, &r.keys)
                .map(|deleted| proto::DeleteManyResponse { deleted }),
        )
    }

    async fn keys(
        &self,
        req: Request<proto::KeysRequest>,
    ) -> Result<Response<proto::KeysResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .keys(&r.collection)
                .map(|keys| proto::KeysResponse { keys }),
        )
    }

    async fn size(
        &self,
        req: Request<proto::SizeRequest>,
    ) -> Result<Response<proto::SizeResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .size(&r.collection)
                .map(|size| proto::SizeResponse { size }),
        )
    }

    async fn clear(
        &self,
        req: Request<proto::ClearRequest>,
    ) -> Result<Response<proto::ClearResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .clear(&r.collection)
                .map(|removed| proto::ClearResponse { removed }),
        )
    }

    type BatchStream = ReceiverStream<Result<proto::BatchResponse, Status>>;

    async fn batch(
        &self,
        req: Request<Streaming<proto::BatchRequest>>,
    ) -> Result<Response<Self::BatchStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(BATCH_OUT_DEPTH);
        let node = self.node.clone();
        self.node.tasks().spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = node.shutdown_token().cancelled() => break,
                    m = inbound.message() => m,
                };
                match msg {
                    Ok(Some(batch)) => {
                        let results = batch
                            .commands
                            .into_iter()
                            .map(|c| proto::CommandResult {
                                id: c.id,
                                result: Some(match c.op {
                                    Some(op) => run_command(&node, op),
                                    None => command_result::Result::Error(to_proto(
                                        &crate::error::Error::InvalidArgument("command without op".into()),
                                        node.epoch(),
                                    )),
                                }),
                            })
                            .collect();
                        if tx.send(Ok(proto::BatchResponse { results })).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        if status.code() == tonic::Code::OutOfRange {
                            tracing::warn!(error = %status.message(), "batch stream refused a message");
                        } else {
                            tracing::debug!(error = %status.message(), "batch stream ended");
                        }
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl proto::collections_server::Collections for Api {
    async fn get_or_create(
        &self,
        req: Request<proto::GetOrCreateCollectionRequest>,
    ) -> Result<Response<proto::GetOrCreateCollectionResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .get_or_create_collection(&r.name, r.default_ttl_ms, r.max_entries)
                .map(|(m, created)| proto::GetOrCreateCollectionResponse {
                    settings: Some(settings(&m)),
                    created,
                }),
        )
    }

    async fn list(
        &self,
        _req: Request<proto::ListCollectionsRequest>,
    ) -> Result<Response<proto::ListCollectionsResponse>, Status> {
        let collections = self
            .node
            .store
            .list_collections()
            .iter()
            .map(|m| settings(m))
            .collect();
        Ok(Response::new(proto::ListCollectionsResponse {
            collections,
        }))
    }

    async fn exists(
        &self,
        req: Request<proto::CollectionExistsRequest>,
    ) -> Result<Response<proto::CollectionExistsResponse>, Status> {
        let exists = self.node.store.collection(&req.into_inner().name).is_ok();
        Ok(Response::new(proto::CollectionExistsResponse { exists }))
    }

    async fn delete(
        &self,
        req: Request<proto::DeleteCollectionRequest>,
    ) -> Result<Response<proto::DeleteCollectionResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .store
                .delete_collection(&r.name)
                .map(|deleted| proto::DeleteCollectionResponse { deleted }),
        )
    }
}

fn grant(key: Bytes, g: crate::locking::Grant) -> proto::LockGrant {
    proto::LockGrant {
        key,
        fencing_token: g.token,
        hold_ms: g.hold_ms,
    }
}

#[tonic::async_trait]
impl proto::locks_server::Locks for Api {
    async fn acquire(
        &self,
        req: Request<proto::AcquireLockRequest>,
    ) -> Result<Response<proto::LockGrant>, Status> {
        let r = req.into_inner();
        let hold = or_default(r.hold_timeout_ms, DEFAULT_HOLD_MS);
        let wait = Duration::from_millis(or_default(r.acquire_timeout_ms, DEFAULT_ACQUIRE_MS));
        let g = self.node.locks.acquire(&r.key, hold, wait).await;
        self.reply(g.map(|g| grant(r.key, g)))
    }

    async fn try_acquire(
        &self,
        req: Request<proto::TryAcquireLockRequest>,
    ) -> Result<Response<proto::TryAcquireLockResponse>, Status> {
        let r = req.into_inner();
        let hold = or_default(r.hold_timeout_ms, DEFAULT_HOLD_MS);
        let g = self.node.locks.try_acquire(&r.key, hold);
        Ok(Response::new(proto::TryAcquireLockResponse {
            acquired: g.is_some(),
            grant: g.map(|g| grant(r.key, g)),
        }))
    }

    async fn release(
        &self,
        req: Request<proto::ReleaseLockRequest>,
    ) -> Result<Response<proto::ReleaseLockResponse>, Status> {
        let r = req.into_inner();
        self.reply(
            self.node
                .locks
                .release(&r.key, r.fencing_token)
                .map(|()| proto::ReleaseLockResponse {}),
        )
    }

    async fn extend(
        &self,
        req: Request<proto::ExtendLockRequest>,
    ) -> Result<Response<proto::LockGrant>, Status> {
        let r = req.into_inner();
        let hold = or_default(r.hold_timeout_ms, DEFAULT_HOLD_MS);
        let g = self.node.locks.extend(&r.key, r.fencing_token, hold);
        self.reply(g.map(|g| grant(r.key, g)))
    }

    async fn force_release(
        &self,
        req: Request<proto::ForceReleaseLockRequest>,
    ) -> Result<Response<proto::ForceReleaseLockResponse>, Status> {
        let released = self.node.locks.force_release(&req.into_inner().key);
        Ok(Response::new(proto::ForceReleaseLockResponse { released }))
    }
}

impl Api {
    fn self_member(&self) -> proto::Member {
        proto::Member {
            name: self.node.name().to_string(),
            address: self.node.address().to_string(),
            peer_address: String::new(),
            alive: true,
            primaries: self.node.store.partition_count(),
            backups: 0,
        }
    }
}

#[tonic::async_trait]
impl proto::cluster_server::Cluster for Api {
    async fn members(
        &self,
        _req: Request<proto::MembersRequest>,
    ) -> Result<Response<proto::MembersResponse>, Status> {
        Ok(Response::new(proto::MembersResponse {
            members: vec![self.self_member()],
        }))
    }

    async fn partition_table(
        &self,
        _req: Request<proto::PartitionTableRequest>,
    ) -> Result<Response<proto::PartitionTableResponse>, Status> {
        let count = self.node.store.partition_count();
        let partitions = (0..count)
            .map(|partition| proto::PartitionOwners {
                partition,
                primary: self.node.name().to_string(),
                backups: Vec::new(),
            })
            .collect();
        Ok(Response::new(proto::PartitionTableResponse {
            epoch: self.node.epoch(),
            partition_count: count,
            partitions,
            members: vec![self.self_member()],
        }))
    }

    async fn health(
        &self,
        _req: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        Ok(Response::new(proto::HealthResponse {
            member: self.node.name().to_string(),
            epoch: self.node.epoch(),
            partition_count: self.node.store.partition_count(),
            backup_count: 0,
            safe: true,
            quorum: true,
            partitions_without_backup: 0,
            migrations_running: 0,
            problem: String::new(),
        }))
    }
}
