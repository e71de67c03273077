//! `loadgen`: drives a distcache cluster (and, on the same run, Redis) with N
//! concurrent callers for S seconds and prints one JSON line per target, then
//! the ratio.
//!
//! Ops: `get` (keys preloaded), `put`, `mixed` (90 % get / 10 % put),
//! `batch` (get of K keys at once: distcache `get_many`, Redis a pipeline of
//! K GETs; on a Redis Cluster the K GETs are sent at once on the multiplexed
//! cluster connection, since a pipeline may not span slots). Ops are counted
//! per key, so a batch of 16 counts 16.
//! Redis is driven with one connection per caller (like `redis-benchmark -c N`),
//! or with `--redis-shared` through one multiplexed connection shared by every
//! caller (what redis-rs recommends).
//!
//! Closed loop by default (each caller starts its next op when the last one
//! ends: peak throughput). `--rate R` is open loop: a pacer thread releases
//! R ops per second in total, evenly spaced (released in ticks of 100 µs),
//! round robin over the callers, and each op is timed
//! from its release, so time queued behind a slow answer counts (no
//! coordinated omission). Ops released but not started by the end of the
//! window are reported as `unstarted` (the target fell behind the rate).
//!
//! `--batch-keys partition` draws each batch's keys from one partition (one
//! owner answers it, as one node answers each pipeline of
//! `redis-benchmark --cluster -P N`); Redis targets get the same key groups,
//! each named with one hash tag (one slot), sent as one pipeline.
//!
//! `--cpu-pids` / `--redis-cpu-pids` name the server processes of each target
//! (Linux): their CPU time (user + system, every thread) over the timed
//! window is reported per op (`server_cpu_us_per_op`), a steadier measure
//! than peak throughput on a shared machine, and compared in the last line
//! (`cpu_ratio`: distcache's CPU per op over the peer's). Every line also
//! reports the generator's own CPU per op (`loadgen_cpu_us_per_op`, the
//! pacer included): on a machine the servers share with it, that is CPU
//! they did not get. `--threads 1` runs the generator on one thread (fewer
//! cross-thread wake-ups, about a third less CPU per op at moderate rates).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use distcache_client::partition::{DEFAULT_COLLECTION, DEFAULT_PARTITION_COUNT, partition_for};
use distcache_client::{Client, ClientConfig};
use hdrhistogram::Histogram;
use redis::AsyncCommands;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Op {
    Get,
    Put,
    Mixed,
    Batch,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BatchKeys {
    Any,
    Partition,
}

/// Load generator for distcache (with Redis side by side).
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen")]
struct Args {
    /// distcache seed endpoints, HOST:PORT[,...].
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7100")]
    endpoints: Vec<String>,
    /// Operation mix.
    #[arg(long, value_enum, default_value = "get")]
    op: Op,
    /// Keys per batch (op batch).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Which keys one batch takes (op batch): `any` key, or keys of one
    /// `partition` (one owner answers the whole batch, as one node answers
    /// each of `redis-benchmark --cluster -P N`'s pipelines; the Redis
    /// targets get the same groups as one hash-tagged slot each).
    #[arg(long, value_enum, default_value = "any")]
    batch_keys: BatchKeys,
    /// Concurrent callers.
    #[arg(long, default_value_t = 50)]
    callers: usize,
    /// Seconds per target.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Value size, bytes.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Key space.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// A single Redis server to compare with.
    #[arg(long, conflicts_with = "redis_cluster")]
    redis: Option<String>,
    /// A Redis Cluster (seed nodes) to compare with.
    #[arg(long, value_delimiter = ',')]
    redis_cluster: Option<Vec<String>>,
    /// Skip distcache (measure only Redis).
    #[arg(long)]
    redis_only: bool,
    /// Every Redis caller shares one multiplexed connection.
    #[arg(long)]
    redis_shared: bool,
    /// Open loop: this many ops per second in total (0 = closed loop, as
    /// fast as the callers go).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// distcache's server processes: report their CPU time per op.
    #[arg(long, value_delimiter = ',')]
    cpu_pids: Vec<u32>,
    /// The Redis servers' processes: report their CPU time per op.
    #[arg(long, value_delimiter = ',')]
    redis_cpu_pids: Vec<u32>,
    /// The generator's own runtime threads: 0 = one per CPU (tokio's
    /// multi-threaded default); 1 = one thread (fewer cross-thread
    /// wake-ups, so less of a shared machine's CPU taken from the servers
    /// at moderate `--rate`s).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Adds a `timeline` to the report: per window of this many
    /// milliseconds (by the op's start, or its release in open loop), the
    /// ops, how many took over 1 ms, and the slowest in µs (0 = off).
    #[arg(long, default_value_t = 0)]
    timeline_ms: u64,
    /// Runs the load (at `--rate`, if given) this many seconds before the
    /// timed `--secs`, and does not count them: connections, buffers and
    /// the servers' threads are warm when timing starts.
    #[arg(long, default_value_t = 0.0)]
    warmup_secs: f64,
}

/// Per window of the run: ops, ops over 1 ms, the slowest (µs).
#[derive(Debug, Clone, Default)]
struct Timeline(Vec<[u64; 3]>);

impl Timeline {
    fn slot(&mut self, window: usize) -> &mut [u64; 3] {
        if self.0.len() <= window {
            self.0.resize(window + 1, [0; 3]);
        }
        &mut self.0[window]
    }

    fn record(&mut self, window: usize, us: u64) {
        let w = self.slot(window);
        w[0] += 1;
        w[1] += u64::from(us > 1_000);
        w[2] = w[2].max(us);
    }

    fn add(&mut self, other: &Timeline) {
        for (i, o) in other.0.iter().enumerate() {
            let w = self.slot(i);
            w[0] += o[0];
            w[1] += o[1];
            w[2] = w[2].max(o[2]);
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times: Linux's USER_HZ,
/// which is 100 on every architecture (the kernel converts to it).
const USER_HZ: f64 = 100.0;

/// User + system CPU ticks of a process (every thread, live or exited),
/// from the text of `/proc/<pid>/stat`. The command name may hold spaces
/// and parentheses, so fields are counted after its closing `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Summed CPU ticks of `pids` now.
fn cpu_now(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        total += cpu_ticks(&stat).with_context(|| format!("unexpected format of {path}"))?;
    }
    Ok(total)
}

/// One caller's connection.
enum Conn {
    Distcache(Client),
    Redis(redis::aio::MultiplexedConnection),
    RedisCluster(redis::cluster_async::ClusterConnection),
}

fn key(i: u64) -> String {
    format!("key:{i:08}")
}

/// The key space as one target names it. With `--batch-keys partition` a
/// batch draws its keys from one group: the keys distcache places in one
/// partition; a Redis target names them with that partition as a hash tag
/// (`{17}key:00000042`), so each group is one slot there.
struct KeySpace {
    tagged: bool,
    partitions: u32,
    /// Key indexes by partition, empty ones left out (`--batch-keys
    /// partition` only).
    groups: Vec<Vec<u64>>,
}

impl KeySpace {
    fn new(args: &Args, partitions: u32, redis: bool) -> KeySpace {
        let grouped = args.op == Op::Batch && args.batch_keys == BatchKeys::Partition;
        let mut space = KeySpace {
            tagged: grouped && redis,
            partitions: partitions.max(1),
            groups: Vec::new(),
        };
        if grouped {
            let mut groups = vec![Vec::new(); space.partitions as usize];
            for i in 0..args.keys {
                groups[space.partition(i) as usize].push(i);
            }
            groups.retain(|g| !g.is_empty());
            space.groups = groups;
        }
        space
    }

    fn partition(&self, i: u64) -> u32 {
        partition_for(DEFAULT_COLLECTION, key(i).as_bytes(), self.partitions)
    }

    fn name(&self, i: u64) -> String {
        if self.tagged {
            format!("{{{}}}{}", self.partition(i), key(i))
        } else {
            key(i)
        }
    }

    /// The keys of one batch of `n`.
    fn batch(&self, rng: &mut Rng, n: usize, keys: u64) -> Vec<String> {
        if self.groups.is_empty() {
            return (0..n).map(|_| self.name(rng.next(keys))).collect();
        }
        let group = &self.groups[rng.next(self.groups.len() as u64) as usize];
        (0..n)
            .map(|_| self.name(group[rng.next(group.len() as u64) as usize]))
            .collect()
    }
}

/// xorshift64*: a cheap per-caller key picker.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

impl Conn {
    /// Runs one operation; returns how many keys it covered.
    async fn run(
        &mut self,
        op: Op,
        rng: &mut Rng,
        args: &Args,
        space: &KeySpace,
        value: &Bytes,
    ) -> anyhow::Result<u64> {
        let op = match op {
            Op::Mixed if rng.next(10) == 0 => Op::Put,
            Op::Mixed => Op::Get,
            other => other,
        };
        match op {
            Op::Get | Op::Mixed => {
                let k = key(rng.next(args.keys));
                match self {
                    Conn::Distcache(c) => {
                        c.get(&k).await?;
                    }
                    Conn::Redis(r) => {
                        let _: Option<Vec<u8>> = r.get(&k).await?;
                    }
                    Conn::RedisCluster(r) => {
                        let _: Option<Vec<u8>> = r.get(&k).await?;
                    }
                }
                Ok(1)
            }
            Op::Put => {
                let k = key(rng.next(args.keys));
                match self {
                    Conn::Distcache(c) => c.put(&k, value.clone()).await?,
                    Conn::Redis(r) => r.set::<_, _, ()>(&k, value.as_ref()).await?,
                    Conn::RedisCluster(r) => r.set::<_, _, ()>(&k, value.as_ref()).await?,
                }
                Ok(1)
            }
            Op::Batch => {
                let keys = space.batch(rng, args.batch, args.keys);
                match self {
                    Conn::Distcache(c) => {
                        c.default_collection().get_many(&keys).await?;
                    }
                    Conn::Redis(r) => {
                        let mut p = redis::pipe();
                        for k in &keys {
                            p.get(k);
                        }
                        let _: Vec<Option<Vec<u8>>> = p.query_async(r).await?;
                    }
                    Conn::RedisCluster(r) if space.tagged => {
                        // One slot: one pipeline to its node.
                        let mut p = redis::pipe();
                        for k in &keys {
                            p.get(k);
                        }
                        let _: Vec<Option<Vec<u8>>> = p.query_async(r).await?;
                    }
                    Conn::RedisCluster(r) => {
                        // Keys span slots: issue them at once on the
                        // multiplexed cluster connection (it pipelines per node).
                        let gets = keys.iter().map(|k| {
                            let mut r = r.clone();
                            async move { r.get::<_, Option<Vec<u8>>>(k).await }
                        });
                        for res in futures::future::join_all(gets).await {
                            res?;
                        }
                    }
                }
                Ok(args.batch as u64)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Distcache,
    Redis,
    RedisCluster,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Distcache => "distcache",
            Target::Redis => "redis",
            Target::RedisCluster => "redis-cluster",
        }
    }
}

async fn connect(target: Target, args: &Args, shared: Option<&Client>) -> anyhow::Result<Conn> {
    Ok(match target {
        Target::Distcache => match shared {
            Some(c) => Conn::Distcache(c.clone()),
            None => bail!("no distcache client"),
        },
        Target::Redis => {
            let addr = args.redis.as_deref().unwrap_or_default();
            let client = redis::Client::open(format!("redis://{addr}/"))?;
            Conn::Redis(client.get_multiplexed_async_connection().await?)
        }
        Target::RedisCluster => {
            let nodes: Vec<String> = args
                .redis_cluster
                .iter()
                .flatten()
                .map(|a| format!("redis://{a}/"))
                .collect();
            let client = redis::cluster::ClusterClient::new(nodes)?;
            Conn::RedisCluster(client.get_async_connection().await?)
        }
    })
}

async fn preload(
    conn: &mut Conn,
    args: &Args,
    space: &KeySpace,
    value: &Bytes,
) -> anyhow::Result<()> {
    let chunk = 500u64;
    let mut start = 0;
    while start < args.keys {
        let end = (start + chunk).min(args.keys);
        match conn {
            Conn::Distcache(c) => {
                c.default_collection()
                    .put_many((start..end).map(|i| (space.name(i), value.clone())), None)
                    .await?
            }
            Conn::Redis(r) => {
                let mut p = redis::pipe();
                for i in start..end {
                    p.set(space.name(i), value.as_ref()).ignore();
                }
                p.query_async::<()>(r).await?;
            }
            Conn::RedisCluster(r) => {
                for i in start..end {
                    r.set::<_, _, ()>(space.name(i), value.as_ref()).await?;
                }
            }
        }
        start = end;
    }
    Ok(())
}

struct Outcome {
    ops: u64,
    errors: u64,
    /// Open loop: ops released in the window that had not started by its end.
    unstarted: u64,
    hist: Histogram<u64>,
    elapsed: Duration,
    /// CPU ticks the target's server processes used in the timed window
    /// (`None`: no processes named).
    server_ticks: Option<u64>,
    /// CPU ticks this generator used in the timed window (every thread,
    /// the pacer's too).
    own_ticks: u64,
    timeline: Timeline,
}

/// The pacer's granularity: it wakes at most once per tick and releases
/// every op due by then (a wake-up per op would cost the machine more CPU
/// than the ops at high rates; tokio's 1 ms timer wheel released a whole
/// millisecond's ops at once).
const PACER_TICK: Duration = Duration::from_micros(100);

/// The pacer (open loop): releases op k at `start + k / rate` (or within
/// [`PACER_TICK`] after), until `deadline`: each wake-up sends one message,
/// the release time and the range of ops it releases, to [`dispatch`] in
/// the runtime (one cross-thread wake-up per tick, not one per caller).
fn pace(
    start: Instant,
    deadline: Instant,
    rate: f64,
    out: &tokio::sync::mpsc::UnboundedSender<(Instant, u64, u64)>,
) {
    let due = |k: u64| start + Duration::from_secs_f64(k as f64 / rate);
    let mut k: u64 = 0;
    while due(k) < deadline {
        let now = Instant::now();
        if due(k) > now {
            std::thread::sleep((due(k) - now).max(PACER_TICK));
            continue;
        }
        let released = Instant::now();
        let from = k;
        while due(k) <= released && due(k) < deadline {
            k += 1;
        }
        if out.send((released, from, k)).is_err() {
            return;
        }
    }
}

/// Hands ops `from..to`, released at `released`, to their callers: op k to
/// caller `k mod callers` (a caller that ended, on an error, just misses
/// its ops).
fn release(
    callers: &[tokio::sync::mpsc::UnboundedSender<Instant>],
    (released, from, to): (Instant, u64, u64),
) {
    for k in from..to {
        let _ = callers[(k % callers.len() as u64) as usize].send(released);
    }
}

/// In the runtime: passes the pacer's releases on to the callers (wake-ups
/// within the runtime cost no system call).
async fn dispatch(
    mut from_pacer: tokio::sync::mpsc::UnboundedReceiver<(Instant, u64, u64)>,
    callers: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>,
) {
    while let Some(r) = from_pacer.recv().await {
        release(&callers, r);
    }
}

async fn drive(
    target: Target,
    args: &Args,
    value: &Bytes,
    pids: &[u32],
) -> anyhow::Result<Outcome> {
    let shared = match target {
        Target::Distcache => Some(
            Client::with_config(ClientConfig::new(args.endpoints.clone()))
                .await
                .context("connecting to distcache")?,
        ),
        _ => None,
    };
    let space = std::sync::Arc::new(KeySpace::new(
        args,
        shared
            .as_ref()
            .map_or(DEFAULT_PARTITION_COUNT, Client::partition_count),
        shared.is_none(),
    ));
    let mut first = connect(target, args, shared.as_ref()).await?;
    if args.op != Op::Put {
        preload(&mut first, args, &space, value)
            .await
            .context("preload")?;
    }
    let mut conns: Vec<Conn> = Vec::with_capacity(args.callers);
    for _ in 1..args.callers {
        let c = match (&first, args.redis_shared) {
            (Conn::Redis(r), true) => Conn::Redis(r.clone()),
            (Conn::RedisCluster(r), true) => Conn::RedisCluster(r.clone()),
            _ => connect(target, args, shared.as_ref()).await?,
        };
        conns.push(c);
    }
    conns.insert(0, first);
    // Warm-up, untimed: each caller runs its op once (connections, routing
    // tables, and for a cluster that just formed the partitions' first
    // writes after their primaries moved), for every target alike.
    let mut rng = Rng(0x5EED);
    for conn in &mut conns {
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            conn.run(args.op, &mut rng, args, &space, value),
        )
        .await;
    }
    // Every caller is set up (its histogram allocated, its task running)
    // before the clock starts: set-up inside the timed window would count
    // as the target's latency (it showed as ~100 ms of multi-ms ops at the
    // start of every open-loop run).
    let ready = std::sync::Arc::new(tokio::sync::Barrier::new(args.callers + 1));
    let (go, window) = tokio::sync::watch::channel(None::<(Instant, Instant)>);
    let (ticket_txs, mut tickets): (Vec<_>, Vec<_>) = if args.rate > 0.0 {
        (0..args.callers)
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
                (tx, Some(rx))
            })
            .unzip()
    } else {
        (Vec::new(), Vec::new())
    };
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let value = value.clone();
        let args = args.clone();
        let space = space.clone();
        let ready = ready.clone();
        let mut window = window.clone();
        let mut ticket = tickets.get_mut(i).and_then(Option::take);
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1000_0001));
            let (mut ops, mut errors, mut unstarted) = (0u64, 0u64, 0u64);
            let mut timeline = Timeline::default();
            ready.wait().await;
            let (start, deadline) = match *window.wait_for(Option::is_some).await? {
                Some(w) => w,
                None => bail!("no start time"),
            };
            loop {
                let t0 = match ticket.as_mut() {
                    // Timed from its release: time spent queued behind a
                    // slow answer counts (no coordinated omission); the
                    // pacer's own lateness does not.
                    Some(rx) => match rx.recv().await {
                        Some(released) => released,
                        None => break,
                    },
                    None => Instant::now(),
                };
                if Instant::now() >= deadline {
                    // Released but not started in the window: the target
                    // fell behind the rate.
                    unstarted += 1;
                    if let Some(rx) = ticket.as_mut() {
                        while rx.try_recv().is_ok() {
                            unstarted += 1;
                        }
                    }
                    break;
                }
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    conn.run(args.op, &mut rng, &args, &space, &value),
                )
                .await
                {
                    // Warm-up: run, not counted.
                    Ok(Ok(_)) if t0 < start => {}
                    Ok(Ok(n)) => {
                        ops += n;
                        let us = t0.elapsed().as_micros() as u64;
                        hist.saturating_record(us);
                        let at = t0.saturating_duration_since(start).as_millis() as u64;
                        if let Some(window) = at.checked_div(args.timeline_ms) {
                            timeline.record(window as usize, us);
                        }
                    }
                    _ if t0 < start => {}
                    _ => errors += 1,
                }
            }
            if ticket.is_none() {
                unstarted = 0;
            }
            anyhow::Ok((ops, errors, unstarted, hist, timeline))
        }));
    }
    ready.wait().await;
    let warm = Instant::now();
    let start = warm + Duration::from_secs_f64(args.warmup_secs);
    let deadline = start + Duration::from_secs(args.secs);
    // Open loop: a pacer thread releases the ops at their times, round
    // robin over the callers; each op is timed from its release.
    let pacer = if args.rate > 0.0 {
        let rate = args.rate;
        let (to_dispatch, from_pacer) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(dispatch(from_pacer, ticket_txs));
        Some(
            std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || pace(warm, deadline, rate, &to_dispatch))
                .context("starting the pacer thread")?,
        )
    } else {
        None
    };
    go.send_replace(Some((start, deadline)));
    tokio::time::sleep_until(start.into()).await;
    let cpu_before = if pids.is_empty() {
        None
    } else {
        Some(cpu_now(pids)?)
    };
    let own_before = cpu_now(&[std::process::id()])?;
    let mut out = Outcome {
        ops: 0,
        errors: 0,
        unstarted: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        elapsed: Duration::ZERO,
        server_ticks: None,
        own_ticks: 0,
        timeline: Timeline::default(),
    };
    for t in tasks {
        let (ops, errors, unstarted, hist, timeline) = t.await??;
        out.timeline.add(&timeline);
        out.ops += ops;
        out.errors += errors;
        out.unstarted += unstarted;
        out.hist.add(&hist)?;
    }
    out.elapsed = start.elapsed();
    out.own_ticks = cpu_now(&[std::process::id()])?.saturating_sub(own_before);
    if let Some(pacer) = pacer
        && pacer.join().is_err()
    {
        bail!("the pacer thread panicked");
    }
    if let Some(before) = cpu_before {
        out.server_ticks = Some(cpu_now(pids)?.saturating_sub(before));
    }
    Ok(out)
}

