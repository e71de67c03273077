//! **Test double**: plays the StatefulSet controller and the kubelet against
//! the fake API server ([`super::apiserver`]), with real `distcache-node`
//! processes. Not a product feature.
//!
//! - StatefulSet controller: creates pods `<sts>-<i>` for `i < replicas`
//!   (Parallel policy) from the template of their revision (ordinals below
//!   `rollingUpdate.partition` keep the current revision), deletes pods
//!   beyond `replicas`, replaces the highest out-of-date pod at or above the
//!   partition once every pod is ready, and reports status (replicas, ready,
//!   updated, current/update revisions).
//! - Garbage collector: deletes objects whose owners are gone.
//! - Kubelet: gives each pod its own loopback IP (127.0.0.x; the pod's
//!   "network namespace"), starts the container as a process with the
//!   template's environment (`$(VAR)` expansion, `fieldRef` for name,
//!   namespace and pod IP), binds `0.0.0.0` listen addresses to the pod IP,
//!   maps volumeClaimTemplate mounts to a directory per pod (its PVC),
//!   points the node at the fake API server through `KUBECONFIG`, runs the
//!   gRPC readiness probe, restarts crashed containers, and on deletion sends
//!   SIGTERM, waits up to the grace period (then SIGKILL) and removes the pod.
//!   Containers start [`CONTAINER_START_DELAY`] after their pod is created
//!   (a real node schedules, pulls and starts first).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;
use serde_json::{Value, json};

use super::apiserver::{Key, Shared};

/// How long after a pod's creation its container starts.
pub const CONTAINER_START_DELAY: Duration = Duration::from_secs(2);

struct Running {
    child: Child,
    ip: String,
    grpc_port: Option<u16>,
    uid: String,
    terminating: Option<Instant>,
    ready: bool,
    restarts: u32,
}

/// Processes the kubelet double runs, by pod (namespace, name).
#[derive(Default)]
struct Kubelet {
    pods: HashMap<(String, String), Running>,
    ips: HashMap<(String, String), String>,
    templates: HashMap<String, Value>,
    /// Pod UID -> when the kubelet first saw it.
    seen: HashMap<String, Instant>,
    /// Pod names ever started, with their process ids (for tests).
    started: Vec<(String, u32)>,
}

