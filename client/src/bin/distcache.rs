//! `distcache`: the command-line client.
//!
//! Exit codes: 0 ok; 1 key not found; 2 lock not acquired; 3 any other error,
//! usage errors included (one line on stderr).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use distcache_client::{Client, ClientConfig, ClientTls, CollectionOptions, Error, LockOptions};

/// Command-line client for a distcache cluster.
#[derive(Debug, Parser)]
#[command(name = "distcache", version)]
struct Cli {
    /// Seed endpoints, HOST:PORT[,...].
    #[arg(
        long,
        env = "DISTCACHE_ENDPOINTS",
        default_value = "127.0.0.1:7100",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Request timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Send every request through the seed endpoint, which forwards it to
    /// the key's owner (for `kubectl port-forward`, where the members'
    /// addresses are unreachable).
    #[arg(long, env = "DISTCACHE_GATEWAY")]
    gateway: bool,
    /// Bearer token (the node's users file names its SHA-256).
    #[arg(long, env = "DISTCACHE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connect with TLS, trusting this CA (PEM); implies TLS.
    #[arg(long, env = "DISTCACHE_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for nodes that require one; implies TLS.
    #[arg(long, env = "DISTCACHE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Key (PEM) of --tls-cert.
    #[arg(long, env = "DISTCACHE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Connect with TLS (with the system's roots unless --tls-ca).
    #[arg(long, env = "DISTCACHE_TLS")]
    tls: bool,
    /// Name to verify the nodes' certificates against (default: each address's host).
    #[arg(long, env = "DISTCACHE_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct Coll {
    /// Collection (default: the default collection).
    #[arg(long, short = 'c', default_value = "")]
    collection: String,
}

/// `distcache cluster` actions.
#[derive(Debug, Subcommand)]
enum ClusterAction {
    /// Declare MEMBER gone for good (its disk and process will not return):
    /// partitions whose in-sync replicas were all on it restart empty, and
    /// that is reported as data loss. Admin only.
    Forget {
        /// Member name.
        member: String,
    },
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Store VALUE under KEY (VALUE `-` reads it from stdin).
    Put {
        #[command(flatten)]
        c: Coll,
        /// Time to live, seconds (default: the collection's).
        #[arg(long)]
        ttl: Option<f64>,
        key: String,
        value: String,
    },
    /// Store VALUE under KEY only if KEY holds nothing (exit 1 if it does).
    PutIfAbsent {
        #[command(flatten)]
        c: Coll,
        /// Time to live, seconds (default: the collection's).
        #[arg(long)]
        ttl: Option<f64>,
        key: String,
        value: String,
    },
    /// Replace KEY's value EXPECTED with NEW (exit 1 if it was not EXPECTED).
    Cas {
        #[command(flatten)]
        c: Coll,
        key: String,
        expected: String,
        new: String,
    },
    /// Add --by (default 1) to the integer at KEY; prints the new value.
    Incr {
        #[command(flatten)]
        c: Coll,
        /// Amount added (negative to decrement).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
        key: String,
    },
    /// Print the value of KEY alone on stdout (exit 1 if not found).
    Get {
        #[command(flatten)]
        c: Coll,
        key: String,
    },
    /// Remove KEY (exit 1 if it was not there).
    Delete {
        #[command(flatten)]
        c: Coll,
        key: String,
    },
    /// List the keys of a collection, one per line.
    Keys {
        #[command(flatten)]
        c: Coll,
    },
    /// Print the number of entries of a collection.
    Size {
        #[command(flatten)]
        c: Coll,
    },
    /// Remove every entry of a collection; prints how many.
    Clear {
        #[command(flatten)]
        c: Coll,
    },
    /// List collections, one per line (`--json` for their settings).
    Collections {
        #[arg(long)]
        json: bool,
    },
    /// Create a collection (or show an existing one's settings).
    CreateCollection {
        name: String,
        /// Default time to live of entries, seconds.
        #[arg(long)]
        ttl: Option<f64>,
        /// Entry limit (LRU eviction beyond it).
        #[arg(long)]
        max_entries: Option<u64>,
    },
    /// Clear and remove a collection.
    DeleteCollection { name: String },
    /// Acquire lock KEY and print its fencing token; the lock stays held for
    /// --hold seconds after this command exits (exit 2 if not acquired).
    Lock {
        key: String,
        /// Lease length, seconds.
        #[arg(long)]
        hold: f64,
        /// How long to wait, seconds (0 = try once).
        #[arg(long, default_value_t = 30.0)]
        wait: f64,
    },
    /// Release lock KEY held with fencing token TOKEN.
    Unlock {
        key: String,
        #[arg(long)]
        token: u64,
    },
    /// Release lock KEY whoever holds it.
    ForceUnlock { key: String },
    /// Show the cluster: epoch, partition count, safety, members
    /// (`cluster forget MEMBER`: declare a member gone for good).
    Cluster {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<ClusterAction>,
    },
    /// Write increasing counters to KEYS keys for SECONDS, then read every
    /// key back; exit 1 if an acknowledged write is missing (a smoke test
    /// to run while pods are deleted, scaled or rolled).
    Verify {
        /// How long to write, seconds.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Distinct keys written.
        #[arg(long, default_value_t = 1000)]
        keys: u64,
        /// Key prefix (default: unique per run).
        #[arg(long)]
        prefix: Option<String>,
    },
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("invalid {what}: {s}"))
}

