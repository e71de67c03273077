//! The PodDisruptionBudget.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Names, meta, selector};
use crate::crd::DistributedCacheCluster;

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
