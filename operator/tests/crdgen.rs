//! `crds/` must be exactly what `crdgen` prints (regenerate with
//! `cargo run -p distcache-operator --bin crdgen > crds/distcache.io_distributedcacheclusters.yaml`).

use distcache_operator::{DistributedCacheCluster, crd_yaml};
use kube::CustomResourceExt;

#[test]
fn committed_crd_matches_crdgen() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/distcache.io_distributedcacheclusters.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("crds/ file exists");
    let generated = crd_yaml(&DistributedCacheCluster::crd()).expect("render");
    assert!(
        committed == generated,
        "crds/ is stale: run `cargo run -p distcache-operator --bin crdgen > crds/distcache.io_distributedcacheclusters.yaml`"
    );
}
