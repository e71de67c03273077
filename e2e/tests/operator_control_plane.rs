//! The operator end to end on a **simulated control plane** (the test doubles
//! of `e2e/src/k8s`: a fake API server, and a StatefulSet controller +
//! kubelet running real `distcache-node` processes on 127.0.0.x). Two real
//! `distcache-operator` processes compete for the leader Lease.
//!
//! Scenario: create 3 -> load -> leader killed -> scale to 5 -> a pod
//! force-deleted -> scale to 2 -> rolling update -> delete; no acknowledged
//! write lost; status, conditions and events checked at every step.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distcache_client::Client;
use distcache_e2e::cluster::{WriteLoad, assert_no_acknowledged_write_lost};
use distcache_e2e::k8s::apiserver::{ApiServer, Key};
use distcache_e2e::k8s::kubelet::KubeletSim;
use distcache_e2e::{bin, free_port};
use distcache_operator::{DistributedCacheCluster, DistributedCacheClusterStatus};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

struct Operator {
    name: String,
    child: Child,
    metrics: String,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn operator(name: &str, kubeconfig: &Path, logs: &Path) -> Operator {
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).expect("log file");
    let child = Command::new(bin("distcache-operator"))
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", "default")
        .env("DISTCACHE_OPERATOR_METRICS_ADDR", &metrics)
        .env("DISTCACHE_OPERATOR_LEASE_DURATION_SECS", "4")
        .env("DISTCACHE_OPERATOR_LEASE_GRACE_SECS", "2")
        .env("DISTCACHE_OPERATOR_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn distcache-operator");
    Operator {
        name: name.into(),
        child,
        metrics,
    }
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cond(st: &DistributedCacheClusterStatus, t: &str) -> Option<(String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.message.clone()))
}

fn settled(st: &DistributedCacheClusterStatus, n: i32, generation: i64) -> bool {
    st.observed_generation == Some(generation)
        && st.ready_replicas == n
        && st.safe
        && st.members.len() == n as usize
        && st.members.iter().all(|m| m.ready)
        && cond(st, "Ready").is_some_and(|c| c.0 == "True")
        && cond(st, "Progressing").is_some_and(|c| c.0 == "False")
        && cond(st, "Degraded").is_some_and(|c| c.0 == "False")
}

async fn wait_settled(
    dccs: &Api<DistributedCacheCluster>,
    n: i32,
    timeout: Duration,
) -> DistributedCacheClusterStatus {
    wait_for(&format!("a settled cluster of {n}"), timeout, async || {
        let d = dccs.get("cache").await.ok()?;
        let generation = d.metadata.generation?;
        d.status.filter(|st| settled(st, n, generation))
    })
    .await
}

