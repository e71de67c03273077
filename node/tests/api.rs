//! Every seed operation through the real gRPC server on 127.0.0.1:0, driven
//! by the Rust client, including the error cases.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use distcache_client::proto::cache_client::CacheClient;
use distcache_client::{Client, CollectionOptions, Error, LockOptions, proto};
use distcache_node::clock::{Clock, ManualClock, SystemClock};
use distcache_node::config::NodeConfig;
use distcache_node::server::Running;

fn config() -> NodeConfig {
    NodeConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..NodeConfig::default()
    }
}

async fn start_with(config: NodeConfig, clock: Arc<dyn Clock>) -> (Running, Client) {
    let running = Running::start(config, clock).await.expect("node starts");
    let client = Client::connect([running.addr.to_string()])
        .await
        .expect("client connects");
    (running, client)
}

async fn start() -> (Running, Client) {
    start_with(config(), Arc::new(SystemClock::default())).await
}

#[tokio::test]
async fn put_get_delete_and_typed_values() {
    let (node, c) = start().await;
    assert_eq!(c.get("k").await.expect("get"), None);
    c.put("k", "v1").await.expect("put");
    assert_eq!(c.get("k").await.expect("get"), Some(Bytes::from("v1")));
    c.put("k", "v2").await.expect("overwrite");
    assert_eq!(c.get("k").await.expect("get"), Some(Bytes::from("v2")));
    assert!(c.delete("k").await.expect("delete"));
    assert!(!c.delete("k").await.expect("delete again"));
    assert_eq!(c.get("k").await.expect("get"), None);

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct User {
        name: String,
        role: String,
    }
    let users = c.collection("users").await.expect("collection");
    let alice = User {
        name: "Alice".into(),
        role: "admin".into(),
    };
    users
        .put_value("user:123", &alice, None)
        .await
        .expect("put typed");
    let back: Option<User> = users.get_value("user:123").await.expect("get typed");
    assert_eq!(back, Some(alice));
    // Binary keys and empty values survive.
    c.put(b"\x00\xff", Bytes::new()).await.expect("put binary");
    assert_eq!(c.get(b"\x00\xff").await.expect("get"), Some(Bytes::new()));
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn ttl_and_default_ttl_follow_the_clock() {
    let clock = ManualClock::new(1_700_000_000_000);
    let quiet_sweep = NodeConfig {
        sweep_interval_ms: 3_600_000,
        ..config()
    };
    let (node, c) = start_with(quiet_sweep, clock.clone()).await;
    c.put_with_ttl("otp", "1234", Duration::from_secs(30))
        .await
        .expect("put");
    c.put("forever", "x").await.expect("put");
    let s = c
        .collection_with(
            "sessions",
            CollectionOptions::default().default_ttl(Duration::from_secs(3600)),
        )
        .await
        .expect("collection");
    assert_eq!(s.settings().map(|s| s.default_ttl_ms), Some(3_600_000));
    s.put("sess", "u1").await.expect("put");
    s.put_with_ttl("short", "u2", Duration::from_secs(10))
        .await
        .expect("put");
    s.put_many([("m1", "a"), ("m2", "b")], Some(Duration::from_secs(20)))
        .await
        .expect("put_many");

    clock.advance(10_000);
    assert_eq!(s.get("short").await.expect("get"), None);
    assert!(s.get("m1").await.expect("get").is_some());
    clock.advance(10_000);
    assert!(s.get_many(["m1", "m2"]).await.expect("get_many").is_empty());
    assert!(c.get("otp").await.expect("get").is_some());
    clock.advance(10_000);
    assert_eq!(c.get("otp").await.expect("get"), None);
    assert_eq!(s.get("sess").await.expect("get"), Some(Bytes::from("u1")));
    clock.advance(3_600_000);
    assert_eq!(s.get("sess").await.expect("get"), None);
    assert_eq!(s.size().await.expect("size"), 0);
    assert_eq!(c.get("forever").await.expect("get"), Some(Bytes::from("x")));
    // The sweep reclaims what lazy expiry hid: short, m1, m2, otp, sess.
    assert_eq!(node.node.store.sweep(271), 5);
    assert_eq!(node.node.store.sweep(271), 0);
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn batch_ops_keys_size_clear() {
    let (node, c) = start().await;
    let col = c.collection("bulk").await.expect("collection");
    let entries: Vec<(String, String)> = (0..200)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    col.put_many(entries.clone(), None).await.expect("put_many");
    assert_eq!(col.size().await.expect("size"), 200);
    let got = col
        .get_many(["k1", "k7", "nope", "k199"])
        .await
        .expect("get_many");
    assert_eq!(got.len(), 3);
    assert_eq!(got.get(&Bytes::from("k7")), Some(&Bytes::from("v7")));
    assert_eq!(
        col.delete_many(["k1", "k2", "nope"])
            .await
            .expect("delete_many"),
        2
    );
    let mut keys = col.keys().await.expect("keys");
    keys.sort();
    assert_eq!(keys.len(), 198);
    assert!(!keys.contains(&Bytes::from("k1")));
    // Other collections are untouched by clear.
    c.put("other", "x").await.expect("put");
    assert_eq!(col.clear().await.expect("clear"), 198);
    assert_eq!(col.size().await.expect("size"), 0);
    assert_eq!(c.get("other").await.expect("get"), Some(Bytes::from("x")));
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn collection_lifecycle_and_not_found() {
    let (node, c) = start().await;
    assert!(c.collection_exists("__default__").await.expect("exists"));
    assert!(!c.collection_exists("tmp").await.expect("exists"));
    let unknown = c.collection_handle("tmp");
    assert!(matches!(
        unknown.put("k", "v").await,
        Err(Error::CollectionNotFound(_))
    ));
    assert!(matches!(
        unknown.get("k").await,
        Err(Error::CollectionNotFound(_))
    ));
    assert!(matches!(
        unknown.size().await,
        Err(Error::CollectionNotFound(_))
    ));

    let tmp = c.collection("tmp").await.expect("create");
    tmp.put("k", "v").await.expect("put");
    let names: Vec<String> = c
        .list_collections()
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["__default__".to_string(), "tmp".to_string()]);
    // get-or-create keeps the existing settings.
    let again = c
        .collection_with("tmp", CollectionOptions::default().max_entries(5))
        .await
        .expect("get");
    assert_eq!(again.settings().map(|s| s.max_entries), Some(0));

    assert!(c.delete_collection("tmp").await.expect("delete"));
    assert!(!c.collection_exists("tmp").await.expect("exists"));
    assert!(matches!(
        tmp.get("k").await,
        Err(Error::CollectionNotFound(_))
    ));
    assert!(matches!(
        tmp.put("k", "v").await,
        Err(Error::CollectionNotFound(_))
    ));
    assert!(matches!(
        c.delete_collection("__default__").await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.collection(&"x".repeat(300)).await,
        Err(Error::InvalidArgument(_))
    ));
    // Re-created collections start empty.
    let tmp = c.collection("tmp").await.expect("re-create");
    assert_eq!(tmp.get("k").await.expect("get"), None);
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn lru_never_exceeds_its_limit_and_evicts_least_recently_used() {
    let (node, c) = start().await;
    let hot = c
        .collection_with("hot", CollectionOptions::default().max_entries(10))
        .await
        .expect("collection");
    for i in 0..10 {
        hot.put(format!("k{i}"), "v").await.expect("put");
    }
    // Touch k0: k1 is now the least recently used.
    assert!(hot.get("k0").await.expect("get").is_some());
    hot.put("k10", "v").await.expect("put");
    assert_eq!(
        hot.get("k1").await.expect("get"),
        None,
        "k1 was the LRU entry"
    );
    assert!(hot.get("k0").await.expect("get").is_some());
    for i in 11..200 {
        hot.put(format!("k{i}"), "v").await.expect("put");
        assert!(hot.size().await.expect("size") <= 10);
    }
    assert_eq!(hot.size().await.expect("size"), 10);
    let keys = hot.keys().await.expect("keys");
    for i in 190..200 {
        assert!(keys.contains(&Bytes::from(format!("k{i}"))), "k{i} kept");
    }
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn thirty_two_acquirers_one_holder_at_a_time_increasing_tokens() {
    let (node, c) = start().await;
    let holders = Arc::new(AtomicU32::new(0));
    let order = Arc::new(parking_lot_free::Order::default());
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (c, holders, order) = (c.clone(), holders.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let opts = LockOptions::default()
                .hold(Duration::from_secs(30))
                .wait(Duration::from_secs(60));
            let g = c.acquire_lock("shared", opts).await.expect("acquire");
            assert_eq!(
                holders.fetch_add(1, Ordering::SeqCst),
                0,
                "two holders at once"
            );
            order.push(g.fencing_token());
            tokio::time::sleep(Duration::from_millis(5)).await;
            holders.fetch_sub(1, Ordering::SeqCst);
            g.release().await.expect("release");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let tokens = order.take();
    assert_eq!(tokens.len(), 32);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "tokens {tokens:?}");
    // Each waiter looked at the lock about once per wake-up: no polling.
    let rounds = node.node.locks.wait_rounds();
    assert!(
        rounds <= 32 * 2,
        "waiters polled: {rounds} rounds for 32 acquires"
    );
    node.stop().await.expect("stop");
}

mod parking_lot_free {
    use std::sync::Mutex;
    #[derive(Default)]
    pub struct Order(Mutex<Vec<u64>>);
    impl Order {
        pub fn push(&self, t: u64) {
            if let Ok(mut v) = self.0.lock() {
                v.push(t);
            }
        }
        pub fn take(&self) -> Vec<u64> {
            self.0
                .lock()
                .map(|mut v| std::mem::take(&mut *v))
                .unwrap_or_default()
        }
    }
}

#[tokio::test]
async fn lock_errors_hold_timeout_force_release_and_drop() {
    let clock = ManualClock::new(0);
    let (node, c) = start_with(config(), clock.clone()).await;
    let g = c
        .try_acquire_lock("res", Duration::from_secs(10))
        .await
        .expect("try")
        .expect("free");
    let t1 = g.fencing_token();
    assert!(
        c.try_acquire_lock("res", Duration::from_secs(10))
            .await
            .expect("try")
            .is_none()
    );
    // A non-holder's token cannot release it.
    assert!(matches!(
        c.release_lock_token("res", t1 + 100).await,
        Err(Error::LockNotHeld(_))
    ));
    // Queue times out while the lease lasts.
    let e = c
        .acquire_lock(
            "res",
            LockOptions::default().wait(Duration::from_millis(50)),
        )
        .await;
    assert!(matches!(e, Err(Error::LockAcquireTimeout(_))), "{e:?}");
    // The lease runs out: release reports the hold timeout.
    clock.advance(10_000);
    assert!(matches!(g.release().await, Err(Error::LockHoldTimeout(_))));

    // A waiter gets a lock whose lease expires, with a new token.
    let mut g2 = c
        .acquire_lock("res", LockOptions::default().hold(Duration::from_secs(5)))
        .await
        .expect("acquire");
    assert!(g2.fencing_token() > t1);
    g2.extend(Duration::from_secs(60)).await.expect("extend");
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.acquire_lock("res", LockOptions::default().wait(Duration::from_secs(60)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    clock.advance(30_000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "extended lease still holds");
    assert!(c.force_release_lock("res").await.expect("force"));
    let g3 = waiter
        .await
        .expect("join")
        .expect("granted after force release");
    assert!(g3.fencing_token() > g2.fencing_token());
    assert!(matches!(g2.release().await, Err(Error::LockNotHeld(_))));
    // Dropping a guard releases it in the background.
    let t3 = g3.fencing_token();
    drop(g3);
    let mut freed = None;
    for _ in 0..100 {
        if let Some(g) = c
            .try_acquire_lock("res", Duration::from_secs(1))
            .await
            .expect("try")
        {
            freed = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let g4 = freed.expect("dropped guard was released");
    assert!(g4.fencing_token() > t3);
    g4.release().await.expect("release");
    node.stop().await.expect("stop");
}

fn small_limits() -> NodeConfig {
    NodeConfig {
        max_key_bytes: 128,
        max_value_bytes: 4 * 1024,
        max_message_bytes: 64 * 1024,
        max_batch_keys: 50,
        ..config()
    }
}

#[tokio::test]
async fn hostile_sizes_get_clear_errors_and_the_node_keeps_serving() {
    let (node, c) = start_with(small_limits(), Arc::new(SystemClock::default())).await;
    c.put("ok", "fine").await.expect("put");

    let e = c.put(vec![b'k'; 129], "v").await.expect_err("key too big");
    assert!(
        matches!(&e, Error::LimitExceeded(m) if m.contains("max-key-bytes")),
        "{e}"
    );
    let e = c
        .put("k", vec![0u8; 4097])
        .await
        .expect_err("value too big");
    assert!(
        matches!(&e, Error::LimitExceeded(m) if m.contains("max-value-bytes")),
        "{e}"
    );
    let e = c
        .default_collection()
        .get_many((0..51).map(|i| format!("k{i}")))
        .await
        .expect_err("too many keys");
    assert!(
        matches!(&e, Error::LimitExceeded(m) if m.contains("max-batch-keys")),
        "{e}"
    );

    // Lock keys obey the same key limit (acquire, try, release, extend, force).
    let long = vec![b'L'; 129];
    let e = c
        .acquire_lock(&long, LockOptions::default())
        .await
        .expect_err("lock key too big");
    assert!(
        matches!(&e, Error::LimitExceeded(m) if m.contains("max-key-bytes")),
        "{e}"
    );
    let e = c
        .try_acquire_lock(&long, Duration::from_secs(5))
        .await
        .expect_err("lock key too big");
    assert!(matches!(&e, Error::LimitExceeded(_)), "{e}");
    let e = c
        .force_release_lock(&long)
        .await
        .expect_err("lock key too big");
    assert!(matches!(&e, Error::LimitExceeded(_)), "{e}");
    let e = c
        .release_lock_token(&long, 1)
        .await
        .expect_err("lock key too big");
    assert!(matches!(&e, Error::LimitExceeded(_)), "{e}");
    let at_limit = c
        .acquire_lock(vec![b'L'; 128], LockOptions::default())
        .await
        .expect("a key at the limit is fine");
    at_limit.release().await.expect("release");

    // A message over the node's max-message-bytes, by a raw gRPC client.
    let mut raw = CacheClient::connect(format!("http://{}", node.addr))
        .await
        .expect("raw connect");
    let status = raw
        .put(proto::PutRequest {
            collection: String::new(),
            key: Bytes::from("big"),
            value: Bytes::from(vec![0u8; 100 * 1024]),
            ttl_ms: None,
        })
        .await
        .expect_err("message too big");
    assert!(status.message().contains("too large"), "{status:?}");

    // Nothing else was affected, on this connection or the client's streams.
    assert_eq!(c.get("ok").await.expect("get"), Some(Bytes::from("fine")));
    assert_eq!(c.get("k").await.expect("get"), None);
    assert_eq!(c.get("big").await.expect("get"), None);
    let resp = raw
        .get(proto::GetRequest {
            collection: String::new(),
            key: Bytes::from("ok"),
        })
        .await
        .expect("raw get after refusal");
    assert!(resp.into_inner().found);
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_waits_for_tasks() {
    let (node, c) = start().await;
    c.put("k", "v").await.expect("put");
    // A lock waiter that would wait a minute.
    let _held = c
        .try_acquire_lock("l", Duration::from_secs(60))
        .await
        .expect("try")
        .expect("free");
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.acquire_lock("l", LockOptions::default().wait(Duration::from_secs(60)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(20), node.stop())
        .await
        .expect("shutdown completes with open streams")
        .expect("clean stop");
    let r = waiter.await.expect("join");
    assert!(
        r.is_err(),
        "waiter must not get the lock from a stopped node"
    );
    assert!(c.get("k").await.is_err(), "node is gone");
}

#[tokio::test]
async fn standard_health_service_reports_serving() {
    let (node, _c) = start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "distcache.v1.Cache".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn server_reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (node, _c) = start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream
        .message()
        .await
        .expect("message")
        .expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "distcache.v1.Cache",
        "distcache.v1.Locks",
        "distcache.v1.Collections",
        "distcache.v1.Cluster",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    node.stop().await.expect("stop");
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint reachable");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("request sent");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("metrics answered in time")
        .expect("metrics read");
    out
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn metrics_endpoint_counts_commands_and_reports_state() {
    let (node, c) = start().await;
    let listener = distcache_node::metrics::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("metrics bind");
    let addr = listener.local_addr().expect("metrics addr");
    distcache_node::server::serve_metrics(&node.node, listener);

    let users = c.collection("users").await.expect("collection");
    for i in 0..5 {
        users.put(format!("k{i}"), "v").await.expect("put");
    }
    assert_eq!(users.get("k1").await.expect("get"), Some(Bytes::from("v")));
    assert_eq!(users.get("absent").await.expect("get"), None);
    // A command refused with an error is counted under its reason.
    assert!(c.collection_handle("nope").get("k").await.is_err());

    let text = scrape(addr).await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        text.contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "distcache_node_commands_total{op=\"put\",result=\"ok\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "distcache_node_commands_total{op=\"get\",result=\"ok\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "distcache_node_command_duration_seconds_count{op=\"put\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "distcache_node_entries{collection=\"users\"}"),
        Some(5.0),
        "{text}"
    );
    // A lone node owns every partition as primary and has no backups.
    assert_eq!(
        sample(&text, "distcache_node_partitions{role=\"primary\"}"),
        Some(271.0),
        "{text}"
    );
    assert_eq!(sample(&text, "distcache_node_quorum"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "distcache_node_wal_failed"),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "distcache_node_partition_table_epoch").is_some_and(|e| e >= 1.0),
        "{text}"
    );

    assert_eq!(
        sample(
            &text,
            "distcache_node_commands_total{op=\"get\",result=\"COLLECTION_NOT_FOUND\"}"
        ),
        Some(1.0),
        "{text}"
    );
    node.stop().await.expect("stop");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the metrics endpoint stops with the node"
    );
}

#[tokio::test]
async fn engine_state_is_bounded_collections_lock_leases_and_unknown_lock_keys() {
    let config = NodeConfig {
        max_collections: 4,
        max_lock_hold_secs: 10,
        ..config()
    };
    let (node, c) = start_with(config, Arc::new(SystemClock::default())).await;
    // The default collection counts: three more fit, the fourth is refused.
    for name in ["a", "b", "c"] {
        c.collection(name).await.expect("within the limit");
    }
    let e = c.collection("d").await.expect_err("over max-collections");
    assert!(
        matches!(&e, Error::LimitExceeded(m) if m.contains("max-collections")),
        "{e}"
    );
    c.collection("a")
        .await
        .expect("an existing one is still got");
    // Collections.List pages in name order.
    let mut raw = distcache_client::proto::collections_client::CollectionsClient::connect(format!(
        "http://{}",
        node.addr
    ))
    .await
    .expect("connect");
    let (mut names, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = raw
            .list(proto::ListCollectionsRequest {
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.collections.len() <= 3);
        names.extend(page.collections.into_iter().map(|c| c.name));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["__default__", "a", "b", "c"]);
    assert_eq!(pages, 2);
    assert_eq!(c.list_collections().await.expect("list").len(), 4);

    // Leases above --max-lock-hold-secs are refused.
    let e = c
        .acquire_lock("l", LockOptions::default().hold(Duration::from_secs(11)))
        .await
        .expect_err("lease too long");
    assert!(
        matches!(&e, Error::LimitExceeded(m) if m.contains("max-lock-hold-secs")),
        "{e}"
    );
    let g = c
        .acquire_lock("l", LockOptions::default().hold(Duration::from_secs(10)))
        .await
        .expect("a lease at the limit");
    g.release().await.expect("release");

    // A failed release or extend of a key never locked creates no state.
    let e = c
        .release_lock_token("never-locked", 7)
        .await
        .expect_err("not held");
    assert!(matches!(e, Error::LockNotHeld(_)), "{e}");
    assert!(!c.force_release_lock("never-locked").await.expect("force"));
    assert!(!node.node.locks.knows(&Bytes::from("never-locked")));
    // A released lock keeps no state either (its tokens stay increasing).
    assert!(!node.node.locks.knows(&Bytes::from("l")));
    let again = c
        .acquire_lock("l", LockOptions::default().hold(Duration::from_secs(10)))
        .await
        .expect("reacquire");
    assert!(node.node.locks.knows(&Bytes::from("l")));
    again.release().await.expect("release");
    node.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomic_operations_put_if_absent_compare_and_set_increment() {
    let clock = ManualClock::new(1_000_000);
    let (node, c) = start_with(config(), clock.clone()).await;
    let s = c.collection("atomic").await.expect("collection");
    assert!(s.put_if_absent("once", "a", None).await.expect("pia"));
    assert!(!s.put_if_absent("once", "b", None).await.expect("pia"));
    assert_eq!(
        s.get("once").await.expect("get").as_deref(),
        Some(&b"a"[..])
    );
    // An expired entry is absent.
    assert!(
        s.put_if_absent("short", "1", Some(Duration::from_millis(10)))
            .await
            .expect("pia")
    );
    clock.advance(20);
    assert!(
        s.put_if_absent("short", "2", None)
            .await
            .expect("pia after expiry")
    );

    assert!(
        !s.compare_and_set("once", "zzz", "c", None)
            .await
            .expect("cas")
    );
    assert!(
        s.compare_and_set("once", "a", "c", None)
            .await
            .expect("cas")
    );
    assert_eq!(
        s.get("once").await.expect("get").as_deref(),
        Some(&b"c"[..])
    );
    assert!(
        !s.compare_and_set("absent", "", "x", None)
            .await
            .expect("cas"),
        "absent never matches"
    );

    assert_eq!(s.increment("n", 5).await.expect("incr"), 5);
    assert_eq!(s.increment("n", -7).await.expect("incr"), -2);
    assert_eq!(s.get("n").await.expect("get").as_deref(), Some(&b"-2"[..]));
    let e = s.increment("once", 1).await.expect_err("not an integer");
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    s.put("big", i64::MAX.to_string()).await.expect("put");
    let e = s.increment("big", 1).await.expect_err("overflow");
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(
        s.get("big").await.expect("get"),
        Some(Bytes::from(i64::MAX.to_string()))
    );
    // An increment keeps the entry's expiry.
    s.put_with_ttl("ttl-n", "1", Duration::from_millis(100))
        .await
        .expect("put");
    assert_eq!(s.increment("ttl-n", 1).await.expect("incr"), 2);
    clock.advance(150);
    assert_eq!(s.get("ttl-n").await.expect("get"), None, "expiry kept");

    // 32 concurrent incrementers: every increment counted once.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                s.increment("hits", 1).await.expect("incr");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        s.get("hits").await.expect("get").as_deref(),
        Some(&b"1600"[..])
    );
    node.stop().await.expect("stop");
}

#[tokio::test]
async fn lock_tokens_keep_increasing_across_a_wal_restart_after_their_state_was_dropped() {
    let dir = std::env::temp_dir().join(format!("dc-lock-wal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let wal_config = || NodeConfig {
        wal_dir: Some(dir.clone()),
        name: Some("solo".into()),
        ..config()
    };
    let (node, c) = start_with(wal_config(), Arc::new(SystemClock::default())).await;
    let mut last = 0;
    for _ in 0..3 {
        let g = c
            .acquire_lock("nightly", LockOptions::default())
            .await
            .expect("acquire");
        assert!(g.fencing_token() > last);
        last = g.fencing_token();
        g.release().await.expect("release");
    }
    assert!(
        !node.node.locks.knows(&Bytes::from("nightly")),
        "state dropped"
    );
    node.stop().await.expect("stop");
    // Restart from the log only (no checkpoint was written).
    let (node, c) = start_with(wal_config(), Arc::new(SystemClock::default())).await;
    let g = c
        .acquire_lock("nightly", LockOptions::default())
        .await
        .expect("acquire after restart");
    assert!(
        g.fencing_token() > last,
        "token {} after restart is not above {last}",
        g.fencing_token()
    );
    let last = g.fencing_token();
    g.release().await.expect("release");
    // And from a checkpoint.
    node.node.checkpoint().await.expect("checkpoint");
    node.stop().await.expect("stop");
    let (node, c) = start_with(wal_config(), Arc::new(SystemClock::default())).await;
    let g = c
        .acquire_lock("nightly", LockOptions::default())
        .await
        .expect("acquire after checkpoint restart");
    assert!(g.fencing_token() > last);
    g.release().await.expect("release");
    node.stop().await.expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}
