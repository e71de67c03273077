//! `distcache-node`: serves one node (see `--help`).

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use distcache_node::clock::SystemClock;
use distcache_node::cluster::kubernetes::KubernetesProvider;
use distcache_node::config::NodeConfig;
use distcache_node::{Node, server};

mod local;

/// distcache node: a partitioned in-memory cache served over gRPC.
///
/// With no flags it serves one in-memory node on 127.0.0.1:7100. Every flag
/// can also be set by the environment variable shown.
#[derive(Debug, Parser)]
#[command(name = "distcache-node", version)]
struct Cli {
    #[command(flatten)]
    node: NodeConfig,
    /// Threads of the node's async runtime (0: one per CPU the process may
    /// use, which follows a container's CPU limit). `local` gives each of
    /// its N nodes the machine's CPUs / N, at least 1, unless this is set.
    #[arg(long, env = "DISTCACHE_WORKER_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    worker_threads: u16,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Start N real node processes on loopback (gRPC on BASE, BASE+1, ...),
    /// print their endpoints, and stop them all on ctrl-c/SIGTERM.
    Local(local::LocalArgs),
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Raises the soft open-file limit to the hard one (connections are
/// descriptors; the peer and client ports have their own caps below it).
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "open-file limit not raised"),
        },
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "open-file limit unknown"),
    }
}

fn main() -> anyhow::Result<()> {
    local::exit_with_launcher();
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if cli.worker_threads > 0 {
        runtime.worker_threads(usize::from(cli.worker_threads));
    }
    runtime
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Cmd::Local(args)) = cli.cmd {
        return local::run(args).await;
    }
    let config = cli.node;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log).context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    config.validate().map_err(anyhow::Error::msg)?;
    raise_open_files();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let bound = listener.local_addr()?;
    let clock = Arc::new(SystemClock::default());
    let node = match config.members_configmap.clone() {
        Some(spec) => {
            let me = config.me(bound).map_err(anyhow::Error::msg)?;
            let provider =
                KubernetesProvider::start(&spec, me, std::time::Duration::from_secs(60)).await?;
            Node::with_provider(config, bound, clock, Box::new(provider))?
        }
        None => Node::new(config, bound, clock)?,
    };
    let peer = server::bind_peer(&node).await?;
    node.start(peer).await;
    tracing::info!(name = node.name(), address = %bound, "distcache node serving");
    let fatal = {
        let node = node.clone();
        async move { node.fatal().await }
    };
    tokio::select! {
        served = server::serve(listener, node, shutdown_signal()) => served?,
        why = fatal => {
            tracing::error!(%why, "the write-ahead log failed: stopping now (fail-stop); this node's partitions fail over, and a restart recovers from the log");
            anyhow::bail!("write-ahead log failed: {why}");
        }
    }
    tracing::info!("stopped");
    Ok(())
}
