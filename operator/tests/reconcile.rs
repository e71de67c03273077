//! Reconcile against a mocked API server (the controller-rs fixture idea):
//! every request is recorded and answered like an apiserver would for
//! server-side apply; tests assert on what the operator asked for.

use std::sync::{Arc, Mutex};

use distcache_operator::reconcile::{
    ClusterHealth, ClusterProbe, Context, MANAGER, ProbeCredentials, next_partition, next_replicas,
    reconcile,
};
use distcache_operator::{DistributedCacheCluster, DistributedCacheClusterSpec};
use http::{Request, Response};
use kube::client::Body;

#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    body: serde_json::Value,
}

/// Starts the mock; `ready` is what StatefulSet applies report as ready
/// replicas; `fail_kind` makes applies of that resource fail with a 500.
fn mock(ready: i32, fail_kind: Option<&'static str>) -> (kube::Client, Arc<Mutex<Vec<Call>>>) {
    mock_with(ready, fail_kind, None)
}

/// A probe that answers with a fixed health.
struct FixedProbe(Option<ClusterHealth>);

impl ClusterProbe for FixedProbe {
    fn health(
        &self,
        _endpoints: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>> {
        let h = self.0.clone();
        Box::pin(async move { h })
    }
}

fn ctx(client: kube::Client, safe: bool) -> Arc<Context> {
    Arc::new(Context {
        client,
        probe: Arc::new(FixedProbe(Some(ClusterHealth {
            epoch: 9,
            safe,
            ..ClusterHealth::default()
        }))),
        recorder: None,
        metrics: Arc::default(),
    })
}

/// Like [`mock`], with an existing StatefulSet of `current` replicas.
fn mock_with(
    ready: i32,
    fail_kind: Option<&'static str>,
    current: Option<i32>,
) -> (kube::Client, Arc<Mutex<Vec<Call>>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let log = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let mut body: serde_json::Value =
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            log.lock().expect("log").push(Call {
                method: method.clone(),
                path: path.clone(),
                query,
                body: body.clone(),
            });
            let (code, reply) = if fail_kind.is_some_and(|k| path.contains(k)) {
                (
                    500,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "boom", "reason": "InternalError", "code": 500}),
                )
            } else if method == "GET" && path.contains("/secrets/") {
                // base64 of "CA", "op-token\n", "CRT", "KEY".
                (
                    200,
                    serde_json::json!({
                        "apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": path.rsplit('/').next(), "namespace": "prod"},
                        "data": {"ca.crt": "Q0E=", "operator-token": "b3AtdG9rZW4K", "tls.crt": "Q1JU", "tls.key": "S0VZ"},
                    }),
                )
            } else if method == "GET" && path.ends_with("/pods") {
                (
                    200,
                    serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
                )
            } else if method == "GET" && path.contains("/statefulsets/") && current.is_some() {
                (
                    200,
                    serde_json::json!({
                        "apiVersion": "apps/v1", "kind": "StatefulSet",
                        "metadata": {"name": "cache", "namespace": "prod"},
                        "spec": {"replicas": current, "selector": {}, "serviceName": "cache-peers", "template": {}},
                    }),
                )
            } else if method == "PATCH" {
                // An apiserver answers with the whole object.
                if body.get("metadata").is_none() {
                    body["metadata"] = serde_json::json!({"name": "cache", "namespace": "prod"});
                }
                if path.ends_with("/status") && body.get("spec").is_none() {
                    body["spec"] = serde_json::json!({});
                }
                if path.contains("/statefulsets/") {
                    body["status"] = serde_json::json!({"replicas": ready, "readyReplicas": ready});
                }
                (200, body)
            } else {
                (
                    404,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404}),
                )
            };
            let resp = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                .expect("response");
            send.send_response(resp);
        }
    });
    (kube::Client::new(svc, "default"), calls)
}

fn cluster(spec: &str) -> Arc<DistributedCacheCluster> {
    let spec: DistributedCacheClusterSpec = serde_json::from_str(spec).expect("spec");
    let mut d = DistributedCacheCluster::new("cache", spec);
    d.metadata.namespace = Some("prod".into());
    d.metadata.uid = Some("uid-1".into());
    d.metadata.generation = Some(4);
    Arc::new(d)
}

fn applied(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method == "PATCH")
        // .../<resource>/<name>, or .../<resource>/<name>/status
        .map(|c| match c.path.strip_suffix("/status") {
            Some(_) => "status".to_string(),
            None => c.path.rsplit('/').nth(1).unwrap_or_default().to_string(),
        })
        .collect()
}

