//! Every RPC against every role in a 3-node cluster, through one member in
//! gateway mode (so commands owned elsewhere are forwarded) and over the
//! Batch stream: each role does exactly its operations and nothing else.

use std::time::Duration;

use distcache_client::{Client, ClientConfig, Error, LockOptions};
use distcache_e2e::cluster::ProcCluster;
use sha2::{Digest, Sha256};

fn sha(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a call came back with: allowed, or refused for lack of a grant.
fn verdict<T>(r: distcache_client::Result<T>, what: &str) -> bool {
    match r {
        Ok(_) => true,
        Err(Error::NotAuthorized(_)) => false,
        Err(e) => panic!("{what}: unexpected {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_role_does_exactly_its_operations_through_any_member() {
    let dir = std::env::temp_dir().join(format!("dc-authz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let users = dir.join("users.json");
    let grant = |roles: &str| {
        format!(
            r#"[{{"collections": "app*", "roles": [{roles}]}}, {{"collections": "__locks__", "roles": [{roles}]}}]"#
        )
    };
    std::fs::write(
        &users,
        format!(
            r#"{{"users": [
                {{"name": "root", "token_sha256": "{}", "grants": [{{"collections": "*", "roles": ["read", "write", "admin"]}}]}},
                {{"name": "reader", "token_sha256": "{}", "grants": {}}},
                {{"name": "writer", "token_sha256": "{}", "grants": {}}},
                {{"name": "admin", "token_sha256": "{}", "grants": {}}}
            ]}}"#,
            sha("root"),
            sha("reader"),
            grant(r#""read""#),
            sha("writer"),
            grant(r#""write""#),
            sha("admin"),
            grant(r#""admin""#),
        ),
    )
    .expect("users");
    let path = users.display().to_string();
    let mut c = ProcCluster::start(3, &["--users-file", &path]);
    let eps = c.endpoints();
    let connect = |token: &'static str, gateway: bool| {
        let eps = eps.clone();
        async move {
            Client::with_config(
                ClientConfig::new(eps)
                    .token(token)
                    .gateway(gateway)
                    .request_timeout(Duration::from_secs(5)),
            )
            .await
            .expect("connect")
        }
    };
    // The cluster forms (health needs a credential now).
    let root = connect("root", false).await;
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !root.health().await.map(|h| h.safe).unwrap_or(false) {
        assert!(std::time::Instant::now() < end, "cluster never safe");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    root.collection("app").await.expect("root creates app");
    let seed: Vec<(String, String)> = (0..30)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    root.collection_handle("app")
        .put_many(seed, None)
        .await
        .expect("seed");

    // role -> [read, write, admin] it holds on app*.
    for (token, can) in [
        ("reader", [true, false, false]),
        ("writer", [false, true, false]),
        ("admin", [false, false, true]),
    ] {
        for gateway in [false, true] {
            let cl = connect(token, gateway).await;
            let app = cl.collection_handle("app");
            let [read, write, admin] = can;
            let w = |what: &str| format!("{token} gateway={gateway} {what}");
            // read: unary through the owner or forwarded, and the Batch stream.
            assert_eq!(
                verdict(app.get("k1").await, &w("get")),
                read,
                "{}",
                w("get")
            );
            assert_eq!(
                verdict(app.get_many(["k1", "k2", "k20"]).await, &w("get_many")),
                read
            );
            assert_eq!(verdict(app.keys().await, &w("keys")), read, "{}", w("keys"));
            assert_eq!(verdict(app.size().await, &w("size")), read, "{}", w("size"));
            assert_eq!(
                verdict(cl.collection_exists("app").await, &w("exists")),
                read
            );
            // write.
            assert_eq!(
                verdict(app.put("w", "1").await, &w("put")),
                write,
                "{}",
                w("put")
            );
            assert_eq!(
                verdict(
                    app.put_many([("a", "1"), ("b", "2")], None).await,
                    &w("put_many")
                ),
                write
            );
            assert_eq!(verdict(app.delete("a").await, &w("delete")), write);
            assert_eq!(
                verdict(app.delete_many(["b"]).await, &w("delete_many")),
                write
            );
            assert_eq!(verdict(app.increment("n", 1).await, &w("increment")), write);
            let lock = cl
                .acquire_lock(format!("job-{token}"), LockOptions::default())
                .await;
            assert_eq!(
                lock.is_ok(),
                write,
                "{}: {:?}",
                w("lock"),
                lock.as_ref().err()
            );
            if let Ok(g) = lock {
                g.release().await.expect("release");
            }
            // admin.
            assert_eq!(
                verdict(cl.force_release_lock("job-x").await, &w("force_release")),
                admin
            );
            assert_eq!(
                verdict(
                    cl.collection(&format!("app-{token}-{gateway}")).await,
                    &w("create")
                ),
                admin
            );
            assert_eq!(verdict(app.clear().await, &w("clear")), admin);
            if admin {
                root.collection_handle("app")
                    .put_many((0..30).map(|i| (format!("k{i}"), format!("v{i}"))), None)
                    .await
                    .expect("reseed");
            }
            // Nobody here may touch a collection outside app*.
            let other = cl.collection_handle("billing");
            assert!(!verdict(other.get("k").await, &w("billing get")));
            assert!(!verdict(other.put("k", "v").await, &w("billing put")));
            let listed: Vec<String> = cl
                .list_collections()
                .await
                .expect("list")
                .into_iter()
                .map(|c| c.name)
                .collect();
            assert!(
                listed.iter().all(|n| n.starts_with("app")),
                "{}: {listed:?}",
                w("list")
            );
        }
    }
    // No credential: UNAUTHENTICATED from every member.
    for ep in c.endpoints() {
        let r = Client::with_config(ClientConfig::new([ep]).max_retries(0)).await;
        assert!(matches!(r, Err(Error::Unauthenticated(_))), "{r:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