/// The running doubles; stops every process when dropped.
pub struct KubeletSim {
    state: Arc<Mutex<Kubelet>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeletSim {
    fn drop(&mut self) {
        self.task.abort();
        for (_, r) in self.state.lock().pods.iter_mut() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

fn s<'a>(v: &'a Value, p: &str) -> Option<&'a str> {
    v.pointer(p).and_then(Value::as_str)
}

fn hash(v: &Value) -> String {
    // FNV-1a over the template's JSON: stable for equal templates.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:x}")[..10].to_string()
}

impl KubeletSim {
    /// Starts the doubles; pod files (PVC directories, logs) go under `root`.
    pub fn start(api: Arc<Shared>, root: PathBuf, kubeconfig: PathBuf) -> KubeletSim {
        let state: Arc<Mutex<Kubelet>> = Arc::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut n: u64 = 0;
            loop {
                n += 1;
                api.collect_garbage();
                statefulsets(&api, &st);
                kubelet(&api, &st, &root, &kubeconfig);
                if n.is_multiple_of(3) {
                    probe(&api, &st).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        KubeletSim { state, task }
    }

    /// (pod name, pid) of every container started so far, in order.
    pub fn started(&self) -> Vec<(String, u32)> {
        self.state.lock().started.clone()
    }

    /// Pods with a running process.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.state.lock().pods.keys().map(|k| k.1.clone()).collect();
        v.sort();
        v
    }

    /// The loopback IP given to a pod.
    pub fn ip(&self, ns: &str, pod: &str) -> Option<String> {
        self.state
            .lock()
            .ips
            .get(&(ns.to_string(), pod.to_string()))
            .cloned()
    }
}

fn ordinal(pod: &str) -> Option<i64> {
    pod.rsplit_once('-').and_then(|(_, o)| o.parse().ok())
}

fn statefulsets(api: &Shared, st: &Mutex<Kubelet>) {
    for sts in api.list("apps/v1", "statefulsets", None) {
        if sts.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let (Some(name), Some(ns), Some(uid)) = (
            s(&sts, "/metadata/name"),
            s(&sts, "/metadata/namespace"),
            s(&sts, "/metadata/uid"),
        ) else {
            continue;
        };
        let replicas = sts
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let partition = sts
            .pointer("/spec/updateStrategy/rollingUpdate/partition")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let template = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let update_rev = format!("{name}-{}", hash(&template));
        let current_rev = s(&sts, "/status/currentRevision")
            .unwrap_or(&update_rev)
            .to_string();
        st.lock().templates.insert(update_rev.clone(), template);
        let pods: Vec<Value> = api
            .list("v1", "pods", Some(ns))
            .into_iter()
            .filter(|p| {
                p.pointer("/metadata/ownerReferences/0/uid")
                    .and_then(Value::as_str)
                    == Some(uid)
            })
            .collect();
        let pod_named = |n: &str| pods.iter().find(|p| s(p, "/metadata/name") == Some(n));
        let rev_of = |p: &Value| {
            s(p, "/metadata/labels/controller-revision-hash")
                .unwrap_or_default()
                .to_string()
        };
        let is_ready = |p: &Value| {
            p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        };
        for i in 0..replicas {
            let pod_name = format!("{name}-{i}");
            if pod_named(&pod_name).is_some() {
                continue;
            }
            let rev = if i >= partition {
                &update_rev
            } else {
                &current_rev
            };
            let Some(tpl) = st.lock().templates.get(rev).cloned() else {
                continue;
            };
            let mut labels = tpl
                .pointer("/metadata/labels")
                .cloned()
                .unwrap_or(json!({}));
            labels["controller-revision-hash"] = json!(rev);
            labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
            let pod = json!({
                "metadata": {
                    "name": pod_name, "namespace": ns, "labels": labels,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": uid, "controller": true}],
                },
                "spec": tpl.get("spec").cloned().unwrap_or(json!({})),
                "status": {"phase": "Pending"},
            });
            let _ = api.create(&Key::new("v1", "pods", ns, &pod_name), pod);
        }
        let terminating = pods
            .iter()
            .any(|p| p.pointer("/metadata/deletionTimestamp").is_some());
        for p in &pods {
            let pn = s(p, "/metadata/name").unwrap_or_default();
            if ordinal(pn).is_some_and(|o| o >= replicas)
                && p.pointer("/metadata/deletionTimestamp").is_none()
            {
                let _ = api.delete(&Key::new("v1", "pods", ns, pn), None);
            }
        }
        let live: Vec<&Value> = pods
            .iter()
            .filter(|p| {
                ordinal(s(p, "/metadata/name").unwrap_or_default()).is_some_and(|o| o < replicas)
            })
            .collect();
        let all_ready = live.len() as i64 == replicas && live.iter().all(|p| is_ready(p));
        if all_ready && !terminating {
            let stale = live
                .iter()
                .filter(|p| {
                    ordinal(s(p, "/metadata/name").unwrap_or_default())
                        .is_some_and(|o| o >= partition)
                        && rev_of(p) != update_rev
                })
                .max_by_key(|p| ordinal(s(p, "/metadata/name").unwrap_or_default()));
            if let Some(p) = stale {
                let pn = s(p, "/metadata/name").unwrap_or_default();
                let _ = api.delete(&Key::new("v1", "pods", ns, pn), None);
            }
        }
        let updated = live.iter().filter(|p| rev_of(p) == update_rev).count() as i64;
        let ready = live.iter().filter(|p| is_ready(p)).count() as i64;
        let current = if updated == replicas {
            update_rev.clone()
        } else {
            current_rev.clone()
        };
        let status = json!({
            "observedGeneration": sts.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "replicas": live.len(), "readyReplicas": ready, "availableReplicas": ready,
            "updatedReplicas": updated,
            "currentReplicas": live.iter().filter(|p| rev_of(p) == current).count(),
            "currentRevision": current, "updateRevision": update_rev,
        });
        if sts.get("status") != Some(&status) {
            let _ = api.patch(
                &Key::new("apps/v1", "statefulsets", ns, name),
                &json!({"status": status}),
                true,
                None,
                true,
                false,
            );
        }
    }
}

fn env_of(pod: &Value, ip: &str, root: &Path, kubeconfig: &Path) -> Vec<(String, String)> {
    let name = s(pod, "/metadata/name").unwrap_or_default();
    let ns = s(pod, "/metadata/namespace").unwrap_or_default();
    let container = pod
        .pointer("/spec/containers/0")
        .cloned()
        .unwrap_or(json!({}));
    let mounts: Vec<(String, String)> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["mountPath"].as_str()?.to_string(),
                m["name"].as_str()?.to_string(),
            ))
        })
        .collect();
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let Some(k) = e["name"].as_str() else {
            continue;
        };
        let mut v = match (
            e["value"].as_str(),
            e.pointer("/valueFrom/fieldRef/fieldPath")
                .and_then(Value::as_str),
        ) {
            (Some(v), _) => {
                let mut out = v.to_string();
                for (dk, dv) in &vars {
                    out = out.replace(&format!("$({dk})"), dv);
                }
                out
            }
            (None, Some("metadata.name")) => name.to_string(),
            (None, Some("metadata.namespace")) => ns.to_string(),
            (None, Some("status.podIP")) => ip.to_string(),
            _ => continue,
        };
        if v.starts_with("0.0.0.0:") {
            v = v.replacen("0.0.0.0", ip, 1);
        }
        for (path, claim) in &mounts {
            if let Some(rest) = v.strip_prefix(path.as_str()) {
                v = format!("{}{rest}", root.join(format!("{claim}-{name}")).display());
            }
        }
        vars.push((k.to_string(), v));
    }
    vars.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    // Debugging aid: DISTCACHE_SIM_NODE_LOG overrides the nodes' log filter.
    if let Ok(filter) = std::env::var("DISTCACHE_SIM_NODE_LOG") {
        vars.retain(|(k, _)| k != "DISTCACHE_LOG");
        vars.push(("DISTCACHE_LOG".into(), filter));
    }
    vars
}

