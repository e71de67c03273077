//! Private network namespaces for fault tests: a test re-runs itself inside
//! a namespace it creates (`ip netns`, needs root), where members listen on
//! 127.0.0.x addresses and `ip rule ... blackhole` cuts traffic between
//! pairs of them. Only the namespace's own loopback receives traffic.

use std::process::Command;

const INSIDE: &str = "DISTCACHE_NETNS_INSIDE";

/// Member addresses inside a test's namespace (the client stays on
/// 127.0.0.1, never cut).
pub const IPS: [&str; 5] = [
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.4",
    "127.0.0.5",
    "127.0.0.6",
];

/// Runs `ip` with `args`; true on success.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(ip(args), "ip {args:?} failed");
}

/// Cuts (`on`) or heals traffic between addresses `a` and `b`, both ways.
pub fn cut(a: &str, b: &str, on: bool) {
    cut_one_way(a, b, on);
    cut_one_way(b, a, on);
}

/// Drops (`on`) or lets through again the packets from `from` to `to` only:
/// a one-way cut (the other direction still flows; over TCP, data already
/// in flight still arrives while its acknowledgements are lost).
pub fn cut_one_way(from: &str, to: &str, on: bool) {
    let verb = if on { "add" } else { "del" };
    must(&[
        "rule",
        verb,
        "pref",
        "10",
        "from",
        from,
        "to",
        to,
        "blackhole",
    ]);
}

/// Runs the test function `name` of the current test executable inside a
/// fresh namespace (`scenario` is run there, on a 4-thread runtime); fails
/// with one clear line where namespaces cannot be created.
pub fn run<F, Fut>(name: &str, scenario: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if std::env::var_os(INSIDE).is_some() {
        must(&["link", "set", "lo", "up"]);
        // Local routes after the blackhole rules, so the rules apply on loopback.
        must(&["rule", "add", "pref", "100", "lookup", "local"]);
        must(&["rule", "del", "pref", "0"]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(scenario());
        return;
    }
    let ns = format!("dc-{}-{}", std::process::id(), name.len());
    if !ip(&["netns", "add", &ns]) {
        panic!(
            "cannot create a network namespace (needs root and iproute2): {name} cannot run here"
        );
    }
    let exe = std::env::current_exe().expect("test exe");
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .status();
    let _ = ip(&["netns", "del", &ns]);
    assert!(
        status.expect("run inside the namespace").success(),
        "{name} failed inside its namespace"
    );
}

/// How many times to run a scenario: `DISTCACHE_FAULT_REPEAT` (default 1;
/// CI runs each once, repeated runs are reported in closing notes).
pub fn repeat() -> usize {
    std::env::var("DISTCACHE_FAULT_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}
