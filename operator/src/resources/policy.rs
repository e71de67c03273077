//! The PodDisruptionBudget and the NetworkPolicy.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
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

/// The label of the operator's own pods (the Helm chart's name).
pub const OPERATOR_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "distcache-operator");

fn labels_selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..LabelSelector::default()
    }
}

fn namespace(name: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(labels_selector(&[("kubernetes.io/metadata.name", name)])),
        ..NetworkPolicyPeer::default()
    }
}

fn port(number: i32) -> Option<Vec<NetworkPolicyPort>> {
    Some(vec![NetworkPolicyPort {
        port: Some(IntOrString::Int(number)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }])
}

/// The NetworkPolicy (None when disabled): the peer port only from the
/// cluster's own pods; the client port from the cluster's namespace, the
/// operator's pods and `clientNamespaces`; the metrics port from the
/// cluster's namespace and `metricsNamespaces`. Nothing else gets in.
pub fn network_policy(dcc: &DistributedCacheCluster) -> Option<NetworkPolicy> {
    let spec = &dcc.spec.network_policy;
    if !spec.enabled {
        return None;
    }
    let names = Names::of(dcc);
    let own_pods = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector(dcc)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        pod_selector: Some(labels_selector(&[OPERATOR_POD_LABEL])),
        ..NetworkPolicyPeer::default()
    };
    let mut clients = vec![namespace(&names.namespace), operator];
    clients.extend(spec.client_namespaces.iter().map(|n| namespace(n)));
    let mut scrapers = vec![namespace(&names.namespace)];
    scrapers.extend(spec.metrics_namespaces.iter().map(|n| namespace(n)));
    let ports = &dcc.spec.ports;
    Some(NetworkPolicy {
        metadata: meta(dcc, &names.cluster),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(dcc)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![own_pods]),
                    ports: port(ports.peer),
                },
                NetworkPolicyIngressRule {
                    from: Some(clients),
                    ports: port(ports.grpc),
                },
                NetworkPolicyIngressRule {
                    from: Some(scrapers),
                    ports: port(ports.metrics),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    })
}
