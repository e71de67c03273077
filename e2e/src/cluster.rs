//! A cluster of real `distcache-node` processes on loopback, driven through
//! a members file (the file membership provider), with faults: SIGKILL,
//! SIGTERM, SIGSTOP/SIGCONT, restart, join, leave.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distcache_client::{Client, ClientConfig, Error};
use distcache_node::security::pki::Ca;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;

use crate::{bin, free_port, free_port_on, wait_listening};

/// Timing flags every test node gets: quick failure detection.
pub const FAST: &[&str] = &[
    "--heartbeat-interval-ms",
    "100",
    "--failure-timeout-ms",
    "1500",
    "--replication-timeout-ms",
    "1000",
    "--leave-timeout-secs",
    "20",
];

/// One member of a [`ProcCluster`].
#[derive(Debug)]
pub struct Member {
    /// Stable name.
    pub name: String,
    /// gRPC address.
    pub grpc: String,
    /// Peer address.
    pub peer: String,
    child: Option<Child>,
}

impl Member {
    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    /// Whether the process runs (was started and not reaped).
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

/// Node processes sharing a members file.
#[derive(Debug)]
pub struct ProcCluster {
    /// Members (also the ones not in the file any more).
    pub members: Vec<Member>,
    /// Working directory (members file, logs).
    pub dir: PathBuf,
    extra: Vec<String>,
    next: usize,
    ips: Vec<String>,
    /// Give each member a WAL under `dir/<name>/wal`.
    pub wal: bool,
    /// Extra environment of member i's process (e.g. libfaketime).
    pub env: HashMap<usize, Vec<(String, String)>>,
    /// A command prefix of member i's process (e.g. prlimit).
    pub prefix: HashMap<usize, Vec<String>>,
    /// The cluster CA of the peer port's mutual TLS (None: `--peer-insecure`
    /// was among the flags).
    pub pki: Option<Ca>,
}

impl ProcCluster {
    /// Starts `n` members; `extra` flags go to every node.
    pub fn start(n: usize, extra: &[&str]) -> ProcCluster {
        ProcCluster::start_on(&vec!["127.0.0.1"; n], extra)
    }

