//! Prometheus metrics of the operator (served at `/metrics` by the binary).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-reconcile counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of per-cluster gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// Namespace of the DistributedCacheCluster.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations by result.
    pub reconciliations: Family<ResultLabels, Counter>,
    /// Time one reconcile takes.
    pub reconcile_duration: Histogram,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// Ready nodes per cluster.
    pub ready_replicas: Family<ClusterLabels, Gauge>,
    /// 1 when the nodes say the cluster is safe.
    pub safe: Family<ClusterLabels, Gauge>,
    /// Partition table epoch per cluster.
    pub epoch: Family<ClusterLabels, Gauge>,
    /// Partitions without an in-sync backup per cluster.
    pub partitions_without_backup: Family<ClusterLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("distcache_operator");
        let m = Metrics {
            reconciliations: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            leader: Gauge::default(),
            ready_replicas: Family::default(),
            safe: Family::default(),
            epoch: Family::default(),
            partitions_without_backup: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciliations",
            "Reconciliations by result",
            m.reconciliations.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            m.leader.clone(),
        );
        registry.register(
            "cluster_ready_replicas",
            "Ready cache nodes",
            m.ready_replicas.clone(),
        );
        registry.register(
            "cluster_safe",
            "1 when every partition has an in-sync backup and nothing migrates",
            m.safe.clone(),
        );
        registry.register("cluster_epoch", "Partition table epoch", m.epoch.clone());
        registry.register(
            "cluster_partitions_without_backup",
            "Partitions without an in-sync backup",
            m.partitions_without_backup.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    /// Forgets the gauges of a deleted cluster.
    pub fn forget(&self, labels: &ClusterLabels) {
        self.ready_replicas.remove(labels);
        self.safe.remove(labels);
        self.epoch.remove(labels);
        self.partitions_without_backup.remove(labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_counters_and_cluster_gauges() {
        let m = Metrics::default();
        m.reconciliations
            .get_or_create(&ResultLabels {
                result: "ok".into(),
            })
            .inc();
        let l = ClusterLabels {
            namespace: "prod".into(),
            name: "cache".into(),
        };
        m.safe.get_or_create(&l).set(1);
        m.epoch.get_or_create(&l).set(7);
        let text = m.encode();
        assert!(
            text.contains("distcache_operator_reconciliations_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("distcache_operator_cluster_epoch{namespace=\"prod\",name=\"cache\"} 7"),
            "{text}"
        );
        m.forget(&l);
        assert!(
            !m.encode().contains("cluster_epoch{"),
            "deleted cluster forgotten"
        );
    }
}