/// The StatefulSet the operator applied.
fn sts_patch(calls: &[Call]) -> &Call {
    calls
        .iter()
        .find(|c| c.method == "PATCH" && c.path.contains("/statefulsets/"))
        .expect("a StatefulSet apply")
}

fn status_patch(calls: &[Call]) -> serde_json::Value {
    calls
        .iter()
        .rev()
        .find(|c| c.path.ends_with("/status"))
        .map(|c| c.body["status"].clone())
        .expect("a status patch")
}

fn condition(status: &serde_json::Value, t: &str) -> String {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .map(|c| c["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn create_applies_every_object_server_side_and_reports_progress() {
    let (client, calls) = mock(1, None);
    let ctx = ctx(client, true);
    reconcile(
        cluster(r#"{"replicas": 3, "storage": {"enabled": true}}"#),
        ctx,
    )
    .await
    .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    let kinds = applied(&calls);
    for k in [
        "serviceaccounts",
        "roles",
        "rolebindings",
        "configmaps",
        "services",
        "poddisruptionbudgets",
        "statefulsets",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} not applied: {kinds:?}");
    }
    for c in calls.iter().filter(|c| c.method == "PATCH") {
        assert!(
            c.query.contains(&format!("fieldManager={MANAGER}")) && c.query.contains("force=true"),
            "{c:?}"
        );
        assert!(c.path.contains("/namespaces/prod/"), "{}", c.path);
    }
    let sts = sts_patch(&calls);
    assert_eq!(sts.body["spec"]["replicas"], 3);
    assert!(
        sts.body["spec"]["volumeClaimTemplates"].is_array(),
        "storage enabled -> PVCs"
    );
    assert_eq!(
        sts.body["metadata"]["ownerReferences"][0]["kind"],
        "DistributedCacheCluster"
    );
    let st = status_patch(&calls);
    assert_eq!(st["readyReplicas"], 1);
    assert_eq!(st["observedGeneration"], 4);
    assert_eq!(condition(&st, "Ready"), "False");
    assert_eq!(condition(&st, "Progressing"), "True");
    assert_eq!(st["partitionCount"], 271);
}

#[tokio::test]
async fn all_ready_is_ready_and_scaling_changes_only_the_replica_count() {
    let (client, calls) = mock(5, None);
    let ctx = ctx(client, true);
    reconcile(cluster(r#"{"replicas": 5}"#), ctx)
        .await
        .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    let st = status_patch(&calls);
    assert_eq!(condition(&st, "Ready"), "True");
    assert_eq!(condition(&st, "Progressing"), "False");
    let cm = calls
        .iter()
        .find(|c| c.path.contains("/configmaps/"))
        .expect("members");
    assert_eq!(
        cm.body["data"]["members"]
            .as_str()
            .map(|m| m.lines().count()),
        Some(5)
    );
}

#[tokio::test]
async fn disabled_pdb_is_deleted() {
    let (client, calls) = mock(3, None);
    reconcile(
        cluster(r#"{"podDisruptionBudget": {"enabled": false}}"#),
        ctx(client, true),
    )
    .await
    .expect("reconcile (a missing PDB is fine)");
    let calls = calls.lock().expect("calls").clone();
    assert!(
        calls
            .iter()
            .any(|c| c.method == "DELETE" && c.path.contains("/poddisruptionbudgets/cache"))
    );
    assert!(!applied(&calls).iter().any(|k| k == "poddisruptionbudgets"));
}

#[tokio::test]
async fn invalid_spec_changes_nothing_and_says_why() {
    let (client, calls) = mock(3, None);
    reconcile(
        cluster(r#"{"replicas": 2, "backupCount": 2}"#),
        ctx(client, true),
    )
    .await
    .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(
        applied(&calls),
        vec!["status".to_string()],
        "only the status patch: {calls:?}"
    );
    let st = status_patch(&calls);
    assert_eq!(condition(&st, "Degraded"), "True");
    assert!(st["conditions"].to_string().contains("backupCount"));

    // Changing partitionCount after creation is refused.
    let (client, calls) = mock(3, None);
    let mut d = (*cluster(r#"{"partitionCount": 512}"#)).clone();
    d.status = Some(distcache_operator::DistributedCacheClusterStatus {
        partition_count: Some(271),
        ..Default::default()
    });
    reconcile(Arc::new(d), ctx(client, true))
        .await
        .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    assert!(!applied(&calls).iter().any(|k| k == "statefulsets"));
    assert!(
        status_patch(&calls)["conditions"]
            .to_string()
            .contains("immutable")
    );

    // Colliding or out-of-range ports are refused before anything is applied.
    for (spec, why) in [
        (r#"{"ports": {"grpc": 7100, "peer": 7100}}"#, "must differ"),
        (r#"{"ports": {"metrics": 7200}}"#, "must differ"),
        (r#"{"ports": {"grpc": 70000}}"#, "spec.ports.grpc (70000)"),
    ] {
        let (client, calls) = mock(3, None);
        reconcile(cluster(spec), ctx(client, true))
            .await
            .expect("reconcile");
        let calls = calls.lock().expect("calls").clone();
        assert_eq!(applied(&calls), vec!["status".to_string()], "{spec}");
        let conditions = status_patch(&calls)["conditions"].to_string();
        assert!(conditions.contains(why), "{spec}: {conditions}");
    }
}

#[tokio::test]
async fn api_errors_surface_as_reconcile_errors() {
    let (client, _calls) = mock(3, Some("/statefulsets/"));
    let err = reconcile(cluster("{}"), ctx(client, true))
        .await
        .expect_err("500 from the API");
    assert!(err.to_string().contains("boom"), "{err}");
}

#[test]
fn replicas_shrink_one_step_at_a_time_and_only_when_safe() {
    assert_eq!(
        next_replicas(None, 3, false),
        3,
        "a new cluster starts at its size"
    );
    assert_eq!(next_replicas(Some(3), 5, false), 5, "growing needs no wait");
    assert_eq!(next_replicas(Some(5), 2, true), 4);
    assert_eq!(next_replicas(Some(5), 2, false), 5, "unsafe: hold");
    assert_eq!(next_replicas(Some(3), 3, true), 3);
}

#[tokio::test]
async fn scale_down_applies_one_step_when_the_cluster_is_safe() {
    let (client, calls) = mock_with(5, None, Some(5));
    reconcile(cluster(r#"{"replicas": 2}"#), ctx(client, true))
        .await
        .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    let sts = sts_patch(&calls);
    assert_eq!(sts.body["spec"]["replicas"], 4);
    let cm = calls
        .iter()
        .find(|c| c.path.contains("/configmaps/"))
        .expect("members");
    assert_eq!(
        cm.body["data"]["members"]
            .as_str()
            .map(|m| m.lines().count()),
        Some(4)
    );
    let st = status_patch(&calls);
    assert_eq!(condition(&st, "Progressing"), "True");
    assert_eq!(st["epoch"], 9);
    assert!(
        st["conditions"]
            .to_string()
            .contains("one member at a time")
    );

    let (client, calls) = mock_with(5, None, Some(5));
    reconcile(cluster(r#"{"replicas": 2}"#), ctx(client, false))
        .await
        .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    let sts = sts_patch(&calls);
    assert_eq!(
        sts.body["spec"]["replicas"], 5,
        "not safe: no member leaves"
    );
}

#[test]
fn rolling_updates_release_one_pod_at_a_time_when_safe() {
    // No rollout: everything held.
    assert_eq!(next_partition(3, 0, 3, 3, false, true), 3);
    // Rollout starts: first release ordinal 2.
    assert_eq!(next_partition(3, 3, 0, 3, true, true), 2);
    // Ordinal 2 not updated yet: hold.
    assert_eq!(next_partition(3, 2, 0, 3, true, true), 2);
    // Updated and ready but the cluster is migrating: hold.
    assert_eq!(next_partition(3, 2, 1, 3, true, false), 2);
    // Updated, ready, safe: next one.
    assert_eq!(next_partition(3, 2, 1, 3, true, true), 1);
    assert_eq!(next_partition(3, 1, 2, 3, true, true), 0);
    assert_eq!(next_partition(3, 0, 3, 3, true, true), 0);
}

#[tokio::test]
async fn a_new_cluster_is_not_held_and_a_steady_one_is() {
    let (client, calls) = mock(3, None);
    reconcile(cluster("{}"), ctx(client, true))
        .await
        .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    let sts = sts_patch(&calls);
    assert_eq!(
        sts.body["spec"]["updateStrategy"]["rollingUpdate"]["partition"],
        0
    );

    let (client, calls) = mock_with(3, None, Some(3));
    reconcile(cluster("{}"), ctx(client, true))
        .await
        .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    let sts = sts_patch(&calls);
    assert_eq!(
        sts.body["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 3,
        "steady: template changes wait for release"
    );
}

#[test]
fn transitions_become_events_once() {
    use distcache_operator::DistributedCacheClusterStatus;
    use distcache_operator::reconcile::transitions;
    let with = |ready: &str, degraded: &str, safe: bool| {
        let cond = |t: &str, s: &str| {
            serde_json::json!({"type": t, "status": s, "reason": "R", "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z"})
        };
        let mut st: DistributedCacheClusterStatus = serde_json::from_value(serde_json::json!({
            "conditions": [cond("Ready", ready), cond("Degraded", degraded)],
        }))
        .expect("status");
        st.safe = safe;
        st.epoch = 3;
        st
    };
    let reasons = |a: &DistributedCacheClusterStatus, b: &DistributedCacheClusterStatus| {
        transitions(a, b)
            .iter()
            .map(|n| n.reason)
            .collect::<Vec<_>>()
    };
    let starting = with("False", "False", false);
    let ready = with("True", "False", true);
    assert_eq!(reasons(&starting, &ready), vec!["Ready", "ClusterSafe"]);
    assert!(reasons(&ready, &ready).is_empty(), "no change, no event");
    let unsafe_ready = with("True", "False", false);
    assert_eq!(reasons(&ready, &unsafe_ready), vec!["ClusterUnsafe"]);
    let invalid = with("False", "True", false);
    assert_eq!(
        reasons(&unsafe_ready, &invalid),
        vec!["NotReady", "InvalidSpec"]
    );
    assert!(reasons(&invalid, &invalid).is_empty());
    assert!(transitions(&ready, &invalid).iter().all(|n| n.warning));
}

/// A probe that records the credentials it was given.
struct RecordingProbe(Mutex<Vec<ProbeCredentials>>);

impl ClusterProbe for RecordingProbe {
    fn health(
        &self,
        _endpoints: Vec<String>,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>> {
        Box::pin(async { None })
    }

    fn health_with(
        &self,
        _endpoints: Vec<String>,
        credentials: ProbeCredentials,
    ) -> futures::future::BoxFuture<'static, Option<ClusterHealth>> {
        self.0.lock().expect("log").push(credentials);
        Box::pin(async {
            Some(ClusterHealth {
                epoch: 3,
                safe: true,
                ..ClusterHealth::default()
            })
        })
    }
}

#[tokio::test]
async fn a_secured_cluster_is_probed_with_its_ca_and_the_operator_token() {
    let (client, calls) = mock_with(3, None, Some(3));
    let probe = Arc::new(RecordingProbe(Mutex::default()));
    let ctx = Arc::new(Context {
        client,
        probe: probe.clone(),
        recorder: None,
        metrics: Arc::default(),
    });
    let spec = r#"{"replicas": 3,
        "tls": {"client": {"secretName": "cache-tls", "requireClientCertificates": true}},
        "auth": {"secretName": "cache-users"}}"#;
    reconcile(cluster(spec), ctx).await.expect("reconcile");
    let seen = probe.0.lock().expect("log").clone();
    assert_eq!(seen.len(), 1);
    let c = &seen[0];
    assert_eq!(c.ca_pem.as_deref(), Some(&b"CA"[..]));
    assert_eq!(c.identity_pem, Some((b"CRT".to_vec(), b"KEY".to_vec())));
    assert_eq!(c.server_name.as_deref(), Some("cache.prod.svc"));
    assert_eq!(c.token.as_deref(), Some("op-token"));
    let calls = calls.lock().expect("calls").clone();
    for name in ["cache-tls", "cache-users"] {
        assert!(
            calls
                .iter()
                .any(|c| c.method == "GET" && c.path.ends_with(&format!("/secrets/{name}"))),
            "{name} read"
        );
    }
    // The StatefulSet mounts both Secrets.
    let sts = calls
        .iter()
        .find(|c| c.method == "PATCH" && c.path.contains("/statefulsets/"))
        .expect("statefulset applied");
    let volumes = sts.body["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(
        volumes.contains("cache-tls") && volumes.contains("cache-users"),
        "{volumes}"
    );
}

#[tokio::test]
async fn the_network_policy_is_applied_by_default_and_deleted_when_disabled() {
    let (client, calls) = mock(3, None);
    reconcile(cluster(r#"{}"#), ctx(client, true))
        .await
        .expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    assert!(applied(&calls).iter().any(|k| k == "networkpolicies"));
    let (client, calls) = mock(3, None);
    reconcile(
        cluster(r#"{"networkPolicy": {"enabled": false}}"#),
        ctx(client, true),
    )
    .await
    .expect("reconcile (a missing NetworkPolicy is fine)");
    let calls = calls.lock().expect("calls").clone();
    assert!(
        calls
            .iter()
            .any(|c| c.method == "DELETE" && c.path.contains("/networkpolicies/cache"))
    );
    assert!(!applied(&calls).iter().any(|k| k == "networkpolicies"));
}
