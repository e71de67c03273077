//! `crdgen`: prints the DistributedCacheCluster CRD as YAML (the content of
//! `crds/distcache.io_distributedcacheclusters.yaml` and of the chart's
//! `crds/`); `crdgen --rules` prints the operator's RBAC rules (the chart's
//! `files/operator-rules.json`).

use distcache_operator::DistributedCacheCluster;
use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        None => print!(
            "{}",
            distcache_operator::crd_yaml(&DistributedCacheCluster::crd())?
        ),
        Some("--rules") => print!("{}", distcache_operator::operator_rules_json()?),
        Some(other) => anyhow::bail!("unknown argument {other:?} (usage: crdgen [--rules])"),
    }
    Ok(())
}
