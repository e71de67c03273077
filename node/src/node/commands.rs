//! Commands: runs one engine [`Command`] here when this node is the
//! partition's primary, or forwards it to the primary (a batch is split by
//! owner first). Data and lock commands share this one path.

use std::time::Duration;

use bytes::Bytes;
use distcache_client::partition::partition_for;
use distcache_client::proto::ErrorReason;
use smallvec::smallvec;

use crate::cluster::table::{Role, Table};
use crate::command::{Command, Keyspace, Origin, Outcome};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::node::routing::Route;
use crate::replica::Ops;
use crate::storage::Room;

impl Node {
    /// Resolves once `member` misses heartbeats (polled every heartbeat).
    async fn until_suspect(&self, member: &str) {
        let period = self.cluster.config().heartbeat_interval;
        while !self.cluster.suspect(member) {
            tokio::time::sleep(period).await;
        }
    }

    /// Runs one command (counted in the metrics). `origin`: a command from
    /// a peer was already forwarded once and is not forwarded again (a stale
    /// route answers NOT_OWNER).
    pub async fn run(&self, cmd: Command, origin: Origin) -> Result<Outcome> {
        let (name, started) = (cmd.name(), std::time::Instant::now());
        let retry = (origin == Origin::Client).then(|| cmd.clone());
        let epoch = self.epoch();
        let mut result = self.execute(cmd, origin).await;
        // A command that failed only because the partition table moved under
        // it (a migration step, a hand-off) is tried once more after this
        // node's table settles, so clients do not see the hand-off: one a
        // stale route sent to a former primary (NOT_OWNER: nothing was
        // applied), and a blind write whose replication the move interrupted
        // (a blind write applied twice is the same write).
        if let (Some(cmd), Err(e)) = (retry, &result)
            && (e.reason() == ErrorReason::NotOwner
                || (e.reason() == ErrorReason::Unavailable && cmd.is_idempotent_write()))
        {
            self.settle(epoch).await;
            result = self.execute(cmd, origin).await;
        }
        self.metrics
            .command(name, result.as_ref().err(), started.elapsed());
        result
    }

    /// Refuses a lease longer than `--max-lock-hold-secs`.
    fn check_lock_hold(&self, cmd: &Command) -> Result<()> {
        let hold_ms = match cmd {
            Command::Acquire { hold_ms, .. }
            | Command::TryAcquire { hold_ms, .. }
            | Command::Extend { hold_ms, .. } => *hold_ms,
            _ => return Ok(()),
        };
        let max = self.config().max_lock_hold_secs.saturating_mul(1000);
        if hold_ms > max {
            return Err(Error::LimitExceeded {
                limit: "max-lock-hold-secs",
                actual: hold_ms / 1000,
                max: self.config().max_lock_hold_secs,
            });
        }
        Ok(())
    }

