//! Pure functions from a `DistributedCacheCluster` to the objects it needs,
//! one file per kind: `statefulset` (with WAL volume claims), `services`
//! (headless peer Service, client Service), `members` (the published member
//! list), `policy` (PodDisruptionBudget), `rbac` (the nodes' ServiceAccount,
//! Role and RoleBinding), `peer_tls` (the members' certificates). No API calls here: the reconciler applies what
//! these return.

mod members;
mod peer_tls;
mod policy;
mod rbac;
mod services;
mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::DistributedCacheCluster;

pub use members::{members_config, published_members};
pub use peer_tls::{PEER_TLS_MOUNT, peer_tls_secret, peer_tls_secret_name};
pub use policy::{OPERATOR_POD_LABEL, network_policy, pdb};
pub use rbac::{NODE_RULES, rbac};
pub use services::{client_service, peer_service};
pub use statefulset::{statefulset, statefulset_with_partition};

/// Seconds a node gets to hand its partitions off before it is killed.
pub const TERMINATION_GRACE_SECONDS: i64 = 60;
/// Where the client TLS Secret is mounted.
pub const TLS_MOUNT: &str = "/etc/distcache/tls";
/// Where the users Secret is mounted.
pub const AUTH_MOUNT: &str = "/etc/distcache/auth";
/// Where the WAL volume is mounted.
pub const WAL_MOUNT: &str = "/data";

/// Names of the objects of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// StatefulSet and client Service.
    pub cluster: String,
    /// Headless Service for peers.
    pub peers: String,
    /// ServiceAccount, Role, RoleBinding of the nodes.
    pub account: String,
    /// Namespace.
    pub namespace: String,
}

impl Names {
    /// Names derived from the resource.
    pub fn of(dcc: &DistributedCacheCluster) -> Names {
        let name = dcc.name_any();
        Names {
            peers: format!("{name}-peers"),
            account: format!("{name}-node"),
            namespace: dcc.namespace().unwrap_or_else(|| "default".into()),
            cluster: name,
        }
    }

    /// DNS name of member `i` through the headless Service.
    pub fn member_host(&self, i: i32) -> String {
        format!("{}-{i}.{}.{}.svc", self.cluster, self.peers, self.namespace)
    }
}

/// Labels every object and pod of the cluster carries.
pub fn labels(dcc: &DistributedCacheCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "distcache".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), dcc.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            "cache-node".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "distcache-operator".to_string(),
        ),
    ])
}

/// Labels that select the cluster's pods.
pub fn selector(dcc: &DistributedCacheCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "distcache".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), dcc.name_any()),
    ])
}

