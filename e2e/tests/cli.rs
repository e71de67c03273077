//! The `distcache` CLI and `distcache-node` binary as a user runs them: exact
//! output and exit codes are contracts (README, issue #2).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use distcache_e2e::{NodeProcess, bin};

fn cli(node: &NodeProcess, args: &[&str]) -> Output {
    Command::new(bin("distcache"))
        .arg("--endpoints")
        .arg(node.addr.to_string())
        .args(args)
        .output()
        .expect("run distcache")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cli_round_trip_with_exit_codes() {
    let node = NodeProcess::start(&[]);
    let o = cli(&node, &["put", "greeting", "hello world"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(&node, &["get", "greeting"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "hello world", "value alone on stdout");

    let o = cli(&node, &["get", "missing"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "not found");
    assert!(stdout(&o).is_empty());

    // VALUE `-` reads stdin (binary-safe).
    let mut child = Command::new(bin("distcache"))
        .args([
            "--endpoints",
            &node.addr.to_string(),
            "put",
            "--collection",
            "",
            "blob",
            "-",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\x00\x01line\n")
        .expect("write");
    assert!(child.wait().expect("wait").success());
    assert_eq!(cli(&node, &["get", "blob"]).stdout, b"\x00\x01line\n");

    // Collections: unknown -> clear one-line error, non-zero exit.
    let o = cli(&node, &["put", "--collection", "nope", "k", "v"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("collection not found"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).lines().count(), 1);
    assert!(
        cli(
            &node,
            &["create-collection", "sessions", "--max-entries", "100"]
        )
        .status
        .success()
    );
    assert!(
        cli(
            &node,
            &["put", "--collection", "sessions", "--ttl", "60", "s1", "u1"]
        )
        .status
        .success()
    );
    assert_eq!(
        stdout(&cli(&node, &["size", "--collection", "sessions"])).trim(),
        "1"
    );
    assert_eq!(
        stdout(&cli(&node, &["keys", "--collection", "sessions"])),
        "s1\n"
    );
    assert_eq!(
        stdout(&cli(&node, &["collections"])),
        "__default__\nsessions\n"
    );
    assert_eq!(
        stdout(&cli(&node, &["clear", "--collection", "sessions"])).trim(),
        "1"
    );
    assert_eq!(cli(&node, &["delete", "greeting"]).status.code(), Some(0));
    assert_eq!(cli(&node, &["delete", "greeting"]).status.code(), Some(1));

    // Locks: token alone on stdout; held lock -> exit 2.
    let o = cli(&node, &["lock", "job", "--hold", "30"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let token: u64 = stdout(&o).trim().parse().expect("token is a number");
    let o = cli(&node, &["lock", "job", "--hold", "30", "--wait", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).trim(), "lock not acquired");
    let o = cli(&node, &["lock", "job", "--hold", "30", "--wait", "0.2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        cli(&node, &["unlock", "job", "--token", &token.to_string()])
            .status
            .success()
    );
    let o = cli(&node, &["lock", "job", "--hold", "30", "--wait", "0"]);
    let token2: u64 = stdout(&o).trim().parse().expect("token");
    assert!(token2 > token);

    // Cluster JSON contract.
    let o = cli(&node, &["cluster", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["partition_count"], 271);
    assert!(v["epoch"].as_u64().is_some());
    assert_eq!(v["safe"], true);
    let m = &v["members"][0];
    assert_eq!(m["address"], node.addr.to_string());
    assert_eq!(m["primaries"], 271);
    assert_eq!(m["backups"], 0);
    assert!(m["name"].is_string());

    // Graceful stop on SIGTERM.
    assert!(node.terminate().success());
}

#[test]
fn cli_reports_unreachable_endpoints_in_one_line() {
    let port = distcache_e2e::free_port();
    let o = Command::new(bin("distcache"))
        .args([
            "--endpoints",
            &format!("127.0.0.1:{port}"),
            "--timeout",
            "1",
            "get",
            "k",
        ])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn usage_errors_exit_3_with_one_line_and_help_exits_0() {
    for args in [
        &["put", "--ttl", "-5", "k", "v"][..],
        &["put", "--ttl", "abc", "k", "v"],
        &["frobnicate"],
        &["get"],
        &["get", "--wat", "0", "k"],
    ] {
        let o = Command::new(bin("distcache"))
            .args(args)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
    for args in [&["--help"][..], &["put", "--help"], &["--version"]] {
        let o = Command::new(bin("distcache"))
            .args(args)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(!stdout(&o).is_empty(), "{args:?}");
    }
}

#[test]
fn node_help_documents_every_flag_with_its_env_var() {
    let o = Command::new(bin("distcache-node"))
        .arg("--help")
        .output()
        .expect("run");
    assert!(o.status.success());
    let help = stdout(&o);
    for flag in [
        "--listen",
        "--name",
        "--partition-count",
        "--max-key-bytes",
        "--max-value-bytes",
        "--max-message-bytes",
        "--sweep-interval-ms",
        "--log",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let flags = help.matches("\n      --").count() + help.matches("\n  -").count();
    let envs = help.matches("[env: DISTCACHE_").count();
    assert!(
        envs >= flags - 2,
        "every flag but --help/--version has an env var: {envs} of {flags}"
    );
}

#[test]
fn verify_writes_then_reads_every_key_back() {
    let node = NodeProcess::start(&[]);
    let o = cli(
        &node,
        &["verify", "--seconds", "1", "--keys", "50", "--prefix", "v-"],
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out} {}", stderr(&o));
    assert!(out.contains("50 keys checked, 0 lost"), "{out}");
    let acked: u64 = out
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count");
    assert!(acked >= 50, "{out}");
    // The keys it wrote are there: the last counter of key 0 reads back.
    let g = cli(&node, &["get", "v-0"]);
    assert_eq!(g.status.code(), Some(0));
    assert!(stdout(&g).trim().parse::<u64>().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_mode_serves_every_key_through_one_member() {
    let mut cluster = distcache_e2e::cluster::ProcCluster::start(3, &[]);
    cluster
        .wait_safe(3, std::time::Duration::from_secs(30))
        .await;
    let seed = cluster.endpoints()[0].clone();
    let run = |args: &[&str]| {
        Command::new(bin("distcache"))
            .args(["--endpoints", &seed, "--gateway"])
            .args(args)
            .output()
            .expect("run distcache")
    };
    let o = run(&[
        "verify",
        "--seconds",
        "1",
        "--keys",
        "100",
        "--prefix",
        "gw-",
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out} {}", stderr(&o));
    assert!(out.contains("100 keys checked, 0 lost"), "{out}");
    // The keys live on every member, not only on the seed.
    let c = cluster.client().await;
    let table = c.partition_table().await.expect("table");
    let owners: std::collections::HashSet<String> = (0..100)
        .map(|k| {
            let p = distcache_client::partition::partition_for(
                distcache_client::partition::DEFAULT_COLLECTION,
                format!("gw-{k}").as_bytes(),
                table.partition_count,
            );
            table.partitions[p as usize].primary.clone()
        })
        .collect();
    assert_eq!(owners.len(), 3, "keys owned by all three members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_json_lists_a_failed_member_as_dead_after_failover() {
    let mut cluster = distcache_e2e::cluster::ProcCluster::start(3, &[]);
    cluster
        .wait_safe(3, std::time::Duration::from_secs(30))
        .await;
    let dead = cluster.members[2].name.clone();
    cluster.kill(2);
    // Failover: the table stops naming the dead member.
    cluster
        .wait_safe(2, std::time::Duration::from_secs(60))
        .await;
    let seed = cluster.endpoints().join(",");
    let o = Command::new(bin("distcache"))
        .args(["--endpoints", &seed, "cluster", "--json"])
        .output()
        .expect("run distcache");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{v}");
    let m = members
        .iter()
        .find(|m| m["name"] == dead.as_str())
        .unwrap_or_else(|| panic!("{dead} not listed: {v}"));
    assert_eq!(m["alive"], false, "{v}");
    assert_eq!(m["primaries"], 0, "{v}");
    assert_eq!(
        members.iter().filter(|m| m["alive"] == true).count(),
        2,
        "{v}"
    );
}

/// The child processes of `pid` (from every one of its threads).
fn member_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    out
}

/// Threads of `pid` named like tokio's runtime threads.
fn runtime_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "tokio-rt-worker")
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn local_members_die_with_a_killed_launcher() {
    // A base port whose neighbours (base+1, base+1000, base+1001) are free too.
    let base = (0..50)
        .map(|_| distcache_e2e::free_port())
        .find(|p| {
            *p < 60_000
                && [1u16, 1000, 1001]
                    .iter()
                    .all(|d| std::net::TcpListener::bind(("127.0.0.1", p + d)).is_ok())
        })
        .expect("a free port range");
    let dir = std::env::temp_dir().join(format!("dc-local-orphans-{}", std::process::id()));
    let mut launcher = Command::new(bin("distcache-node"))
        .args(["local", "--nodes", "2", "--base-port", &base.to_string()])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start local");
    let addrs: Vec<std::net::SocketAddr> = [base, base + 1]
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().expect("addr"))
        .collect();
    for a in &addrs {
        assert!(
            distcache_e2e::wait_listening(*a, std::time::Duration::from_secs(20)),
            "member {a} did not start"
        );
    }
    // Each member's runtime gets the machine's CPUs shared among the two
    // members (at least one thread), so the members do not oversubscribe.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let each = (cpus / 2).max(1);
    let members = member_pids(launcher.id());
    assert_eq!(members.len(), 2, "members of the launcher: {members:?}");
    for pid in &members {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(&format!("--worker-threads {each} ")),
            "member {pid} started without --worker-threads {each}: {cmdline}"
        );
        // Runtime threads: the workers (blocking-pool threads, named alike,
        // leave after 10 s idle).
        let end = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let mut workers = runtime_threads(*pid);
        while workers != each && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(250));
            workers = runtime_threads(*pid);
        }
        assert_eq!(workers, each, "runtime threads of member {pid}");
    }
    launcher.kill().expect("kill -9 the launcher");
    let _ = launcher.wait();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut alive: Vec<_> = addrs.clone();
    while !alive.is_empty() && std::time::Instant::now() < end {
        alive.retain(|a| {
            std::net::TcpStream::connect_timeout(a, std::time::Duration::from_millis(200)).is_ok()
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        alive.is_empty(),
        "orphaned members still listening: {alive:?}"
    );
}

#[test]
fn atomic_commands_put_if_absent_cas_and_incr() {
    let node = NodeProcess::start(&[]);
    let o = cli(&node, &["put-if-absent", "job", "me"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = cli(&node, &["put-if-absent", "job", "you"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "exists");
    let o = cli(&node, &["cas", "job", "you", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "not swapped");
    assert_eq!(
        cli(&node, &["cas", "job", "me", "you"]).status.code(),
        Some(0)
    );
    assert_eq!(stdout(&cli(&node, &["get", "job"])), "you");
    assert_eq!(stdout(&cli(&node, &["incr", "n"])).trim(), "1");
    assert_eq!(
        stdout(&cli(&node, &["incr", "--by", "-5", "n"])).trim(),
        "-4"
    );
    let o = cli(&node, &["incr", "job"]);
    assert_eq!(o.status.code(), Some(3), "not an integer");
}
