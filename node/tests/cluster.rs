//! In-process clusters (several nodes in one test on 127.0.0.1): forwarding
//! for plain gRPC clients, anti-entropy repair, and hostile peer input.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distcache_client::partition::partition_for;
use distcache_client::proto::{self, cache_client::CacheClient};
use distcache_client::{Client, ClientConfig};
use distcache_node::clock::SystemClock;
use distcache_node::cluster::table::Role;
use distcache_node::config::NodeConfig;
use distcache_node::replica::ReplOp;
use distcache_node::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback port free a moment ago: below the kernel's ephemeral range
/// (32768 and up), so no outbound connection (these tests run side by side)
/// can be handed it before its node listens, and never the same one twice
/// in this process. (Port 0 could hand back a port another test's
/// connection then took: "Address already in use" in CI.)
fn port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + ((std::process::id().wrapping_mul(7) + k) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

async fn cluster(n: usize) -> Vec<Running> {
    let specs: Vec<(String, String, String)> = (0..n)
        .map(|i| {
            (
                format!("n{i}"),
                format!("127.0.0.1:{}", port()),
                format!("127.0.0.1:{}", port()),
            )
        })
        .collect();
    let members = specs
        .iter()
        .map(|(n, g, p)| format!("{n}={g}/{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for (name, grpc, _) in &specs {
        let config = NodeConfig {
            listen: grpc.parse().expect("addr"),
            name: Some(name.clone()),
            members: Some(members.clone()),
            heartbeat_interval_ms: 100,
            failure_timeout_ms: 1500,
            anti_entropy_interval_secs: 1,
            peer_frame_timeout_ms: 300,
            leave_timeout_secs: 2,
            ..NodeConfig::default()
        };
        nodes.push(
            Running::start(config, Arc::new(SystemClock::default()))
                .await
                .expect("node"),
        );
    }
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let epochs: Vec<u64> = nodes.iter().map(|r| r.node.epoch()).collect();
        if nodes.iter().all(|r| r.node.safety().0) && epochs.windows(2).all(|w| w[0] == w[1]) {
            return nodes;
        }
        assert!(
            Instant::now() < end,
            "cluster did not become safe: epochs {epochs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plain_grpc_client_on_any_node_reaches_every_key() {
    let nodes = cluster(3).await;
    let mut a = CacheClient::connect(format!("http://{}", nodes[0].addr))
        .await
        .expect("connect");
    let mut b = CacheClient::connect(format!("http://{}", nodes[1].addr))
        .await
        .expect("connect");
    for i in 0..100 {
        a.put(proto::PutRequest {
            collection: String::new(),
            key: Bytes::from(format!("k{i}")),
            value: Bytes::from(format!("v{i}")),
            ttl_ms: None,
        })
        .await
        .expect("put through node 0 (forwarded when not the owner)");
    }
    for i in 0..100 {
        let r = b
            .get(proto::GetRequest {
                collection: String::new(),
                key: Bytes::from(format!("k{i}")),
            })
            .await
            .expect("get through node 1")
            .into_inner();
        assert!(r.found && r.value == format!("v{i}"), "k{i}");
    }
    // Size answers for the whole cluster through every node.
    for r in &nodes {
        let mut c = CacheClient::connect(format!("http://{}", r.addr))
            .await
            .expect("connect");
        let size = c
            .size(proto::SizeRequest {
                collection: String::new(),
            })
            .await
            .expect("size")
            .into_inner()
            .size;
        assert_eq!(size, 100, "size through {}", r.addr);
    }
    // The smart client agrees.
    let client = Client::with_config(ClientConfig::new([nodes[2].addr.to_string()]))
        .await
        .expect("client");
    assert_eq!(client.default_collection().size().await.expect("size"), 100);
    for r in nodes {
        r.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anti_entropy_repairs_a_diverged_backup() {
    let nodes = cluster(3).await;
    let client = Client::connect([nodes[0].addr.to_string()])
        .await
        .expect("client");
    client.put("ae-key", "right").await.expect("put");
    let t = nodes[0].node.cluster.table();
    let p = partition_for("__default__", b"ae-key", t.partition_count);
    let backup = nodes
        .iter()
        .find(|r| t.role_of(r.node.cluster.me(), p) == Role::Backup)
        .expect("a backup");
    let primary = nodes
        .iter()
        .find(|r| t.role_of(r.node.cluster.me(), p) == Role::Primary)
        .expect("the primary");
    assert_eq!(backup.node.store.digest(p), primary.node.store.digest(p));
    // Corrupt the backup's copy behind the primary's back.
    backup.node.store.apply(
        p,
        &[ReplOp::Put {
            collection: "__default__".into(),
            key: Bytes::from("ae-key"),
            value: Bytes::from("wrong"),
            expires_at: 0,
        }],
    );
    assert_ne!(backup.node.store.digest(p), primary.node.store.digest(p));
    let end = Instant::now() + Duration::from_secs(20);
    while backup.node.store.digest(p) != primary.node.store.digest(p) {
        assert!(
            Instant::now() < end,
            "anti-entropy did not repair the backup"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        backup
            .node
            .store
            .get("", &Bytes::from("ae-key"))
            .expect("get"),
        Some(Bytes::from("right"))
    );
    for r in nodes {
        r.stop().await.expect("stop");
    }
}

async fn closed(mut s: tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_peer_input_is_cut_off_and_the_node_keeps_serving() {
    let nodes = cluster(3).await;
    let peer_addr = nodes[0].node.cluster.me().peer.clone();
    let client = Client::connect([nodes[0].addr.to_string()])
        .await
        .expect("client");

    // A 0xFFFFFFFF length prefix: refused before allocating.
    let mut s = tokio::net::TcpStream::connect(&peer_addr)
        .await
        .expect("connect");
    s.write_all(&[0xFF, 0xFF, 0xFF, 0xFF]).await.expect("write");
    assert!(closed(s).await, "oversized frame must close the connection");
    // A well-framed message that is not msgpack of ours.
    let mut s = tokio::net::TcpStream::connect(&peer_addr)
        .await
        .expect("connect");
    s.write_all(&[0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1])
        .await
        .expect("write");
    assert!(closed(s).await, "garbage must close the connection");
    // Deep nesting inside a frame.
    let mut s = tokio::net::TcpStream::connect(&peer_addr)
        .await
        .expect("connect");
    let deep = vec![0x91u8; 50_000];
    s.write_all(&(deep.len() as u32).to_be_bytes())
        .await
        .expect("write");
    s.write_all(&deep).await.expect("write");
    assert!(closed(s).await, "deep nesting must close the connection");
    // Slowloris: half a header, then nothing.
    let mut s = tokio::net::TcpStream::connect(&peer_addr)
        .await
        .expect("connect");
    s.write_all(&[0, 0]).await.expect("write");
    assert!(closed(s).await, "a stalled frame must be cut off");

    // A well-formed request naming a partition that does not exist.
    let mut s = tokio::net::TcpStream::connect(&peer_addr)
        .await
        .expect("connect");
    let env = distcache_node::net::message::Envelope {
        version: distcache_node::net::message::PROTOCOL_VERSION,
        id: 1,
        body: distcache_node::net::message::Body::Request(
            distcache_node::net::message::Request::Digest {
                epoch: 0,
                partition: 1_000_000,
            },
        ),
    };
    let frame = distcache_node::net::message::encode(&env).expect("encode");
    s.write_all(&(frame.len() as u32).to_be_bytes())
        .await
        .expect("write");
    s.write_all(&frame).await.expect("write");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.expect("an answer");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.expect("an answer");
    let answer = distcache_node::net::message::decode(&buf).expect("decode");
    assert!(
        matches!(
            answer.body,
            distcache_node::net::message::Body::Response(
                distcache_node::net::message::Response::Error(_)
            )
        ),
        "out-of-range partition is refused: {answer:?}"
    );

    // Everyone else is still served, and the cluster is intact.
    client.put("after", "attack").await.expect("put");
    assert_eq!(
        client.get("after").await.expect("get"),
        Some(Bytes::from("attack"))
    );
    assert!(nodes.iter().all(|r| r.node.cluster.quorum()));
    for r in nodes {
        r.stop().await.expect("stop");
    }
}

async fn plain(r: &Running) -> CacheClient<tonic::transport::Channel> {
    CacheClient::connect(format!("http://{}", r.addr))
        .await
        .expect("connect")
}

/// Every key of `collection` through one node, `page_size` keys a page.
async fn all_keys(
    c: &mut CacheClient<tonic::transport::Channel>,
    collection: &str,
    page_size: u32,
) -> Vec<Bytes> {
    let (mut keys, mut token, mut pages) = (Vec::new(), Bytes::new(), 0);
    loop {
        let page = c
            .keys(proto::KeysRequest {
                collection: collection.into(),
                page_size,
                page_token: token,
            })
            .await
            .expect("keys")
            .into_inner();
        assert!(page.keys.len() <= page_size as usize, "page over its size");
        keys.extend(page.keys);
        pages += 1;
        assert!(pages < 1_000, "paging does not end");
        if page.next_page_token.is_empty() {
            return keys;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collection_wide_ops_and_get_many_give_one_answer_through_any_node() {
    let nodes = cluster(3).await;
    let client = Client::with_config(ClientConfig::new([nodes[0].addr.to_string()]))
        .await
        .expect("client");
    let col = client.collection("wide").await.expect("collection");
    let entries: Vec<(String, String)> = (0..300)
        .map(|i| (format!("o-{i}"), format!("v{i}")))
        .collect();
    col.put_many(entries.clone(), None).await.expect("put_many");
    let expected: std::collections::BTreeSet<Bytes> = entries
        .iter()
        .map(|(k, _)| Bytes::from(k.clone()))
        .collect();
    let mut orders = Vec::new();
    for r in &nodes {
        let mut c = plain(r).await;
        let size = c
            .size(proto::SizeRequest {
                collection: "wide".into(),
            })
            .await
            .expect("size")
            .into_inner()
            .size;
        assert_eq!(size, 300, "size through {}", r.addr);
        let keys = all_keys(&mut c, "wide", 7).await;
        assert_eq!(
            keys.len(),
            300,
            "keys through {}: duplicates or gaps",
            r.addr
        );
        let set: std::collections::BTreeSet<Bytes> = keys.iter().cloned().collect();
        assert_eq!(set, expected, "keys through {}", r.addr);
        orders.push(keys);
        // GetMany answers in request order (a missing key is left out).
        let asked: Vec<Bytes> = [0, 5, 6, 299, 17, 1000, 3, 250, 42, 8]
            .iter()
            .map(|i| Bytes::from(format!("o-{i}")))
            .collect();
        let got = c
            .get_many(proto::GetManyRequest {
                collection: "wide".into(),
                keys: asked.clone(),
            })
            .await
            .expect("get_many")
            .into_inner()
            .entries;
        let want: Vec<Bytes> = asked.into_iter().filter(|k| k != "o-1000").collect();
        let got_keys: Vec<Bytes> = got.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(got_keys, want, "get_many order through {}", r.addr);
        for kv in &got {
            let i: usize = String::from_utf8_lossy(&kv.key[2..])
                .parse()
                .expect("index");
            assert_eq!(kv.value, format!("v{i}"));
        }
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "every node pages keys in the same order"
    );
    // The smart client and the plain RPCs agree.
    assert_eq!(col.size().await.expect("size"), 300);
    assert_eq!(col.keys().await.expect("keys").len(), 300);
    // Clear through one node clears the whole collection.
    let removed = plain(&nodes[1])
        .await
        .clear(proto::ClearRequest {
            collection: "wide".into(),
        })
        .await
        .expect("clear")
        .into_inner()
        .removed;
    assert_eq!(removed, 300);
    for r in &nodes {
        let mut c = plain(r).await;
        assert!(all_keys(&mut c, "wide", 50).await.is_empty());
        for (k, _) in entries.iter().step_by(37) {
            let got = c
                .get(proto::GetRequest {
                    collection: "wide".into(),
                    key: Bytes::from(k.clone()),
                })
                .await
                .expect("get")
                .into_inner();
            assert!(!got.found, "{k} still readable after clear");
        }
    }
    for r in nodes {
        r.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_quorum_answers_every_write_with_quorum_lost() {
    let mut nodes = cluster(3).await;
    let survivor = nodes.remove(0);
    for r in nodes {
        r.crash().await;
    }
    // Wait until the survivor knows it is alone.
    let end = Instant::now() + Duration::from_secs(20);
    while survivor.node.cluster.quorum() {
        assert!(Instant::now() < end, "quorum never lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = plain(&survivor).await;
    let table = survivor.node.cluster.table();
    let mut seen_remote = 0;
    for i in 0..60 {
        let key = Bytes::from(format!("q{i}"));
        let p = partition_for("__default__", &key, table.partition_count);
        if table.role_of(survivor.node.cluster.me(), p) != Role::Primary {
            seen_remote += 1;
        }
        let err = c
            .put(proto::PutRequest {
                collection: String::new(),
                key,
                value: Bytes::from_static(b"v"),
                ttl_ms: None,
            })
            .await
            .expect_err("no write without quorum");
        let reason = err
            .metadata()
            .get("distcache-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert_eq!(reason, "QUORUM_LOST", "key q{i}: {err:?}");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }
    assert!(seen_remote > 0, "some keys' primaries were the dead nodes");
    survivor.stop().await.expect("stop");
}
