//! The peer port under attack (issue 13): mutual TLS refuses a process
//! without a member certificate before any frame; with `--peer-insecure`
//! (so a test process can speak the protocol, as a buggy member would)
//! every forged frame is refused and the cluster keeps every key; the port's
//! memory and connections are bounded; certificates rotate under load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distcache_e2e::cluster::{ProcCluster, WriteLoad, assert_no_acknowledged_write_lost};
use distcache_node::cluster::table::Table;
use distcache_node::meta::state::MetaCmd;
use distcache_node::meta::{RaftRpc, node_id};
use distcache_node::net::message::{Heartbeat, ReplItem, Request, Response};
use distcache_node::net::peer::{PeerLimits, Peers};
use distcache_node::security::peer_tls::{PeerTls, PeerTlsFiles};
use distcache_node::security::pki::Ca;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(3);

async fn fill(c: &mut ProcCluster, n: usize) -> distcache_client::Client {
    // A settled cluster (no migration under way), so any later epoch change
    // is the attack's doing.
    let members = c.members.len();
    c.wait_safe(members, Duration::from_secs(60)).await;
    let client = c.client().await;
    for i in 0..n {
        client
            .put(format!("k{i}"), format!("v{i}").into_bytes())
            .await
            .expect("put");
    }
    client
}

async fn all_there(client: &distcache_client::Client, n: usize) {
    for i in 0..n {
        let got = client.get(format!("k{i}")).await.expect("get");
        assert_eq!(
            got.as_deref(),
            Some(format!("v{i}").as_bytes()),
            "key k{i} lost"
        );
    }
}

fn log_of(c: &ProcCluster, i: usize) -> String {
    std::fs::read_to_string(c.dir.join(format!("{}.log", c.members[i].name))).unwrap_or_default()
}

/// A peer client of the test process (the attacker).
fn attacker(tls: Option<Arc<PeerTls>>, member_at: &str) -> Peers {
    let p = Peers::new(PeerLimits::default(), None, tls, CancellationToken::new());
    let name = member_at.to_string();
    p.set_directory(Box::new(move |_| Some(name.clone())));
    p
}

fn heartbeat(name: &str) -> Request {
    Request::Heartbeat(Heartbeat {
        name: name.into(),
        incarnation: 1,
        epoch: 1,
        leaving: true,
        quorum: true,
        seq: u64::MAX,
        unloaded: Vec::new(),
        wall_ms: 0,
        skewed: false,
    })
}

