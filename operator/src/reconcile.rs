//! A thin reconcile: read the cluster's objects and ask the nodes, let
//! [`crate::plan`] decide, server-side apply what it built, and report its
//! status, metrics and events. Only I/O lives here.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{DistributedCacheCluster, DistributedCacheClusterStatus};
use crate::metrics::{ClusterLabels, Metrics, ResultLabels};
pub use crate::plan::{
    ClusterHealth, Note, Observed, Plan, Step, next_partition, next_replicas, probe_endpoints,
    transitions, validate,
};
use crate::plan::{carry_times, plan};
use crate::resources;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder};

/// Field manager of everything the operator applies.
pub const MANAGER: &str = "distcache-operator";

/// Every (API group, resource, verbs) the operator itself uses; the Helm
/// chart's ClusterRole is derived from this one list.
pub const OPERATOR_RULES: &[(&str, &str, &[&str])] = &[
    (
        "distcache.io",
        "distributedcacheclusters",
        &["get", "list", "watch", "patch"],
    ),
    (
        "distcache.io",
        "distributedcacheclusters/status",
        &["get", "patch"],
    ),
    ("apps", "statefulsets", &["get", "list", "watch", "patch"]),
    ("", "services", &["get", "list", "watch", "patch"]),
    ("", "configmaps", &["get", "list", "watch", "patch"]),
    ("", "serviceaccounts", &["get", "list", "watch", "patch"]),
    ("", "pods", &["get", "list", "watch"]),
    // The cluster's TLS and users Secrets (the health probe's credentials),
    // the user's peer CA; the peer certificates Secret it writes.
    ("", "secrets", &["get", "create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
    (
        "policy",
        "poddisruptionbudgets",
        &["get", "list", "watch", "patch", "delete"],
    ),
    (
        "networking.k8s.io",
        "networkpolicies",
        &["get", "list", "watch", "patch", "delete"],
    ),
    (
        "rbac.authorization.k8s.io",
        "roles",
        &["get", "list", "watch", "patch"],
    ),
    (
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["get", "list", "watch", "patch"],
    ),
];

/// Reconcile failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object has no namespace.
    #[error("{0}")]
    Invalid(String),
}

/// What the operator presents to the nodes' client port when it is secured
/// (from the cluster's TLS and users Secrets).
#[derive(Clone, Default)]
pub struct ProbeCredentials {
    /// CA (PEM) of the nodes' certificate, when the port speaks TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM), when the nodes require one.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the nodes' certificate against.
    pub server_name: Option<String>,
    /// Bearer token, when the nodes have users.
    pub token: Option<String>,
}

impl std::fmt::Debug for ProbeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeCredentials")
            .field("tls", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("server_name", &self.server_name)
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// Asks the cache nodes how the cluster is (a seam for tests).
pub trait ClusterProbe: Send + Sync {
    /// Health seen through the first of `endpoints` (`host:port`) that
    /// answers; None when none does.
    fn health(
        &self,
        endpoints: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>>;

    /// [`ClusterProbe::health`] with the credentials a secured port needs.
    fn health_with(
        &self,
        endpoints: Vec<String>,
        _credentials: ProbeCredentials,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>> {
        self.health(endpoints)
    }
}

/// The real probe: the distcache client against the client Service.
pub struct GrpcProbe;

impl ClusterProbe for GrpcProbe {
    fn health(
        &self,
        endpoints: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>> {
        self.health_with(endpoints, ProbeCredentials::default())
    }

    fn health_with(
        &self,
        endpoints: Vec<String>,
        credentials: ProbeCredentials,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>> {
        Box::pin(async move {
            let mut config = distcache_client::ClientConfig::new(endpoints)
                .request_timeout(Duration::from_secs(3))
                .max_retries(0);
            if let Some(ca) = credentials.ca_pem {
                let mut tls = distcache_client::ClientTls::default();
                tls.ca_pem = Some(ca);
                tls.identity_pem = credentials.identity_pem;
                tls.server_name = credentials.server_name;
                config = config.tls(tls);
            }
            if let Some(t) = credentials.token {
                config = config.token(t);
            }
            let client = distcache_client::Client::with_config(config).await.ok()?;
            let h = client.health().await.ok()?;
            let t = client.partition_table().await.ok()?;
            Some(ClusterHealth {
                partitions_lost: h.partitions_lost,
                epoch: h.epoch,
                safe: h.safe,
                partitions_without_backup: h.partitions_without_backup,
                migrations_running: h.migrations_running,
                members: t
                    .members
                    .into_iter()
                    .map(|m| (m.name, m.address, m.alive, m.primaries, m.backups))
                    .collect(),
            })
        })
    }
}

/// What reconcile needs.
#[derive(Clone)]
pub struct Context {
    /// API client.
    pub client: kube::Client,
    /// How to ask the nodes.
    pub probe: Arc<dyn ClusterProbe>,
    /// Publishes Kubernetes events (None: events are only logged).
    pub recorder: Option<Recorder>,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
}

async fn publish(ctx: &Context, dcc: &DistributedCacheCluster, notes: &[Note]) {
    for n in notes {
        if n.warning {
            tracing::warn!(name = %dcc.name_any(), reason = n.reason, message = %n.message, "event");
        } else {
            tracing::info!(name = %dcc.name_any(), reason = n.reason, message = %n.message, "event");
        }
        let Some(recorder) = &ctx.recorder else {
            continue;
        };
        let ev = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.into(),
            note: Some(n.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &dcc.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing an event failed");
        }
    }
}

async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

async fn patch_status(
    client: &kube::Client,
    dcc: &DistributedCacheCluster,
    ns: &str,
    mut status: DistributedCacheClusterStatus,
) -> Result<(), Error> {
    carry_times(dcc.status.as_ref(), &mut status);
    let api: Api<DistributedCacheCluster> = Api::namespaced(client.clone(), ns);
    let body = serde_json::json!({
        "apiVersion": "distcache.io/v1alpha1",
        "kind": "DistributedCacheCluster",
        "status": status,
    });
    api.patch_status(
        &dcc.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Brings the cluster's objects to what the spec asks for (and counts it).
pub async fn reconcile(
    dcc: Arc<DistributedCacheCluster>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let out = reconcile_inner(dcc, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciliations
        .get_or_create(&ResultLabels {
            result: if out.is_ok() { "ok" } else { "error" }.into(),
        })
        .inc();
    out
}

fn selector_string(dcc: &DistributedCacheCluster) -> String {
    resources::selector(dcc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn reconcile_inner(
    dcc: Arc<DistributedCacheCluster>,
    ctx: &Context,
) -> Result<Action, Error> {
    let ns = dcc
        .namespace()
        .ok_or_else(|| Error::Invalid("DistributedCacheCluster without a namespace".into()))?;
    let client = &ctx.client;
    // Read (nothing, for a spec that is refused anyway).
    let (existing, pods, health) = match validate(&dcc) {
        Err(why) => {
            tracing::warn!(name = %dcc.name_any(), %why, "invalid spec; nothing changed");
            (None, Vec::new(), None)
        }
        Ok(()) => {
            let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
            let existing = sts_api.get_opt(&dcc.name_any()).await?;
            let pods = Api::<Pod>::namespaced(client.clone(), &ns)
                .list(&ListParams::default().labels(&selector_string(&dcc)))
                .await?
                .items;
            let health = match &existing {
                Some(_) => {
                    let credentials = probe_credentials(client, &ns, &dcc).await?;
                    ctx.probe
                        .health_with(probe_endpoints(&dcc, &pods), credentials)
                        .await
                }
                None => None,
            };
            (existing, pods, health)
        }
    };
    let seen = Observed {
        statefulset: existing.as_ref(),
        pods: &pods,
        health: health.as_ref(),
    };
    // Decide, then write.
    let step = match plan(&dcc, seen) {
        Plan::Invalid { status, notes } => {
            patch_status(client, &dcc, &ns, *status).await?;
            publish(ctx, &dcc, &notes).await;
            return Ok(Action::await_change());
        }
        Plan::Apply(step) => step,
    };
    ensure_peer_certs(client, &ns, &dcc, existing.as_ref()).await?;
    let sts = apply_objects(client, &ns, &step).await?;
    let ready = sts
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let (status, notes, requeue) = crate::plan::status(&dcc, &step, ready, health.as_ref());
    record_metrics(ctx, &ns, &step.stepped, &status);
    patch_status(client, &step.stepped, &ns, status).await?;
    publish(ctx, &step.stepped, &notes).await;
    Ok(Action::requeue(requeue))
}

/// A Secret's value.
fn field(s: &Secret, key: &str) -> Option<Vec<u8>> {
    s.data.as_ref()?.get(key).map(|b| b.0.clone())
}

/// Writes the peer certificates Secret when it is missing, a member has no
/// certificate or one is due for renewal (before the StatefulSet, so that a
/// new pod finds its certificate).
async fn ensure_peer_certs(
    client: &kube::Client,
    ns: &str,
    dcc: &DistributedCacheCluster,
    existing: Option<&StatefulSet>,
) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let current = secrets
        .get_opt(&crate::resources::peer_tls_secret_name(dcc))
        .await?;
    let user_ca = match &dcc.spec.tls.peer {
        Some(p) => {
            let s = secrets.get(&p.secret_name).await?;
            let ca = field(&s, "tls.crt")
                .zip(field(&s, "tls.key"))
                .and_then(|(c, k)| String::from_utf8(c).ok().zip(String::from_utf8(k).ok()))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "Secret {} has no tls.crt and tls.key (the peer CA)",
                        p.secret_name
                    ))
                })?;
            Some(ca)
        }
        None => None,
    };
    let running = existing
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let members = dcc.spec.replicas.max(running);
    let now = jiff::Timestamp::now().as_second();
    match crate::resources::peer_tls_secret(dcc, current.as_ref(), user_ca, members, now) {
        Ok(Some(secret)) => {
            tracing::info!(name = %dcc.name_any(), members, "peer certificates written");
            apply(client, ns, &secret).await.map(|_| ())
        }
        Ok(None) => Ok(()),
        Err(why) => Err(Error::Invalid(format!("peer certificates: {why}"))),
    }
}

/// Deletes an object the spec no longer wants (absent already is fine).
async fn delete_if_present<K>(client: &kube::Client, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What the probe presents to a secured client port, read from the
/// cluster's TLS and users Secrets.
async fn probe_credentials(
    client: &kube::Client,
    ns: &str,
    dcc: &DistributedCacheCluster,
) -> Result<ProbeCredentials, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);

    let mut c = ProbeCredentials::default();
    if let Some(tls) = &dcc.spec.tls.client {
        let secret = secrets.get(&tls.secret_name).await?;
        c.ca_pem = field(&secret, "ca.crt");
        if tls.require_client_certificates {
            c.identity_pem = field(&secret, "tls.crt").zip(field(&secret, "tls.key"));
        }
        let names = resources::Names::of(dcc);
        c.server_name = Some(
            tls.server_name
                .clone()
                .unwrap_or_else(|| format!("{}.{}.svc", names.cluster, names.namespace)),
        );
    }
    if let Some(auth) = &dcc.spec.auth {
        let secret = secrets.get(&auth.secret_name).await?;
        c.token = field(&secret, &auth.operator_token_key)
            .and_then(|t| String::from_utf8(t).ok())
            .map(|t| t.trim().to_string());
    }
    Ok(c)
}

/// Applies every object of `step` (the StatefulSet last); returns the
/// applied StatefulSet.
async fn apply_objects(client: &kube::Client, ns: &str, step: &Step) -> Result<StatefulSet, Error> {
    let o = &step.objects;
    apply(client, ns, &o.service_account).await?;
    apply(client, ns, &o.role).await?;
    apply(client, ns, &o.role_binding).await?;
    apply(client, ns, &o.members).await?;
    apply(client, ns, &o.peer_service).await?;
    apply(client, ns, &o.client_service).await?;
    match &o.pdb {
        Some(pdb) => {
            apply(client, ns, pdb).await?;
        }
        None => {
            delete_if_present::<PodDisruptionBudget>(client, ns, &step.stepped.name_any()).await?
        }
    }
    match &o.network_policy {
        Some(np) => {
            apply(client, ns, np).await?;
        }
        None => delete_if_present::<NetworkPolicy>(client, ns, &step.stepped.name_any()).await?,
    }
    apply(client, ns, &o.statefulset).await
}

fn record_metrics(
    ctx: &Context,
    ns: &str,
    dcc: &DistributedCacheCluster,
    status: &DistributedCacheClusterStatus,
) {
    let labels = ClusterLabels {
        namespace: ns.to_string(),
        name: dcc.name_any(),
    };
    let m = &ctx.metrics;
    m.ready_replicas
        .get_or_create(&labels)
        .set(i64::from(status.ready_replicas));
    m.safe.get_or_create(&labels).set(i64::from(status.safe));
    m.epoch.get_or_create(&labels).set(status.epoch);
    m.partitions_without_backup
        .get_or_create(&labels)
        .set(i64::from(status.partitions_without_backup));
}

/// Retry a failed reconcile after a pause.
pub fn error_policy(dcc: Arc<DistributedCacheCluster>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %dcc.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(10))
}
