//! Collections: the registry (create/delete here and on every member,
//! pulled from the coordinator when missed), and whole-collection ops.

use std::sync::Arc;

use distcache_client::partition::{DEFAULT_COLLECTION, resolve_collection};

use crate::error::{Error, Result};
use crate::net::message::{CollectionOp, Request, Response};
use crate::node::Node;
use crate::storage::CollectionMeta;

impl Node {
    /// Gets or creates a collection here and on every live member.
    pub async fn create_collection(
        &self,
        name: &str,
        ttl: u64,
        max: u64,
    ) -> Result<(Arc<CollectionMeta>, bool)> {
        let most = self.config().max_collections;
        if self.store.collection(name).is_err() && self.store.collection_count() as u64 >= most {
            return Err(Error::LimitExceeded {
                limit: "max-collections",
                actual: self.store.collection_count() as u64 + 1,
                max: most,
            });
        }
        let applying = if self.wal.is_some() && self.store.collection(name).is_err() {
            self.log_collection(&CollectionOp::Create {
                name: resolve_collection(name).to_string(),
                default_ttl_ms: ttl,
                max_entries: max,
            })
            .await?
        } else {
            None
        };
        let (meta, created) = self.store.get_or_create_collection(name, ttl, max)?;
        drop(applying);
        if created {
            self.broadcast(CollectionOp::Create {
                name: meta.name.to_string(),
                default_ttl_ms: meta.default_ttl_ms,
                max_entries: meta.max_entries,
            })
            .await;
        }
        Ok((meta, created))
    }

    /// Deletes a collection here and on every live member.
    pub async fn delete_collection(&self, name: &str) -> Result<bool> {
        let op = CollectionOp::Delete {
            name: resolve_collection(name).to_string(),
        };
        let applying = if self.wal.is_some()
            && self.store.collection(name).is_ok()
            && resolve_collection(name) != DEFAULT_COLLECTION
        {
            self.log_collection(&op).await?
        } else {
            None
        };
        let deleted = self.store.delete_collection(name)?;
        drop(applying);
        self.broadcast(op).await;
        Ok(deleted)
    }

    async fn broadcast(&self, op: CollectionOp) {
        let (alive, _) = self.cluster.liveness();
        let calls = alive.iter().filter(|m| m.name != self.name()).map(|m| {
            let req = Request::Collection(op.clone());
            async move {
                (
                    m.name.clone(),
                    self.peers
                        .call(&m.peer, req, self.cluster.config().request_timeout)
                        .await,
                )
            }
        });
        for (name, r) in futures::future::join_all(calls).await {
            if r.is_err() {
                tracing::warn!(member = %name, "collection change not delivered; it syncs later");
            }
        }
    }

    /// Applies a collection-registry change from a peer (logged first).
    pub(super) async fn apply_collection(&self, op: &CollectionOp) -> Result<()> {
        let _applying = self.log_collection(op).await?;
        match op {
            CollectionOp::Create {
                name,
                default_ttl_ms,
                max_entries,
            } => self
                .store
                .get_or_create_collection(name, *default_ttl_ms, *max_entries)
                .map(|_| ()),
            CollectionOp::Delete { name } => self.store.delete_collection(name).map(|_| ()),
        }
    }

    /// Creates collections the coordinator has and this node lacks.
    pub(super) async fn pull_collections(&self) {
        let Some(coord) = self
            .coordinator()
            .filter(|c| c != self.name() && self.cluster.alive(c))
        else {
            return;
        };
        let Some(spec) = self
            .cluster
            .members()
            .iter()
            .find(|&m| m.name == coord)
            .cloned()
        else {
            return;
        };
        if let Ok(Response::Collections(list)) = self
            .peers
            .call(
                &spec.peer,
                Request::ListCollections,
                self.cluster.config().request_timeout,
            )
            .await
        {
            for (name, ttl, max) in list {
                if self.store.collection(&name).is_err() {
                    let op = CollectionOp::Create {
                        name,
                        default_ttl_ms: ttl,
                        max_entries: max,
                    };
                    let _ = self.apply_collection(&op).await;
                }
            }
        }
    }

    /// The collections as a peer answer.
    pub(super) fn collections_answer(&self) -> Response {
        Response::Collections(
            self.store
                .list_collections()
                .iter()
                .map(|m| (m.name.to_string(), m.default_ttl_ms, m.max_entries))
                .collect(),
        )
    }
}