fn write_pair(dir: &std::path::Path, tag: &str, ca: &Ca, name: &str) -> (String, String) {
    let issued = ca.issue(name, 30).expect("certificate");
    let (cert, key) = (
        dir.join(format!("{tag}.crt")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&cert, issued.cert_pem).expect("write");
    std::fs::write(&key, issued.key_pem).expect("write");
    (cert.display().to_string(), key.display().to_string())
}

fn tls_from(cert: &str, key: &str, ca: &std::path::Path) -> Arc<PeerTls> {
    PeerTls::load(PeerTlsFiles {
        cert: cert.into(),
        key: key.into(),
        ca: ca.to_path_buf(),
    })
    .expect("attacker TLS material loads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_member_certificate_no_frame_is_processed() {
    let mut c = ProcCluster::start(3, &[]);
    let client = fill(&mut c, 200).await;
    let target = c.members[1].peer.clone();
    let ca_file = c.pki_dir().join("ca.crt");

    // 1. Plaintext: a well-formed heartbeat frame gets no answer.
    let mut tcp = tokio::net::TcpStream::connect(&target)
        .await
        .expect("connect");
    let frame = distcache_node::net::message::encode(&distcache_node::net::message::Envelope {
        version: distcache_node::net::message::PROTOCOL_VERSION,
        id: 1,
        body: distcache_node::net::message::Body::Request(heartbeat("node-0")),
    })
    .expect("encode");
    tcp.write_all(&(frame.len() as u32).to_be_bytes())
        .await
        .expect("write");
    tcp.write_all(&frame).await.expect("write");
    // The only answer is a TLS alert record (0x15), then the close.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
        .await
        .expect("closed in time");
    assert!(
        got.is_empty() || (got[0] == 0x15 && got.len() < 64),
        "a plaintext frame got an answer: {got:?}"
    );

    // 2. A certificate from another CA (trusting the real CA itself).
    let other = Ca::generate("not the cluster CA", 30).expect("CA");
    let (cert, key) = write_pair(&c.dir, "foreign", &other, "node-0");
    let p = attacker(Some(tls_from(&cert, &key, &ca_file)), "node-1");
    let r = p.call(&target, heartbeat("node-0"), T).await;
    assert!(r.is_err(), "foreign-CA certificate answered: {r:?}");

    // 3. The cluster CA's certificate, for a name that is no member.
    let ca = c.pki.as_ref().expect("mTLS cluster");
    let (cert, key) = write_pair(&c.dir, "intruder", ca, "intruder");
    let p = attacker(Some(tls_from(&cert, &key, &ca_file)), "node-1");
    for req in [
        heartbeat("intruder"),
        heartbeat("node-0"),
        Request::ListCollections,
    ] {
        let r = p.call(&target, req, T).await;
        assert!(r.is_err(), "non-member certificate answered: {r:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = log_of(&c, 1);
    assert!(
        log.contains("TLS handshake refused"),
        "no log line for the plaintext/foreign peer"
    );
    assert!(
        log.contains("not a current member: refused before any frame"),
        "no log line for the non-member certificate"
    );

    // 4. A member's certificate works (the same client code, honest use).
    let (cert, key) = (
        c.pki_dir().join("node-0.crt").display().to_string(),
        c.pki_dir().join("node-0.key").display().to_string(),
    );
    let p = attacker(Some(tls_from(&cert, &key, &ca_file)), "node-1");
    let r = p.call(&target, Request::ListCollections, T).await;
    assert!(
        matches!(r, Ok(Response::Collections(_))),
        "member refused: {r:?}"
    );

    all_there(&client, 200).await;
}

fn refused(r: distcache_node::Result<Response>, what: &str) -> String {
    match r {
        Ok(Response::Error(e)) => e.message,
        other => panic!("{what} was not refused: {other:?}"),
    }
}

/// A replication frame refused as a whole or item by item.
fn refused_items(r: distcache_node::Result<Response>, what: &str) {
    match r {
        Ok(Response::Error(_)) => {}
        Ok(Response::Replicated(items)) => {
            assert!(!items.is_empty(), "{what}: no answer per item");
            for i in items {
                assert!(i.is_some(), "{what} was applied");
            }
        }
        other => panic!("{what} was not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_frames_are_refused_and_every_key_stays() {
    // Plaintext on loopback: the test process speaks for every member (it
    // connects from their address), like a buggy member would.
    let mut c = ProcCluster::start(3, &["--peer-insecure", "--wal"]);
    let client = fill(&mut c, 300).await;
    let table = client.partition_table().await.expect("table");
    let epoch = table.epoch;
    let p = attacker(None, "node-1");
    // A partition that was written to (its backups follow its primary's stream).
    let p0 = distcache_client::partition::partition_for(
        distcache_client::partition::DEFAULT_COLLECTION,
        b"k0",
        table.partition_count,
    );
    // Partition 0's primary and a member that is not its primary.
    let owner0 = table
        .partitions
        .iter()
        .find(|o| o.partition == p0)
        .expect("p0")
        .clone();
    let primary = owner0.primary.clone();
    let not_primary = c
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != primary)
        .expect("another member");
    let targets: Vec<String> = c.members.iter().map(|m| m.peer.clone()).collect();

    for t in &targets {
        // A table nobody committed, naming a made-up member as every owner.
        let mut forged = Table::empty(table.partition_count, 1);
        forged.epoch = u64::MAX;
        forged.owners = vec![vec!["evil".into()]; table.partition_count as usize + 5];
        let why = refused(
            p.call(
                t,
                Request::Meta(MetaCmd::Table {
                    base: epoch,
                    table: forged,
                    reset: Vec::new(),
                }),
                T,
            )
            .await,
            "a forged table",
        );
        assert!(why.contains("never proposed by a peer"), "{why}");

        // Raft votes at a term near u64::MAX, from a member's node id.
        for term in [u64::MAX, u64::MAX - 1, 1 << 50] {
            let vote = openraft::raft::VoteRequest {
                vote: openraft::Vote::new(term, node_id(&not_primary)),
                last_log_id: None,
            };
            let why = refused(
                p.call(t, Request::Raft(Box::new(RaftRpc::Vote(vote))), T)
                    .await,
                "a vote at a huge term",
            );
            assert!(
                why.contains("far above") || why.contains("cannot speak"),
                "{why}"
            );
        }
        // A Raft message from no member.
        let vote = openraft::raft::VoteRequest {
            vote: openraft::Vote::new(1, node_id("evil")),
            last_log_id: None,
        };
        let why = refused(
            p.call(t, Request::Raft(Box::new(RaftRpc::Vote(vote))), T)
                .await,
            "a vote from a non-member",
        );
        assert!(why.contains("no current member"), "{why}");

        // Replication and snapshots of p0 from a member that is not its
        // primary, from a non-member, and at epoch u64::MAX.
        let replicate = |from: &str, epoch: u64, stream: u64, seq: u64| Request::Replicate {
            from: from.into(),
            items: vec![ReplItem {
                partition: p0,
                epoch,
                stream,
                seq,
                ops: vec![distcache_node::replica::ReplOp::Clear {
                    collection: "__default__".into(),
                }],
            }],
        };
        for req in [
            replicate(&not_primary, epoch, 1, 1),
            replicate("evil", epoch, 1, 1),
            replicate(&not_primary, u64::MAX, 1, 1),
            // In the primary's name: a stream the backups do not follow,
            // the first write of a made-up stream, an absurd sequence.
            replicate(&primary, epoch, 7, 1),
            replicate(&primary, epoch, u64::MAX, u64::MAX),
            replicate(&primary, u64::MAX, 1, 2),
        ] {
            refused_items(p.call(t, req, T).await, "a forged replicate");
        }
        let snapshot = Request::Snapshot {
            from: not_primary.clone(),
            epoch,
            partition: p0,
            chunk: 0,
            last: true,
            snapshot: Default::default(),
            stream: 1,
            seq: 1,
        };
        let _ = refused(
            p.call(t, snapshot, T).await,
            "a snapshot from a non-primary",
        );

        // Forgetting a live member.
        let why = refused(
            p.call(
                t,
                Request::Meta(MetaCmd::Forget {
                    member: not_primary.clone(),
                }),
                T,
            )
            .await,
            "forgetting a live member",
        );
        assert!(why.contains("alive"), "{why}");
        // A heartbeat from a made-up name.
        let _ = refused(p.call(t, heartbeat("evil"), T).await, "a made-up heartbeat");
    }

    // Heartbeats in every member's name, another incarnation and leaving,
    // every 50 ms for 2 s: answered, never believed.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for (i, t) in targets.iter().enumerate() {
            let victim = &c.members[(i + 1) % 3].name;
            let r = p.call(t, heartbeat(victim), T).await;
            assert!(matches!(r, Ok(Response::Heartbeat(_))), "{r:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = client.partition_table().await.expect("table");
    assert_eq!(after.epoch, epoch, "a forged heartbeat moved partitions");
    all_there(&client, 300).await;

    // Writes keep succeeding, and a member's death still fails over.
    for i in 0..50 {
        client
            .put(format!("after{i}"), &b"x"[..])
            .await
            .expect("write after the attack");
    }
    c.kill(2);
    let start = Instant::now();
    for i in 0..300 {
        client
            .put(format!("failover{i}"), &b"y"[..])
            .await
            .expect("write after kill -9");
    }
    eprintln!("300 writes across the failover took {:?}", start.elapsed());
    all_there(&client, 300).await;

    // The poisoned epochs survived nothing: a full restart from the WAL
    // comes back at a sane epoch with every key.
    for i in 0..2 {
        c.kill(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    let client = c.client().await;
    all_there(&client, 300).await;
    let t = client.partition_table().await.expect("table");
    assert!(t.epoch < 1_000, "epoch {} after the restart", t.epoch);
    for i in 0..3 {
        assert!(!log_of(&c, i).contains("panicked"), "member {i} panicked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_memory_and_connections_stay_bounded() {
    // Member 0 runs under a 2 GiB address-space limit: an allocation beyond
    // it would abort the node.
    let mut c = ProcCluster::start_prefixed(
        3,
        &["--peer-insecure", "--peer-idle-timeout-secs", "2"],
        0,
        &["prlimit", "--as=2147483648", "--"],
    );
    let client = fill(&mut c, 100).await;
    let target = c.members[0].peer.clone();
    let pid = c.pid(0).expect("member 0 runs");
    let before = distcache_e2e::rss_kib(pid);

    // 1. 16 connections each announce a 79 MiB frame and send 60 MiB of it.
    let chunk = vec![0x5Au8; 1 << 20];
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (target, chunk) = (target.clone(), chunk.clone());
        senders.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(&target).await else {
                return;
            };
            let _ = s.write_all(&(79u32 << 20).to_be_bytes()).await;
            for _ in 0..60 {
                if tokio::time::timeout(Duration::from_secs(5), s.write_all(&chunk))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    break;
                }
            }
        }));
    }
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        peak = peak.max(distcache_e2e::rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in senders {
        s.abort();
    }
    eprintln!("member 0 RSS: {before} KiB before, {peak} KiB peak under 16 x 60 MiB of frames");
    assert!(c.members[0].running(), "member 0 aborted");
    // The budget (256 MiB) bounds what frames hold; twice that for growth.
    assert!(
        peak < before + 640 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );

    // 2. An idle connection is closed after the idle timeout.
    let mut idle = tokio::net::TcpStream::connect(&target)
        .await
        .expect("connect");
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(8), idle.read(&mut b))
        .await
        .expect("the idle connection was closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // 3. A flood of 3,000 connections does not lock gRPC clients out.
    let mut flood = Vec::new();
    for _ in 0..3_000 {
        if let Ok(s) = tokio::net::TcpStream::connect(&target).await {
            flood.push(s);
        }
    }
    for i in 0..20 {
        client
            .put(format!("flood{i}"), &b"z"[..])
            .await
            .expect("gRPC during the flood");
    }
    drop(flood);
    all_there(&client, 100).await;
    assert!(c.members[0].running(), "member 0 aborted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_rotate_under_load() {
    let mut c = ProcCluster::start(3, &[]);
    let client = c.client().await;
    let load = WriteLoad::start(&client, 4, 64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        let name = c.members[i].name.clone();
        c.issue_cert(&name);
    }
    // Nodes re-read the files within 2 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for i in 0..3 {
        assert!(
            log_of(&c, i).contains("peer TLS certificates reloaded"),
            "member {i} did not reload"
        );
    }
    // New connections use the new certificates: a restarted member must
    // handshake with everyone.
    c.kill(1);
    c.spawn(1);
    c.wait_safe(3, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (history, acked, _) = load.stop().await;
    assert!(acked > 100, "only {acked} writes acknowledged");
    assert_no_acknowledged_write_lost(&client, &history).await;
}
