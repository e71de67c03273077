//! **Test double**: an in-memory stand-in for the Kubernetes API server,
//! serving the subset the operator and the nodes use, over plain HTTP on
//! loopback. It is not a product feature and not a conformant apiserver.
//!
//! What it does: typed CRUD on `/api/v1/...` and `/apis/<group>/<version>/...`
//! (namespaced and cluster-wide lists), `?watch=true` streams (newline
//! separated JSON events, resumed from a resourceVersion), label selectors
//! (`k=v`, `k!=v`, `k`) and `metadata.name`/`metadata.namespace` field
//! selectors, the `status` subresource, server-side apply (merge, field
//! ownership per manager, 409 Conflict on a non-forced apply over another
//! manager's differing field), JSON merge and strategic merge patches (as
//! merge patches), generation bumps on spec changes, pod deletion with a
//! grace period (the [`super::kubelet`] double finishes it), finalizers, and
//! background garbage collection through owner references.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Identifies one object: (group/version, plural, namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// `v1` or `group/version`.
    pub gv: String,
    /// Resource (plural).
    pub plural: String,
    /// Namespace ("" for cluster-scoped objects).
    pub ns: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// A key.
    pub fn new(gv: &str, plural: &str, ns: &str, name: &str) -> Key {
        Key {
            gv: gv.into(),
            plural: plural.into(),
            ns: ns.into(),
            name: name.into(),
        }
    }
}

/// One change, as watchers see it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Resource version of the change.
    pub rv: u64,
    /// The object's key.
    pub key: Key,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    /// The object after the change (before it, for DELETED).
    pub object: Value,
}

#[derive(Debug, Default)]
struct Stored {
    object: Value,
    /// Field path -> manager that set it last.
    owners: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Stored>,
    log: Vec<Change>,
}

/// The shared state of the fake API server (also used in-process by the
/// kubelet double and by tests).
#[derive(Debug)]
pub struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
}

/// An API error (rendered as a `Status`).
#[derive(Debug)]
pub struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
}

fn err(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        reason,
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        (
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

fn kind_of(plural: &str) -> String {
    match plural {
        "pods" => "Pod",
        "services" => "Service",
        "configmaps" => "ConfigMap",
        "serviceaccounts" => "ServiceAccount",
        "statefulsets" => "StatefulSet",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "networkpolicies" => "NetworkPolicy",
        "secrets" => "Secret",
        "roles" => "Role",
        "rolebindings" => "RoleBinding",
        "leases" => "Lease",
        "events" => "Event",
        "distributedcacheclusters" => "DistributedCacheCluster",
        "customresourcedefinitions" => "CustomResourceDefinition",
        other => other,
    }
    .to_string()
}

/// Leaf paths of a JSON object (arrays count as leaves), with their values.
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(&format!("{prefix}.{k}"), v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|s| !s.is_empty())
        .try_fold(v, |v, k| v.get(k))
}

/// RFC 7386 merge: objects merge recursively, null deletes, the rest replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// `k=v,k!=v,k` against the object's labels.
fn labels_match(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = obj.pointer("/metadata/labels");
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    sel.split(',').all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            get(k.trim().trim_end_matches('=')) == Some(v.trim())
        } else {
            get(term.trim()).is_some()
        }
    })
}