    /// Waits (briefly) for this node to install a table newer than `epoch`.
    async fn settle(&self, epoch: u64) {
        let patience = self
            .cluster
            .config()
            .heartbeat_interval
            .saturating_mul(2)
            .min(Duration::from_millis(250));
        let deadline = tokio::time::Instant::now() + patience;
        tokio::time::sleep(Duration::from_millis(10)).await;
        while self.epoch() == epoch && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs `cmd` once; a read is answered only if no table install
    /// overlapped it (an install drops and fills copies before it publishes
    /// the new table, so a read that loaded the old table could see a copy
    /// being dropped): it is run again, and refused as retriable if
    /// installs keep overlapping it. Writes have their own check.
    async fn execute(&self, cmd: Command, origin: Origin) -> Result<Outcome> {
        if cmd.is_write() {
            return self.execute_unchecked(cmd, origin).await;
        }
        for _ in 0..5 {
            let Some(stamp) = self.cluster.installs().stamp() else {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            };
            let r = self.execute_unchecked(cmd.clone(), origin).await;
            if self.cluster.installs().still_valid(stamp) {
                return r;
            }
        }
        Err(Error::Unavailable(
            "the partition table kept changing during the read; retry".into(),
        ))
    }

    async fn execute_unchecked(&self, cmd: Command, origin: Origin) -> Result<Outcome> {
        // A node that knows it lacks quorum answers every write with
        // QUORUM_LOST before trying anything (never an indeterminate error).
        if cmd.is_write() {
            self.require_write_quorum()?;
        }
        if let (Keyspace::Locks, Some(key)) = (cmd.keyspace(), cmd.key()) {
            self.store.check_key(key)?;
        }
        self.check_lock_hold(&cmd)?;
        // The rarer paths (scans, batches, forwards) are boxed: every
        // command's future is as large as its largest path, and it is
        // allocated (and moved) once per command.
        if cmd.is_collection_wide() {
            return Box::pin(self.execute_scan(cmd, origin)).await;
        }
        let table = self.cluster.table();
        if cmd.key().is_none() {
            return Box::pin(self.execute_batch(&table, cmd, origin)).await;
        }
        let space = cmd.keyspace();
        let key = cmd.key().cloned().unwrap_or_default();
        let (p, route) = self.route_key(&table, space, &key, origin)?;
        match route {
            Route::Local => self.execute_here(&table, p, cmd).await,
            Route::Remote(addr) => {
                let fallback = matches!(cmd, Command::Get { .. }).then(|| cmd.clone());
                // A primary that stopped answering heartbeats is not waited
                // for (a forward would wait out the request timeout): the
                // metadata leader is moving the partition to an in-sync replica.
                let primary = table.primary(p).unwrap_or_default().to_string();
                let unreachable = || {
                    Error::Unavailable(format!(
                        "the primary of partition {p} ({primary}) is unreachable; failover pending"
                    ))
                };
                let forwarded = if self.cluster.suspect(&primary) {
                    Err(unreachable())
                } else {
                    // Abandoned as soon as the primary misses heartbeats.
                    tokio::select! {
                        r = Box::pin(self.forward(&addr, cmd)) => r,
                        () = Box::pin(self.until_suspect(&primary)) => Err(unreachable()),
                    }
                };
                match (forwarded, fallback) {
                    // Read-from-backup fallback: the primary is unreachable,
                    // and this copy is in sync by the primary's own last word
                    // (loaded is not enough: a primary acknowledges writes
                    // without backups it reported out of sync).
                    (Err(Error::Unavailable(_)), Some(Command::Get { collection, key }))
                        if table.role_of(self.cluster.me(), p) == Role::Backup
                            && self.cluster.in_sync(&table, p, self.name()) =>
                    {
                        tracing::info!(
                            partition = p,
                            "primary unreachable: read served by this backup"
                        );
                        Ok(Outcome::Value(self.store.get(&collection, &key)?))
                    }
                    (other, _) => other,
                }
            }
        }
    }

    /// A batch: split by owner, the local part run here, each remote part
    /// forwarded to its owner; outcomes merged.
    async fn execute_batch(&self, table: &Table, cmd: Command, origin: Origin) -> Result<Outcome> {
        let space = cmd.keyspace();
        let mut merged = match &cmd {
            Command::GetMany { .. } => Outcome::Entries(Vec::new()),
            Command::DeleteMany { .. } => Outcome::DeletedCount(0),
            _ => Outcome::StoredMany,
        };
        let meta = match space {
            Keyspace::Collection(name) => self.store.collection(name)?,
            Keyspace::Locks => return Err(Error::Internal("lock batches do not exist".into())),
        };
        // GetMany answers in request order, whoever owns each key.
        let order = match &cmd {
            Command::GetMany { keys, .. } => Some(keys.clone()),
            _ => None,
        };
        let parts = cmd.split_by(|key| {
            let p = partition_for(&meta.name, key, table.partition_count);
            self.route_from(table, p, origin)
        })?;
        for (route, part) in parts {
            let outcome = match route {
                Route::Local => self.execute_batch_here(table, part).await?,
                Route::Remote(addr) => self.forward(&addr, part).await?,
            };
            merged.merge(outcome);
        }
        if let (Some(order), Outcome::Entries(found)) = (order, &mut merged) {
            let mut by_key: std::collections::HashMap<Bytes, Bytes> =
                std::mem::take(found).into_iter().collect();
            *found = order
                .into_iter()
                .filter_map(|k| {
                    let v = by_key.get(&k).cloned();
                    v.map(|v| (k, v))
                })
                .collect();
            by_key.clear();
            self.store.check_answer(found)?;
        }
        Ok(merged)
    }

    /// A batch whose partitions are all primary here.
    async fn execute_batch_here(&self, table: &Table, cmd: Command) -> Result<Outcome> {
        match cmd {
            Command::GetMany { collection, keys } => {
                Ok(Outcome::Entries(self.store.get_many(&collection, &keys)?))
            }
            Command::PutMany {
                collection,
                entries,
                ttl_ms,
            } => {
                let (planned, room) = self.store.plan_puts(&collection, entries, ttl_ms)?;
                let parts: Vec<u32> = planned.iter().map(|(p, _)| *p).collect();
                let apply = |ops| self.store.apply_planned(ops, room);
                self.write(table, &parts, planned, apply).await?;
                Ok(Outcome::StoredMany)
            }
            Command::DeleteMany { collection, keys } => {
                let planned = self.store.plan_deletes(&collection, &keys)?;
                let parts: Vec<u32> = planned.iter().map(|(p, _)| *p).collect();
                let apply = |ops| self.store.apply_planned(ops, Room::none());
                let n = self.write(table, &parts, planned, apply).await?;
                Ok(Outcome::DeletedCount(n))
            }
            single => Err(Error::Internal(format!(
                "{} is not a batch command",
                single.name()
            ))),
        }
    }

    /// A single-key command on partition `p`, primary here.
    #[allow(clippy::too_many_lines)]
    async fn execute_here(&self, table: &Table, p: u32, cmd: Command) -> Result<Outcome> {
        match cmd {
            Command::Get { collection, key } => {
                let v = self.store.get(&collection, &key)?;
                tracing::trace!(partition = p, epoch = table.epoch, key = %String::from_utf8_lossy(&key), value = ?v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()), "get");
                Ok(Outcome::Value(v))
            }
            Command::Put {
                collection,
                key,
                value,
                ttl_ms,
            } => {
                let what = tracing::enabled!(tracing::Level::TRACE).then(|| {
                    (
                        String::from_utf8_lossy(&key).into_owned(),
                        String::from_utf8_lossy(&value).into_owned(),
                    )
                });
                let (op, room) = self.store.plan_put(&collection, key, value, ttl_ms)?;
                let apply = |ops| self.store.apply_planned(ops, room);
                let res = self.write(table, &[p], smallvec![op], apply).await;
                if let Some((key, value)) = what {
                    tracing::trace!(partition = p, epoch = table.epoch, %key, %value, ok = res.is_ok(), "put");
                }
                res?;
                Ok(Outcome::Stored)
            }
            Command::Delete { collection, key } => {
                let planned = self
                    .store
                    .plan_deletes(&collection, std::slice::from_ref(&key))?;
                let apply = |ops| self.store.apply_planned(ops, Room::none());
                let live = self.write(table, &[p], planned, apply).await?;
                Ok(Outcome::Deleted(live > 0))
            }
            Command::PutIfAbsent {
                collection,
                key,
                value,
                ttl_ms,
            } => {
                let plan = || {
                    if self.store.peek(&collection, &key)?.is_some() {
                        return Ok(((false, Room::none()), Ops::new()));
                    }
                    let (op, room) = self.store.plan_put(&collection, key, value, ttl_ms)?;
                    Ok(((true, room), smallvec![op]))
                };
                let inserted = self
                    .write_with(table, &[p], plan, applied_with(&self.store))
                    .await?;
                Ok(Outcome::Inserted(inserted))
            }
            Command::CompareAndSet {
                collection,
                key,
                expected,
                value,
                ttl_ms,
            } => {
                let plan = || match self.store.peek(&collection, &key)? {
                    Some((current, _)) if current == expected => {
                        let (op, room) = self.store.plan_put(&collection, key, value, ttl_ms)?;
                        Ok(((true, room), smallvec![op]))
                    }
                    _ => Ok(((false, Room::none()), Ops::new())),
                };
                let swapped = self
                    .write_with(table, &[p], plan, applied_with(&self.store))
                    .await?;
                Ok(Outcome::Swapped(swapped))
            }
            Command::Increment {
                collection,
                key,
                delta,
                ttl_ms,
            } => {
                let plan = || {
                    let current = self.store.peek(&collection, &key)?;
                    let (now, expires_at) = match &current {
                        Some((v, exp)) => (parse_counter(&key, v)?, Some(*exp)),
                        None => (0, None),
                    };
                    let next = now.checked_add(delta).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "incrementing {:?} by {delta} overflows",
                            String::from_utf8_lossy(&key)
                        ))
                    })?;
                    let value = Bytes::from(next.to_string());
                    let (op, room) = match (ttl_ms, expires_at) {
                        (None, Some(exp)) => {
                            self.store.plan_put_expiring(&collection, key, value, exp)?
                        }
                        _ => self.store.plan_put(&collection, key, value, ttl_ms)?,
                    };
                    Ok(((next, room), smallvec![op]))
                };
                let value = self
                    .write_with(table, &[p], plan, applied_with(&self.store))
                    .await?;
                Ok(Outcome::Counter(value))
            }
            Command::Acquire {
                key,
                hold_ms,
                wait_ms,
            } => {
                self.require_write_quorum()?;
                let g = self
                    .locks
                    .acquire(&key, hold_ms, Duration::from_millis(wait_ms))
                    .await?;
                self.replicate_grant(table, p, &key, g).await?;
                Ok(Outcome::Granted(g))
            }
            Command::TryAcquire { key, hold_ms } => {
                self.require_write_quorum()?;
                let Some(g) = self.locks.try_acquire(&key, hold_ms) else {
                    return Ok(Outcome::MaybeGranted(None));
                };
                self.replicate_grant(table, p, &key, g).await?;
                Ok(Outcome::MaybeGranted(Some(g)))
            }
            // A key never locked: refused (or nothing to release) without
            // creating state here or on the backups.
            Command::Release { key, .. } | Command::Extend { key, .. }
                if !self.locks.knows(&key) =>
            {
                Err(Error::LockNotHeld(crate::locking::show_key(&key)))
            }
            Command::ForceRelease { key } if !self.locks.knows(&key) => {
                Ok(Outcome::ForceReleased(false))
            }
            Command::Release { key, token } => {
                let res = self.locks.release(&key, token);
                self.replicate_lock(table, p, &key).await?;
                res.map(|()| Outcome::Released)
            }
            Command::Extend {
                key,
                token,
                hold_ms,
            } => {
                let g = self.locks.extend(&key, token, hold_ms)?;
                self.replicate_lock(table, p, &key).await?;
                Ok(Outcome::Granted(g))
            }
            Command::ForceRelease { key } => {
                let released = self.locks.force_release(&key);
                self.replicate_lock(table, p, &key).await?;
                Ok(Outcome::ForceReleased(released))
            }
            batch => self.execute_batch_here(table, batch).await,
        }
    }
}

/// The decimal integer stored at `key`.
fn parse_counter(key: &Bytes, v: &Bytes) -> Result<i64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the value of {:?} is not a decimal integer",
                String::from_utf8_lossy(key)
            ))
        })
}

/// Applies a conditional write's planned ops with the room their plan
/// reserved; the outcome is its decision.
fn applied_with<'s, D>(
    store: &'s crate::storage::Store,
) -> impl FnOnce((D, Room<'s>), Ops) -> Result<(D, crate::replica::Written)> + 's {
    move |(decided, room), ops| store.apply_planned(ops, room).map(|(_, w)| (decided, w))
}
