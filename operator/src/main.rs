//! `distcache-operator`: watches DistributedCacheClusters and reconciles them.

use std::sync::Arc;

use distcache_operator::DistributedCacheCluster;
use distcache_operator::reconcile::{Context, GrpcProbe, error_policy, reconcile};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTCACHE_OPERATOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let client = Client::try_default().await?;
    let clusters: Api<DistributedCacheCluster> = Api::all(client.clone());
    let statefulsets: Api<StatefulSet> = Api::all(client.clone());
    let ctx = Arc::new(Context {
        client,
        probe: Arc::new(GrpcProbe),
    });
    tracing::info!("distcache-operator started");
    Controller::new(clusters, watcher::Config::default())
        .owns(statefulsets, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile event");
            }
        })
        .await;
    Ok(())
}