/// Outcomes that are answers, not failures.
enum Outcome {
    Ok,
    NotFound,
    /// A conditional write did not apply (exit 1, the reason on stderr).
    Refused(&'static str),
    LockNotAcquired,
    WritesLost(u64),
}

/// Writes counters for `duration`, then reads them back: (acknowledged,
/// failed, lost) with a few examples of lost keys.
async fn verify(
    client: &Client,
    duration: Duration,
    keys: u64,
    prefix: &str,
) -> (u64, u64, Vec<String>) {
    let keys = keys.max(1);
    let mut acked: Vec<Option<u64>> = vec![None; keys as usize];
    let mut attempted: Vec<u64> = vec![0; keys as usize];
    let (mut ok, mut failed) = (0u64, 0u64);
    let end = std::time::Instant::now() + duration;
    let mut seq = 0u64;
    while std::time::Instant::now() < end {
        seq += 1;
        let k = (seq % keys) as usize;
        attempted[k] = seq;
        match client.put(format!("{prefix}{k}"), seq.to_string()).await {
            Ok(()) => {
                acked[k] = Some(seq);
                ok += 1;
            }
            Err(_) => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut lost = Vec::new();
    for k in 0..keys as usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let got = loop {
            match client.get(format!("{prefix}{k}")).await {
                Ok(v) => break Ok(v),
                Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => break Err(e),
            }
        };
        let value = match got {
            Ok(v) => v.and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u64>().ok()),
            Err(e) => {
                lost.push(format!("{prefix}{k}: read failed: {e}"));
                continue;
            }
        };
        let fine = match (acked[k], value) {
            (Some(a), Some(v)) => v >= a && v <= attempted[k],
            (None, v) => v.is_none_or(|v| v <= attempted[k]),
            (Some(_), None) => false,
        };
        if !fine {
            lost.push(format!(
                "{prefix}{k}: acknowledged {:?}, read {value:?}",
                acked[k]
            ));
        }
    }
    (ok, failed, lost)
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let mut config = ClientConfig::new(cli.endpoints.clone())
        .request_timeout(secs(cli.timeout, "--timeout")?)
        .gateway(cli.gateway);
    config.max_retries = 2;
    if cli.tls || cli.tls_ca.is_some() || cli.tls_cert.is_some() {
        let mut tls = ClientTls::from_files(
            cli.tls_ca.as_deref(),
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
        )?;
        if let Some(name) = &cli.tls_server_name {
            tls = tls.server_name(name.clone());
        }
        config = config.tls(tls);
    }
    if let Some(t) = &cli.token {
        config = config.token(t.clone());
    }
    let client = Client::with_config(config).await?;
    let coll = |c: &Coll| -> distcache_client::Collection {
        if c.collection.is_empty() {
            client.default_collection()
        } else {
            // Data commands never create collections: an unknown one is an error.
            client.collection_handle(&c.collection)
        }
    };
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Put { c, ttl, key, value } => {
            let value = if value == "-" {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("reading stdin")?;
                buf
            } else {
                value.into_bytes()
            };
            let col = coll(&c);
            match ttl {
                Some(t) => col.put_with_ttl(key, value, secs(t, "--ttl")?).await?,
                None => col.put(key, value).await?,
            }
        }
        Cmd::PutIfAbsent { c, ttl, key, value } => {
            let ttl = ttl.map(|t| secs(t, "--ttl")).transpose()?;
            if !coll(&c).put_if_absent(key, value.into_bytes(), ttl).await? {
                return Ok(Outcome::Refused("exists"));
            }
        }
        Cmd::Cas {
            c,
            key,
            expected,
            new,
        } => {
            if !coll(&c)
                .compare_and_set(key, expected.into_bytes(), new.into_bytes(), None)
                .await?
            {
                return Ok(Outcome::Refused("not swapped"));
            }
        }
        Cmd::Incr { c, by, key } => writeln!(out, "{}", coll(&c).increment(key, by).await?)?,
        Cmd::Get { c, key } => match coll(&c).get(key).await? {
            Some(v) => out.write_all(&v)?,
            None => return Ok(Outcome::NotFound),
        },
        Cmd::Delete { c, key } => {
            if !coll(&c).delete(key).await? {
                return Ok(Outcome::NotFound);
            }
        }
        Cmd::Keys { c } => {
            for k in coll(&c).keys().await? {
                out.write_all(&k)?;
                out.write_all(b"\n")?;
            }
        }
        Cmd::Size { c } => writeln!(out, "{}", coll(&c).size().await?)?,
        Cmd::Clear { c } => writeln!(out, "{}", coll(&c).clear().await?)?,
        Cmd::Collections { json } => {
            let list = client.list_collections().await?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "default_ttl_ms": c.default_ttl_ms,
                            "max_entries": c.max_entries,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(v))?;
            } else {
                for c in list {
                    writeln!(out, "{}", c.name)?;
                }
            }
        }
        Cmd::CreateCollection {
            name,
            ttl,
            max_entries,
        } => {
            let mut opts = CollectionOptions::default();
            if let Some(t) = ttl {
                opts = opts.default_ttl(secs(t, "--ttl")?);
            }
            if let Some(n) = max_entries {
                opts = opts.max_entries(n);
            }
            let c = client.collection_with(&name, opts).await?;
            if let Some(s) = c.settings() {
                writeln!(
                    out,
                    "{} default_ttl_ms={} max_entries={}",
                    s.name, s.default_ttl_ms, s.max_entries
                )?;
            }
        }
        Cmd::DeleteCollection { name } => {
            if !client.delete_collection(&name).await? {
                return Ok(Outcome::NotFound);
            }
        }
        Cmd::Lock { key, hold, wait } => {
            let hold = secs(hold, "--hold")?;
            let guard = if wait == 0.0 {
                client.try_acquire_lock(&key, hold).await?
            } else {
                let opts = LockOptions::default()
                    .hold(hold)
                    .wait(secs(wait, "--wait")?);
                match client.acquire_lock(&key, opts).await {
                    Ok(g) => Some(g),
                    Err(Error::LockAcquireTimeout(_)) => None,
                    Err(e) => return Err(e.into()),
                }
            };
            match guard {
                Some(g) => writeln!(out, "{}", g.detach())?,
                None => return Ok(Outcome::LockNotAcquired),
            }
        }
        Cmd::Unlock { key, token } => client.release_lock_token(&key, token).await?,
        Cmd::ForceUnlock { key } => {
            if !client.force_release_lock(&key).await? {
                return Ok(Outcome::NotFound);
            }
        }
        Cmd::Verify {
            seconds,
            keys,
            prefix,
        } => {
            let prefix = prefix.unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                format!("verify-{}-{t}-", std::process::id())
            });
            let (ok, failed, lost) =
                verify(&client, secs(seconds, "--seconds")?, keys, &prefix).await;
            writeln!(
                out,
                "{ok} writes acknowledged, {failed} failed (retried), {} keys checked, {} lost",
                keys,
                lost.len()
            )?;
            for l in lost.iter().take(20) {
                writeln!(out, "lost: {l}")?;
            }
            if !lost.is_empty() {
                out.flush()?;
                return Ok(Outcome::WritesLost(lost.len() as u64));
            }
        }
        Cmd::Cluster {
            action: Some(ClusterAction::Forget { member }),
            ..
        } => {
            let lost = client.forget_member(&member).await?;
            println!("{member} forgotten; partitions restarted empty so far: {lost}");
        }
        Cmd::Cluster { json, action: None } => {
            let table = client.partition_table().await?;
            let health = client.health().await?;
            let mut primaries = std::collections::HashMap::<&str, u32>::new();
            let mut backups = std::collections::HashMap::<&str, u32>::new();
            for p in &table.partitions {
                *primaries.entry(p.primary.as_str()).or_default() += 1;
                for b in &p.backups {
                    *backups.entry(b.as_str()).or_default() += 1;
                }
            }
            // Every configured member (a failed one with alive: false, until
            // it is forgotten), then any the table still names besides.
            let mut listed = client.members().await?;
            for m in &table.members {
                if !listed.iter().any(|l| l.name == m.name) {
                    listed.push(m.clone());
                }
            }
            let members: Vec<_> = listed
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "name": m.name,
                        "address": m.address,
                        "alive": m.alive,
                        "primaries": primaries.get(m.name.as_str()).copied().unwrap_or(0),
                        "backups": backups.get(m.name.as_str()).copied().unwrap_or(0),
                    })
                })
                .collect();
            let v = serde_json::json!({
                "epoch": table.epoch,
                "partition_count": table.partition_count,
                "safe": health.safe,
                "quorum": health.quorum,
                "partitions_without_backup": health.partitions_without_backup,
                "migrations_running": health.migrations_running,
                "members": members,
            });
            if json {
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "epoch {}  partitions {}  safe {}  quorum {}",
                    table.epoch, table.partition_count, health.safe, health.quorum
                )?;
                for m in &members {
                    writeln!(
                        out,
                        "{:<24} {:<24} {:<5} primaries {:>4}  backups {:>4}",
                        m["name"].as_str().unwrap_or_default(),
                        m["address"].as_str().unwrap_or_default(),
                        if m["alive"].as_bool().unwrap_or(false) {
                            "alive"
                        } else {
                            "dead"
                        },
                        m["primaries"],
                        m["backups"]
                    )?;
                }
            }
        }
    }
    out.flush()?;
    Ok(Outcome::Ok)
}

/// A clap error's first paragraph on one line, without its "error: " prefix.
fn usage_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = first.join(" ");
    let line = line.trim_start_matches("error: ").trim();
    if line.is_empty() {
        "invalid usage (see --help)".to_string()
    } else {
        format!("{line} (see --help)")
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as usual and succeed.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // A usage error is an error like any other: one line, exit 3 (exit 2
        // means "lock not acquired").
        Err(e) => {
            eprintln!("error: {}", usage_line(&e));
            return ExitCode::from(3);
        }
    };
    match run(cli).await {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound) => {
            eprintln!("not found");
            ExitCode::from(1)
        }
        Ok(Outcome::Refused(why)) => {
            eprintln!("{why}");
            ExitCode::from(1)
        }
        Ok(Outcome::LockNotAcquired) => {
            eprintln!("lock not acquired");
            ExitCode::from(2)
        }
        Ok(Outcome::WritesLost(n)) => {
            eprintln!("{n} acknowledged writes lost");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}
