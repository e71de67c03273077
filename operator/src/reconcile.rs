//! A thin reconcile: validate the spec, server-side apply the objects that
//! [`crate::resources`] builds, and report status and conditions.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{DistributedCacheCluster, DistributedCacheClusterStatus};
use crate::metrics::{ClusterLabels, Metrics, ResultLabels};
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
    ("events.k8s.io", "events", &["create", "patch"]),
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
    (
        "policy",
        "poddisruptionbudgets",
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

/// What the nodes say about the cluster (from one member's Health and
/// partition table).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterHealth {
    /// Partition table epoch.
    pub epoch: u64,
    /// Every partition has its in-sync backups, nothing migrates.
    pub safe: bool,
    /// Partitions without an in-sync backup.
    pub partitions_without_backup: u32,
    /// Migrations pending.
    pub migrations_running: u32,
    /// Members: (name, address, alive, primaries, backups).
    pub members: Vec<(String, String, bool, u32, u32)>,
}

/// Asks the cache nodes how the cluster is (a seam for tests).
pub trait ClusterProbe: Send + Sync {
    /// Health seen through the first of `endpoints` (`host:port`) that
    /// answers; None when none does.
    fn health(
        &self,
        endpoints: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>>;
}

/// The real probe: the distcache client against the client Service.
pub struct GrpcProbe;

impl ClusterProbe for GrpcProbe {
    fn health(
        &self,
        endpoints: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>> {
        Box::pin(async move {
            let config = distcache_client::ClientConfig::new(endpoints)
                .request_timeout(Duration::from_secs(3))
                .max_retries(0);
            let client = distcache_client::Client::with_config(config).await.ok()?;
            let h = client.health().await.ok()?;
            let t = client.partition_table().await.ok()?;
            Some(ClusterHealth {
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

/// An event to publish about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Warning (else Normal).
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// Human readable message.
    pub message: String,
}

fn note(warning: bool, reason: &'static str, message: impl Into<String>) -> Note {
    Note {
        warning,
        reason,
        message: message.into(),
    }
}

/// Events for the transitions between two statuses.
pub fn transitions(
    old: &DistributedCacheClusterStatus,
    new: &DistributedCacheClusterStatus,
) -> Vec<Note> {
    let cond = |s: &DistributedCacheClusterStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.status == "True", c.reason.clone(), c.message.clone()))
    };
    let mut out = Vec::new();
    match (cond(old, "Ready"), cond(new, "Ready")) {
        (Some((true, ..)), Some((false, _, m))) => out.push(note(true, "NotReady", m)),
        (old_ready, Some((true, _, m))) if !old_ready.as_ref().is_some_and(|r| r.0) => {
            out.push(note(false, "Ready", m))
        }
        _ => {}
    }
    if let Some((true, reason, m)) = cond(new, "Degraded")
        && cond(old, "Degraded").is_none_or(|(d, r, _)| !d || r != reason)
    {
        out.push(note(true, "InvalidSpec", m));
    }
    if old.safe && !new.safe && new.epoch > 0 {
        out.push(note(
            true,
            "ClusterUnsafe",
            format!(
                "{} partitions without an in-sync backup, {} migrations running",
                new.partitions_without_backup, new.migrations_running
            ),
        ));
    } else if !old.safe && new.safe {
        out.push(note(
            false,
            "ClusterSafe",
            format!(
                "every partition has its in-sync backups (epoch {})",
                new.epoch
            ),
        ));
    }
    out
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

/// The rolling-update partition to apply now. Without a pending rollout all
/// pods are held (`replicas`), so a template change rolls nothing by itself;
/// during a rollout one more pod is released once the previously released
/// ones run the new revision, every pod is ready and the cluster is safe.
pub fn next_partition(
    replicas: i32,
    partition: i32,
    updated: i32,
    ready: i32,
    rollout: bool,
    safe: bool,
) -> i32 {
    if !rollout {
        return replicas;
    }
    let partition = partition.min(replicas);
    if updated >= replicas - partition && ready >= replicas && safe {
        (partition - 1).max(0)
    } else {
        partition
    }
}

/// The StatefulSet size to apply now: a new cluster starts at the desired
/// size and grows at once; it shrinks one member at a time, and only while
/// the cluster is safe (every partition has an in-sync backup, nothing
/// migrates), so the leaving member's partitions always have a copy elsewhere.
pub fn next_replicas(current: Option<i32>, desired: i32, safe: bool) -> i32 {
    match current {
        None => desired,
        Some(c) if desired >= c => desired,
        Some(c) if safe => c - 1,
        Some(c) => c,
    }
}

/// Checks what the CRD's schema cannot: partitionCount against the value
/// the cluster was created with (kept in status).
pub fn validate(dcc: &DistributedCacheCluster) -> Result<(), String> {
    let s = &dcc.spec;
    if s.replicas < 1 {
        return Err("spec.replicas must be at least 1".into());
    }
    if s.backup_count < 0 || s.backup_count >= s.replicas {
        return Err(format!(
            "spec.backupCount ({}) must be between 0 and spec.replicas - 1 ({})",
            s.backup_count,
            s.replicas - 1
        ));
    }
    let p = &s.ports;
    for (name, port) in [("grpc", p.grpc), ("peer", p.peer), ("metrics", p.metrics)] {
        if !(1..=65535).contains(&port) {
            return Err(format!(
                "spec.ports.{name} ({port}) must be between 1 and 65535"
            ));
        }
    }
    if p.grpc == p.peer || p.grpc == p.metrics || p.peer == p.metrics {
        return Err("spec.ports.grpc, spec.ports.peer and spec.ports.metrics must differ".into());
    }
    if let Some(was) = dcc.status.as_ref().and_then(|st| st.partition_count)
        && was != s.partition_count
    {
        return Err(format!(
            "spec.partitionCount is immutable: the cluster has {was} partitions, the spec asks for {}",
            s.partition_count
        ));
    }
    Ok(())
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

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(jiff::Timestamp::now()),
    }
}

/// Keeps the transition time of conditions whose status did not change.
fn carry_times(
    old: Option<&DistributedCacheClusterStatus>,
    new: &mut DistributedCacheClusterStatus,
) {
    let Some(old) = old else { return };
    for c in &mut new.conditions {
        if let Some(prev) = old
            .conditions
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = prev.last_transition_time.clone();
        }
    }
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

/// The gRPC endpoints to probe: ready pods first, then other pods with an
/// IP, then the client Service.
pub fn probe_endpoints(dcc: &DistributedCacheCluster, pods: &[Pod]) -> Vec<String> {
    let port = dcc.spec.ports.grpc;
    let published = resources::published_members(dcc, pods);
    let with_ip = |m: &&distcache_client::members::PublishedMember| {
        pods.iter().any(|p| {
            p.metadata.name.as_deref() == Some(m.name.as_str())
                && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
        })
    };
    let mut out: Vec<String> = published
        .members
        .iter()
        .filter(|m| m.ready && with_ip(m))
        .chain(published.members.iter().filter(|m| !m.ready && with_ip(m)))
        .map(|m| m.grpc.clone())
        .collect();
    let names = resources::Names::of(dcc);
    out.push(format!("{}.{}.svc:{port}", names.cluster, names.namespace));
    out
}

async fn reconcile_inner(
    dcc: Arc<DistributedCacheCluster>,
    ctx: &Context,
) -> Result<Action, Error> {
    let ns = dcc
        .namespace()
        .ok_or_else(|| Error::Invalid("DistributedCacheCluster without a namespace".into()))?;
    let client = &ctx.client;
    let generation = dcc.meta().generation;
    let desired = dcc.spec.replicas;
    let previous = dcc.status.clone().unwrap_or_default();
    if let Err(why) = validate(&dcc) {
        tracing::warn!(name = %dcc.name_any(), %why, "invalid spec; nothing changed");
        let status = DistributedCacheClusterStatus {
            observed_generation: generation,
            conditions: vec![
                condition("Ready", false, "InvalidSpec", &why, generation),
                condition("Progressing", false, "InvalidSpec", &why, generation),
                condition("Degraded", true, "InvalidSpec", &why, generation),
            ],
            ..previous.clone()
        };
        let notes = transitions(&previous, &status);
        patch_status(client, &dcc, &ns, status).await?;
        publish(ctx, &dcc, &notes).await;
        return Ok(Action::await_change());
    }
    let sts_api: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(client.clone(), &ns);
    let existing = sts_api.get_opt(&dcc.name_any()).await?;
    let current = existing
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector_string(&dcc)))
        .await?
        .items;
    let health = match current {
        Some(_) => ctx.probe.health(probe_endpoints(&dcc, &pods)).await,
        None => None,
    };
    let safe = health.as_ref().is_some_and(|h| h.safe);
    let step = next_replicas(current, dcc.spec.replicas, safe);
    let mut notes = Vec::new();
    match current {
        Some(c) if step < c => notes.push(note(
            false,
            "ScalingDown",
            format!(
                "cluster safe: removing member {}-{} ({c} -> {step}, target {desired})",
                dcc.name_any(),
                c - 1
            ),
        )),
        Some(c) if step > c => notes.push(note(
            false,
            "ScalingUp",
            format!("adding members ({c} -> {step})"),
        )),
        None => notes.push(note(false, "Created", format!("creating {step} members"))),
        _ => {}
    }
    // Build every object for the size applied now (the member list follows it).
    let mut stepped = (*dcc).clone();
    stepped.spec.replicas = step;
    let dcc = Arc::new(stepped);
    let (sa, role, binding) = resources::rbac(&dcc);
    apply(client, &ns, &sa).await?;
    apply(client, &ns, &role).await?;
    apply(client, &ns, &binding).await?;
    apply(client, &ns, &resources::members_config(&dcc, &pods)).await?;
    apply(client, &ns, &resources::peer_service(&dcc)).await?;
    apply(client, &ns, &resources::client_service(&dcc)).await?;
    match resources::pdb(&dcc) {
        Some(pdb) => {
            apply(client, &ns, &pdb).await?;
        }
        None => {
            let api: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
                Api::namespaced(client.clone(), &ns);
            match api.delete(&dcc.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let partition = match &existing {
        None => 0,
        Some(sts) => {
            let st = sts.status.clone().unwrap_or_default();
            let held = sts
                .spec
                .as_ref()
                .and_then(|s| s.update_strategy.as_ref())
                .and_then(|u| u.rolling_update.as_ref())
                .and_then(|r| r.partition)
                .unwrap_or(0);
            let rollout = st.update_revision.is_some() && st.update_revision != st.current_revision;
            let next = next_partition(
                step,
                held,
                st.updated_replicas.unwrap_or(0),
                st.ready_replicas.unwrap_or(0),
                rollout,
                safe,
            );
            if rollout && next < held {
                notes.push(note(
                    false,
                    "RollingUpdate",
                    format!(
                        "cluster safe: updating member {}-{next} ({} of {step} updated)",
                        dcc.name_any(),
                        step - held
                    ),
                ));
            }
            next
        }
    };
    let sts = apply(
        client,
        &ns,
        &resources::statefulset_with_partition(&dcc, partition),
    )
    .await?;
    let ready = sts
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let all_ready = ready >= desired && step == desired;
    let msg = if step == desired {
        format!("{ready}/{desired} nodes ready")
    } else {
        format!(
            "scaling {step} -> {desired} one member at a time (cluster safe: {safe}); {ready} ready"
        )
    };
    let status = DistributedCacheClusterStatus {
        observed_generation: generation,
        conditions: vec![
            condition(
                "Ready",
                all_ready,
                if all_ready {
                    "AllNodesReady"
                } else {
                    "NodesStarting"
                },
                &msg,
                generation,
            ),
            condition(
                "Progressing",
                !all_ready,
                if all_ready { "Stable" } else { "RollingOut" },
                &msg,
                generation,
            ),
            condition("Degraded", false, "SpecValid", "spec accepted", generation),
        ],
        ready_replicas: ready,
        partition_count: Some(dcc.spec.partition_count),
        epoch: health.as_ref().map_or(previous.epoch, |h| h.epoch as i64),
        safe,
        partitions_without_backup: health
            .as_ref()
            .map_or(0, |h| h.partitions_without_backup as i32),
        migrations_running: health.as_ref().map_or(0, |h| h.migrations_running as i32),
        members: health
            .as_ref()
            .map(|h| {
                h.members
                    .iter()
                    .map(|(name, address, alive, p, b)| crate::crd::MemberStatus {
                        name: name.clone(),
                        address: address.clone(),
                        ready: *alive,
                        primaries: *p as i32,
                        backups: *b as i32,
                    })
                    .collect()
            })
            .unwrap_or_else(|| previous.members.clone()),
    };
    let labels = ClusterLabels {
        namespace: ns.clone(),
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
    notes.extend(transitions(&previous, &status));
    patch_status(client, &dcc, &ns, status).await?;
    publish(ctx, &dcc, &notes).await;
    Ok(Action::requeue(if all_ready {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    }))
}

/// Retry a failed reconcile after a pause.
pub fn error_policy(dcc: Arc<DistributedCacheCluster>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %dcc.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(10))
}