/// Writes the Secrets a pod mounts into its volume directories
/// (`root/<volume>-<pod>`, where `env_of` points mounted paths), like the
/// kubelet's secret volumes: files replaced when the Secret changes.
fn sync_secret_volumes(api: &Shared, pod: &Value, root: &Path) {
    use base64::Engine;
    let name = s(pod, "/metadata/name").unwrap_or_default();
    let ns = s(pod, "/metadata/namespace").unwrap_or_default();
    for v in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(volume), Some(secret)) = (
            v["name"].as_str(),
            v.pointer("/secret/secretName").and_then(Value::as_str),
        ) else {
            continue;
        };
        let Some(obj) = api.get(&Key::new("v1", "secrets", ns, secret)) else {
            continue;
        };
        let dir = root.join(format!("{volume}-{name}"));
        let _ = std::fs::create_dir_all(&dir);
        for (file, b64) in obj["data"].as_object().into_iter().flatten() {
            let Some(bytes) = b64
                .as_str()
                .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
            else {
                continue;
            };
            let path = dir.join(file);
            if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
                let tmp = dir.join(format!(".{file}.tmp"));
                if std::fs::write(&tmp, &bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        }
    }
}

fn kubelet(api: &Shared, st: &Mutex<Kubelet>, root: &Path, kubeconfig: &Path) {
    let pods = api.list("v1", "pods", None);
    let mut k = st.lock();
    // Processes whose pod object is gone (force deletion, or done).
    let present: Vec<(String, String)> = pods
        .iter()
        .filter_map(|p| {
            Some((
                s(p, "/metadata/namespace")?.to_string(),
                s(p, "/metadata/name")?.to_string(),
            ))
        })
        .collect();
    let uids: HashMap<(String, String), String> = pods
        .iter()
        .filter_map(|p| {
            Some((
                (
                    s(p, "/metadata/namespace")?.to_string(),
                    s(p, "/metadata/name")?.to_string(),
                ),
                s(p, "/metadata/uid")?.to_string(),
            ))
        })
        .collect();
    k.pods.retain(|key, r| {
        if uids.get(key) == Some(&r.uid) {
            return true;
        }
        let _ = r.child.kill();
        let _ = r.child.wait();
        false
    });
    drop(present);
    for pod in &pods {
        let (Some(ns), Some(name), Some(uid)) = (
            s(pod, "/metadata/namespace"),
            s(pod, "/metadata/name"),
            s(pod, "/metadata/uid"),
        ) else {
            continue;
        };
        let key = (ns.to_string(), name.to_string());
        let pkey = Key::new("v1", "pods", ns, name);
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            let grace = pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30);
            let done = match k.pods.get_mut(&key) {
                None => true,
                Some(r) => {
                    let since = *r.terminating.get_or_insert_with(|| {
                        let _ = kill(Pid::from_raw(r.child.id() as i32), Signal::SIGTERM);
                        Instant::now()
                    });
                    if since.elapsed() > Duration::from_secs(grace) {
                        let _ = r.child.kill();
                    }
                    matches!(r.child.try_wait(), Ok(Some(_)))
                }
            };
            if done {
                k.pods.remove(&key);
                api.remove(&pkey);
            }
            continue;
        }
        sync_secret_volumes(api, pod, root);
        let exited = k
            .pods
            .get_mut(&key)
            .is_some_and(|r| matches!(r.child.try_wait(), Ok(Some(_))));
        if k.pods.contains_key(&key) && !exited {
            continue;
        }
        // Scheduling, image pull and container start take a while on a real
        // node: a new pod's container starts CONTAINER_START_DELAY after the
        // pod was created.
        let created = k.seen.entry(uid.to_string()).or_insert_with(Instant::now);
        if created.elapsed() < CONTAINER_START_DELAY {
            continue;
        }
        let restarts = k.pods.remove(&key).map_or(0, |r| r.restarts + 1);
        let next_ip = format!("127.0.0.{}", 10 + k.ips.len());
        let ip = k.ips.entry(key.clone()).or_insert(next_ip).clone();
        let env = env_of(pod, &ip, root, kubeconfig);
        for (_, v) in &env {
            if v.starts_with(&root.display().to_string()) {
                let _ = std::fs::create_dir_all(v);
            }
        }
        let grpc_port = pod
            .pointer("/spec/containers/0/readinessProbe/grpc/port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok());
        let logs = root.join("logs");
        let _ = std::fs::create_dir_all(&logs);
        let log = std::fs::File::create(logs.join(format!("{name}-{restarts}-{uid}.log")));
        let child = Command::new(crate::bin("distcache-node"))
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log.map(Stdio::from).unwrap_or_else(|_| Stdio::null()))
            .spawn();
        let Ok(child) = child else { continue };
        k.started.push((name.to_string(), child.id()));
        k.pods.insert(
            key,
            Running {
                child,
                ip: ip.clone(),
                grpc_port,
                uid: uid.to_string(),
                terminating: None,
                ready: false,
                restarts,
            },
        );
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "node", "ready": false, "restartCount": restarts, "image": "sim", "imageID": "sim", "started": true, "state": {"running": {}}}],
        }});
        let _ = api.patch(&pkey, &status, true, None, true, false);
    }
}

