//! A gRPC client that is not ours (Python grpcio, stubs generated from the
//! proto files) puts and gets against a node.

use std::process::Command;
use std::sync::Arc;

use distcache_node::clock::SystemClock;
use distcache_node::config::NodeConfig;
use distcache_node::server::Running;

#[tokio::test]
async fn python_grpcio_puts_and_gets() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status();
    if !probe.map(|s| s.success()).unwrap_or(false) {
        panic!(
            "python3 with grpcio and grpcio-tools is required (pip install grpcio grpcio-tools; .ci/run installs them)"
        );
    }
    let config = NodeConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..NodeConfig::default()
    };
    let node = Running::start(config, Arc::new(SystemClock::default()))
        .await
        .expect("node");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/python/plain_client.py");
    let proto_dir = root.join("../client/proto");
    let addr = node.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(addr)
            .arg(proto_dir)
            .output()
    })
    .await
    .expect("join")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("OK"), "{stdout}");
    // What Python wrote, the Rust side reads.
    let c = distcache_client::Client::connect([node.addr.to_string()])
        .await
        .expect("connect");
    assert_eq!(
        c.get("from-python").await.expect("get").as_deref(),
        Some(&b"hello from grpcio"[..])
    );
    node.stop().await.expect("stop");
}
