//! Serving a node on a bound listener until a shutdown future resolves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use distcache_client::proto;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::grpc::Api;
use crate::grpc::auth::Access;
use crate::grpc::budget::HandoffService;
use crate::grpc::inbound::RequestRoom;
use crate::listener::{self, ConnLimits};
use crate::node::Node;
use crate::security::tls::{ReloadingCert, TlsFiles, server_config};
use crate::security::users::Users;

/// Serves every distcache service, the standard gRPC health service and
/// server reflection on `listener` until `shutdown` resolves; then stops the
/// node's streams and background tasks and waits for them.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let max = usize::try_from(node.config().max_message_bytes).unwrap_or(usize::MAX);
    if let Some(addr) = node.config().metrics_listen {
        serve_metrics(&node, crate::metrics::bind(addr).await?);
        tracing::info!(address = %addr, "metrics served at /metrics");
    }
    let access = Access::new(match &node.config().users_file {
        Some(path) => Some(Users::load(path.clone())?),
        None => {
            tracing::warn!(
                "no --users-file: the client port is open to anyone who can reach it (read, write and delete every collection)"
            );
            None
        }
    });
    let tls = tls_files(node.config());
    let cert = match &tls {
        Some(files) => Some(ReloadingCert::load(files.clone())?),
        None => {
            tracing::warn!("no --tls-cert: the client port is plaintext");
            None
        }
    };
    spawn_reloads(&node, cert.clone(), access.users());
    let api = Api::with_access(node.clone(), access);
    let requests = api.requests();

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::cache_server::CacheServer<Api>>()
        .await;
    health
        .set_serving::<proto::collections_server::CollectionsServer<Api>>()
        .await;
    health
        .set_serving::<proto::locks_server::LocksServer<Api>>()
        .await;
    health
        .set_serving::<proto::cluster_server::ClusterServer<Api>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

    let limits = ConnLimits {
        max_connections: node.config().max_connections,
        idle_timeout: (node.config().idle_timeout_secs > 0)
            .then(|| Duration::from_secs(node.config().idle_timeout_secs)),
        handshake_timeout: Duration::from_secs(10),
    };
    let keepalive = (node.config().keepalive_secs > 0)
        .then(|| Duration::from_secs(node.config().keepalive_secs));
    let token = node.shutdown_token().clone();
    let leaver = node.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down");
        // Hand partitions off while still serving, then end Batch streams and
        // lock waits so that connections can drain.
        leaver.leave().await;
        token.cancel();
    };
    let router = tonic::transport::Server::builder()
        .http2_adaptive_window(Some(true))
        .max_concurrent_streams(Some(node.config().max_concurrent_streams.max(1)))
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RequestRoom::new(
            HandoffService::<_, proto::BatchResponse>::new(
                proto::cache_server::CacheServer::new(api.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
                max,
            ),
            requests.clone(),
        ))
        .add_service(RequestRoom::new(
            proto::collections_server::CollectionsServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            requests.clone(),
        ))
        .add_service(RequestRoom::new(
            proto::locks_server::LocksServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            requests.clone(),
        ))
        .add_service(RequestRoom::new(
            proto::cluster_server::ClusterServer::new(api)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            requests,
        ));
    let served = match (&tls, cert) {
        (Some(files), Some(cert)) => {
            let config = server_config(files, cert)?;
            router
                .serve_with_incoming_shutdown(listener::tls(listener, limits, config), signal)
                .await
        }
        _ => {
            router
                .serve_with_incoming_shutdown(listener::plain(listener, limits), signal)
                .await
        }
    };
    served.map_err(|e| Error::Internal(format!("grpc server: {e}")))?;
    node.shutdown().await;
    Ok(())
}

fn tls_files(config: &crate::config::NodeConfig) -> Option<TlsFiles> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.tls_client_ca.clone(),
        }),
        _ => None,
    }
}

/// Re-reads the certificate and the users file when they change (every 2 s
/// until the node shuts down): rotation and revocation need no restart.
fn spawn_reloads(node: &Arc<Node>, cert: Option<Arc<ReloadingCert>>, users: Option<Arc<Users>>) {
    if cert.is_none() && users.is_none() {
        return;
    }
    let token = node.shutdown_token().clone();
    node.tasks().spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {
                    if let Some(c) = &cert {
                        c.reload_if_changed();
                    }
                    if let Some(u) = &users {
                        u.reload_if_changed();
                    }
                }
            }
        }
    });
}

/// Binds the peer listener of a node that has peers (`--peer-listen`, else
/// its own peer address from the member list); `None` for a lone node.
pub async fn bind_peer(node: &Node) -> Result<Option<TcpListener>> {
    let addr = match node.config().peer_listen {
        Some(a) => a.to_string(),
        None if node.cluster.me().peer.is_empty() => return Ok(None),
        None => node.cluster.me().peer.clone(),
    };
    TcpListener::bind(&addr)
        .await
        .map(Some)
        .map_err(|e| Error::InvalidArgument(format!("cannot listen for peers on {addr}: {e}")))
}

/// A node served in the background (tests, embedding).
#[derive(Debug)]
pub struct Running {
    /// The bound gRPC address.
    pub addr: std::net::SocketAddr,
    /// The node.
    pub node: Arc<Node>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    /// Binds `config.listen` (port 0 picks one), starts the node and serves it.
    pub async fn start(
        config: crate::config::NodeConfig,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Running> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Internal(format!("bind {}: {e}", config.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let node = Node::new(config, addr, clock)?;
        let peer = bind_peer(&node).await?;
        node.start(peer).await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(serve(listener, node.clone(), async {
            let _ = rx.await;
        }));
        Ok(Running {
            addr,
            node,
            stop: Some(tx),
            join,
        })
    }

    /// Stops abruptly, like a killed process: no hand-off, the server
    /// dropped, the node's tasks ended (tests of failures).
    pub async fn crash(self) {
        self.join.abort();
        let _ = self.join.await;
        self.node.shutdown().await;
    }

    /// Stops serving and waits until the server and the node's tasks ended.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match (&mut self.join).await {
            Ok(r) => r,
            Err(e) => Err(Error::Internal(format!("server task: {e}"))),
        }
    }
}

/// Serves `GET /metrics` on `listener` until the node shuts down; a task of
/// the node's tracker.
pub fn serve_metrics(node: &Arc<Node>, listener: TcpListener) {
    let token = node.shutdown_token().clone();
    let weak = Arc::downgrade(node);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let weak = weak.clone();
            async move {
                let body = weak
                    .upgrade()
                    .map(|node| node.metrics_text())
                    .unwrap_or_default();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    node.tasks().spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
}
