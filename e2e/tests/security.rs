//! The client port's security with real processes: TLS (Rust client, CLI,
//! Python grpcio), bearer tokens and client certificates, per-collection
//! grants for every RPC, revocation without a restart, and clear errors for
//! a plaintext client or a missing credential.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use distcache_client::{Client, ClientConfig, ClientTls, Error, LockOptions};
use distcache_e2e::{NodeProcess, bin};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use sha2::{Digest, Sha256};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for localhost/127.0.0.1 and a client
    /// certificate for `ops.clients`, as PEM files in a fresh directory.
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("dc-sec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "distcache test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let leaf = |names: Vec<String>, file: &str| {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("sign");
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).expect("write");
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).expect("write");
        };
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
        leaf(vec!["localhost".into(), "127.0.0.1".into()], "server");
        leaf(vec!["ops.clients".into()], "client");
        leaf(vec!["stranger.clients".into()], "stranger");
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn s(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

fn sha(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn users_json(with_web: bool) -> String {
    let web = if with_web {
        format!(
            r#"{{"name": "web", "token_sha256": "{}", "grants": [{{"collections": "sessions*", "roles": ["read", "write"]}}, {{"collections": "__locks__", "roles": ["write"]}}]}},"#,
            sha("web-token")
        )
    } else {
        String::new()
    };
    format!(
        r#"{{"users": [
            {web}
            {{"name": "reader", "token_sha256": "{}", "grants": [{{"collections": "sessions*", "roles": ["read"]}}]}},
            {{"name": "admin", "token_sha256": "{}", "grants": [{{"collections": "*", "roles": ["read", "write", "admin"]}}]}},
            {{"name": "ops", "cert_name": "ops.clients", "grants": [{{"collections": "*", "roles": ["read", "admin"]}}]}}
        ]}}"#,
        sha("reader-token"),
        sha("admin-token")
    )
}

fn write_users(path: &Path, with_web: bool) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, users_json(with_web)).expect("write users");
    std::fs::rename(&tmp, path).expect("rename users");
}

async fn client(
    node: &NodeProcess,
    pki: &Pki,
    token: Option<&str>,
) -> distcache_client::Result<Client> {
    let tls =
        ClientTls::from_files(Some(&pki.path("ca.pem")), None, None)?.server_name("localhost");
    let mut config = ClientConfig::new([node.addr.to_string()])
        .tls(tls)
        .max_retries(0)
        .request_timeout(Duration::from_secs(5));
    if let Some(t) = token {
        config = config.token(t);
    }
    Client::with_config(config).await
}

