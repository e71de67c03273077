//! The `DistributedCacheCluster` custom resource (`distcache.io/v1alpha1`,
//! short name `dcc`), generated into `crds/` by the `crdgen` binary.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Default container image of the nodes.
pub const DEFAULT_IMAGE: &str = "ghcr.io/distcache/distcache-node:0.1.0";

fn default_replicas() -> i32 {
    3
}
fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}
fn default_partition_count() -> i32 {
    271
}
fn default_backup_count() -> i32 {
    1
}
fn default_failure_timeout_ms() -> i64 {
    3_000
}
fn default_true() -> bool {
    true
}

/// A distcache cluster: a StatefulSet of nodes with their Services, PDB,
/// RBAC and (optionally) WAL volumes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "distcache.io",
    version = "v1alpha1",
    kind = "DistributedCacheCluster",
    plural = "distributedcacheclusters",
    shortname = "dcc",
    namespaced,
    status = "DistributedCacheClusterStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.readyReplicas"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Safe", type_ = "boolean", json_path = ".status.safe"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.backupCount < self.spec.replicas")
        .message("spec.backupCount must be smaller than spec.replicas"),
)]
#[serde(rename_all = "camelCase")]
pub struct DistributedCacheClusterSpec {
    /// Number of cache nodes.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.replicas must be at least 1"))]
    pub replicas: i32,
    /// Node container image.
    #[serde(default = "default_image")]
    pub image: String,
    /// Number of partitions; fixed for the life of the cluster.
    #[serde(default = "default_partition_count")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.partitionCount is immutable"))]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65536").message("spec.partitionCount must be between 1 and 65536"))]
    pub partition_count: i32,
    /// Synchronous backups per partition (smaller than replicas).
    #[serde(default = "default_backup_count")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.backupCount must not be negative"))]
    pub backup_count: i32,
    /// Container resources of each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// WAL persistence on a PersistentVolumeClaim per node.
    #[serde(default)]
    pub storage: StorageSpec,
    /// Ports.
    #[serde(default)]
    pub ports: PortsSpec,
    /// A node silent this long is considered failed, milliseconds.
    #[serde(default = "default_failure_timeout_ms")]
    #[x_kube(validation = Rule::new("self >= 500").message("spec.failureDetectionTimeoutMs must be at least 500"))]
    pub failure_detection_timeout_ms: i64,
    /// Pod placement.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// PodDisruptionBudget.
    #[serde(default)]
    pub pod_disruption_budget: PdbSpec,
    /// TLS (README "Security").
    #[serde(default)]
    pub tls: TlsSpec,
    /// What a write does when a node holds its memory limit of entries (80 %
    /// of `resources.limits.memory`, else 75 % of the container's cgroup
    /// limit): `reject` (refused with MEMORY_LIMIT, reads and deletes work)
    /// or `evict-lru`.
    #[serde(default)]
    pub max_memory_policy: MemoryPolicy,
    /// The NetworkPolicy of the cluster's pods.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// Users and grants on the client port (README "Security"); without it
    /// the client port is open to anyone who reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
}

/// Who may reach the cluster's pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy: the peer port only from the cluster's own
    /// pods, the client port from the cluster's namespace (and the
    /// operator), the metrics port from the cluster's namespace.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// More namespaces whose pods may use the client port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_namespaces: Vec<String>,
    /// More namespaces whose pods may scrape the metrics port (e.g. `monitoring`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_namespaces: Vec<String>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        NetworkPolicySpec {
            enabled: true,
            client_namespaces: Vec::new(),
            metrics_namespaces: Vec::new(),
        }
    }
}

/// TLS settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// TLS on the client (gRPC) port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientTlsSpec>,
    /// Mutual TLS between members (always on): by default the operator
    /// makes a cluster CA; this brings your own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerTlsSpec>,
}

/// The nodes' `--max-memory-policy`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryPolicy {
    /// Refuse writes at the limit.
    #[default]
    Reject,
    /// Evict least recently used entries.
    EvictLru,
}

impl MemoryPolicy {
    /// The flag value.
    pub fn as_flag(self) -> &'static str {
        match self {
            MemoryPolicy::Reject => "reject",
            MemoryPolicy::EvictLru => "evict-lru",
        }
    }
}

/// The CA of the peer port's mutual TLS, from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerTlsSpec {
    /// A Secret holding a CA certificate and key as `tls.crt` and `tls.key`
    /// (cert-manager's output for a CA Certificate fits). The operator
    /// issues each member's certificate from it.
    pub secret_name: String,
}

