//! Collection-wide commands (`Size`, `Keys`, `Clear`) answer for the whole
//! cluster through any node: the node splits the partitions by their
//! primary in its table, answers its own share, and asks each other primary
//! for exactly the partitions it owns. A part refused because ownership
//! moved (a migration, a failover) is re-routed with the newer table until
//! the request timeout; a partition no primary answers for makes the whole
//! command fail (never a silent partial answer).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distcache_client::proto::ErrorReason;

use crate::cluster::table::Table;
use crate::command::{Command, Origin, Outcome};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::node::routing::Route;
use crate::replica::ReplOp;

/// Most keys in one page when the client asks for none (or more).
pub const MAX_KEYS_PAGE: u32 = 10_000;
/// A page stops growing past this many key bytes.
const KEYS_PAGE_BYTES: usize = 1 << 20;

/// Whether a part's failure may heal by re-routing with a newer table.
fn reroutable(e: &Error) -> bool {
    match e {
        Error::NotOwner { .. }
        | Error::Unavailable(_)
        | Error::PartitionUnavailable(_)
        | Error::ClusterNotReady(_) => true,
        Error::Remote { reason, .. } => matches!(
            ErrorReason::try_from(*reason),
            Ok(ErrorReason::NotOwner | ErrorReason::Unavailable | ErrorReason::ClusterNotReady)
        ),
        _ => false,
    }
}

/// The command restricted to `partitions` (and, for Keys, a page).
fn restricted(
    cmd: &Command,
    partitions: Vec<u32>,
    after: Option<(u32, Bytes)>,
    limit: u32,
) -> Command {
    match cmd {
        Command::Size { collection, .. } => Command::Size {
            collection: collection.clone(),
            partitions: Some(partitions),
        },
        Command::Clear { collection, .. } => Command::Clear {
            collection: collection.clone(),
            partitions: Some(partitions),
        },
        Command::Keys { collection, .. } => Command::Keys {
            collection: collection.clone(),
            partitions: Some(partitions),
            after,
            limit,
        },
        other => other.clone(),
    }
}

impl Node {
    /// Runs a collection-wide command.
    pub(super) async fn execute_scan(&self, cmd: Command, origin: Origin) -> Result<Outcome> {
        let count = self.store.partition_count();
        let (collection, partitions) = match &cmd {
            Command::Size {
                collection,
                partitions,
            }
            | Command::Clear {
                collection,
                partitions,
            }
            | Command::Keys {
                collection,
                partitions,
                ..
            } => (collection.clone(), partitions.clone()),
            other => {
                return Err(Error::Internal(format!(
                    "{} is not collection-wide",
                    other.name()
                )));
            }
        };
        self.store.collection(&collection)?;
        let mut parts = partitions.unwrap_or_else(|| (0..count).collect());
        if let Some(p) = parts.iter().find(|p| **p >= count) {
            return Err(Error::InvalidArgument(format!(
                "partition {p} out of range (the cluster has {count})"
            )));
        }
        parts.sort_unstable();
        parts.dedup();
        if origin == Origin::Peer {
            // Asked by the node that splits the command: answer for exactly
            // these partitions, all primary here, or refuse.
            let table = self.cluster.table();
            for &p in &parts {
                self.route_from(&table, p, Origin::Peer)?;
            }
            return self.scan_here(&table, &cmd, &parts).await;
        }
        match cmd {
            Command::Keys {
                ref after, limit, ..
            } => self.keys_page(&cmd, parts, after.clone(), limit).await,
            _ => self.scan_all(&cmd, parts).await,
        }
    }