fn tls_node(pki: &Pki, users: &Path, extra: &[&str]) -> NodeProcess {
    let (cert, key, users) = (
        pki.s("server.pem"),
        pki.s("server.key"),
        users.display().to_string(),
    );
    let mut args = vec![
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--users-file",
        &users,
    ];
    args.extend_from_slice(extra);
    NodeProcess::start(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_grants_decide_every_call_and_revocation_needs_no_restart() {
    let pki = Pki::new("grants");
    let users = pki.path("users.json");
    write_users(&users, true);
    let node = tls_node(&pki, &users, &[]);

    let admin = client(&node, &pki, Some("admin-token"))
        .await
        .expect("admin connects");
    admin
        .collection("sessions")
        .await
        .expect("admin creates sessions");
    admin
        .collection("billing")
        .await
        .expect("admin creates billing");
    let web = client(&node, &pki, Some("web-token"))
        .await
        .expect("web connects");
    let reader = client(&node, &pki, Some("reader-token"))
        .await
        .expect("reader connects");

    // What each role may do on sessions (write + read), and nothing else.
    let s = web.collection_handle("sessions");
    s.put("k", "v").await.expect("web writes sessions");
    assert_eq!(
        s.get("k").await.expect("web reads").as_deref(),
        Some(&b"v"[..])
    );
    s.put_many([("a", "1"), ("b", "2")], None)
        .await
        .expect("batch write");
    assert_eq!(s.get_many(["a", "b"]).await.expect("batch read").len(), 2);
    assert_eq!(s.size().await.expect("size"), 3);
    assert_eq!(s.keys().await.expect("keys").len(), 3);
    assert_eq!(s.delete_many(["a"]).await.expect("delete_many"), 1);
    assert!(s.delete("b").await.expect("delete"));
    let lock = web
        .acquire_lock("job", LockOptions::default())
        .await
        .expect("web takes a lock");
    lock.release().await.expect("release");
    let denied = |r: distcache_client::Result<_>, what: &str| match r {
        Err(Error::NotAuthorized(m)) => assert!(!m.is_empty(), "{what}"),
        Err(e) => panic!("{what}: expected NOT_AUTHORIZED, got {e:?}"),
        Ok(_) => panic!("{what}: expected NOT_AUTHORIZED, got success"),
    };
    denied(s.clear().await.map(|_| ()), "web clear (admin)");
    denied(
        web.delete_collection("sessions").await.map(|_| ()),
        "web delete collection",
    );
    denied(
        web.collection("new-one").await.map(|_| ()),
        "web creates a collection",
    );
    denied(
        web.force_release_lock("job").await.map(|_| ()),
        "web force-unlock",
    );
    let b = web.collection_handle("billing");
    denied(b.get("k").await.map(|_| ()), "web reads billing");
    denied(b.put("k", "v").await, "web writes billing");
    let names: Vec<String> = web
        .list_collections()
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        names,
        vec!["sessions".to_string()],
        "web lists only what it may see"
    );

    let r = reader.collection_handle("sessions");
    assert_eq!(
        r.get("k").await.expect("reader reads").as_deref(),
        Some(&b"v"[..])
    );
    denied(r.put("k", "x").await, "reader writes");
    denied(
        reader
            .acquire_lock("job", LockOptions::default())
            .await
            .map(|_| ()),
        "reader locks",
    );

    // The missing grant is named.
    match s.clear().await {
        Err(Error::NotAuthorized(m)) => {
            assert!(m.contains("admin") && m.contains("sessions"), "{m}")
        }
        other => panic!("{other:?}"),
    }

    // No credential, or a wrong one: UNAUTHENTICATED.
    match client(&node, &pki, None).await {
        Err(Error::Unauthenticated(_)) => {}
        other => panic!("no token: {other:?}"),
    }
    match client(&node, &pki, Some("guess")).await {
        Err(Error::Unauthenticated(_)) => {}
        other => panic!("bad token: {other:?}"),
    }

    // Revoke web in the file: refused within seconds, no restart.
    write_users(&users, false);
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match s.get("k").await {
            Err(Error::Unauthenticated(_)) => break,
            Ok(_) if std::time::Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("web still served after revocation: {other:?}"),
        }
    }
    // Others keep working.
    assert_eq!(
        r.get("k").await.expect("reader still reads").as_deref(),
        Some(&b"v"[..])
    );

    // The CLI with --tls-ca and --token.
    let cli = |token: &str, args: &[&str]| {
        Command::new(bin("distcache"))
            .args([
                "--endpoints",
                &node.addr.to_string(),
                "--tls-ca",
                &pki.s("ca.pem"),
            ])
            .args(["--tls-server-name", "localhost", "--token", token])
            .args(args)
            .output()
            .expect("run distcache")
    };
    let o = cli("admin-token", &["put", "-c", "billing", "x", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cli("reader-token", &["get", "-c", "billing", "x"]);
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("reader") && err.lines().count() == 1, "{err}");

    // A plaintext client on the TLS port fails with a clear error.
    let plain = Client::with_config(
        ClientConfig::new([node.addr.to_string()])
            .max_retries(0)
            .request_timeout(Duration::from_secs(3)),
    )
    .await;
    assert!(plain.is_err(), "plaintext client connected to a TLS port");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_name_their_user() {
    let pki = Pki::new("mtls");
    let users = pki.path("users.json");
    write_users(&users, true);
    let ca = pki.s("ca.pem");
    let node = tls_node(&pki, &users, &["--tls-client-ca", &ca]);
    let with_cert = |file: &str| {
        ClientTls::from_files(
            Some(&pki.path("ca.pem")),
            Some(&pki.path(&format!("{file}.pem"))),
            Some(&pki.path(&format!("{file}.key"))),
        )
        .expect("tls files")
        .server_name("localhost")
    };
    let config = |tls: ClientTls| {
        ClientConfig::new([node.addr.to_string()])
            .tls(tls)
            .max_retries(0)
            .request_timeout(Duration::from_secs(3))
    };
    // ops (certificate): read and admin everywhere, no write.
    let ops = Client::with_config(config(with_cert("client")))
        .await
        .expect("ops connects");
    let c = ops.collection("audit").await.expect("ops creates (admin)");
    assert_eq!(c.get("k").await.expect("ops reads"), None);
    assert!(matches!(
        c.put("k", "v").await,
        Err(Error::NotAuthorized(_))
    ));
    // A certificate the CA signed but no user names: UNAUTHENTICATED.
    assert!(matches!(
        Client::with_config(config(with_cert("stranger"))).await,
        Err(Error::Unauthenticated(_))
    ));
    // No certificate at all: the handshake is refused.
    let none = ClientTls::from_files(Some(&pki.path("ca.pem")), None, None)
        .expect("tls")
        .server_name("localhost");
    let refused = Client::with_config(config(none).token("admin-token")).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn python_grpcio_speaks_tls_with_a_token() {
    let pki = Pki::new("py");
    let users = pki.path("users.json");
    write_users(&users, true);
    let node = tls_node(&pki, &users, &[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = r#"
import importlib, sys, tempfile
import grpc
from grpc_tools import protoc
addr, proto_dir, ca = sys.argv[1], sys.argv[2], sys.argv[3]
out = tempfile.mkdtemp()
assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", "distcache/v1/distcache.proto"]) == 0
sys.path.insert(0, out)
pb = importlib.import_module("distcache.v1.distcache_pb2")
rpc = importlib.import_module("distcache.v1.distcache_pb2_grpc")
creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
ch = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])
cols = rpc.CollectionsStub(ch)
cache = rpc.CacheStub(ch)
admin = [("authorization", "Bearer admin-token")]
cols.GetOrCreate(pb.GetOrCreateCollectionRequest(name="sessions"), metadata=admin, timeout=10)
cache.Put(pb.PutRequest(collection="sessions", key=b"py", value=b"tls"), metadata=[("authorization", "Bearer web-token")], timeout=10)
got = cache.Get(pb.GetRequest(collection="sessions", key=b"py"), metadata=[("authorization", "Bearer reader-token")], timeout=10)
assert got.found and got.value == b"tls", got
try:
    cache.Get(pb.GetRequest(collection="sessions", key=b"py"), timeout=10)
    raise SystemExit("no token accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code()
try:
    cache.Put(pb.PutRequest(collection="sessions", key=b"py", value=b"x"), metadata=[("authorization", "Bearer reader-token")], timeout=10)
    raise SystemExit("reader wrote")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e.code()
    assert ("distcache-reason", "NOT_AUTHORIZED") in list(e.trailing_metadata()), e.trailing_metadata()
print("OK")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(node.addr.to_string())
        .arg(root.join("../client/proto"))
        .arg(pki.path("ca.pem"))
        .output()
        .expect("python3 with grpcio (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let old = Pki::new("rot-old");
    let new = Pki::new("rot-new");
    let users = old.path("users.json");
    write_users(&users, true);
    // The node reads its certificate from these two paths.
    let (cert, key) = (old.dir.join("live.pem"), old.dir.join("live.key"));
    std::fs::copy(old.path("server.pem"), &cert).expect("copy");
    std::fs::copy(old.path("server.key"), &key).expect("copy");
    let (c, k, u) = (
        cert.display().to_string(),
        key.display().to_string(),
        users.display().to_string(),
    );
    let node = NodeProcess::start(&["--tls-cert", &c, "--tls-key", &k, "--users-file", &u]);
    assert!(
        client(&node, &old, Some("admin-token")).await.is_ok(),
        "old CA trusted"
    );
    assert!(
        client(&node, &new, Some("admin-token")).await.is_err(),
        "new CA not yet"
    );
    // Rotate: the new CA's certificate replaces the old one on disk.
    for (from, to) in [
        (new.path("server.key"), &key),
        (new.path("server.pem"), &cert),
    ] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).expect("copy");
        std::fs::rename(&tmp, to).expect("rename");
    }
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match client(&node, &new, Some("admin-token")).await {
            Ok(c) => {
                c.collection("after-rotation")
                    .await
                    .expect("served with the new certificate");
                break;
            }
            Err(e) if std::time::Instant::now() < end => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the rotated certificate was not served: {e}"),
        }
    }
    assert!(
        client(&node, &old, Some("admin-token")).await.is_err(),
        "old certificate retired"
    );
    let _ = std::fs::remove_dir_all(&old.dir);
    let _ = std::fs::remove_dir_all(&new.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_a_flood_cannot_lock_clients_out() {
    let mut node = NodeProcess::start_under(
        Some(1 << 30),
        &["--max-connections", "16", "--idle-timeout-secs", "1"],
        &[],
    );
    // 200 connections that never send a byte: 16 are accepted, the rest wait
    // in the backlog; each accepted one is closed after a second of silence.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(node.addr)
                .await
                .expect("connect"),
        );
    }
    let started = std::time::Instant::now();
    let c = Client::with_config(
        ClientConfig::new([node.addr.to_string()]).request_timeout(Duration::from_secs(20)),
    )
    .await
    .expect("a real client is served despite the flood");
    c.put("k", "v").await.expect("put");
    println!(
        "served after {:?} behind 200 idle connections",
        started.elapsed()
    );
    // The first accepted idle connection was closed by the node (after its
    // HTTP/2 settings, it reads end of stream).
    use tokio::io::AsyncReadExt;
    let first = &mut idle[0];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        loop {
            match first.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "an idle connection was not closed");
    assert!(node.alive(), "the node died under the flood");
}

/// A node under a 1.5 GiB address-space cap with a response budget of
/// `budget` bytes, holding four 4 MiB values; a client and their keys.
/// Unbounded, the floods below abort such a node ("memory allocation
/// failed"); bounded, they must not. glibc's dynamic mmap threshold would
/// keep freed 16 MiB buffers in the heap (RSS then measures the
/// allocator's history, not live memory): it is fixed.
async fn node_with_four_large_values(budget: &str) -> (NodeProcess, Client, Vec<String>) {
    let node = NodeProcess::start_under(
        Some(1536 << 20),
        &[
            "--batch-buffer-bytes",
            budget,
            "--max-value-bytes",
            "4194304",
        ],
        &[("MALLOC_MMAP_THRESHOLD_", "131072")],
    );
    let c = Client::connect([node.addr.to_string()])
        .await
        .expect("client");
    let keys: Vec<String> = (0..4).map(|i| format!("big{i}")).collect();
    for k in &keys {
        c.put(k, vec![7u8; 4 << 20]).await.expect("put 4 MiB");
    }
    (node, c, keys)
}

/// 40 connections whose receive windows stay at 1 KiB each ask 8 times
/// for 16 MiB (four 4 MiB values) and never read: as Batch streams, or as
/// unary `GetMany` calls. Checks that the node stayed alive, served a
/// well-behaved client and grew by less than [`UNREAD_GROWTH_LIMIT`].
async fn unread_large_answers_stay_within_the_budget(unary: bool) {
    use distcache_client::proto::{self, cache_client::CacheClient};
    let budget = std::env::var("DC_TEST_BUDGET").unwrap_or_else(|_| "16777216".into());
    let (mut node, c, keys) = node_with_four_large_values(&budget).await;
    let base = node.rss_bytes();
    let ask = proto::GetManyRequest {
        collection: String::new(),
        keys: keys.iter().map(|k| bytes::Bytes::from(k.clone())).collect(),
    };
    let mut held = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..40 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
            .expect("endpoint")
            .initial_stream_window_size(Some(1024))
            .initial_connection_window_size(Some(1024))
            .connect()
            .await
            .expect("connect");
        let mut raw = CacheClient::new(channel).max_decoding_message_size(64 << 20);
        if unary {
            // Each call waits for a body it never gets to read.
            for _ in 0..8 {
                let mut raw = raw.clone();
                let ask = ask.clone();
                calls.push(tokio::spawn(async move { raw.get_many(ask).await }));
            }
            continue;
        }
        let asks: Vec<proto::BatchRequest> = (0..8)
            .map(|i| proto::BatchRequest {
                commands: vec![proto::Command {
                    id: i,
                    op: Some(proto::command::Op::GetMany(ask.clone())),
                }],
            })
            .collect();
        let resp = raw
            .batch(futures::stream::iter(asks))
            .await
            .expect("stream opens");
        held.push((raw, resp));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = node.rss_bytes().saturating_sub(base);
    let what = if unary {
        "unary calls"
    } else {
        "Batch streams"
    };
    println!(
        "RSS grew by {} MiB with 40 connections of unread {what}",
        grown >> 20
    );
    assert!(node.alive(), "the node aborted under the address-space cap");
    // A well-behaved client is still served.
    c.put("small", "ok").await.expect("put while others stall");
    assert_eq!(
        c.get("small").await.expect("get").as_deref(),
        Some(&b"ok"[..])
    );
    for call in &calls {
        call.abort();
    }
    drop(held);
    assert!(
        grown < UNREAD_GROWTH_LIMIT,
        "RSS grew by {} MiB",
        grown >> 20
    );
}

// Without the budget the Batch flood grows the node by ~1.3 GiB (measured:
// 1,282 MiB with --batch-buffer-bytes 4000000000), and the unary one (320
// calls of 16 MiB) cannot fit under the cap. Since a large answer's room
// travels with its encoded bytes until they are written, a 16 MiB budget
// holds the growth to about the budget: 17 MiB in every run measured
// (session 21; 33-306 MiB before, when the room was given back as soon as
// the transport asked for the next answer). 64 MiB leaves room for the
// allocator, not for a second unbudgeted answer per connection.
const UNREAD_GROWTH_LIMIT: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_streams_whose_responses_are_never_read_cannot_grow_the_node() {
    unread_large_answers_stay_within_the_budget(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_answers_that_are_never_read_cannot_grow_the_node() {
    unread_large_answers_stay_within_the_budget(true).await;
}

/// One `GetMany` naming a 4 MiB value's key 20,000 times asks for an 80 GB
/// answer from a few hundred KiB of request: the node refuses it (the
/// answer is counted as it is built, against `--max-message-bytes`) instead
/// of encoding it, which aborted the node under its address-space cap
/// (session 21), and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_of_one_key_repeated_cannot_blow_up_its_answer() {
    use distcache_client::proto::{self, cache_client::CacheClient};
    let mut node = NodeProcess::start_under(Some(2048 << 20), &[], &[]);
    let c = Client::connect([node.addr.to_string()])
        .await
        .expect("client");
    c.put("big", vec![7u8; 4 << 20]).await.expect("put 4 MiB");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut raw = CacheClient::new(channel).max_decoding_message_size(128 << 20);
    let ask = |n: usize| proto::GetManyRequest {
        collection: String::new(),
        keys: vec![bytes::Bytes::from_static(b"big"); n],
    };
    let refused = raw.get_many(ask(20_000)).await.expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("max-message-bytes"),
        "{refused:?}"
    );
    assert!(node.alive(), "the node aborted");
    let fine = raw.get_many(ask(10)).await.expect("40 MiB fits");
    assert_eq!(fine.into_inner().entries.len(), 10);
    c.put("small", "ok").await.expect("still serving");
}

/// 60 clients each open a Batch stream, send one command, read its whole
/// answer and keep the stream open: the node grows by less than
/// [`UNREAD_GROWTH_LIMIT`], stays alive under its address-space cap and
/// serves others meanwhile.
async fn idle_streams_cannot_grow_the_node(ask: fn(&[String]) -> proto_op::Op) {
    use distcache_client::proto::{self, cache_client::CacheClient};
    let (mut node, c, keys) = node_with_four_large_values("16777216").await;
    let base = node.rss_bytes();
    let ask = proto::BatchRequest {
        commands: vec![proto::Command {
            id: 1,
            op: Some(ask(&keys)),
        }],
    };
    let mut open = Vec::new();
    let mut answered = 0usize;
    for _ in 0..60 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut raw = CacheClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(ask.clone()).await.expect("queue the ask");
        let mut answers = raw
            .batch(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|ask| (ask, rx))
            }))
            .await
            .expect("stream opens")
            .into_inner();
        // Every answer is read in full: the node holds nothing for a slow
        // reader here, only what a stream keeps once it has been used.
        let got = tokio::time::timeout(Duration::from_secs(20), answers.message())
            .await
            .expect("answered within 20 s")
            .expect("an answer")
            .expect("not the end");
        assert!(
            !matches!(
                got.results.first().and_then(|r| r.result.as_ref()),
                Some(proto::command_result::Result::Error(_)) | None
            ),
            "{got:?}"
        );
        answered += got.results.len();
        open.push((raw, tx, answers));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = node.rss_bytes().saturating_sub(base);
    println!(
        "RSS grew by {} MiB with 60 idle streams ({answered} results)",
        grown >> 20
    );
    assert_eq!(answered, 60, "every stream got its answer");
    assert!(node.alive(), "the node aborted under the address-space cap");
    c.put("small", "ok").await.expect("put while others idle");
    assert!(
        grown < UNREAD_GROWTH_LIMIT,
        "RSS grew by {} MiB",
        grown >> 20
    );
}

