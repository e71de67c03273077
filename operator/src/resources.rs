//! Pure functions from a `DistributedCacheCluster` to the objects it needs:
//! StatefulSet (with WAL volume claims), headless peer Service, client
//! Service, PodDisruptionBudget, and the nodes' ServiceAccount + Role +
//! RoleBinding. No API calls here: the reconciler applies what these return.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, Container, ContainerPort, EnvVar, EnvVarSource, GRPCAction,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::DistributedCacheCluster;
use distcache_client::members::{
    MEMBERS_JSON_KEY, MEMBERS_TEXT_KEY, PublishedMember, PublishedMembers,
};

/// Seconds a node gets to hand its partitions off before it is killed.
pub const TERMINATION_GRACE_SECONDS: i64 = 60;
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

fn meta(dcc: &DistributedCacheCluster, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: dcc.namespace(),
        labels: Some(labels(dcc)),
        owner_references: owner(dcc).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner(dcc: &DistributedCacheCluster) -> Option<OwnerReference> {
    dcc.controller_owner_ref(&())
}

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

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn node_env(dcc: &DistributedCacheCluster) -> Vec<EnvVar> {
    let n = Names::of(dcc);
    let s = &dcc.spec;
    let mut v = vec![
        field_env("DISTCACHE_NAME", "metadata.name"),
        field_env("DISTCACHE_NAMESPACE", "metadata.namespace"),
        field_env("DISTCACHE_POD_IP", "status.podIP"),
        env("DISTCACHE_LISTEN", format!("0.0.0.0:{}", s.ports.grpc)),
        env("DISTCACHE_PEER_LISTEN", format!("0.0.0.0:{}", s.ports.peer)),
        env(
            "DISTCACHE_METRICS_LISTEN",
            format!("0.0.0.0:{}", s.ports.metrics),
        ),
        env(
            "DISTCACHE_ADVERTISE",
            format!("$(DISTCACHE_POD_IP):{}", s.ports.grpc),
        ),
        env(
            "DISTCACHE_PEER_ADVERTISE",
            format!("$(DISTCACHE_POD_IP):{}", s.ports.peer),
        ),
        env(
            "DISTCACHE_MEMBERS_CONFIGMAP",
            format!("$(DISTCACHE_NAMESPACE)/{}", n.cluster),
        ),
        env("DISTCACHE_PARTITION_COUNT", s.partition_count.to_string()),
        env("DISTCACHE_BACKUP_COUNT", s.backup_count.to_string()),
        env(
            "DISTCACHE_FAILURE_TIMEOUT_MS",
            s.failure_detection_timeout_ms.to_string(),
        ),
        env(
            "DISTCACHE_LEAVE_TIMEOUT_SECS",
            (TERMINATION_GRACE_SECONDS - 15).to_string(),
        ),
        env("DISTCACHE_LOG", "info"),
    ];
    if s.storage.enabled {
        v.push(env("DISTCACHE_WAL_DIR", format!("{WAL_MOUNT}/wal")));
        v.push(env("DISTCACHE_WAL_FSYNC", s.storage.fsync.to_string()));
        v.push(env(
            "DISTCACHE_WAL_MAX_SEGMENT_BYTES",
            s.storage.max_segment_bytes.to_string(),
        ));
    }
    v
}

fn grpc_probe(port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port,
            service: None,
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn default_affinity(dcc: &DistributedCacheCluster) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector(dcc)),
                            ..LabelSelector::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The StatefulSet of nodes, holding pod updates back at `partition`
/// (pods with an ordinal >= partition get a new template; the reconciler
/// releases one pod at a time while the cluster is safe).
pub fn statefulset_with_partition(dcc: &DistributedCacheCluster, partition: i32) -> StatefulSet {
    let mut sts = statefulset(dcc);
    if let Some(spec) = sts.spec.as_mut() {
        spec.update_strategy = Some(StatefulSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateStatefulSetStrategy {
                partition: Some(partition),
                ..RollingUpdateStatefulSetStrategy::default()
            }),
        });
    }
    sts
}

