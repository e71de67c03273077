//! The operations pack reads only metrics that exist: every `distcache_*`
//! name in the chart's dashboard and alerts is exported by a live node (after
//! some traffic) or by the operator's registry.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use distcache_e2e::NodeProcess;

/// Every `distcache_...` identifier in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("distcache_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_read_is_exported() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/distcache-operator/files");
    let board = std::fs::read_to_string(root.join("dashboard.json")).expect("dashboard");
    let alerts = std::fs::read_to_string(root.join("alerts.yaml")).expect("alerts");
    let wanted: BTreeSet<String> = names(&board).union(&names(&alerts)).cloned().collect();
    assert!(wanted.len() > 8, "{wanted:?}");

    let metrics = format!("127.0.0.1:{}", distcache_e2e::free_port());
    let node = NodeProcess::start(&["--metrics-listen", &metrics]);
    let c = distcache_client::Client::connect([node.addr.to_string()])
        .await
        .expect("client");
    c.put("k", "v").await.expect("put");
    let _ = c.get("missing-collection-key").await;
    let _ = c.collection_handle("nope").get("k").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = distcache_e2e::scrape_metrics(&metrics)
        .await
        .expect("scrape");
    let operator = distcache_operator::metrics::Metrics::default();
    operator
        .reconciliations
        .get_or_create(&distcache_operator::metrics::ResultLabels {
            result: "ok".into(),
        })
        .inc();
    let exported: BTreeSet<String> = names(&text)
        .union(&names(&operator.encode()))
        .cloned()
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "read by the dashboard or alerts but not exported: {missing:?}"
    );
}
