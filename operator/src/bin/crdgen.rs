//! `crdgen`: prints the DistributedCacheCluster CRD as YAML (the content of
//! `crds/distcache.io_distributedcacheclusters.yaml`).

use distcache_operator::DistributedCacheCluster;
use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    print!(
        "{}",
        distcache_operator::crd_yaml(&DistributedCacheCluster::crd())?
    );
    Ok(())
}