fn fields_match(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((path, want)) => {
            at(obj, path.trim_end_matches('=')).and_then(Value::as_str) == Some(want)
        }
        None => true,
    })
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Shared {
    fn new() -> Arc<Shared> {
        let (changes, _) = broadcast::channel(16_384);
        Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes,
        })
    }

    fn emit(&self, store: &mut Store, key: &Key, kind: &'static str, object: Value) {
        let change = Change {
            rv: store.rv,
            key: key.clone(),
            kind,
            object,
        };
        store.log.push(change.clone());
        let _ = self.changes.send(change);
    }

    /// The object at `key`.
    pub fn get(&self, key: &Key) -> Option<Value> {
        self.store.lock().objects.get(key).map(|s| s.object.clone())
    }

    /// Objects of a resource (in a namespace, or all with None).
    pub fn list(&self, gv: &str, plural: &str, ns: Option<&str>) -> Vec<Value> {
        self.store
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.gv == gv && k.plural == plural && ns.is_none_or(|n| n == k.ns))
            .map(|(_, s)| s.object.clone())
            .collect()
    }

    /// Every change so far.
    pub fn history(&self) -> Vec<Change> {
        self.store.lock().log.clone()
    }

    /// Creates an object (409 when it exists).
    pub fn create(&self, key: &Key, mut obj: Value) -> Result<Value, ApiError> {
        let mut store = self.store.lock();
        if store.objects.contains_key(key) {
            return Err(err(
                409,
                "AlreadyExists",
                format!("{} {:?} already exists", key.plural, key.name),
            ));
        }
        store.rv += 1;
        store.uid += 1;
        let rv = store.rv;
        let uid = format!("uid-{}", store.uid);
        obj["apiVersion"] = json!(key.gv);
        obj["kind"] = json!(kind_of(&key.plural));
        let meta = &mut obj["metadata"];
        meta["name"] = json!(key.name);
        if !key.ns.is_empty() {
            meta["namespace"] = json!(key.ns);
        }
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(rv.to_string());
        meta["creationTimestamp"] = json!(now());
        meta["generation"] = json!(1);
        store.objects.insert(
            key.clone(),
            Stored {
                object: obj.clone(),
                owners: HashMap::new(),
            },
        );
        self.emit(&mut store, key, "ADDED", obj.clone());
        Ok(obj)
    }

    /// Applies a change to an existing object (or creates it when `upsert`):
    /// `patch` is merged into the object (only `status` for the status
    /// subresource, everything but `status` otherwise). With `manager`,
    /// field ownership is recorded and, unless `force`, checked.
    pub fn patch(
        &self,
        key: &Key,
        patch: &Value,
        status: bool,
        manager: Option<&str>,
        force: bool,
        upsert: bool,
    ) -> Result<Value, ApiError> {
        let exists = self.store.lock().objects.contains_key(key);
        if !exists {
            if !upsert {
                return Err(err(
                    404,
                    "NotFound",
                    format!("{} {:?} not found", key.plural, key.name),
                ));
            }
            let mut body = patch.clone();
            if let Value::Object(m) = &mut body {
                m.remove("status");
            }
            self.create(key, body)?;
        }
        let mut store = self.store.lock();
        let mut scoped = patch.clone();
        if let Value::Object(m) = &mut scoped {
            if status {
                m.retain(|k, _| k == "status");
            } else {
                m.remove("status");
                if let Some(Value::Object(meta)) = m.get_mut("metadata") {
                    for k in ["uid", "resourceVersion", "creationTimestamp", "generation"] {
                        meta.remove(k);
                    }
                }
            }
        }
        let mut paths = Vec::new();
        leaves("", &scoped, &mut paths);
        paths.retain(|(p, _)| {
            !matches!(
                p.as_str(),
                ".apiVersion" | ".kind" | ".metadata.name" | ".metadata.namespace"
            )
        });
        let stored = store
            .objects
            .get_mut(key)
            .ok_or_else(|| err(404, "NotFound", "vanished"))?;
        if let (Some(m), false) = (manager, force) {
            let conflicts: Vec<String> = paths
                .iter()
                .filter(|(p, v)| {
                    stored.owners.get(p).is_some_and(|o| o != m)
                        && !v.is_null()
                        && at(&stored.object, p).is_some_and(|cur| cur != v)
                })
                .map(|(p, _)| format!("conflict with {:?}: {p}", stored.owners[p]))
                .collect();
            if !conflicts.is_empty() {
                return Err(err(
                    409,
                    "Conflict",
                    format!(
                        "Apply failed with {} conflicts: {}",
                        conflicts.len(),
                        conflicts.join("; ")
                    ),
                ));
            }
        }
        let before_spec = stored.object.get("spec").cloned();
        merge(&mut stored.object, &scoped);
        let who = manager.unwrap_or("unknown");
        for (p, v) in &paths {
            if v.is_null() {
                stored.owners.retain(|k, _| !k.starts_with(p.as_str()));
            } else {
                stored.owners.insert(p.clone(), who.to_string());
            }
        }
        if stored.object.get("spec").cloned() != before_spec {
            let g = stored
                .object
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            stored.object["metadata"]["generation"] = json!(g + 1);
        }
        store.rv += 1;
        let rv = store.rv;
        let stored = store
            .objects
            .get_mut(key)
            .ok_or_else(|| err(404, "NotFound", "vanished"))?;
        stored.object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = stored.object.clone();
        let finalized = obj.pointer("/metadata/deletionTimestamp").is_some()
            && key.plural != "pods"
            && obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        self.emit(&mut store, key, "MODIFIED", obj.clone());
        drop(store);
        if finalized {
            self.remove(key);
        }
        Ok(obj)
    }

    /// Deletes: pods with a grace period and objects with finalizers get a
    /// deletionTimestamp; everything else goes at once, and the objects it
    /// owns are collected.
    pub fn delete(&self, key: &Key, grace: Option<i64>) -> Result<Value, ApiError> {
        let obj = self.get(key).ok_or_else(|| {
            err(
                404,
                "NotFound",
                format!("{} {:?} not found", key.plural, key.name),
            )
        })?;
        let finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let grace = grace.unwrap_or_else(|| {
            obj.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30)
        });
        if (key.plural == "pods" && grace > 0) || finalizers {
            if obj.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(obj);
            }
            let mut store = self.store.lock();
            store.rv += 1;
            let rv = store.rv;
            let Some(stored) = store.objects.get_mut(key) else {
                return Err(err(404, "NotFound", "vanished"));
            };
            stored.object["metadata"]["deletionTimestamp"] = json!(now());
            stored.object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            stored.object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let obj = stored.object.clone();
            self.emit(&mut store, key, "MODIFIED", obj.clone());
            return Ok(obj);
        }
        Ok(self.remove(key).unwrap_or(obj))
    }

    /// Removes an object now (the end of a deletion) and collects what it
    /// owned.
    pub fn remove(&self, key: &Key) -> Option<Value> {
        let (obj, uid) = {
            let mut store = self.store.lock();
            let stored = store.objects.remove(key)?;
            store.rv += 1;
            let uid = stored
                .object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            self.emit(&mut store, key, "DELETED", stored.object.clone());
            (stored.object, uid)
        };
        let owned: Vec<Key> = self
            .store
            .lock()
            .objects
            .iter()
            .filter(|(_, s)| {
                s.object
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(uid)))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in owned {
            let _ = self.delete(&k, None);
        }
        Some(obj)
    }
}

