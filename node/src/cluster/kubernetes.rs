//! Kubernetes membership provider: watches the member list the operator
//! publishes in a ConfigMap (key `members.json`, see
//! [`distcache_client::members`]) through the Kubernetes API, so a change
//! reaches the node within a watch round trip (the kubelet refreshes mounted
//! ConfigMaps only every minute or so).
//!
//! Besides the list, the operator publishes the UID of each member's pod. When
//! a member's UID changes or disappears, its process is gone (the pod was
//! deleted or replaced): the provider reports the member as gone and the
//! cluster stops counting its current incarnation as alive at once, without
//! waiting for the heartbeat timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use distcache_client::members::{MEMBERS_JSON_KEY, PublishedMembers};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::watcher;
use parking_lot::Mutex;

use crate::cluster::membership::{MemberSpec, MembersProvider};
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    members: Arc<Vec<MemberSpec>>,
    uids: HashMap<String, String>,
    gone: Vec<String>,
}

impl State {
    /// Takes in a published list; this member's own entry always carries
    /// `me`'s addresses (the operator may not know the pod's IP yet).
    fn update(&mut self, me: &MemberSpec, published: &PublishedMembers) {
        let mut uids = HashMap::new();
        for m in &published.members {
            if m.name != me.name
                && let Some(old) = self.uids.get(&m.name)
                && !old.is_empty()
                && *old != m.pod_uid
            {
                tracing::info!(member = %m.name, "member's pod is gone; not waiting for the heartbeat timeout");
                self.gone.push(m.name.clone());
            }
            uids.insert(m.name.clone(), m.pod_uid.clone());
        }
        self.uids = uids;
        self.members = Arc::new(
            published
                .members
                .iter()
                .map(|m| {
                    if m.name == me.name {
                        me.clone()
                    } else {
                        MemberSpec {
                            name: m.name.clone(),
                            grpc: m.grpc.clone(),
                            peer: m.peer.clone(),
                        }
                    }
                })
                .collect(),
        );
    }
}

/// Watches `namespace/name` (a ConfigMap) for the member list.
#[derive(Debug)]
pub struct KubernetesProvider {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubernetesProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse(cm: &ConfigMap) -> Result<PublishedMembers> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(MEMBERS_JSON_KEY))
        .ok_or_else(|| {
            Error::InvalidArgument(format!("members ConfigMap has no {MEMBERS_JSON_KEY} key"))
        })?;
    PublishedMembers::from_json(text).map_err(Error::InvalidArgument)
}

impl KubernetesProvider {
    /// Connects (kubeconfig or in-cluster config), reads the list once (it
    /// must exist within `wait`) and keeps watching it. `me` is this
    /// member's name and advertised addresses.
    pub async fn start(spec: &str, me: MemberSpec, wait: Duration) -> Result<KubernetesProvider> {
        let (namespace, name) = spec.split_once('/').ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--members-configmap {spec:?}: expected NAMESPACE/NAME"
            ))
        })?;
        let client = kube::Client::try_default()
            .await
            .map_err(|e| Error::InvalidArgument(format!("Kubernetes API client: {e}")))?;
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        let deadline = tokio::time::Instant::now() + wait;
        let first = loop {
            match api
                .get(name)
                .await
                .map_err(|e| e.to_string())
                .and_then(|cm| parse(&cm).map_err(|e| e.to_string()))
            {
                Ok(list) => break list,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::InvalidArgument(format!(
                        "members ConfigMap {spec}: {e}"
                    )));
                }
                Err(e) => {
                    tracing::info!(error = %e, "waiting for the members ConfigMap");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let state = Arc::new(Mutex::new(State::default()));
        state.lock().update(&me, &first);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config));
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                        match parse(&cm) {
                            Ok(list) => {
                                tracing::debug!(members = list.members.len(), "member list");
                                shared.lock().update(&me, &list);
                            }
                            Err(e) => tracing::warn!(error = %e, "member list ignored"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "watching the members ConfigMap");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(KubernetesProvider { state, task })
    }
}

impl MembersProvider for KubernetesProvider {
    fn members(&self) -> Arc<Vec<MemberSpec>> {
        self.state.lock().members.clone()
    }

    fn take_gone(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().gone)
    }
}

#[cfg(test)]
mod tests {
    use distcache_client::members::PublishedMember;

    use super::*;

    fn member(name: &str, ip: &str, uid: &str) -> PublishedMember {
        PublishedMember {
            name: name.into(),
            grpc: format!("{ip}:7000"),
            peer: format!("{ip}:7001"),
            ready: true,
            pod_uid: uid.into(),
        }
    }

    #[test]
    fn replaced_pods_are_reported_gone_once_and_own_entry_is_ours() {
        let me = MemberSpec {
            name: "c-0".into(),
            grpc: "10.0.0.9:7000".into(),
            peer: "10.0.0.9:7001".into(),
        };
        let mut s = State::default();
        let list = |uid1: &str, uid0: &str| PublishedMembers {
            expected_size: 2,
            members: vec![member("c-0", "dns", uid0), member("c-1", "10.0.0.2", uid1)],
        };
        s.update(&me, &list("", "a"));
        assert!(s.gone.is_empty(), "a pod appearing is not a departure");
        assert_eq!(s.members[0], me, "own entry uses our own addresses");
        assert_eq!(s.members[1].peer, "10.0.0.2:7001");
        s.update(&me, &list("u1", "a"));
        assert!(s.gone.is_empty());
        s.update(&me, &list("u1", "b"));
        assert!(s.gone.is_empty(), "our own pod is never reported");
        s.update(&me, &list("", "b"));
        assert_eq!(std::mem::take(&mut s.gone), vec!["c-1".to_string()]);
        s.update(&me, &list("u2", "b"));
        assert!(
            s.gone.is_empty(),
            "absent -> new pod is not a second departure"
        );
        s.update(&me, &list("u3", "b"));
        assert_eq!(s.gone, vec!["c-1".to_string()], "replaced pod");
    }
}
