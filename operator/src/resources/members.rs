//! The member list the operator publishes (a ConfigMap the nodes watch).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};

use super::{Names, meta};
use crate::crd::DistributedCacheCluster;
use distcache_client::members::{
    MEMBERS_JSON_KEY, MEMBERS_TEXT_KEY, PublishedMember, PublishedMembers,
};

/// The member list the nodes watch: one entry per replica by stable pod
/// name, with the pod's IP when it has one (its DNS name through the
/// headless Service otherwise), its readiness and its UID.
pub fn published_members(dcc: &DistributedCacheCluster, pods: &[Pod]) -> PublishedMembers {
    let n = Names::of(dcc);
    let p = &dcc.spec.ports;
    let members = (0..dcc.spec.replicas)
        .map(|i| {
            let name = format!("{}-{i}", n.cluster);
            let pod = pods
                .iter()
                .find(|pod| pod.metadata.name.as_deref() == Some(&name));
            let status = pod.and_then(|pod| pod.status.as_ref());
            let host = status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty())
                .unwrap_or_else(|| n.member_host(i));
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            PublishedMember {
                grpc: format!("{host}:{}", p.grpc),
                peer: format!("{host}:{}", p.peer),
                ready,
                pod_uid: pod
                    .and_then(|pod| pod.metadata.uid.clone())
                    .unwrap_or_default(),
                name,
            }
        })
        .collect();
    PublishedMembers {
        expected_size: u32::try_from(dcc.spec.replicas).unwrap_or(0),
        members,
    }
}

/// The ConfigMap holding the member list ([`published_members`]) under
/// `members.json` (what the nodes watch) and as `NAME=GRPC/PEER` text under
/// `members`.
pub fn members_config(dcc: &DistributedCacheCluster, pods: &[Pod]) -> ConfigMap {
    let list = published_members(dcc, pods);
    ConfigMap {
        metadata: meta(dcc, &Names::of(dcc).cluster),
        data: Some(BTreeMap::from([
            (
                MEMBERS_JSON_KEY.to_string(),
                serde_json::to_string(&list).unwrap_or_default(),
            ),
            (MEMBERS_TEXT_KEY.to_string(), list.to_text() + "\n"),
        ])),
        ..ConfigMap::default()
    }
}
