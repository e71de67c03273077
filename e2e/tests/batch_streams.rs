//! The client opens as many Batch streams to a node as the node advises
//! (`x-distcache-batch-streams`: its worker threads), unless told a number;
//! the node counts its open Batch streams in `distcache_node_batch_streams`.

use std::time::{Duration, Instant};

use distcache_client::{Client, ClientConfig};
use distcache_e2e::{NodeProcess, metric_value, scrape_metrics};

/// `distcache_node_batch_streams` as scraped from `metrics` (whose port
/// may open just after the gRPC one).
async fn open_streams(metrics: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        match scrape_metrics(metrics).await {
            Ok(text) => break text,
            Err(e) if Instant::now() > deadline => panic!("metrics at {metrics}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    metric_value(&text, "distcache_node_batch_streams")
        .unwrap_or_else(|| panic!("no distcache_node_batch_streams in:\n{text}")) as i64
}

/// Waits (bounded) until the node counts `want` open Batch streams.
async fn wait_for_streams(metrics: &str, want: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = open_streams(metrics).await;
        if n == want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves `calls` concurrent gets through `client` (every stream slot is
/// picked in turn).
async fn load(client: &Client, calls: usize) {
    let gets = (0..calls).map(|i| client.get(format!("k{i}")));
    for r in futures::future::join_all(gets).await {
        r.expect("get");
    }
}

async fn streams_opened(workers: &str, config: impl Fn(ClientConfig) -> ClientConfig) -> i64 {
    let metrics = format!("127.0.0.1:{}", distcache_e2e::free_port());
    let node = NodeProcess::start(&["--worker-threads", workers, "--metrics-listen", &metrics]);
    assert_eq!(open_streams(&metrics).await, 0, "no stream before a client");
    let client = Client::with_config(config(ClientConfig::new([node.addr.to_string()])))
        .await
        .expect("client");
    // A first call opens one stream and brings the advice; later calls
    // open the rest.
    load(&client, 1).await;
    load(&client, 64).await;
    load(&client, 64).await;
    let counted = open_streams(&metrics).await;
    drop(client);
    // A client that goes away closes its streams; the gauge follows.
    assert_eq!(wait_for_streams(&metrics, 0).await, 0, "streams left open");
    counted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_opens_as_many_streams_as_the_node_advises_unless_told() {
    assert_eq!(streams_opened("3", |c| c).await, 3, "a 3-thread node");
    assert_eq!(streams_opened("1", |c| c).await, 1, "a 1-thread node");
    // A number given in the configuration wins over the advice.
    assert_eq!(
        streams_opened("1", |c| c.streams_per_node(2)).await,
        2,
        "streams_per_node(2) on a 1-thread node"
    );
    // More threads than the client takes on advice: capped.
    assert_eq!(
        streams_opened("16", |c| c).await,
        distcache_client::config::MAX_ADVISED_STREAMS as i64,
        "a 16-thread node"
    );
}
