//! Conformance: a plain (non-Rust) gRPC client (Python grpcio) drives every
//! RPC against a single node and then through each member of a 3-node
//! cluster in turn; every member must give the single node's answers.

use std::process::Command;
use std::time::Duration;

use distcache_e2e::NodeProcess;
use distcache_e2e::cluster::ProcCluster;

fn scenario(tag: &str, addr: &str) -> serde_json::Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("tests/python/conformance.py"))
        .arg(root.join("../client/proto"))
        .arg(tag)
        .arg(addr)
        .output()
        .expect("python3 with grpcio and grpcio-tools (.ci/run installs them)");
    assert!(
        out.status.success(),
        "scenario {tag} through {addr} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_gives_the_same_answer_through_any_member_as_on_one_node() {
    let single = NodeProcess::start(&[]);
    let reference = scenario("one", &single.addr.to_string());
    // The reference itself says what the contract is.
    assert_eq!(reference["get_many"][0][0], "m5", "{reference}");
    assert_eq!(reference["size"], 66);
    assert_eq!(
        reference["atomic"],
        serde_json::json!([
            true,
            false,
            false,
            true,
            7,
            -3,
            ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
        ])
    );
    assert_eq!(reference["keys"].as_array().map(Vec::len), Some(66));
    assert_eq!(reference["keys_pages_over_one"], true);
    assert_eq!(reference["clear"], 66);
    assert_eq!(
        reference["errors"]["malformed_protobuf"][0], "INVALID_ARGUMENT",
        "{reference}"
    );
    assert_eq!(
        reference["errors"]["lock_key_too_big"],
        serde_json::json!(["RESOURCE_EXHAUSTED", "LIMIT_EXCEEDED"])
    );

    let mut cluster = ProcCluster::start(3, &[]);
    cluster.wait_safe(3, Duration::from_secs(30)).await;
    for (i, m) in cluster.members.iter().enumerate() {
        let got = scenario(&format!("m{i}"), &m.grpc);
        for (field, want) in reference.as_object().expect("object") {
            assert_eq!(
                &got[field], want,
                "{field} through member {i} ({}) differs from a single node",
                m.grpc
            );
        }
    }
}
