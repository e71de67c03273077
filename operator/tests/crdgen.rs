//! Generated files must be exactly what `crdgen` prints:
//! - `crds/` and the Helm chart's `crds/` (regenerate with
//!   `cargo run -p distcache-operator --bin crdgen > crds/distcache.io_distributedcacheclusters.yaml`
//!   and copy it to `charts/distcache-operator/crds/`);
//! - the chart's RBAC rules (`cargo run -p distcache-operator --bin crdgen -- --rules >
//!   charts/distcache-operator/files/operator-rules.json`).

use distcache_operator::{DistributedCacheCluster, crd_yaml, operator_rules_json};
use kube::CustomResourceExt;

fn read(rel: &str) -> String {
    let path = format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn committed_crd_matches_crdgen() {
    let generated = crd_yaml(&DistributedCacheCluster::crd()).expect("render");
    assert!(
        read("crds/distcache.io_distributedcacheclusters.yaml") == generated,
        "crds/ is stale: run `cargo run -p distcache-operator --bin crdgen > crds/distcache.io_distributedcacheclusters.yaml`"
    );
    assert!(
        read("charts/distcache-operator/crds/distcache.io_distributedcacheclusters.yaml")
            == generated,
        "the chart's crds/ differs from crds/: copy crds/distcache.io_distributedcacheclusters.yaml to charts/distcache-operator/crds/"
    );
}

#[test]
fn chart_rbac_rules_are_the_operators() {
    let generated = operator_rules_json().expect("rules");
    assert!(
        read("charts/distcache-operator/files/operator-rules.json") == generated,
        "the chart's RBAC rules differ from OPERATOR_RULES: run `cargo run -p distcache-operator --bin crdgen -- --rules > charts/distcache-operator/files/operator-rules.json`"
    );
    let parsed: serde_json::Value = serde_json::from_str(&generated).expect("json");
    let rules = parsed.as_array().expect("array");
    assert_eq!(
        rules.len(),
        distcache_operator::reconcile::OPERATOR_RULES.len()
    );
    assert!(rules.iter().any(|r| {
        r["resources"][0] == "leases"
            && r["verbs"]
                .as_array()
                .is_some_and(|v| v.contains(&"patch".into()))
    }));
}
