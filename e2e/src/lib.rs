//! # distcache-e2e
//!
//! Whole-system tests (real `distcache-node` processes on loopback, driven by
//! the real client and CLI) and the `loadgen` load generator. This module
//! holds the helpers the tests share: finding the workspace's binaries,
//! picking loopback ports, and node processes that are killed when dropped.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cluster;
pub mod k8s;
pub mod netns;
mod settle;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a binary of this workspace, built next to the test executable
/// (`cargo test --workspace` / `cargo nextest run --workspace` build them all).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago, never the same twice in one
/// test process (two members of one cluster must not be given the same
/// one). Taken below the kernel's ephemeral range (32768 and up), so the
/// outbound connections of members already running cannot be handed it
/// before the member meant to listen there starts.
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// Like [`free_port`], checked free on `ip` as well as on 127.0.0.1 (a
/// member bound to 127.0.0.4 can collide with a port still held on that
/// address, e.g. by a killed process's connections).
pub fn free_port_on(ip: &str) -> u16 {
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Test processes run side by side: each starts at its own offset.
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for k in 0..SPAN {
        let port = FIRST + (start + k) % SPAN;
        if given.contains(&port) || TcpListener::bind((ip, port)).is_err() {
            continue;
        }
        if ip != "127.0.0.1" && TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

/// Resident set size of process `pid`, KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The Prometheus text of a node's (or the operator's) metrics endpoint at
/// `addr` (`GET /metrics`, the whole HTTP answer).
pub async fn scrape_metrics(addr: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// The value of the unlabelled metric `name` in scraped text, if present.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A `distcache-node` process; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    /// Its gRPC address.
    pub addr: SocketAddr,
    child: Child,
}

impl NodeProcess {
    /// Starts `distcache-node --listen 127.0.0.1:<free port>` plus `args` and
    /// waits until it listens.
    pub fn start(args: &[&str]) -> NodeProcess {
        NodeProcess::start_with_env(args, &[])
    }

    /// [`NodeProcess::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> NodeProcess {
        NodeProcess::start_under(None, args, env)
    }

    /// [`NodeProcess::start_with_env`] under `prlimit --as=BYTES` (its
    /// address space capped: an allocation beyond it aborts the node).
    pub fn start_under(
        address_space: Option<u64>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> NodeProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut cmd = match address_space {
            Some(bytes) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--as={bytes}"))
                    .arg("--")
                    .arg(bin("distcache-node"));
                c
            }
            None => Command::new(bin("distcache-node")),
        };
        let child = cmd
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .envs(env.iter().copied())
            .env("DISTCACHE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn distcache-node");
        let node = NodeProcess { addr, child };
        assert!(
            wait_listening(addr, Duration::from_secs(20)),
            "distcache-node did not listen on {addr}"
        );
        node
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory of the process, bytes (from /proc).
    pub fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().expect("wait for node")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
