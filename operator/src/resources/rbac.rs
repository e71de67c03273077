//! The nodes' ServiceAccount, Role and RoleBinding.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::{Names, meta};
use crate::crd::DistributedCacheCluster;

/// What the nodes may do in the API (least privilege: read their
/// cluster's member-list ConfigMap, by name: `resourceNames`).
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
                    // Only the cluster's own member list.
                    resource_names: Some(vec![n.cluster.clone()]),
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