impl Shared {
    /// The garbage collector's sweep: deletes objects whose every owner
    /// (by UID) is gone, as Kubernetes' GC does for objects created after
    /// their owner was deleted.
    pub fn collect_garbage(&self) {
        let orphans: Vec<Key> = {
            let store = self.store.lock();
            let uids: std::collections::HashSet<&str> = store
                .objects
                .values()
                .filter_map(|s| s.object.pointer("/metadata/uid").and_then(Value::as_str))
                .collect();
            store
                .objects
                .iter()
                .filter(|(_, s)| {
                    s.object
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            !refs.is_empty()
                                && refs
                                    .iter()
                                    .all(|r| r["uid"].as_str().is_none_or(|u| !uids.contains(u)))
                        })
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in orphans {
            let _ = self.delete(&k, None);
        }
    }
}

/// The fake API server: serves [`Shared`] on a loopback port until dropped.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state.
    pub shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// Starts on 127.0.0.1 (a free port).
    pub async fn start() -> ApiServer {
        let shared = Shared::new();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ApiServer { addr, shared, task }
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: http://{}\nusers:\n- name: sim\n  user: {{}}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\n    namespace: default\ncurrent-context: sim\n",
            self.addr
        )
    }
}

struct Target {
    gv: String,
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn target(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(*s)),
        _ => return None,
    };
    Some(Target {
        gv,
        plural: plural.to_string(),
        ns,
        name,
        status: sub == Some("status"),
    })
}