    /// Size or Clear over `parts`: each primary asked once for its share,
    /// parts that moved re-routed until the request timeout.
    async fn scan_all(&self, cmd: &Command, mut todo: Vec<u32>) -> Result<Outcome> {
        let deadline = Instant::now() + self.cluster.config().request_timeout;
        let mut total = 0u64;
        loop {
            let table = self.cluster.table();
            let mut groups: BTreeMap<Route, Vec<u32>> = BTreeMap::new();
            let mut failed: Vec<u32> = Vec::new();
            let mut last_err = None;
            for p in todo.drain(..) {
                match self.route(&table, p) {
                    Ok(route) => groups.entry(route).or_default().push(p),
                    Err(e) => {
                        failed.push(p);
                        last_err = Some(e);
                    }
                }
            }
            for (route, parts) in groups {
                let part = match &route {
                    Route::Local => self.scan_here(&table, cmd, &parts).await,
                    Route::Remote(addr) => {
                        self.forward(addr, restricted(cmd, parts.clone(), None, 0))
                            .await
                    }
                };
                match part {
                    Ok(Outcome::Count(n) | Outcome::Cleared(n)) => total += n,
                    Ok(other) => return Err(Error::Internal(format!("unexpected {other:?}"))),
                    Err(e) if reroutable(&e) => {
                        failed.extend(parts);
                        last_err = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if failed.is_empty() {
                return Ok(match cmd {
                    Command::Clear { .. } => Outcome::Cleared(total),
                    _ => Outcome::Count(total),
                });
            }
            if Instant::now() >= deadline {
                return Err(unavailable(&failed, last_err));
            }
            tokio::time::sleep(
                self.cluster
                    .config()
                    .heartbeat_interval
                    .min(Duration::from_millis(200)),
            )
            .await;
            todo = failed;
        }
    }

    /// One page of keys: partitions in order, each run of partitions with one
    /// primary asked for at most what the page still has room for.
    async fn keys_page(
        &self,
        cmd: &Command,
        parts: Vec<u32>,
        after: Option<(u32, Bytes)>,
        limit: u32,
    ) -> Result<Outcome> {
        let limit = page_limit(limit);
        let mut parts: Vec<u32> = match &after {
            Some((from, _)) => parts.into_iter().filter(|p| p >= from).collect(),
            None => parts,
        };
        let mut last = after;
        let mut keys: Vec<Bytes> = Vec::new();
        let deadline = Instant::now() + self.cluster.config().request_timeout;
        while !parts.is_empty() {
            let room = limit.saturating_sub(keys.len() as u32);
            if room == 0 {
                // Full, with partitions left: the next page starts after `last`.
                return Ok(Outcome::KeysPage {
                    keys,
                    last,
                    more: true,
                });
            }
            let table = self.cluster.table();
            let route = match self.route(&table, parts[0]) {
                Ok(r) => r,
                Err(e) if reroutable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(unavailable(&parts[..1], Some(e))),
            };
            // The run of leading partitions with the same primary.
            let run: Vec<u32> = parts
                .iter()
                .copied()
                .take_while(|p| self.route(&table, *p).ok().as_ref() == Some(&route))
                .collect();
            let sub = restricted(cmd, run.clone(), last.clone(), room);
            let page = match &route {
                Route::Local => self.scan_here(&table, &sub, &run).await,
                Route::Remote(addr) => self.forward(addr, sub).await,
            };
            match page {
                Ok(Outcome::KeysPage {
                    keys: got,
                    last: end,
                    more,
                }) => {
                    keys.extend(got);
                    if end.is_some() {
                        last = end;
                    }
                    if more {
                        return Ok(Outcome::KeysPage {
                            keys,
                            last,
                            more: true,
                        });
                    }
                    parts.drain(..run.len());
                }
                Ok(other) => return Err(Error::Internal(format!("unexpected {other:?}"))),
                Err(e) if reroutable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(unavailable(&run, Some(e))),
            }
        }
        Ok(Outcome::KeysPage {
            keys,
            last,
            more: false,
        })
    }

    /// The command over `parts`, every one primary here under `table`.
    async fn scan_here(&self, table: &Table, cmd: &Command, parts: &[u32]) -> Result<Outcome> {
        match cmd {
            Command::Size { collection, .. } => {
                let mut mine = vec![false; table.partition_count as usize];
                for &p in parts {
                    if let Some(slot) = mine.get_mut(p as usize) {
                        *slot = true;
                    }
                }
                let n = self.store.size(collection, |p| {
                    mine.get(p as usize).copied().unwrap_or(false)
                })?;
                Ok(Outcome::Count(n))
            }
            Command::Clear { collection, .. } => {
                self.require_write_quorum()?;
                let meta = self.store.collection(collection)?;
                let mut removed = 0;
                for &p in parts {
                    let planned = smallvec::smallvec![(
                        p,
                        ReplOp::Clear {
                            collection: meta.name.to_string(),
                        },
                    )];
                    removed += self
                        .write(table, &[p], planned, |ops| {
                            self.store.apply_planned(ops, crate::storage::Room::none())
                        })
                        .await?;
                }
                Ok(Outcome::Cleared(removed))
            }
            Command::Keys {
                collection,
                after,
                limit,
                ..
            } => {
                let limit = page_limit(*limit);
                let (mut keys, mut bytes) = (Vec::new(), 0usize);
                let mut last: Option<(u32, Bytes)> = None;
                for &p in parts {
                    let skip_to = after.as_ref().filter(|(ap, _)| *ap == p).map(|(_, k)| k);
                    for k in self.store.sorted_keys(collection, p)? {
                        if skip_to.is_some_and(|s| k <= *s) {
                            continue;
                        }
                        if keys.len() as u32 >= limit || bytes >= KEYS_PAGE_BYTES {
                            return Ok(Outcome::KeysPage {
                                keys,
                                last,
                                more: true,
                            });
                        }
                        bytes += k.len();
                        last = Some((p, k.clone()));
                        keys.push(k);
                    }
                }
                Ok(Outcome::KeysPage {
                    keys,
                    last,
                    more: false,
                })
            }
            other => Err(Error::Internal(format!(
                "{} is not collection-wide",
                other.name()
            ))),
        }
    }
}

/// The page size asked for, bounded (0: the largest).
fn page_limit(limit: u32) -> u32 {
    if limit == 0 {
        MAX_KEYS_PAGE
    } else {
        limit.min(MAX_KEYS_PAGE)
    }
}

fn unavailable(parts: &[u32], last: Option<Error>) -> Error {
    let shown: Vec<String> = parts.iter().take(8).map(|p| p.to_string()).collect();
    Error::Unavailable(format!(
        "partitions {}{} have no reachable primary; the collection-wide operation did not complete{}",
        shown.join(","),
        if parts.len() > 8 { ",..." } else { "" },
        last.map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    ))
}