async fn probe(api: &Shared, st: &Mutex<Kubelet>) {
    type Target = ((String, String), String, Option<u16>, bool, u32);
    let targets: Vec<Target> = st
        .lock()
        .pods
        .iter()
        .filter(|(_, r)| r.terminating.is_none())
        .map(|(k, r)| (k.clone(), r.ip.clone(), r.grpc_port, r.ready, r.restarts))
        .collect();
    for ((ns, name), ip, port, was, restarts) in targets {
        let Some(port) = port else { continue };
        let ready = health(&format!("http://{ip}:{port}")).await;
        if ready == was {
            continue;
        }
        if let Some(r) = st.lock().pods.get_mut(&(ns.clone(), name.clone())) {
            r.ready = ready;
        }
        let flag = if ready { "True" } else { "False" };
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": flag}],
            "containerStatuses": [{"name": "node", "ready": ready, "restartCount": restarts, "image": "sim", "imageID": "sim", "started": true, "state": {"running": {}}}],
        }});
        let _ = api.patch(
            &Key::new("v1", "pods", &ns, &name),
            &status,
            true,
            None,
            true,
            false,
        );
    }
}

/// The gRPC health check the readiness probe runs (service "").
async fn health(url: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_string()) else {
        return false;
    };
    let call = async {
        let channel = endpoint.connect().await.ok()?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(resp.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(Duration::from_millis(500), call)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
