//! The StatefulSet: node pods with their probes, environment, affinity and
//! WAL volume claims.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, GRPCAction,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretVolumeSource, SecurityContext, TCPSocketAction, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    AUTH_MOUNT, Names, PEER_TLS_MOUNT, TERMINATION_GRACE_SECONDS, TLS_MOUNT, WAL_MOUNT, labels,
    meta, peer_tls_secret_name, selector,
};
use crate::crd::DistributedCacheCluster;

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
        env(
            "DISTCACHE_PEER_TLS_CERT",
            format!("{PEER_TLS_MOUNT}/$(DISTCACHE_NAME).crt"),
        ),
        env(
            "DISTCACHE_PEER_TLS_KEY",
            format!("{PEER_TLS_MOUNT}/$(DISTCACHE_NAME).key"),
        ),
        env("DISTCACHE_PEER_TLS_CA", format!("{PEER_TLS_MOUNT}/ca.crt")),
        env("DISTCACHE_MAX_MEMORY_POLICY", s.max_memory_policy.as_flag()),
    ];
    if let Some(limit) = s
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| quantity_bytes(&q.0))
    {
        // 80 % of the container's limit for entries; the rest for the
        // process, buffers and allocator slack.
        v.push(env("DISTCACHE_MAX_MEMORY", (limit / 5 * 4).to_string()));
    }
    if let Some(tls) = &s.tls.client {
        v.push(env("DISTCACHE_TLS_CERT", format!("{TLS_MOUNT}/tls.crt")));
        v.push(env("DISTCACHE_TLS_KEY", format!("{TLS_MOUNT}/tls.key")));
        if tls.require_client_certificates {
            v.push(env(
                "DISTCACHE_TLS_CLIENT_CA",
                format!("{TLS_MOUNT}/ca.crt"),
            ));
        }
    }
    if s.auth.is_some() {
        v.push(env(
            "DISTCACHE_USERS_FILE",
            format!("{AUTH_MOUNT}/users.json"),
        ));
    }
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

/// The kubelet's probe: gRPC health, or a TCP connect when the port speaks
/// TLS (the kubelet's gRPC probe has no TLS).
/// Bytes of a Kubernetes memory quantity (`512Mi`, `2Gi`, `1G`, `1e9`,
/// `1000000`); None when it does not parse.
pub(crate) fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "m" => 1e-3,
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    let bytes = n * mult;
    (0.0..1.8e19).contains(&bytes).then_some(bytes as u64)
}

fn probe(dcc: &DistributedCacheCluster, period: i32, failures: i32) -> Probe {
    let port = dcc.spec.ports.grpc;
    let (grpc, tcp_socket) = if dcc.spec.tls.client.is_some() {
        (
            None,
            Some(TCPSocketAction {
                port: IntOrString::Int(port),
                host: None,
            }),
        )
    } else {
        (
            Some(GRPCAction {
                port,
                service: None,
            }),
            None,
        )
    };
    Probe {
        grpc,
        tcp_socket,
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Where the WAL claim and the TLS and users Secrets are mounted.
fn mounts(dcc: &DistributedCacheCluster) -> Vec<VolumeMount> {
    let s = &dcc.spec;
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    let mut v = Vec::new();
    if s.storage.enabled {
        v.push(VolumeMount {
            name: "wal".into(),
            mount_path: WAL_MOUNT.into(),
            ..VolumeMount::default()
        });
    }
    v.push(mount("peer-tls", PEER_TLS_MOUNT, true));
    if s.tls.client.is_some() {
        v.push(mount("client-tls", TLS_MOUNT, true));
    }
    if s.auth.is_some() {
        v.push(mount("users", AUTH_MOUNT, true));
    }
    v
}

/// The TLS and users Secrets as volumes.
fn secret_volumes(dcc: &DistributedCacheCluster) -> Vec<Volume> {
    let secret = |volume: &str, name: &str| Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(name.into()),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mut v = vec![secret("peer-tls", &peer_tls_secret_name(dcc))];
    if let Some(tls) = &dcc.spec.tls.client {
        v.push(secret("client-tls", &tls.secret_name));
    }
    if let Some(auth) = &dcc.spec.auth {
        v.push(secret("users", &auth.secret_name));
    }
    v
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
        readiness_probe: Some(probe(dcc, 5, 3)),
        liveness_probe: Some(probe(dcc, 10, 6)),
        resources: s.resources.clone(),
        // Pod Security "restricted".
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts(dcc)).filter(|m| !m.is_empty()),
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
                    volumes: Some(secret_volumes(dcc)).filter(|v| !v.is_empty()),
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
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
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

#[cfg(test)]
mod memory_tests {
    use super::quantity_bytes;

    #[test]
    fn memory_quantities_parse_to_bytes() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("2Gi"), Some(2 << 30));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1e9"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1000000"), Some(1_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("-1Gi"), None);
    }
}