fn ok(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match serve(&shared, method, uri, q, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    shared: &Arc<Shared>,
    method: Method,
    uri: Uri,
    q: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t = target(uri.path())
        .ok_or_else(|| err(404, "NotFound", format!("no route {}", uri.path())))?;
    let ns = t.ns.clone().unwrap_or_default();
    let parse = |b: &Bytes| -> Result<Value, ApiError> {
        serde_json::from_slice(b).map_err(|e| err(400, "BadRequest", format!("body: {e}")))
    };
    match (method, &t.name) {
        (Method::GET, Some(name)) => {
            let key = Key::new(&t.gv, &t.plural, &ns, name);
            shared
                .get(&key)
                .map(|o| ok(&o))
                .ok_or_else(|| err(404, "NotFound", format!("{} {name:?} not found", t.plural)))
        }
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            Ok(watch(shared, &t, &q))
        }
        (Method::GET, None) => {
            let rv = shared.store.lock().rv;
            let items: Vec<Value> = shared
                .list(&t.gv, &t.plural, t.ns.as_deref())
                .into_iter()
                .filter(|o| {
                    labels_match(o, q.get("labelSelector"))
                        && fields_match(o, q.get("fieldSelector"))
                })
                .collect();
            Ok(ok(&json!({
                "apiVersion": t.gv, "kind": format!("{}List", kind_of(&t.plural)),
                "metadata": {"resourceVersion": rv.to_string()}, "items": items,
            })))
        }
        (Method::POST, None) => {
            let obj = parse(&body)?;
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| {
                    obj.pointer("/metadata/generateName")
                        .and_then(Value::as_str)
                        .map(|g| format!("{g}{}", shared.store.lock().uid + 1))
                })
                .ok_or_else(|| err(422, "Invalid", "metadata.name is required"))?;
            let created = shared.create(&Key::new(&t.gv, &t.plural, &ns, &name), obj)?;
            Ok((
                StatusCode::CREATED,
                [("content-type", "application/json")],
                created.to_string(),
            )
                .into_response())
        }
        (Method::PUT, Some(name)) => {
            let key = Key::new(&t.gv, &t.plural, &ns, name);
            let obj = parse(&body)?;
            let cur = shared
                .get(&key)
                .ok_or_else(|| err(404, "NotFound", "not found"))?;
            let want = obj.pointer("/metadata/resourceVersion");
            if want.is_some() && want != cur.pointer("/metadata/resourceVersion") {
                return Err(err(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
            let mut next = cur.clone();
            let section = if t.status { "status" } else { "spec" };
            if let Some(v) = obj.get(section) {
                next[section] = v.clone();
            }
            if !t.status {
                for k in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    next["metadata"][k] = obj["metadata"][k].clone();
                }
                if let Some(d) = obj.get("data") {
                    next["data"] = d.clone();
                }
            }
            let diff = json!({ section: next[section].clone(), "metadata": next["metadata"].clone(), "data": next.get("data").cloned().unwrap_or(Value::Null) });
            Ok(ok(&shared.patch(&key, &diff, t.status, None, true, false)?))
        }
        (Method::PATCH, Some(name)) => {
            let key = Key::new(&t.gv, &t.plural, &ns, name);
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let obj = parse(&body)?;
            let manager = q.get("fieldManager").map(String::as_str);
            let force = q.get("force").is_some_and(|f| f == "true");
            let applied = if ct.starts_with("application/apply-patch") {
                let m = manager.ok_or_else(|| err(422, "Invalid", "apply needs a fieldManager"))?;
                shared.patch(&key, &obj, t.status, Some(m), force, true)?
            } else if ct.starts_with("application/merge-patch")
                || ct.starts_with("application/strategic-merge-patch")
            {
                shared.patch(&key, &obj, t.status, manager, true, false)?
            } else {
                return Err(err(
                    415,
                    "UnsupportedMediaType",
                    format!("patch type {ct:?}"),
                ));
            };
            Ok(ok(&applied))
        }
        (Method::DELETE, Some(name)) => {
            let key = Key::new(&t.gv, &t.plural, &ns, name);
            let opts: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let grace = q
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse().ok())
                .or_else(|| opts.get("gracePeriodSeconds").and_then(Value::as_i64));
            Ok(ok(&shared.delete(&key, grace)?))
        }
        (m, _) => Err(err(405, "MethodNotAllowed", format!("{m} {}", uri.path()))),
    }
}

fn watch(shared: &Arc<Shared>, t: &Target, q: &HashMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(60u64)
        .min(60);
    let (gv, plural, ns) = (t.gv.clone(), t.plural.clone(), t.ns.clone());
    let (labels, fields) = (
        q.get("labelSelector").cloned(),
        q.get("fieldSelector").cloned(),
    );
    let relevant = move |c: &Change| {
        c.key.gv == gv
            && c.key.plural == plural
            && ns.as_ref().is_none_or(|n| *n == c.key.ns)
            && labels_match(&c.object, labels.as_ref())
            && fields_match(&c.object, fields.as_ref())
    };
    let (backlog, mut rx) = {
        let store = shared.store.lock();
        let rx = shared.changes.subscribe();
        let backlog: Vec<Change> = if from == 0 {
            store
                .objects
                .iter()
                .map(|(k, s)| Change {
                    rv: store.rv,
                    key: k.clone(),
                    kind: "ADDED",
                    object: s.object.clone(),
                })
                .filter(|c| relevant(c))
                .collect()
        } else {
            store
                .log
                .iter()
                .filter(|c| c.rv > from && relevant(c))
                .cloned()
                .collect()
        };
        (backlog, rx)
    };
    let line =
        |c: &Change| Bytes::from(format!("{}\n", json!({"type": c.kind, "object": c.object})));
    let stream = async_stream(
        backlog.iter().map(line).collect(),
        move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                let next = tokio::time::timeout_at(end, rx.recv()).await;
                match next {
                    Ok(Ok(c)) => {
                        if relevant(&c) && tx.send(line(&c)).await.is_err() {
                            break;
                        }
                    }
                    // Lagged or closed, or the timeout: the client re-watches.
                    _ => break,
                }
            }
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(stream)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A streaming body: `first` chunks, then what `produce` sends.
fn async_stream<F, Fut>(first: Vec<Bytes>, produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        produce(tx).await;
    });
    let s = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::io::Error>(b), rx))
    });
    Body::from_stream(s)
}