pub(crate) fn meta(dcc: &DistributedCacheCluster, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: dcc.namespace(),
        labels: Some(labels(dcc)),
        owner_references: owner(dcc).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

pub(crate) fn owner(dcc: &DistributedCacheCluster) -> Option<OwnerReference> {
    dcc.controller_owner_ref(&())
}

#[cfg(test)]
mod tests {
    use distcache_client::members::PublishedMembers;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;
    use crate::crd::DistributedCacheClusterSpec;

    fn dcc(json: &str) -> DistributedCacheCluster {
        let spec: DistributedCacheClusterSpec = serde_json::from_str(json).expect("spec");
        let mut d = DistributedCacheCluster::new("cache", spec);
        d.metadata.namespace = Some("prod".into());
        d.metadata.uid = Some("uid-1".into());
        d
    }

    fn envs(s: &StatefulSet) -> BTreeMap<String, String> {
        s.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod")
            .containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .collect()
    }

    #[test]
    fn statefulset_follows_the_spec() {
        let d = dcc(r#"{"replicas": 5, "backupCount": 2, "image": "x:1"}"#);
        let s = statefulset(&d);
        let spec = s.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(5));
        assert_eq!(spec.service_name.as_deref(), Some("cache-peers"));
        assert!(spec.volume_claim_templates.is_none(), "no storage, no PVCs");
        let e = envs(&s);
        assert_eq!(e["DISTCACHE_BACKUP_COUNT"], "2");
        assert_eq!(
            e["DISTCACHE_MEMBERS_CONFIGMAP"],
            "$(DISTCACHE_NAMESPACE)/cache"
        );
        assert_eq!(e["DISTCACHE_ADVERTISE"], "$(DISTCACHE_POD_IP):7100");
        assert_eq!(e["DISTCACHE_PEER_ADVERTISE"], "$(DISTCACHE_POD_IP):7200");
        assert_eq!(e["DISTCACHE_METRICS_LISTEN"], "0.0.0.0:9100");
        let template = spec.template.metadata.as_ref().expect("template metadata");
        let annotations = template.annotations.as_ref().expect("annotations");
        assert_eq!(annotations["prometheus.io/port"], "9100");
        let ports: Vec<(Option<&str>, i32)> = spec.template.spec.as_ref().expect("pod").containers
            [0]
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
        assert_eq!(
            ports,
            vec![
                (Some("grpc"), 7100),
                (Some("peer"), 7200),
                (Some("metrics"), 9100)
            ]
        );
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cache-1", "uid": "p1"},
            "status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("pod");
        let cm = members_config(&d, &[pod]);
        let data = cm.data.as_ref().expect("data");
        let list = &data["members"];
        assert_eq!(list.lines().count(), 5);
        assert!(list.starts_with(
            "cache-0=cache-0.cache-peers.prod.svc:7100/cache-0.cache-peers.prod.svc:7200\n"
        ));
        let published = PublishedMembers::from_json(&data["members.json"]).expect("published list");
        assert_eq!(published.expected_size, 5);
        let m1 = &published.members[1];
        assert_eq!(
            (
                m1.grpc.as_str(),
                m1.peer.as_str(),
                m1.ready,
                m1.pod_uid.as_str()
            ),
            ("10.1.2.3:7100", "10.1.2.3:7200", true, "p1"),
            "a pod with an IP is published by IP, with readiness and UID"
        );
        assert!(!published.members[0].ready && published.members[0].pod_uid.is_empty());
        assert!(!e.contains_key("DISTCACHE_WAL_DIR"));
        let pod = spec.template.spec.as_ref().expect("pod");
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(TERMINATION_GRACE_SECONDS)
        );
        let c = &pod.containers[0];
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.grpc.as_ref())
                .map(|g| g.port),
            Some(7100)
        );
        assert!(
            pod.affinity
                .as_ref()
                .and_then(|a| a.pod_anti_affinity.as_ref())
                .is_some(),
            "spread by default"
        );
        assert_eq!(
            s.metadata
                .owner_references
                .as_ref()
                .map(|o| o[0].kind.as_str()),
            Some("DistributedCacheCluster")
        );
    }

    fn plain_dcc() -> DistributedCacheCluster {
        dcc(r#"{}"#)
    }

    #[test]
    fn client_tls_and_users_mount_their_secrets_and_switch_the_probes_to_tcp() {
        let plain = statefulset(&dcc(r#"{}"#));
        let pod = |s: &StatefulSet| {
            s.spec
                .as_ref()
                .and_then(|s| s.template.spec.clone())
                .expect("pod")
        };
        // Every cluster mounts its peer certificates (mutual TLS is always on).
        let peer_only: Vec<(String, Option<String>)> = pod(&plain)
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.name, v.secret.and_then(|s| s.secret_name)))
            .collect();
        assert_eq!(
            peer_only,
            vec![("peer-tls".to_string(), Some("cache-peer-tls".to_string()))]
        );
        let pe = envs(&plain);
        assert_eq!(
            pe["DISTCACHE_PEER_TLS_CERT"],
            "/etc/distcache/peer-tls/$(DISTCACHE_NAME).crt"
        );
        assert_eq!(
            pe["DISTCACHE_PEER_TLS_KEY"],
            "/etc/distcache/peer-tls/$(DISTCACHE_NAME).key"
        );
        assert_eq!(
            pe["DISTCACHE_PEER_TLS_CA"],
            "/etc/distcache/peer-tls/ca.crt"
        );
        assert!(!pe.contains_key("DISTCACHE_PEER_INSECURE"));
        // Pod Security "restricted".
        let ps = pod(&plain);
        let psc = ps.security_context.as_ref().expect("pod security context");
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        assert_eq!(psc.run_as_non_root, Some(true));
        let csc = ps.containers[0]
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(
            csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(
            csc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        // The nodes' Role reads only the cluster's own member list.
        let (_, role, _) = rbac(&plain_dcc());
        let rules = role.rules.expect("rules");
        assert!(
            rules
                .iter()
                .all(|r| r.resource_names == Some(vec!["cache".to_string()])),
            "{rules:?}"
        );
        assert!(
            pod(&plain).containers[0]
                .readiness_probe
                .as_ref()
                .and_then(|p| p.grpc.as_ref())
                .is_some()
        );
        assert!(!envs(&plain).contains_key("DISTCACHE_TLS_CERT"));

        let d = dcc(
            r#"{"tls": {"client": {"secretName": "cache-tls", "requireClientCertificates": true}},
                "auth": {"secretName": "cache-users"}}"#,
        );
        let s = statefulset(&d);
        let p = pod(&s);
        let volumes: Vec<(String, Option<String>)> = p
            .volumes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.name, v.secret.and_then(|s| s.secret_name)))
            .collect();
        assert_eq!(
            volumes,
            vec![
                ("peer-tls".to_string(), Some("cache-peer-tls".to_string())),
                ("client-tls".to_string(), Some("cache-tls".to_string())),
                ("users".to_string(), Some("cache-users".to_string()))
            ]
        );
        let c = &p.containers[0];
        let mounts: Vec<(String, String, Option<bool>)> = c
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m.name, m.mount_path, m.read_only))
            .collect();
        assert!(mounts.contains(&("client-tls".into(), TLS_MOUNT.into(), Some(true))));
        assert!(mounts.contains(&("users".into(), AUTH_MOUNT.into(), Some(true))));
        let e = envs(&s);
        assert_eq!(e["DISTCACHE_TLS_CERT"], "/etc/distcache/tls/tls.crt");
        assert_eq!(e["DISTCACHE_TLS_KEY"], "/etc/distcache/tls/tls.key");
        assert_eq!(e["DISTCACHE_TLS_CLIENT_CA"], "/etc/distcache/tls/ca.crt");
        assert_eq!(e["DISTCACHE_USERS_FILE"], "/etc/distcache/auth/users.json");
        // The kubelet's gRPC probe has no TLS: a TCP probe instead.
        let probe = c.readiness_probe.as_ref().expect("probe");
        assert!(probe.grpc.is_none() && probe.tcp_socket.is_some());
        assert_eq!(
            d.spec.auth.as_ref().map(|a| a.operator_token_key.as_str()),
            Some("operator-token")
        );
    }

    #[test]
    fn the_network_policy_admits_each_port_only_from_its_peers() {
        let d = dcc(
            r#"{"networkPolicy": {"metricsNamespaces": ["monitoring"], "clientNamespaces": ["web"]}}"#,
        );
        let np = network_policy(&d).expect("enabled by default");
        let spec = np.spec.expect("spec");
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        let rules = spec.ingress.expect("rules");
        let port_of = |i: usize| {
            rules[i].ports.as_ref().expect("ports")[0]
                .port
                .clone()
                .expect("port")
        };
        assert_eq!(port_of(0), IntOrString::Int(7200));
        assert_eq!(port_of(1), IntOrString::Int(7100));
        assert_eq!(port_of(2), IntOrString::Int(9100));
        let from = |i: usize| serde_json::to_string(&rules[i].from).expect("json");
        // Peer port: only the cluster's own pods, no namespace selector.
        assert!(from(0).contains("podSelector") && !from(0).contains("namespaceSelector"));
        assert!(from(0).contains("app.kubernetes.io/instance"));
        // Client port: own namespace, the operator's pods, and "web".
        assert!(from(1).contains(r#""kubernetes.io/metadata.name":"prod""#));
        assert!(from(1).contains(r#""kubernetes.io/metadata.name":"web""#));
        assert!(from(1).contains("distcache-operator"));
        // Metrics: own namespace and "monitoring", not "web".
        assert!(from(2).contains("monitoring") && !from(2).contains("web"));
        let off = dcc(r#"{"networkPolicy": {"enabled": false}}"#);
        assert!(network_policy(&off).is_none());
    }

    #[test]
    fn storage_adds_wal_claims_and_env() {
        let d = dcc(
            r#"{"storage": {"enabled": true, "size": "5Gi", "storageClassName": "fast", "fsync": false}}"#,
        );
        let s = statefulset(&d);
        let claims = s
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.clone())
            .expect("claims");
        let req = claims[0]
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert_eq!(req["storage"], Quantity("5Gi".into()));
        assert_eq!(
            claims[0]
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref()),
            Some("fast")
        );
        let e = envs(&s);
        assert_eq!(e["DISTCACHE_WAL_DIR"], "/data/wal");
        assert_eq!(e["DISTCACHE_WAL_FSYNC"], "false");
    }

    #[test]
    fn services_pdb_and_rbac() {
        let d = dcc("{}");
        let peers = peer_service(&d);
        let ps = peers.spec.as_ref().expect("spec");
        assert_eq!(ps.cluster_ip.as_deref(), Some("None"));
        assert_eq!(ps.publish_not_ready_addresses, Some(true));
        assert_eq!(client_service(&d).metadata.name.as_deref(), Some("cache"));
        let pdb = pdb(&d).expect("pdb on by default");
        assert_eq!(
            pdb.spec.and_then(|s| s.max_unavailable),
            Some(IntOrString::Int(1))
        );
        assert!(super::pdb(&dcc(r#"{"podDisruptionBudget": {"enabled": false}}"#)).is_none());
        let (sa, role, binding) = rbac(&d);
        assert_eq!(sa.metadata.name.as_deref(), Some("cache-node"));
        let rules = role.rules.expect("rules");
        assert!(
            rules.iter().all(|r| r
                .verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str()))),
            "read-only"
        );
        assert_eq!(binding.role_ref.name, "cache-node");
    }
}