use distcache_client::proto::command as proto_op;

/// Each stream reads 16 MiB (four 4 MiB values). tonic's encoder kept the
/// buffer of a stream's largest answer for the stream's life, so these 60
/// idle streams held 962 MiB that no budget counted; the node now encodes
/// each answer into a buffer of its own, freed once written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_that_read_large_answers_cannot_grow_the_node() {
    idle_streams_cannot_grow_the_node(|keys| {
        proto_op::Op::GetMany(distcache_client::proto::GetManyRequest {
            collection: String::new(),
            keys: keys.iter().map(|k| bytes::Bytes::from(k.clone())).collect(),
        })
    })
    .await;
}

/// Each stream writes one 4 MiB value (the same key, so the store holds
/// one): what the stream's decoder keeps of the request once it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_that_wrote_large_values_cannot_grow_the_node() {
    idle_streams_cannot_grow_the_node(|_| {
        proto_op::Op::Put(distcache_client::proto::PutRequest {
            collection: String::new(),
            key: bytes::Bytes::from_static(b"same"),
            value: vec![9u8; 4 << 20].into(),
            ttl_ms: None,
        })
    })
    .await;
}

/// 40 calls to `path` (10 connections of 4 streams) each announce a 32 MiB message,
/// send 8 MiB of it and stall. tonic read every stream's bytes as they came
/// (up to `--max-message-bytes` held per stream, whatever the number of
/// streams); the node now reads a large message only once it has room for
/// it in `--request-buffer-bytes` (16 MiB here), so the others wait unread,
/// held back by HTTP/2 flow control. Checks that the node grew by less than
/// [`UNREAD_GROWTH_LIMIT`], stayed alive and served others meanwhile.
async fn stalled_large_requests_cannot_grow_the_node(path: &str) {
    let mut node = NodeProcess::start_under(
        Some(1536 << 20),
        &["--request-buffer-bytes", "16777216"],
        &[("MALLOC_MMAP_THRESHOLD_", "131072")],
    );
    let c = Client::connect([node.addr.to_string()])
        .await
        .expect("client");
    c.put("small", "before").await.expect("put");
    let base = node.rss_bytes();
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let tcp = tokio::net::TcpStream::connect(node.addr)
            .await
            .expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2");
        let driver = tokio::spawn(connection);
        for _ in 0..4 {
            let request =
                http::Request::post(format!("http://{}/distcache.v1.Cache/Batch", node.addr))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .expect("request");
            let mut client = client.clone().ready().await.expect("ready");
            let (response, mut send) = client.send_request(request, false).expect("stream");
            let mut message = vec![0u8];
            message.extend_from_slice(&(32u32 << 20).to_be_bytes());
            message.resize(5 + (8 << 20), 7);
            send.send_data(bytes::Bytes::from(message), false)
                .expect("queued");
            stalled.push((response, send));
        }
        stalled_drivers_keep_running(&driver);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = node.rss_bytes().saturating_sub(base);
    println!(
        "RSS grew by {} MiB with 40 stalled 32 MiB requests to {path}",
        grown >> 20
    );
    assert!(node.alive(), "the node aborted under the address-space cap");
    c.put("small", "during")
        .await
        .expect("put while others stall");
    assert_eq!(
        c.get("small").await.expect("get").as_deref(),
        Some(&b"during"[..])
    );
    assert!(
        grown < UNREAD_GROWTH_LIMIT,
        "RSS grew by {} MiB",
        grown >> 20
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_batch_requests_cannot_grow_the_node() {
    stalled_large_requests_cannot_grow_the_node("/distcache.v1.Cache/Batch").await;
}

/// The same with unary calls, on the Cache service and on another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_unary_requests_cannot_grow_the_node() {
    stalled_large_requests_cannot_grow_the_node("/distcache.v1.Cache/Put").await;
    stalled_large_requests_cannot_grow_the_node("/distcache.v1.Locks/Acquire").await;
}

/// A connection's driver has not failed (the node did not reset it).
fn stalled_drivers_keep_running(driver: &tokio::task::JoinHandle<Result<(), h2::Error>>) {
    assert!(!driver.is_finished(), "the node closed the connection");
}
