//! `distcache-node local`: N real node processes on loopback, in the
//! foreground, stopped together on ctrl-c / SIGTERM.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Arguments of `local`.
/// Set by the launcher on each member: the launcher's pid.
pub const PARENT_PID_ENV: &str = "DISTCACHE_LOCAL_PARENT_PID";

/// In a member started by `distcache-node local`: asks the kernel to kill
/// this process when its launcher dies (PR_SET_PDEATHSIG), and exits at once
/// if the launcher is already gone.
pub fn exit_with_launcher() {
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("cannot tie this member to its launcher: {e}");
    }
    if nix::unistd::getppid().as_raw() != parent {
        eprintln!("the local launcher is gone; exiting");
        std::process::exit(1);
    }
}

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// gRPC port of the first node; node i listens on BASE+i, its peer port is BASE+1000+i.
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// Directory for the nodes' logs (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Backups per partition.
    #[arg(long, default_value_t = 1)]
    backup_count: u32,
    /// Persist each member's data under DIR/<member name>/ (the WAL): stopping
    /// and re-running the same command brings the data back.
    #[arg(long)]
    wal: bool,
    /// Extra flags passed to every node (e.g. `--failure-timeout-ms=2000`).
    #[arg(last = true)]
    extra: Vec<String>,
}

struct Member {
    name: String,
    grpc: String,
    peer: String,
}

/// `--worker-threads` for each member, unless the user chose: the machine's
/// CPUs shared among the members (N runtimes of one thread per CPU each
/// would keep more threads runnable than there are CPUs, and pay for it in
/// context switches).
fn worker_threads(args: &LocalArgs) -> Vec<String> {
    let chosen = std::env::var_os("DISTCACHE_WORKER_THREADS").is_some()
        || args
            .extra
            .iter()
            .any(|a| a == "--worker-threads" || a.starts_with("--worker-threads="));
    if chosen {
        return Vec::new();
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let each = (cpus / usize::from(args.nodes.max(1))).max(1);
    vec!["--worker-threads".to_string(), each.to_string()]
}

fn spawn(
    exe: &std::path::Path,
    m: &Member,
    members: &str,
    args: &LocalArgs,
    dir: &std::path::Path,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{}.log", m.name)))?;
    let pki = dir.join("pki");
    let tls = if args.extra.iter().any(|a| a == "--peer-insecure") {
        Vec::new()
    } else {
        vec![
            "--peer-tls-cert".to_string(),
            pki.join(format!("{}.crt", m.name)).display().to_string(),
            "--peer-tls-key".to_string(),
            pki.join(format!("{}.key", m.name)).display().to_string(),
            "--peer-tls-ca".to_string(),
            pki.join("ca.crt").display().to_string(),
        ]
    };
    Command::new(exe)
        .args(["--listen", &m.grpc, "--name", &m.name, "--members", members])
        .args(tls)
        .args(["--backup-count", &args.backup_count.to_string()])
        .args(if args.wal {
            vec![
                "--wal-dir".to_string(),
                dir.join(&m.name).display().to_string(),
            ]
        } else {
            Vec::new()
        })
        .args(worker_threads(args))
        .args(&args.extra)
        // The member dies with this launcher, even if it is killed -9.
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", m.name))
}

/// Runs the local cluster until ctrl-c or SIGTERM.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    let last = u32::from(args.base_port) + 1000 + u32::from(args.nodes);
    anyhow::ensure!(
        last <= 65_535,
        "--base-port too high for {} nodes",
        args.nodes
    );
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("distcache-local-{}", args.base_port))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let members: Vec<Member> = (0..args.nodes)
        .map(|i| Member {
            name: format!("node-{i}"),
            grpc: format!("127.0.0.1:{}", args.base_port + i),
            peer: format!("127.0.0.1:{}", args.base_port + 1000 + i),
        })
        .collect();
    let list = members
        .iter()
        .map(|m| format!("{}={}/{}", m.name, m.grpc, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    if !args.extra.iter().any(|a| a == "--peer-insecure") {
        // A throwaway CA and member certificates: the members talk mutual
        // TLS like a real cluster's (pass `-- --peer-insecure` for plaintext).
        let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
        distcache_node::security::pki::write_throwaway(&dir.join("pki"), &names)
            .context("making the throwaway peer certificates")?;
    }
    let exe = std::env::current_exe().context("locating distcache-node")?;
    let mut children = Vec::new();
    for m in &members {
        children.push(spawn(&exe, m, &list, &args, &dir)?);
        println!(
            "{}  grpc {}  peer {}  log {}",
            m.name,
            m.grpc,
            m.peer,
            dir.join(format!("{}.log", m.name)).display()
        );
    }
    println!(
        "endpoints: {}",
        members
            .iter()
            .map(|m| m.grpc.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("ctrl-c stops every node");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut reported = vec![false; children.len()];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                for ((c, m), seen) in children.iter_mut().zip(&members).zip(reported.iter_mut()) {
                    if !*seen && let Ok(Some(status)) = c.try_wait() {
                        eprintln!("{} exited ({status}); see its log", m.name);
                        *seen = true;
                    }
                }
            }
        }
    }
    eprintln!("stopping {} nodes", children.len());
    for c in &children {
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    for c in &mut children {
        match tokio::time::timeout(Duration::from_secs(60), c.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = c.start_kill();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{LocalArgs, worker_threads};
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        local: LocalArgs,
    }

    fn args(list: &[&str]) -> LocalArgs {
        Wrap::parse_from(std::iter::once("local").chain(list.iter().copied())).local
    }

    #[test]
    fn members_share_the_cpus_unless_the_user_chose() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for nodes in [1usize, 2, 3, 64] {
            let n = nodes.to_string();
            let given = worker_threads(&args(&["--nodes", &n]));
            assert_eq!(given.len(), 2, "{given:?}");
            assert_eq!(given[0], "--worker-threads");
            let each: usize = given[1].parse().expect("a number");
            assert!(each >= 1, "at least one thread each");
            assert!(
                each * nodes <= cpus.max(nodes),
                "{each} x {nodes} on {cpus} CPUs"
            );
            assert_eq!(each, (cpus / nodes).max(1));
        }
        for chosen in [
            &["--", "--worker-threads", "4"][..],
            &["--", "--worker-threads=4"],
        ] {
            assert!(worker_threads(&args(chosen)).is_empty(), "{chosen:?}");
        }
    }
}