/// The StatefulSet of nodes.
pub fn statefulset(dcc: &DistributedCacheCluster) -> StatefulSet {
    let n = Names::of(dcc);
    let s = &dcc.spec;
    let container = Container {
        name: "node".into(),
        image: Some(s.image.clone()),
        env: Some(node_env(dcc)),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: s.ports.grpc,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("peer".into()),
                container_port: s.ports.peer,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: s.ports.metrics,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(grpc_probe(s.ports.grpc, 5, 3)),
        liveness_probe: Some(grpc_probe(s.ports.grpc, 10, 6)),
        resources: s.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            ..SecurityContext::default()
        }),
        volume_mounts: s.storage.enabled.then(|| {
            vec![VolumeMount {
                name: "wal".into(),
                mount_path: WAL_MOUNT.into(),
                ..VolumeMount::default()
            }]
        }),
        ..Container::default()
    };
    let claims = s.storage.enabled.then(|| {
        vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("wal".into()),
                labels: Some(labels(dcc)),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: s.storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".into(),
                        Quantity(s.storage.size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }]
    });
    StatefulSet {
        metadata: meta(dcc, &n.cluster),
        spec: Some(StatefulSetSpec {
            replicas: Some(s.replicas),
            service_name: Some(n.peers.clone()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector(dcc)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(dcc)),
                    // The common scrape convention (Prometheus kubernetes_sd
                    // relabelling); the headless Service's `metrics` port
                    // serves ServiceMonitors.
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        (
                            "prometheus.io/port".to_string(),
                            s.ports.metrics.to_string(),
                        ),
                        ("prometheus.io/path".to_string(), "/metrics".to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(n.account.clone()),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    containers: vec![container],
                    affinity: Some(
                        s.scheduling
                            .affinity
                            .clone()
                            .unwrap_or_else(|| default_affinity(dcc)),
                    ),
                    topology_spread_constraints: s.scheduling.topology_spread_constraints.clone(),
                    tolerations: s.scheduling.tolerations.clone(),
                    node_selector: s.scheduling.node_selector.clone(),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65_532),
                        fs_group: Some(65_532),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: claims,
            ..StatefulSetSpec::default()
        }),
        status: None,
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

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        ..ServicePort::default()
    }
}

/// The headless Service that gives every node its stable DNS name; it
/// publishes not-ready pods too, so members find each other while starting.
pub fn peer_service(dcc: &DistributedCacheCluster) -> Service {
    let n = Names::of(dcc);
    Service {
        metadata: meta(dcc, &n.peers),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(dcc)),
            ports: Some(vec![
                port("grpc", dcc.spec.ports.grpc),
                port("peer", dcc.spec.ports.peer),
                port("metrics", dcc.spec.ports.metrics),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The client Service (ready pods only).
pub fn client_service(dcc: &DistributedCacheCluster) -> Service {
    let n = Names::of(dcc);
    Service {
        metadata: meta(dcc, &n.cluster),
        spec: Some(ServiceSpec {
            selector: Some(selector(dcc)),
            ports: Some(vec![port("grpc", dcc.spec.ports.grpc)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The PodDisruptionBudget (None when disabled).
pub fn pdb(dcc: &DistributedCacheCluster) -> Option<PodDisruptionBudget> {
    let p = &dcc.spec.pod_disruption_budget;
    p.enabled.then(|| PodDisruptionBudget {
        metadata: meta(dcc, &Names::of(dcc).cluster),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(p.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(dcc)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

/// What the nodes may do in the API (least privilege: read the ConfigMaps
/// of their namespace, for the member list).
pub const NODE_RULES: &[(&str, &str, &[&str])] = &[("", "configmaps", &["get", "list", "watch"])];

/// ServiceAccount, Role and RoleBinding of the nodes.
pub fn rbac(dcc: &DistributedCacheCluster) -> (ServiceAccount, Role, RoleBinding) {
    let n = Names::of(dcc);
    let sa = ServiceAccount {
        metadata: meta(dcc, &n.account),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(dcc, &n.account),
        rules: Some(
            NODE_RULES
                .iter()
                .map(|(group, resource, verbs)| PolicyRule {
                    api_groups: Some(vec![group.to_string()]),
                    resources: Some(vec![resource.to_string()]),
                    verbs: verbs.iter().map(|v| v.to_string()).collect(),
                    ..PolicyRule::default()
                })
                .collect(),
        ),
    };
    let binding = RoleBinding {
        metadata: meta(dcc, &n.account),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: n.account.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: n.account.clone(),
            namespace: Some(n.namespace.clone()),
            ..Subject::default()
        }]),
    };
    (sa, role, binding)
}

#[cfg(test)]
mod tests {
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