/// Prints the target's JSON line; returns its ops/s and server CPU µs per op.
fn report(target: Target, args: &Args, o: &Outcome) -> anyhow::Result<(f64, Option<f64>)> {
    let secs = o.elapsed.as_secs_f64().max(1e-9);
    let ops_per_sec = o.ops as f64 / secs;
    // Server CPU seconds in the window, then per op and per second.
    let cpu_secs = o.server_ticks.map(|t| t as f64 / USER_HZ);
    let cpu_us_per_op = cpu_secs.map(|c| c * 1e6 / o.ops.max(1) as f64);
    let round1 = |x: f64| (x * 10.0).round() / 10.0;
    let mut line = serde_json::json!({
        "target": target.name(),
        "op": format!("{:?}", args.op).to_lowercase(),
        "callers": args.callers,
        "batch": if args.op == Op::Batch { args.batch } else { 1 },
        "value_bytes": args.value_bytes,
        "secs": o.elapsed.as_secs_f64(),
        "rate": if args.rate > 0.0 { serde_json::json!(args.rate) } else { serde_json::json!("closed-loop") },
        "redis_conn": if args.redis_shared { "shared" } else { "per-caller" },
        "ops": o.ops,
        "ops_per_sec": ops_per_sec.round(),
        "p50_us": o.hist.value_at_quantile(0.50),
        "p99_us": o.hist.value_at_quantile(0.99),
        "p999_us": o.hist.value_at_quantile(0.999),
        "errors": o.errors,
    });
    if args.rate > 0.0 {
        line["unstarted"] = serde_json::json!(o.unstarted);
    }
    line["loadgen_cpu_us_per_op"] = serde_json::json!(round1(
        o.own_ticks as f64 / USER_HZ * 1e6 / o.ops.max(1) as f64
    ));
    if args.timeline_ms > 0 {
        line["timeline"] = serde_json::json!(o.timeline.0);
    }
    if let (Some(cpu), Some(per_op)) = (cpu_secs, cpu_us_per_op) {
        line["server_cpu_us_per_op"] = serde_json::json!(round1(per_op));
        line["server_cpu_cores"] = serde_json::json!(round1(cpu / secs));
    }
    emit(&line)?;
    Ok((ops_per_sec, cpu_us_per_op))
}

