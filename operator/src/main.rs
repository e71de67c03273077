//! `distcache-operator`: watches DistributedCacheClusters (and the
//! StatefulSets and pods they own) and reconciles them while it holds the
//! leader Lease; serves `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use distcache_operator::DistributedCacheCluster;
use distcache_operator::metrics::Metrics;
use distcache_operator::reconcile::{Context, GrpcProbe, MANAGER, error_policy, reconcile};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

mod leader;

/// Command line (every flag also reads an environment variable).
#[derive(Debug, Parser)]
#[command(name = "distcache-operator", version, about)]
struct Cli {
    /// Address of the metrics and health endpoints.
    #[arg(
        long,
        env = "DISTCACHE_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DISTCACHE_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Run only while holding the leader Lease (so several replicas can run).
    #[arg(long, env = "DISTCACHE_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "DISTCACHE_OPERATOR_LEASE_NAME",
        default_value = "distcache-operator"
    )]
    lease_name: String,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a leader's Lease stays valid without renewal.
    #[arg(
        long,
        env = "DISTCACHE_OPERATOR_LEASE_DURATION_SECS",
        default_value_t = 15
    )]
    lease_duration_secs: u64,
    /// Seconds before expiry the leader renews (must be below the duration).
    #[arg(long, env = "DISTCACHE_OPERATOR_LEASE_GRACE_SECS", default_value_t = 5)]
    lease_grace_secs: u64,
    /// This replica's identity in the Lease and in events (default: the pod
    /// name, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "metrics and health endpoints");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}

async fn shutdown_signal(stop: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
    stop.cancel();
}

/// Runs the controller until `until` fires.
async fn run_controller(client: Client, cli: &Cli, ctx: Arc<Context>, until: CancellationToken) {
    let (clusters, statefulsets, pods): (Api<DistributedCacheCluster>, Api<StatefulSet>, Api<Pod>) =
        match &cli.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=distcache-operator");
    Controller::new(clusters, watcher::Config::default())
        .owns(statefulsets, managed.clone())
        // Pod changes (IPs, readiness, deletions) republish the member list.
        .watches(pods, managed, |pod: Pod| {
            let ns = pod.namespace()?;
            pod.labels()
                .get("app.kubernetes.io/instance")
                .map(|name| ObjectRef::<DistributedCacheCluster>::new(name).within(&ns))
        })
        .graceful_shutdown_on(async move { until.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile event");
            }
        })
        .await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTCACHE_OPERATOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.lease_grace_secs >= cli.lease_duration_secs {
        anyhow::bail!("--lease-grace-secs must be below --lease-duration-secs");
    }
    let identity = cli.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_metrics(
        cli.metrics_addr,
        metrics.clone(),
        stop.clone(),
    ));
    tokio::spawn(shutdown_signal(stop.clone()));
    let ctx = Arc::new(Context {
        client: client.clone(),
        probe: Arc::new(GrpcProbe),
        recorder: Some(Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(identity.clone()),
            },
        )),
        metrics: metrics.clone(),
    });
    tracing::info!(%identity, leader_election = cli.leader_election, "distcache-operator started");
    if !cli.leader_election {
        metrics.leader.set(1);
        run_controller(client, &cli, ctx, stop.clone()).await;
    } else {
        let lease = leader::LeaseSettings {
            name: cli.lease_name.clone(),
            namespace: cli.lease_namespace.clone(),
            identity: identity.clone(),
            duration_secs: cli.lease_duration_secs,
            grace_secs: cli.lease_grace_secs,
        };
        leader::run_while_leading(client.clone(), lease, &metrics, &stop, |lost| {
            run_controller(client.clone(), &cli, ctx.clone(), lost)
        })
        .await?;
    }
    stop.cancel();
    server.await??;
    Ok(())
}
