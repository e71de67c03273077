//! The operator's decisions, as pure functions of what it observed: the
//! spec's validity, the scale step, the rollout partition, the objects to
//! apply, the status and the events. [`crate::reconcile`] only does I/O
//! around them, so every decision is unit-tested without an API server.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::crd::{DistributedCacheCluster, DistributedCacheClusterStatus, MemberStatus};
use crate::resources;

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
    /// Partitions the cluster restarted without an in-sync replica (data
    /// loss), from its committed metadata.
    pub partitions_lost: u64,
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

pub(crate) fn note(warning: bool, reason: &'static str, message: impl Into<String>) -> Note {
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
    if let Some((true, _, m)) = cond(new, "DataLoss")
        && cond(old, "DataLoss").is_none_or(|(lost, _, old_m)| !lost || old_m != m)
    {
        out.push(note(true, "DataLoss", m));
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

/// Every object of a cluster, built for the size applied now.
#[derive(Debug, Clone)]
pub struct Objects {
    /// The nodes' service account.
    pub service_account: ServiceAccount,
    /// The nodes' Role.
    pub role: Role,
    /// Its binding.
    pub role_binding: RoleBinding,
    /// The published member list.
    pub members: ConfigMap,
    /// The headless peer Service.
    pub peer_service: Service,
    /// The client Service.
    pub client_service: Service,
    /// The PodDisruptionBudget (None: delete it).
    pub pdb: Option<PodDisruptionBudget>,
    /// The NetworkPolicy (None: delete it).
    pub network_policy: Option<NetworkPolicy>,
    /// The StatefulSet, with its rollout partition.
    pub statefulset: StatefulSet,
}

/// What one reconcile does.
#[derive(Debug, Clone)]
pub enum Plan {
    /// The spec is invalid: nothing is applied; this status is reported.
    Invalid {
        /// Status to report.
        status: Box<DistributedCacheClusterStatus>,
        /// Events.
        notes: Vec<Note>,
    },
    /// Apply these objects, then report [`status`].
    Apply(Box<Step>),
}

/// One step toward the spec.
#[derive(Debug, Clone)]
pub struct Step {
    /// The cluster with `spec.replicas` set to the size applied now.
    pub stepped: DistributedCacheCluster,
    /// The size applied now.
    pub replicas: i32,
    /// The rollout partition applied now.
    pub partition: i32,
    /// The objects to apply.
    pub objects: Objects,
    /// Events about the step (scaling, rollout).
    pub notes: Vec<Note>,
}

/// The cluster's state as read by one reconcile.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The existing StatefulSet, if any.
    pub statefulset: Option<&'a StatefulSet>,
    /// The cluster's pods.
    pub pods: &'a [Pod],
    /// What the nodes report (None: not asked or no answer).
    pub health: Option<&'a ClusterHealth>,
}

/// Decides what to apply for `dcc` given what was observed.
pub fn plan(dcc: &DistributedCacheCluster, seen: Observed<'_>) -> Plan {
    let generation = dcc.metadata.generation;
    let previous = dcc.status.clone().unwrap_or_default();
    if let Err(why) = validate(dcc) {
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
        return Plan::Invalid {
            status: Box::new(status),
            notes,
        };
    }
    let desired = dcc.spec.replicas;
    let current = seen
        .statefulset
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let safe = seen.health.is_some_and(|h| h.safe);
    let step = next_replicas(current, desired, safe);
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
    // Every object is built for the size applied now (the member list follows it).
    let mut stepped = dcc.clone();
    stepped.spec.replicas = step;
    let partition = match seen.statefulset {
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
    let (service_account, role, role_binding) = resources::rbac(&stepped);
    let objects = Objects {
        service_account,
        role,
        role_binding,
        members: resources::members_config(&stepped, seen.pods),
        peer_service: resources::peer_service(&stepped),
        client_service: resources::client_service(&stepped),
        pdb: resources::pdb(&stepped),
        network_policy: resources::network_policy(&stepped),
        statefulset: resources::statefulset_with_partition(&stepped, partition),
    };
    Plan::Apply(Box::new(Step {
        stepped,
        replicas: step,
        partition,
        objects,
        notes,
    }))
}

/// The status after applying `step` (`ready`: ready replicas the applied
/// StatefulSet reports), the events its transitions raise, and when to
/// look again.
pub fn status(
    dcc: &DistributedCacheCluster,
    step: &Step,
    ready: i32,
    health: Option<&ClusterHealth>,
) -> (DistributedCacheClusterStatus, Vec<Note>, Duration) {
    let generation = dcc.metadata.generation;
    let previous = dcc.status.clone().unwrap_or_default();
    let desired = dcc.spec.replicas;
    let safe = health.is_some_and(|h| h.safe);
    let all_ready = ready >= desired && step.replicas == desired;
    let msg = if step.replicas == desired {
        format!("{ready}/{desired} nodes ready")
    } else {
        format!(
            "scaling {} -> {desired} one member at a time (cluster safe: {safe}); {ready} ready",
            step.replicas
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
            data_loss(&previous, health, generation),
        ],
        ready_replicas: ready,
        partition_count: Some(dcc.spec.partition_count),
        epoch: health.map_or(previous.epoch, |h| h.epoch as i64),
        safe,
        partitions_without_backup: health.map_or(0, |h| h.partitions_without_backup as i32),
        migrations_running: health.map_or(0, |h| h.migrations_running as i32),
        members: health
            .map(|h| {
                h.members
                    .iter()
                    .map(|(name, address, alive, p, b)| MemberStatus {
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
    let mut notes = step.notes.clone();
    notes.extend(transitions(&previous, &status));
    let requeue = if all_ready {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    };
    (status, notes, requeue)
}

/// The DataLoss condition: True once the cluster restarted partitions
/// without an in-sync replica (kept from the last status while the cluster
/// cannot be asked).
fn data_loss(
    previous: &DistributedCacheClusterStatus,
    health: Option<&ClusterHealth>,
    generation: Option<i64>,
) -> Condition {
    match health {
        Some(h) if h.partitions_lost > 0 => condition(
            "DataLoss",
            true,
            "PartitionsRestartedEmpty",
            &format!(
                "{} partitions were restarted without an in-sync replica: acknowledged writes they held are lost (see the README, Failover)",
                h.partitions_lost
            ),
            generation,
        ),
        Some(_) => condition("DataLoss", false, "NoLoss", "no partition lost", generation),
        None => previous
            .conditions
            .iter()
            .find(|c| c.type_ == "DataLoss")
            .cloned()
            .unwrap_or_else(|| {
                condition("DataLoss", false, "NoLoss", "no partition lost", generation)
            }),
    }
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
pub fn carry_times(
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{
        RollingUpdateStatefulSetStrategy, StatefulSetSpec, StatefulSetStatus,
        StatefulSetUpdateStrategy,
    };

    use super::*;
    use crate::crd::DistributedCacheClusterSpec;

    fn dcc(json: &str) -> DistributedCacheCluster {
        let spec: DistributedCacheClusterSpec = serde_json::from_str(json).expect("spec");
        let mut d = DistributedCacheCluster::new("cache", spec);
        d.metadata.namespace = Some("prod".into());
        d.metadata.uid = Some("uid-1".into());
        d.metadata.generation = Some(4);
        d
    }

    fn sts(replicas: i32, partition: i32, updated: i32, ready: i32, rollout: bool) -> StatefulSet {
        StatefulSet {
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                update_strategy: Some(StatefulSetUpdateStrategy {
                    rolling_update: Some(RollingUpdateStatefulSetStrategy {
                        partition: Some(partition),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: Some(StatefulSetStatus {
                replicas,
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                current_revision: Some("r1".into()),
                update_revision: Some(if rollout { "r2" } else { "r1" }.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn health(safe: bool) -> ClusterHealth {
        ClusterHealth {
            epoch: 7,
            safe,
            partitions_without_backup: u32::from(!safe),
            ..ClusterHealth::default()
        }
    }

    fn step(p: Plan) -> Step {
        match p {
            Plan::Apply(s) => *s,
            Plan::Invalid { status, .. } => panic!("unexpected invalid plan: {status:?}"),
        }
    }

    fn applied_replicas(s: &Step) -> Option<i32> {
        s.objects.statefulset.spec.as_ref().and_then(|s| s.replicas)
    }

    #[test]
    fn an_invalid_spec_applies_nothing_and_says_why() {
        let d = dcc(r#"{"replicas": 3, "backupCount": 3, "image": "x:1"}"#);
        let seen = Observed {
            statefulset: None,
            pods: &[],
            health: None,
        };
        let Plan::Invalid { status, notes } = plan(&d, seen) else {
            panic!("an invalid spec must not be applied");
        };
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .expect("Degraded condition");
        assert_eq!(degraded.status, "True");
        assert!(degraded.message.contains("backupCount"), "{degraded:?}");
        assert!(notes.iter().any(|n| n.reason == "InvalidSpec" && n.warning));
    }

    #[test]
    fn a_new_cluster_is_created_at_its_size_with_every_object() {
        let d = dcc(r#"{"replicas": 3, "backupCount": 1, "image": "x:1"}"#);
        let s = step(plan(
            &d,
            Observed {
                statefulset: None,
                pods: &[],
                health: None,
            },
        ));
        assert_eq!((s.replicas, s.partition), (3, 0));
        assert_eq!(applied_replicas(&s), Some(3));
        assert!(s.objects.pdb.is_some());
        assert_eq!(s.notes.len(), 1);
        assert_eq!(s.notes[0].reason, "Created");
    }

    #[test]
    fn scale_down_waits_for_a_safe_cluster_and_removes_one_member() {
        let d = dcc(r#"{"replicas": 3, "backupCount": 1, "image": "x:1"}"#);
        let existing = sts(5, 5, 5, 5, false);
        for (safe, want) in [(false, 5), (true, 4)] {
            let h = health(safe);
            let s = step(plan(
                &d,
                Observed {
                    statefulset: Some(&existing),
                    pods: &[],
                    health: Some(&h),
                },
            ));
            assert_eq!(s.replicas, want, "safe={safe}");
            assert_eq!(applied_replicas(&s), Some(want));
            let scaling = s.notes.iter().find(|n| n.reason == "ScalingDown");
            assert_eq!(scaling.is_some(), safe, "{:?}", s.notes);
            if let Some(n) = scaling {
                assert!(n.message.contains("cache-4"), "{}", n.message);
            }
        }
    }

    #[test]
    fn a_rollout_releases_one_pod_at_a_time_only_while_safe() {
        let d = dcc(r#"{"replicas": 3, "backupCount": 1, "image": "x:1"}"#);
        // Pod 2 already runs the new revision; all ready.
        let existing = sts(3, 2, 1, 3, true);
        let h = health(true);
        let s = step(plan(
            &d,
            Observed {
                statefulset: Some(&existing),
                pods: &[],
                health: Some(&h),
            },
        ));
        assert_eq!(s.partition, 1);
        assert!(s.notes.iter().any(|n| n.reason == "RollingUpdate"));
        let unsafe_h = health(false);
        let held = step(plan(
            &d,
            Observed {
                statefulset: Some(&existing),
                pods: &[],
                health: Some(&unsafe_h),
            },
        ));
        assert_eq!(held.partition, 2, "an unsafe cluster releases no pod");
        assert!(held.notes.is_empty(), "{:?}", held.notes);
    }

    #[test]
    fn status_reports_readiness_safety_and_when_to_look_again() {
        let d = dcc(r#"{"replicas": 3, "backupCount": 1, "image": "x:1"}"#);
        let existing = sts(3, 3, 3, 3, false);
        let h = health(true);
        let seen = Observed {
            statefulset: Some(&existing),
            pods: &[],
            health: Some(&h),
        };
        let s = step(plan(&d, seen));
        let (st, notes, requeue) = status(&d, &s, 3, Some(&h));
        let ready = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.status, "True");
        assert_eq!((st.epoch, st.safe, st.ready_replicas), (7, true, 3));
        assert_eq!(requeue, Duration::from_secs(60));
        assert!(notes.iter().any(|n| n.reason == "Ready"));
        assert!(notes.iter().any(|n| n.reason == "ClusterSafe"));
        let lost_cond = |st: &DistributedCacheClusterStatus| {
            st.conditions
                .iter()
                .find(|c| c.type_ == "DataLoss")
                .map(|c| c.status.clone())
        };
        assert_eq!(lost_cond(&st).as_deref(), Some("False"));
        let lossy = ClusterHealth {
            partitions_lost: 3,
            ..health(true)
        };
        let mut d2 = d.clone();
        d2.status = Some(st.clone());
        let (lost, notes, _) = status(&d2, &s, 3, Some(&lossy));
        assert_eq!(lost_cond(&lost).as_deref(), Some("True"));
        assert!(notes.iter().any(|n| n.reason == "DataLoss" && n.warning));
        // Kept while the cluster cannot be asked.
        d2.status = Some(lost);
        let (kept, notes, _) = status(&d2, &s, 3, None);
        assert_eq!(lost_cond(&kept).as_deref(), Some("True"));
        assert!(!notes.iter().any(|n| n.reason == "DataLoss"), "raised once");
        let (st, _, requeue) = status(&d, &s, 2, Some(&h));
        assert_eq!(requeue, Duration::from_secs(5));
        assert!(
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False")
        );
    }
}