/// Prints one JSON line; a closed stdout (say `| head -1`) ends the run
/// quietly, as a Unix tool does on SIGPIPE.
fn emit(line: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => r.context("writing the report to stdout"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.callers == 0 || args.secs == 0 || args.batch == 0 {
        bail!("--callers, --secs and --batch must be positive");
    }
    if !(0.0..=3600.0).contains(&args.warmup_secs) {
        bail!("--warmup-secs must be between 0 and 3600");
    }
    // Each caller keeps one timeline slot per window of the timed run.
    if args.timeline_ms > 0 && args.secs.saturating_mul(1000) / args.timeline_ms > 100_000 {
        bail!("--timeline-ms is too fine for --secs: at most 100,000 windows");
    }
    let runtime = runtime(args.threads).context("starting the runtime")?;
    runtime.block_on(run(args))
}

/// The generator's runtime: `--threads` 0 is tokio's multi-threaded
/// default (a worker per CPU), 1 a single-threaded runtime, N that many
/// workers.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let value = Bytes::from(vec![b'x'; args.value_bytes]);
    let ours = if args.redis_only {
        None
    } else {
        let o = drive(Target::Distcache, &args, &value, &args.cpu_pids).await?;
        Some(report(Target::Distcache, &args, &o)?)
    };
    let peer = if args.redis.is_some() {
        Some(Target::Redis)
    } else if args.redis_cluster.is_some() {
        Some(Target::RedisCluster)
    } else {
        None
    };
    if let Some(peer) = peer {
        let o = drive(peer, &args, &value, &args.redis_cpu_pids).await?;
        let (theirs, their_cpu) = report(peer, &args, &o)?;
        if let Some((ours, our_cpu)) = ours
            && theirs > 0.0
        {
            let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
            let mut line = serde_json::json!({
                "op": format!("{:?}", args.op).to_lowercase(),
                "peer": peer.name(),
                "ratio": round3(ours / theirs),
            });
            if let (Some(ours), Some(theirs)) = (our_cpu, their_cpu)
                && theirs > 0.0
            {
                line["cpu_ratio"] = serde_json::json!(round3(ours / theirs));
            }
            emit(&line)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Args, BatchKeys, KeySpace, Rng, Timeline, cpu_ticks, key, runtime};
    use clap::Parser;
    use distcache_client::partition::{DEFAULT_COLLECTION, partition_for};

    fn args(extra: &[&str]) -> Args {
        let base = ["loadgen", "--op", "batch", "--keys", "2000"];
        Args::parse_from(base.iter().chain(extra))
    }

    #[test]
    fn a_timeline_counts_ops_slow_ops_and_the_slowest_per_window_and_merges() {
        let mut a = Timeline::default();
        a.record(0, 200);
        a.record(0, 1_500);
        a.record(2, 1_000);
        assert_eq!(a.0, vec![[2, 1, 1_500], [0, 0, 0], [1, 0, 1_000]]);
        let mut b = Timeline::default();
        b.record(1, 3_000);
        b.record(3, 5);
        b.record(0, 700);
        a.add(&b);
        assert_eq!(
            a.0,
            vec![[3, 1, 1_500], [1, 1, 3_000], [1, 0, 1_000], [1, 0, 5]]
        );
        let parsed = args(&["--timeline-ms", "50", "--warmup-secs", "1.5"]);
        assert_eq!((parsed.timeline_ms, parsed.warmup_secs), (50, 1.5));
    }

    #[test]
    fn a_partition_batch_takes_keys_of_one_partition_named_alike_on_redis() {
        let a = args(&["--batch-keys", "partition"]);
        assert_eq!(a.batch_keys, BatchKeys::Partition);
        let ours = KeySpace::new(&a, 271, false);
        let redis = KeySpace::new(&a, 271, true);
        let grouped: usize = ours.groups.iter().map(Vec::len).sum();
        assert_eq!(grouped, 2000, "every key in exactly one group");
        let mut rng = Rng(7);
        for _ in 0..50 {
            let batch = ours.batch(&mut rng, 16, a.keys);
            assert_eq!(batch.len(), 16);
            let parts: std::collections::BTreeSet<u32> = batch
                .iter()
                .map(|k| partition_for(DEFAULT_COLLECTION, k.as_bytes(), 271))
                .collect();
            assert_eq!(parts.len(), 1, "{batch:?} spans partitions {parts:?}");
        }
        for _ in 0..50 {
            let batch = redis.batch(&mut rng, 16, a.keys);
            let tags: std::collections::BTreeSet<&str> = batch
                .iter()
                .map(|k| &k[..k.find('}').map_or(0, |i| i + 1)])
                .collect();
            assert_eq!(tags.len(), 1, "{batch:?} spans hash tags");
            assert!(batch[0].starts_with('{'), "{batch:?} has no hash tag");
        }
        // The Redis name of key i carries key i's distcache partition.
        let i = 42;
        let p = partition_for(DEFAULT_COLLECTION, key(i).as_bytes(), 271);
        assert_eq!(redis.name(i), format!("{{{p}}}{}", key(i)));
    }

    #[test]
    fn threads_picks_the_runtime_one_thread_or_n_workers() {
        use tokio::runtime::RuntimeFlavor;
        assert_eq!(args(&[]).threads, 0, "tokio's default unless asked");
        assert_eq!(args(&["--threads", "1"]).threads, 1);
        let one = runtime(1).expect("runtime");
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let three = runtime(3).expect("runtime");
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(runtime(0).expect("runtime").metrics().num_workers(), cpus);
    }

    #[test]
    fn the_pacer_releases_rate_times_window_ops_round_robin_and_in_order() {
        let (txs, mut rxs): (Vec<_>, Vec<_>) = (0..3)
            .map(|_| tokio::sync::mpsc::unbounded_channel::<std::time::Instant>())
            .unzip();
        let start = std::time::Instant::now();
        let deadline = start + std::time::Duration::from_millis(200);
        let (out, mut ranges) = tokio::sync::mpsc::unbounded_channel();
        super::pace(start, deadline, 1000.0, &out);
        drop(out);
        let mut next = 0;
        while let Ok(r) = ranges.try_recv() {
            assert_eq!(r.1, next, "ranges follow each other");
            assert!(r.2 > r.1, "a tick releases at least one op");
            next = r.2;
            super::release(&txs, r);
        }
        drop(txs);
        let mut all = Vec::new();
        let mut counts = Vec::new();
        for rx in &mut rxs {
            let mut n = 0;
            while let Ok(t) = rx.try_recv() {
                assert!(t >= start, "released before the start");
                all.push(t);
                n += 1;
            }
            counts.push(n);
        }
        // Ops 0..199 are due before the deadline: 67, 67, 66 by caller.
        assert_eq!(counts, vec![67, 67, 66]);
        all.sort();
        let span = all[all.len() - 1] - all[0];
        assert!(
            span >= std::time::Duration::from_millis(150),
            "releases spread over {span:?}, not the window"
        );
    }

    #[test]
    fn any_batch_keys_are_plain_names_over_several_partitions() {
        let a = args(&[]);
        assert_eq!(a.batch_keys, BatchKeys::Any);
        for space in [KeySpace::new(&a, 271, false), KeySpace::new(&a, 271, true)] {
            assert!(space.groups.is_empty());
            let batch = space.batch(&mut Rng(9), 16, a.keys);
            assert!(batch.iter().all(|k| k.starts_with("key:")), "{batch:?}");
            let parts: std::collections::BTreeSet<u32> = batch
                .iter()
                .map(|k| partition_for(DEFAULT_COLLECTION, k.as_bytes(), 271))
                .collect();
            assert!(parts.len() > 1, "{batch:?}");
        }
    }

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_with_odd_command_names() {
        let stat = "4242 (tokio (rt) x) S 1 2 3 0 -1 4194560 100 0 0 0 \
                    1234 567 8 9 20 0 3 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(1234 + 567));
        let plain = "7 (redis-server) R 1 7 7 0 -1 0 0 0 0 0 10 20 0 0 20 0 1 0 5 0 0";
        assert_eq!(cpu_ticks(plain), Some(30));
    }

    #[test]
    fn cpu_ticks_refuses_what_is_not_a_stat_line() {
        assert_eq!(cpu_ticks("no parenthesis here"), None);
        assert_eq!(cpu_ticks("1 (short) S 1 2"), None);
        assert_eq!(cpu_ticks("1 (bad) S 1 2 3 0 -1 0 0 0 0 0 x 20"), None);
    }
}