/// TLS on the client port, from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSpec {
    /// A `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and `ca.crt`
    /// (cert-manager's Certificate output fits). Renewals reach the nodes
    /// without a restart (the kubelet updates the mounted files; the nodes
    /// re-read them).
    pub secret_name: String,
    /// Require client certificates signed by the Secret's `ca.crt`.
    #[serde(default)]
    pub require_client_certificates: bool,
    /// The name the certificate carries for the operator's health probe to
    /// verify (default: `<cluster>.<namespace>.svc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Users and grants, from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// A Secret with `users.json` (the users file); edits reach the nodes
    /// without a restart.
    pub secret_name: String,
    /// The key of that Secret holding the operator's own bearer token (its
    /// SHA-256 must name a user in `users.json`; any grant will do: the
    /// operator only reads cluster health).
    #[serde(default = "default_operator_token_key")]
    pub operator_token_key: String,
}

fn default_operator_token_key() -> String {
    "operator-token".into()
}

/// WAL storage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Keep a write-ahead log on a PVC (data survives full restarts).
    #[serde(default)]
    pub enabled: bool,
    /// PVC size, e.g. `10Gi`.
    #[serde(default = "default_size")]
    pub size: String,
    /// StorageClass of the PVCs (cluster default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// fsync before acknowledging writes.
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// WAL segment size before rotation, bytes.
    #[serde(default = "default_segment")]
    #[x_kube(validation = Rule::new("self >= 1048576").message("spec.storage.maxSegmentBytes must be at least 1 MiB"))]
    pub max_segment_bytes: i64,
}

fn default_size() -> String {
    "10Gi".into()
}
fn default_segment() -> i64 {
    64 * 1024 * 1024
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            enabled: false,
            size: default_size(),
            storage_class_name: None,
            fsync: true,
            max_segment_bytes: default_segment(),
        }
    }
}

/// Ports of the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.grpc != self.peer && self.grpc != self.metrics && self.peer != self.metrics").message("spec.ports.grpc, spec.ports.peer and spec.ports.metrics must differ"))]
pub struct PortsSpec {
    /// Client gRPC port.
    #[serde(default = "default_grpc")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.ports.grpc must be between 1 and 65535"))]
    pub grpc: i32,
    /// Node <-> node port.
    #[serde(default = "default_peer")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.ports.peer must be between 1 and 65535"))]
    pub peer: i32,
    /// Prometheus metrics port of each node (`GET /metrics`).
    #[serde(default = "default_metrics")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.ports.metrics must be between 1 and 65535"))]
    pub metrics: i32,
}

fn default_grpc() -> i32 {
    7100
}
fn default_peer() -> i32 {
    7200
}
fn default_metrics() -> i32 {
    9100
}

impl Default for PortsSpec {
    fn default() -> Self {
        PortsSpec {
            grpc: default_grpc(),
            peer: default_peer(),
            metrics: default_metrics(),
        }
    }
}

/// Pod placement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Affinity (default: prefer spreading nodes over hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Topology spread constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// PodDisruptionBudget settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PdbSpec {
    /// Create a PDB.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Pods that may be down at once.
    #[serde(default = "default_max_unavailable")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.podDisruptionBudget.maxUnavailable must be at least 1"))]
    pub max_unavailable: i32,
}

fn default_max_unavailable() -> i32 {
    1
}

impl Default for PdbSpec {
    fn default() -> Self {
        PdbSpec {
            enabled: true,
            max_unavailable: 1,
        }
    }
}

/// Observed state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistributedCacheClusterStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Members as the cluster reports them.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// Pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Partition table epoch.
    #[serde(default)]
    pub epoch: i64,
    /// Partitions without an in-sync backup.
    #[serde(default)]
    pub partitions_without_backup: i32,
    /// Migrations pending.
    #[serde(default)]
    pub migrations_running: i32,
    /// All partitions have in-sync backups and nothing migrates.
    #[serde(default)]
    pub safe: bool,
    /// Partition count the cluster was created with (partitionCount is immutable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_count: Option<i32>,
}

/// One member in the status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Pod name (stable identity).
    pub name: String,
    /// Client address.
    pub address: String,
    /// Ready.
    pub ready: bool,
    /// Primary partitions.
    pub primaries: i32,
    /// Backup partitions.
    pub backups: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_has_the_contracted_shape() {
        let crd = DistributedCacheCluster::crd();
        let json = serde_json::to_string(&crd).expect("json");
        assert_eq!(crd.spec.group, "distcache.io");
        assert_eq!(crd.spec.names.short_names, Some(vec!["dcc".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        let sub = v.subresources.as_ref().expect("subresources");
        assert!(sub.status.is_some() && sub.scale.is_some());
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Replicas", "Ready", "Safe", "Epoch", "Age"]);
        for rule in [
            "self == oldSelf",
            "self.spec.backupCount < self.spec.replicas",
            "spec.partitionCount is immutable",
        ] {
            assert!(json.contains(rule), "missing {rule}");
        }
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: DistributedCacheClusterSpec = serde_json::from_str("{}").expect("minimal spec");
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.partition_count, 271);
        assert_eq!(spec.backup_count, 1);
        assert!(!spec.storage.enabled && spec.storage.fsync);
        assert_eq!(spec.ports.grpc, 7100);
        assert!(spec.pod_disruption_budget.enabled);
    }
}