fn events(api: &ApiServer) -> Vec<(String, String)> {
    api.shared
        .list("events.k8s.io/v1", "events", Some("default"))
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn lease_holder(api: &ApiServer) -> Option<String> {
    api.shared
        .get(&Key::new(
            "coordination.k8s.io/v1",
            "leases",
            "default",
            "distcache-operator",
        ))?
        .pointer("/spec/holderIdentity")?
        .as_str()
        .map(str::to_string)
}

fn pods(api: &ApiServer) -> Vec<Value> {
    api.shared.list("v1", "pods", Some("default"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_creates_scales_rolls_and_deletes_without_losing_writes() {
    let dir = std::env::temp_dir().join(format!("dc-k8s-sim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let api = ApiServer::start().await;
    let kubeconfig: PathBuf = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let kubelet = KubeletSim::start(api.shared.clone(), dir.join("pods"), kubeconfig.clone());
    let kcfg = kube::config::Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kcfg, &Default::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let mut ops = vec![
        operator("op-a", &kubeconfig, &dir),
        operator("op-b", &kubeconfig, &dir),
    ];
    let leader = wait_for("a leader", Duration::from_secs(30), async || {
        lease_holder(&api)
    })
    .await;
    assert!(leader == "op-a" || leader == "op-b", "leader {leader}");

    // Create 3.
    let dccs: Api<DistributedCacheCluster> = Api::namespaced(client.clone(), "default");
    let dcc: DistributedCacheCluster = serde_json::from_value(json!({
        "apiVersion": "distcache.io/v1alpha1", "kind": "DistributedCacheCluster",
        "metadata": {"name": "cache", "namespace": "default"},
        "spec": {
            "replicas": 3, "backupCount": 1, "image": "distcache/node:sim-1",
            "failureDetectionTimeoutMs": 10000,
            "storage": {"enabled": true, "fsync": false, "size": "1Gi"},
        },
    }))
    .expect("dcc");
    dccs.create(&PostParams::default(), &dcc)
        .await
        .expect("create");
    let st = wait_settled(&dccs, 3, Duration::from_secs(90)).await;
    assert!(st.epoch > 0 && st.partitions_without_backup == 0 && st.migrations_running == 0);
    assert_eq!(st.partition_count, Some(271));
    for kind in ["services", "configmaps", "serviceaccounts"] {
        assert!(
            !api.shared.list("v1", kind, Some("default")).is_empty(),
            "{kind} applied"
        );
    }
    // The members talk mutual TLS with certificates the operator issued.
    let secret = api
        .shared
        .get(&Key::new("v1", "secrets", "default", "cache-peer-tls"))
        .expect("the peer certificates Secret");
    for k in [
        "ca.crt",
        "ca.key",
        "cache-0.crt",
        "cache-0.key",
        "cache-2.crt",
    ] {
        assert!(secret.pointer(&format!("/data/{k}")).is_some(), "no {k}");
    }
    assert_eq!(
        secret
            .pointer("/metadata/ownerReferences/0/kind")
            .and_then(Value::as_str),
        Some("DistributedCacheCluster")
    );
    for p in pods(&api) {
        let env = p
            .pointer("/spec/containers/0/env")
            .cloned()
            .unwrap_or_default()
            .to_string();
        assert!(env.contains("DISTCACHE_PEER_TLS_CERT"), "{env}");
        assert!(!env.contains("DISTCACHE_PEER_INSECURE"), "{env}");
    }
    assert!(
        events(&api).iter().any(|(r, _)| r == "Created"),
        "{:?}",
        events(&api)
    );
    assert!(
        events(&api).iter().any(|(r, _)| r == "Ready"),
        "{:?}",
        events(&api)
    );
    let endpoints: Vec<String> = pods(&api)
        .iter()
        .filter_map(|p| Some(format!("{}:7100", p.pointer("/status/podIP")?.as_str()?)))
        .collect();
    assert_eq!(endpoints.len(), 3);

    // Load.
    let cache = Client::connect(endpoints.clone()).await.expect("client");
    let load = WriteLoad::start(&cache, 8, 500);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every node serves its metrics on the port the StatefulSet declares.
    let mut node_puts = 0.0;
    for e in &endpoints {
        let text = scrape(&e.replace(":7100", ":9100"));
        assert!(text.contains("distcache_node_members 3"), "{e}: {text}");
        assert!(text.contains("distcache_node_quorum 1"), "{e}: {text}");
        node_puts += text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("distcache_node_commands_total{op=\"put\",result=\"ok\"} ")
            })
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum::<f64>();
    }
    assert!(node_puts > 0.0, "the nodes count the load's writes");

    // The leader dies; the other replica takes over the Lease.
    let idx = ops
        .iter()
        .position(|o| o.name == leader)
        .expect("leader process");
    let dead = ops.remove(idx);
    drop(dead);
    let next = wait_for("a new leader", Duration::from_secs(30), async || {
        lease_holder(&api).filter(|h| *h != leader)
    })
    .await;
    assert_eq!(next, ops[0].name);

    // Scale to 5.
    let ssa = PatchParams::apply("e2e-test").force();
    let scale = |n: i32| Patch::Merge(json!({"spec": {"replicas": n}}));
    dccs.patch("cache", &PatchParams::default(), &scale(5))
        .await
        .expect("scale to 5");
    let st = wait_settled(&dccs, 5, Duration::from_secs(90)).await;
    assert!(st.epoch > 0);
    let metrics = scrape(&ops[0].metrics);
    assert!(metrics.contains("distcache_operator_leader 1"), "{metrics}");
    assert!(
        metrics.contains(
            "distcache_operator_cluster_ready_replicas{namespace=\"default\",name=\"cache\"} 5"
        ),
        "{metrics}"
    );

    // A pod force-deleted: the nodes learn it through the API well before
    // their 10 s heartbeat timeout and fail its partitions over.
    let victim = "cache-1";
    let victim_ip = kubelet.ip("default", victim).expect("victim ip");
    let before = cache.partition_table().await.expect("table");
    assert!(
        before
            .members
            .iter()
            .any(|m| m.address.starts_with(&victim_ip) && m.primaries > 0)
    );
    let started = Instant::now();
    api.shared
        .delete(&Key::new("v1", "pods", "default", victim), Some(0))
        .expect("force delete");
    wait_for(
        "failover of the deleted pod's partitions",
        Duration::from_secs(9),
        async || {
            let t = cache.partition_table().await.ok()?;
            let holds = t
                .members
                .iter()
                .any(|m| m.address.starts_with(&victim_ip) && m.primaries > 0 && m.alive);
            (!holds && t.epoch > before.epoch).then_some(())
        },
    )
    .await;
    let failover = started.elapsed();
    assert!(
        failover < Duration::from_secs(10),
        "pod deletion must beat the heartbeat timeout: {failover:?}"
    );
    eprintln!("failover after pod deletion: {failover:?} (heartbeat timeout 10 s)");
    wait_settled(&dccs, 5, Duration::from_secs(90)).await;

    // Scale to 2: one member at a time, only while safe.
    dccs.patch("cache", &PatchParams::default(), &scale(2))
        .await
        .expect("scale to 2");
    let mut saw_progress = false;
    wait_for("scale down to 2", Duration::from_secs(180), async || {
        let d = dccs.get("cache").await.ok()?;
        let st = d.status.clone()?;
        if cond(&st, "Progressing")
            .is_some_and(|c| c.0 == "True" && c.1.contains("one member at a time"))
        {
            saw_progress = true;
        }
        settled(&st, 2, d.metadata.generation?).then_some(())
    })
    .await;
    assert!(saw_progress, "Progressing=True while stepping down");
    assert!(
        events(&api)
            .iter()
            .any(|(r, n)| r == "ScalingDown" && n.contains("cache-4")),
        "{:?}",
        events(&api)
    );
    // The StatefulSet went 5 -> 4 -> 3 -> 2, one member per step.
    let mut sizes: Vec<i64> = api
        .shared
        .history()
        .iter()
        .filter(|c| c.key.plural == "statefulsets" && c.kind != "DELETED")
        .filter_map(|c| c.object.pointer("/spec/replicas")?.as_i64())
        .collect();
    sizes.dedup();
    assert!(
        sizes.ends_with(&[5, 4, 3, 2]),
        "StatefulSet sizes {sizes:?}"
    );
    let sts = api
        .shared
        .get(&Key::new("apps/v1", "statefulsets", "default", "cache"))
        .expect("sts");
    assert_eq!(sts.pointer("/spec/replicas"), Some(&json!(2)));
    wait_for(
        "2 pods and 2 processes",
        Duration::from_secs(60),
        async || (pods(&api).len() == 2 && kubelet.running().len() == 2).then_some(()),
    )
    .await;

    // Rolling update: a new image rolls one pod at a time.
    let before_roll = kubelet.started().len();
    let old_revision = api
        .shared
        .get(&Key::new("apps/v1", "statefulsets", "default", "cache"))
        .and_then(|s| s.pointer("/status/updateRevision").cloned())
        .expect("a revision");
    dccs.patch(
        "cache",
        &ssa,
        &Patch::Apply(json!({
            "apiVersion": "distcache.io/v1alpha1", "kind": "DistributedCacheCluster",
            "spec": {"image": "distcache/node:sim-2"},
        })),
    )
    .await
    .expect("update image");
    wait_for("rolled out", Duration::from_secs(180), async || {
        let sts = api
            .shared
            .get(&Key::new("apps/v1", "statefulsets", "default", "cache"))?;
        let done = sts.pointer("/status/updateRevision") != Some(&old_revision)
            && sts.pointer("/status/currentRevision") == sts.pointer("/status/updateRevision")
            && sts.pointer("/status/updatedReplicas") == Some(&json!(2));
        let d = dccs.get("cache").await.ok()?;
        (done && settled(d.status.as_ref()?, 2, d.metadata.generation?)).then_some(())
    })
    .await;
    let restarted: Vec<String> = kubelet.started()[before_roll..]
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert!(
        restarted.contains(&"cache-0".to_string()) && restarted.contains(&"cache-1".to_string()),
        "both pods restarted: {restarted:?}"
    );
    assert!(events(&api).iter().any(|(r, _)| r == "RollingUpdate"));

    // No acknowledged write lost through all of it.
    let (history, acked, failed) = load.stop().await;
    eprintln!("load: {acked} writes acknowledged, {failed} failed (retried)");
    assert!(acked > 1000, "the load ran: {acked}");
    assert_no_acknowledged_write_lost(&cache, &history).await;

    // Delete: everything owned goes, every process stops.
    dccs.delete("cache", &Default::default())
        .await
        .expect("delete");
    wait_for(
        "everything collected",
        Duration::from_secs(90),
        async || {
            eprintln!(
                "left: sts {} pods {} services {} processes {:?}",
                api.shared
                    .list("apps/v1", "statefulsets", Some("default"))
                    .len(),
                pods(&api).len(),
                api.shared.list("v1", "services", Some("default")).len(),
                kubelet.running()
            );
            let gone = api
                .shared
                .list("apps/v1", "statefulsets", Some("default"))
                .is_empty()
                && pods(&api).is_empty()
                && api
                    .shared
                    .list("v1", "services", Some("default"))
                    .is_empty()
                && kubelet.running().is_empty();
            gone.then_some(())
        },
    )
    .await;
    drop(ops);
    let _ = std::fs::remove_dir_all(&dir);
}
