//! The administrative services over the same [`Api`]: `Collections`
//! (create, list, exists, delete) and `Cluster` (members, partition table,
//! health).

use tonic::{Request, Response, Status};

use distcache_client::proto;

use super::service::Api;
use crate::security::users::Role;
use crate::storage::CollectionMeta;

/// Most collections in one List page.
const MAX_COLLECTIONS_PAGE: usize = 1_000;

fn settings(m: &CollectionMeta) -> proto::CollectionSettings {
    proto::CollectionSettings {
        name: m.name.to_string(),
        default_ttl_ms: m.default_ttl_ms,
        max_entries: m.max_entries,
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

impl Api {
    fn members(&self) -> Vec<proto::Member> {
        let t = self.node.cluster.table();
        self.node
            .cluster
            .members()
            .iter()
            .cloned()
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
        } else if !safe && !examples.is_empty() {
            examples.join("; ")
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
            metadata_leader: self.node.meta_leader().unwrap_or_default(),
            metadata_voters: self.node.meta_voters(),
            clock_offset_ms: self.node.clock_offset_ms().unwrap_or(0),
            clock_skewed: c.is_skewed(),
            partitions_lost: c.meta().lost_total,
        }))
    }

    async fn forget(
        &self,
        req: Request<proto::ForgetMemberRequest>,
    ) -> Result<Response<proto::ForgetMemberResponse>, Status> {
        let caller = self.caller(&req)?;
        caller
            .require("*", Role::Admin)
            .map_err(|e| self.status(e))?;
        let member = req.into_inner().member;
        if member.is_empty() || member == self.node.name() {
            return Err(self.status(crate::error::Error::InvalidArgument(
                "name another member to forget (not empty, not the node you ask)".into(),
            )));
        }
        tracing::warn!(%member, "an operator declared a member gone for good");
        let res = match self
            .node
            .propose(crate::meta::state::MetaCmd::Forget { member })
            .await
        {
            Ok((crate::meta::state::MetaReply::Done, index)) => {
                self.node.applied_up_to(index).await;
                Ok(proto::ForgetMemberResponse {
                    partitions_lost: self.node.cluster.meta().lost_total,
                })
            }
            Ok((crate::meta::state::MetaReply::Refused(why), _)) => {
                Err(crate::error::Error::InvalidArgument(why))
            }
            Err(e) => Err(e),
        };
        self.reply(res)
    }
}