    /// Starts `n` members, member `i`'s command run under `prefix` (e.g.
    /// `prlimit --as=BYTES --`).
    pub fn start_prefixed(n: usize, extra: &[&str], i: usize, prefix: &[&str]) -> ProcCluster {
        let mut c = ProcCluster::create(&vec!["127.0.0.1"; n], extra);
        c.prefix
            .insert(i, prefix.iter().map(|s| s.to_string()).collect());
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    /// Starts one member per IP (member i listens on `ips[i]`).
    pub fn start_on(ips: &[&str], extra: &[&str]) -> ProcCluster {
        let mut c = ProcCluster::create(ips, extra);
        for i in 0..ips.len() {
            c.spawn(i);
        }
        c
    }

    /// The first `n` members on `ips[..n]`, started; later [`join`]s take
    /// the next addresses of `ips`.
    ///
    /// [`join`]: ProcCluster::join
    pub fn start_first_of(ips: &[&str], n: usize, extra: &[&str]) -> ProcCluster {
        let mut c = ProcCluster::create(&ips[..n.min(ips.len())], extra);
        c.ips = ips.iter().map(|s| s.to_string()).collect();
        for i in 0..c.members.len() {
            c.spawn(i);
        }
        c
    }

    /// The index of the member the others name as metadata leader (asked
    /// in turn); None while nobody names one (an election is on).
    pub async fn leader_index(&self) -> Option<usize> {
        for m in &self.members {
            if let Some(h) = health_of(&m.grpc).await
                && let Some(i) = self
                    .members
                    .iter()
                    .position(|x| x.name == h.metadata_leader)
            {
                return Some(i);
            }
        }
        None
    }

    /// Member `i`'s process id, when it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    fn create(ips: &[&str], extra: &[&str]) -> ProcCluster {
        let n = ips.len();
        let dir = std::env::temp_dir().join(format!(
            "distcache-e2e-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("test dir");
        let mut c = ProcCluster {
            members: Vec::new(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            next: 0,
            ips: ips.iter().map(|s| s.to_string()).collect(),
            wal: extra.contains(&"--wal"),
            env: HashMap::new(),
            prefix: HashMap::new(),
            pki: None,
        };
        if !extra.contains(&"--peer-insecure") {
            let ca = Ca::generate("distcache e2e peer CA", 30).expect("CA");
            std::fs::create_dir_all(c.pki_dir()).expect("pki dir");
            std::fs::write(c.pki_dir().join("ca.crt"), ca.cert_pem()).expect("CA file");
            c.pki = Some(ca);
        }
        c.extra.retain(|a| a != "--wal");
        for _ in 0..n {
            c.allocate();
        }
        c.write_file(&c.members.iter().map(|m| m.name.clone()).collect::<Vec<_>>());
        c
    }

    fn allocate(&mut self) -> usize {
        let name = format!("node-{}", self.next);
        let ip = self
            .ips
            .get(self.next)
            .cloned()
            .unwrap_or_else(|| "127.0.0.1".into());
        self.next += 1;
        if self.pki.is_some() {
            self.issue_cert(&name);
        }
        self.members.push(Member {
            name,
            grpc: format!("{ip}:{}", free_port_on(&ip)),
            peer: format!("{ip}:{}", free_port_on(&ip)),
            child: None,
        });
        self.members.len() - 1
    }

    /// Directory of the peer certificates (`ca.crt`, `<name>.crt/.key`).
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// Issues (or re-issues: rotation) member `name`'s peer certificate,
    /// written in place (temporary file, then rename).
    pub fn issue_cert(&self, name: &str) {
        let Some(ca) = &self.pki else { return };
        let issued = ca.issue(name, 30).expect("member certificate");
        let dir = self.pki_dir();
        for (ext, text) in [("key", &issued.key_pem), ("crt", &issued.cert_pem)] {
            let tmp = dir.join(format!("{name}.{ext}.tmp"));
            std::fs::write(&tmp, text).expect("certificate file");
            std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).expect("certificate file");
        }
    }

    /// The peer TLS flags of member `name` (none with `--peer-insecure`).
    pub fn tls_flags(&self, name: &str) -> Vec<String> {
        if self.pki.is_none() {
            return Vec::new();
        }
        let d = self.pki_dir();
        vec![
            "--peer-tls-cert".into(),
            d.join(format!("{name}.crt")).display().to_string(),
            "--peer-tls-key".into(),
            d.join(format!("{name}.key")).display().to_string(),
            "--peer-tls-ca".into(),
            d.join("ca.crt").display().to_string(),
        ]
    }

    /// Rewrites the members file to list exactly `names`.
    pub fn write_file(&self, names: &[String]) {
        let text: String = self
            .members
            .iter()
            .filter(|m| names.contains(&m.name))
            .map(|m| format!("{}={}/{}\n", m.name, m.grpc, m.peer))
            .collect();
        let tmp = self.dir.join("members.tmp");
        std::fs::write(&tmp, text).expect("members file");
        std::fs::rename(&tmp, self.dir.join("members")).expect("members file");
    }

    /// Names currently in the members file.
    pub fn listed(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("members"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(n, _)| n.to_string()))
            .collect()
    }

    /// (Re)starts member `i`'s process and waits until it listens.
    pub fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.members[i].name)))
            .expect("log file");
        let m = &self.members[i];
        let mut cmd = match self.prefix.get(&i).and_then(|p| p.split_first()) {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("distcache-node"));
                c
            }
            None => Command::new(bin("distcache-node")),
        };
        let child = cmd
            .args(["--listen", &m.grpc, "--name", &m.name])
            .arg("--members-file")
            .arg(self.dir.join("members"))
            .args(&self.extra)
            .args(self.tls_flags(&m.name))
            .args(if self.wal {
                vec![
                    "--wal-dir".to_string(),
                    self.dir.join(&m.name).join("wal").display().to_string(),
                ]
            } else {
                Vec::new()
            })
            .args(FAST)
            // DISTCACHE_E2E_NODE_LOG overrides the nodes' log filter (debugging).
            .env(
                "DISTCACHE_LOG",
                std::env::var("DISTCACHE_E2E_NODE_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .envs(self.env.get(&i).cloned().unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn distcache-node");
        let addr = m.grpc.parse().expect("addr");
        self.members[i].child = Some(child);
        if !wait_listening(addr, Duration::from_secs(20)) {
            let name = &self.members[i].name;
            let log =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{name} did not listen at {addr}; its log ends:\n{}",
                tail.join("\n")
            );
        }
    }

    /// Gives every member new loopback ports (same names) and rewrites the
    /// members file, as after a full restart with new pod IPs.
    pub fn shuffle_addresses(&mut self) {
        for m in &mut self.members {
            let ip = m
                .grpc
                .rsplit_once(':')
                .map(|(ip, _)| ip.to_string())
                .unwrap_or_default();
            m.grpc = format!("{ip}:{}", free_port_on(&ip));
            m.peer = format!("{ip}:{}", free_port_on(&ip));
        }
        let names = self.listed();
        self.write_file(&names);
    }

    /// Adds a new member to the file and starts it; returns its index.
    pub fn join(&mut self) -> usize {
        let i = self.allocate();
        let mut names = self.listed();
        names.push(self.members[i].name.clone());
        self.write_file(&names);
        self.spawn(i);
        i
    }

    /// (name, index) of the member that is primary of `key` in `collection`
    /// under `table`.
    pub fn primary_of(
        &self,
        table: &distcache_client::proto::PartitionTableResponse,
        collection: &str,
        key: &str,
    ) -> (String, usize) {
        let p = distcache_client::partition::partition_for(
            collection,
            key.as_bytes(),
            table.partition_count,
        );
        let name = table
            .partitions
            .iter()
            .find(|o| o.partition == p)
            .map(|o| o.primary.clone())
            .expect("the partition has an owner");
        let index = self
            .members
            .iter()
            .position(|m| m.name == name)
            .expect("the primary is a member");
        (name, index)
    }

    /// SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the graceful exit.
    pub fn terminate(&mut self, i: usize) -> bool {
        let Some(pid) = self.members[i].pid() else {
            return false;
        };
        let _ = kill(pid, Signal::SIGTERM);
        self.members[i]
            .child
            .take()
            .and_then(|mut c| c.wait().ok())
            .is_some_and(|s| s.success())
    }

    /// SIGSTOP (pause).
    pub fn pause(&self, i: usize) {
        if let Some(pid) = self.members[i].pid() {
            let _ = kill(pid, Signal::SIGSTOP);
        }
    }

    /// SIGCONT (resume).
    pub fn resume(&self, i: usize) {
        if let Some(pid) = self.members[i].pid() {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }

    /// gRPC addresses of the running members.
    pub fn endpoints(&mut self) -> Vec<String> {
        self.members
            .iter_mut()
            .filter_map(|m| m.running().then(|| m.grpc.clone()))
            .collect()
    }

    /// gRPC addresses of the running members other than `i`.
    pub fn endpoints_except(&mut self, i: usize) -> Vec<String> {
        let skip = self.members[i].grpc.clone();
        self.endpoints()
            .into_iter()
            .filter(|e| *e != skip)
            .collect()
    }

    /// A client seeded with every running member.
    pub async fn client(&mut self) -> Client {
        let eps = self.endpoints();
        Client::with_config(
            ClientConfig::new(eps)
                .request_timeout(Duration::from_secs(5))
                .max_retries(12),
        )
        .await
        .expect("client connects")
    }

    /// Waits until every running member reports the cluster safe at the same
    /// epoch, with `members` members owning partitions.
    pub async fn wait_safe(&mut self, members: usize, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < end {
            let eps = self.endpoints();
            let mut epochs = Vec::new();
            let mut all_safe = true;
            for ep in &eps {
                match Client::with_config(ClientConfig::new([ep.clone()]).max_retries(0)).await {
                    Ok(c) => match (c.health().await, c.partition_table().await) {
                        (Ok(h), Ok(t)) => {
                            let owners = t.members.iter().filter(|m| m.primaries > 0).count();
                            all_safe &= h.safe && owners == members;
                            epochs.push(h.epoch);
                            last = format!(
                                "{ep}: safe {} epoch {} owners {owners} without-backup {} migrating {} quorum {} ({})",
                                h.safe,
                                h.epoch,
                                h.partitions_without_backup,
                                h.migrations_running,
                                h.quorum,
                                h.problem
                            );
                        }
                        _ => all_safe = false,
                    },
                    Err(_) => all_safe = false,
                }
            }
            epochs.dedup();
            if all_safe && epochs.len() == 1 {
                return epochs[0];
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "cluster not safe within {timeout:?}: {last}; logs in {}",
            self.dir.display()
        );
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.resume(i);
            self.kill(i);
        }
        if !std::thread::panicking() && std::env::var_os("DISTCACHE_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What one writer did to its keys: per key, the last acknowledged value and
/// the last attempted one (a failed write is indeterminate).
#[derive(Debug, Default, Clone)]
pub struct KeyHistory {
    /// Last value whose put was acknowledged.
    pub acked: Option<u64>,
    /// Last value attempted.
    pub attempted: u64,
    /// Values whose put failed (indeterminate: may or may not be applied).
    pub failed: Vec<u64>,
}

/// A concurrent write load with a full history.
#[derive(Debug)]
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Per key history.
    pub history: Arc<Mutex<HashMap<String, KeyHistory>>>,
    /// Acknowledged writes.
    pub acked: Arc<AtomicU64>,
    /// Failed (indeterminate) writes.
    pub failed: Arc<AtomicU64>,
}

impl WriteLoad {
    /// `writers` tasks, each cycling through `keys` keys of its own with an
    /// increasing counter as the value.
    pub fn start(client: &Client, writers: usize, keys: usize) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let history: Arc<Mutex<HashMap<String, KeyHistory>>> = Arc::default();
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..writers)
            .map(|w| {
                let (client, stop, history, acked, failed) = (
                    client.clone(),
                    stop.clone(),
                    history.clone(),
                    acked.clone(),
                    failed.clone(),
                );
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        seq += 1;
                        let key = format!("w{w}-k{}", seq as usize % keys);
                        history.lock().entry(key.clone()).or_default().attempted = seq;
                        match client.put(&key, seq.to_string()).await {
                            Ok(()) => {
                                history.lock().entry(key).or_default().acked = Some(seq);
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                history.lock().entry(key).or_default().failed.push(seq);
                                failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        WriteLoad {
            stop,
            tasks,
            history,
            acked,
            failed,
        }
    }

    /// Stops the writers and waits for them.
    pub async fn stop(self) -> (HashMap<String, KeyHistory>, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let h = self.history.lock().clone();
        (
            h,
            self.acked.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// One member's Health answer (None: unreachable or refused).
pub async fn health_of(addr: &str) -> Option<distcache_client::proto::HealthResponse> {
    use distcache_client::proto::{HealthRequest, cluster_client::ClusterClient};
    let mut c = ClusterClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    Some(c.health(HealthRequest {}).await.ok()?.into_inner())
}

/// Reads every key back and returns the violations: keys whose value is
/// older than the last acknowledged write (or missing), or newer than any
/// write attempted.
pub async fn check_history(client: &Client, history: &HashMap<String, KeyHistory>) -> Vec<String> {
    let mut bad = Vec::new();
    for (key, h) in history {
        let got = loop {
            match client.get(key).await {
                Ok(v) => break v,
                Err(Error::Unavailable(_) | Error::Timeout(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    bad.push(format!("{key}: read failed: {e}"));
                    break None;
                }
            }
        };
        let value: Option<u64> = got.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok());
        match (h.acked, value) {
            (Some(a), Some(v)) if v >= a && v <= h.attempted => {}
            (None, None) => {}
            (None, Some(v)) if v <= h.attempted => {}
            (a, v) => bad.push(format!(
                "{key} (p{}): acked {a:?} attempted {} read {v:?}{}",
                distcache_client::partition::partition_for(
                    "__default__",
                    key.as_bytes(),
                    distcache_client::partition::DEFAULT_PARTITION_COUNT
                ),
                h.attempted,
                if v.is_some_and(|v| h.failed.contains(&v)) {
                    " (a failed, indeterminate write)"
                } else {
                    ""
                }
            )),
        }
    }
    bad
}

/// [`check_history`], failing the test with the first violations (read
/// twice: a violation that the second read no longer shows was a stale read,
/// one that stays is a lost write; both fail).
pub async fn assert_no_acknowledged_write_lost(
    client: &Client,
    history: &HashMap<String, KeyHistory>,
) {
    let bad = check_history(client, history).await;
    if bad.is_empty() {
        return;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let keys: HashMap<String, KeyHistory> = bad
        .iter()
        // Each violation starts with the key (then " (pN): ...").
        .filter_map(|b| b.split(' ').next())
        .filter_map(|k| history.get(k).map(|h| (k.to_string(), h.clone())))
        .collect();
    let again = check_history(client, &keys).await;
    // Each bad key's writer's last attempted write (is it the very last?).
    let last: Vec<String> = keys
        .keys()
        .filter_map(|k| k.split('-').next())
        .map(|w| {
            let max = history
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{w}-")))
                .map(|(_, h)| h.attempted)
                .max()
                .unwrap_or(0);
            format!("{w} last attempted {max}")
        })
        .collect();
    panic!(
        "{} keys lost or wrong: {:?}; read again 2 s later, {} still wrong: {:?}; {last:?}",
        bad.len(),
        &bad[..bad.len().min(10)],
        again.len(),
        &again[..again.len().min(10)]
    );
}

impl ProcCluster {
    /// Compares every partition's copies (digest of each backup against its
    /// primary's, asked over the peer port as a member would); returns how
    /// many copies had data (a non-zero digest) and the partitions whose
    /// copies differ, as `"p<n>: <primary> <digest> / <backup> <digest>"`.
    /// Call when no write is in flight: a quiet, safe cluster's copies are
    /// equal.
    pub async fn diverging_copies(&self, client: &Client) -> (usize, Vec<String>) {
        use distcache_node::net::message::{Request, Response};
        use distcache_node::net::peer::{PeerLimits, Peers};
        // A member never admits a connection in its own name: ask each
        // member as member 0, and member 0 as member 1.
        let shutdown = tokio_util::sync::CancellationToken::new();
        let names: HashMap<String, String> = self
            .members
            .iter()
            .map(|m| (m.peer.clone(), m.name.clone()))
            .collect();
        let as_member = |me: &str| {
            let tls = self.pki.as_ref().map(|_| {
                let d = self.pki_dir();
                distcache_node::security::peer_tls::PeerTls::load(
                    distcache_node::security::peer_tls::PeerTlsFiles {
                        cert: d.join(format!("{me}.crt")),
                        key: d.join(format!("{me}.key")),
                        ca: d.join("ca.crt"),
                    },
                )
                .expect("member TLS material")
            });
            let peers = Peers::new(PeerLimits::default(), None, tls, shutdown.clone());
            let names = names.clone();
            peers.set_directory(Box::new(move |addr| names.get(addr).cloned()));
            peers
        };
        let (first, second) = (&self.members[0].name, &self.members[1].name);
        let (as_first, as_second) = (as_member(first), as_member(second));
        let peer_of = |name: &str| {
            self.members
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.peer.clone())
        };
        let table = client.partition_table().await.expect("partition table");
        let mut diverging = Vec::new();
        let mut with_data = 0;
        for owners in &table.partitions {
            let p = owners.partition;
            let mut copies = Vec::new();
            for name in std::iter::once(&owners.primary).chain(owners.backups.iter()) {
                let Some(addr) = peer_of(name) else {
                    diverging.push(format!("p{p}: {name} is not a known member"));
                    continue;
                };
                let peers = if name == first { &as_second } else { &as_first };
                let digest = match peers
                    .call(
                        &addr,
                        Request::Digest {
                            epoch: 0,
                            partition: p,
                        },
                        Duration::from_secs(5),
                    )
                    .await
                {
                    Ok(Response::Digest { digest, .. }) => digest,
                    other => panic!("digest of p{p} at {name}: {other:?}"),
                };
                with_data += usize::from(digest != 0);
                copies.push((name.clone(), digest));
            }
            if let Some((first, d0)) = copies.first()
                && let Some((other, d)) = copies.iter().find(|(_, d)| d != d0)
            {
                diverging.push(format!("p{p}: {first} {d0:#x} / {other} {d:#x}"));
            }
        }
        shutdown.cancel();
        (with_data, diverging)
    }
}
