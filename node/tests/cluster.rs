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

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
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
    // Each node counts only its primaries; together they count everything once.
    let mut total = 0;
    for r in &nodes {
        let mut c = CacheClient::connect(format!("http://{}", r.addr))
            .await
            .expect("connect");
        total += c
            .size(proto::SizeRequest {
                collection: String::new(),
            })
            .await
            .expect("size")
            .into_inner()
            .size;
    }
    assert_eq!(total, 100);
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
