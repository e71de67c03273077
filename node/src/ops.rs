//! The data path of a node: route each operation to its partition's
//! primary (serve it here or forward it), apply writes with synchronous
//! replication, keep backups in sync (snapshots, anti-entropy), and answer
//! peers.
//!
//! What an acknowledged write guarantees: it was applied on the primary and
//! on every backup the primary holds in sync, at the same table epoch. A
//! backup that fails to answer in time makes that write fail (its outcome is
//! indeterminate: it may be on the primary), is reported out of sync to a
//! majority of members before any later write is acknowledged without it, and
//! is repaired by a snapshot; while it is out of sync the partition is not
//! "safe" and the coordinator never promotes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use distcache_client::partition::{lock_partition_for, partition_for, resolve_collection};
use distcache_client::proto::{self, command, command_result};
use prost::Message;

use crate::cluster::table::{Role, Table};
use crate::error::{Error, Result};
use crate::grpc::to_proto;
use crate::locking::Grant;
use crate::net::message::{CollectionOp, Forward, Request, Response, WireError};
use crate::node::Node;
use crate::storage::{CollectionMeta, ReplOp, Written};

/// Where an operation on a partition runs.
enum Route {
    /// Here: this node is the primary.
    Local,
    /// At the primary's peer address.
    Remote(String),
}

fn kvs(entries: Vec<(Bytes, Bytes)>) -> Vec<proto::KeyValue> {
    entries
        .into_iter()
        .map(|(key, value)| proto::KeyValue { key, value })
        .collect()
}

fn decode<M: Message + Default>(b: &[u8]) -> Result<M> {
    M::decode(b).map_err(|e| Error::Internal(format!("bad forwarded message: {e}")))
}

impl Node {
    fn route(&self, table: &Table, p: u32) -> Result<Route> {
        let Some(primary) = table.primary(p) else {
            return Err(Error::ClusterNotReady("no partition table yet".into()));
        };
        if primary == self.name() {
            if !self.cluster.current.load(Ordering::SeqCst) {
                return Err(Error::Unavailable(
                    "this node restarted; confirming the partition table with the cluster".into(),
                ));
            }
            if table.role_of(&self.cluster.me, p) != Role::Primary {
                return Err(Error::Unavailable(
                    "this node restarted; waiting for a table that includes it".into(),
                ));
            }
            return Ok(Route::Local);
        }
        match table.member(primary) {
            Some(m) => Ok(Route::Remote(m.peer.clone())),
            None => Err(Error::ClusterNotReady(format!("primary {primary} unknown"))),
        }
    }

    fn not_owner(&self, p: u32) -> Error {
        Error::NotOwner {
            partition: p,
            epoch: self.epoch(),
        }
    }

    async fn forward(&self, addr: &str, f: Forward, timeout: Duration) -> Result<Bytes> {
        let t0 = std::time::Instant::now();
        let r = self.peers.call(addr, Request::Forward(f), timeout).await;
        if t0.elapsed() > Duration::from_millis(500) {
            tracing::warn!(peer = addr, elapsed = ?t0.elapsed(), ok = r.is_ok(), "slow forward");
        }
        match r? {
            Response::Forwarded(b) => Ok(b),
            Response::Error(WireError { reason, message }) => {
                Err(Error::Remote { reason, message })
            }
            other => Err(Error::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn forward_command(&self, addr: &str, op: command::Op) -> Result<command_result::Result> {
        let bytes = proto::Command {
            id: 0,
            op: Some(op),
        }
        .encode_to_vec();
        let resp = self
            .forward(
                addr,
                Forward::Command(bytes.into()),
                self.cluster.config.request_timeout,
            )
            .await?;
        decode::<proto::CommandResult>(&resp)?
            .result
            .ok_or_else(|| Error::Internal("empty forwarded result".into()))
    }

    // ------------------------------------------------------------ commands

    /// Runs one data command. `forwarded`: it came from another node, so it
    /// is not forwarded again (a stale route answers NOT_OWNER).
    pub async fn run_command(&self, op: command::Op, forwarded: bool) -> command_result::Result {
        let (name, started) = (crate::metrics::op_name(&op), std::time::Instant::now());
        let result = match self.command(op, forwarded).await {
            Ok(r) => r,
            Err(e) => command_result::Result::Error(to_proto(&e, self.epoch())),
        };
        self.metrics.command(name, &result, started.elapsed());
        result
    }

    async fn command(&self, op: command::Op, forwarded: bool) -> Result<command_result::Result> {
        use command_result::Result as R;
        let table = self.cluster.table();
        let count = table.partition_count;
        match op {
            command::Op::Get(r) => {
                let meta = self.store.collection(&r.collection)?;
                let p = partition_for(&meta.name, &r.key, count);
                match self.route(&table, p)? {
                    Route::Local => {
                        let v = self.store.get(&r.collection, &r.key)?;
                        tracing::trace!(partition = p, epoch = table.epoch, key = %String::from_utf8_lossy(&r.key), value = ?v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()), "get");
                        Ok(R::Get(get_response(v)))
                    }
                    Route::Remote(_) if forwarded => Err(self.not_owner(p)),
                    Route::Remote(addr) => {
                        let res = self
                            .forward_command(&addr, command::Op::Get(r.clone()))
                            .await;
                        match res {
                            // Read-from-backup fallback: the primary is
                            // unreachable, and this copy is in sync by the
                            // primary's own last word (loaded is not enough:
                            // a primary acknowledges writes without backups
                            // it reported out of sync).
                            Err(Error::Unavailable(_))
                                if table.role_of(&self.cluster.me, p) == Role::Backup
                                    && self.cluster.in_sync(&table, p, self.name()) =>
                            {
                                tracing::info!(
                                    partition = p,
                                    "primary unreachable: read served by this backup"
                                );
                                Ok(R::Get(get_response(self.store.get(&r.collection, &r.key)?)))
                            }
                            other => other,
                        }
                    }
                }
            }
            command::Op::Put(r) => {
                let meta = self.store.collection(&r.collection)?;
                let p = partition_for(&meta.name, &r.key, count);
                match self.route(&table, p)? {
                    Route::Local => {
                        let what = tracing::enabled!(tracing::Level::TRACE).then(|| {
                            (
                                String::from_utf8_lossy(&r.key).into_owned(),
                                String::from_utf8_lossy(&r.value).into_owned(),
                            )
                        });
                        let planned =
                            vec![
                                self.store
                                    .plan_put(&r.collection, r.key, r.value, r.ttl_ms)?,
                            ];
                        let res = self
                            .write(&table, vec![p], planned, |ops| {
                                self.store.apply_planned(ops)
                            })
                            .await;
                        if let Some((key, value)) = what {
                            tracing::trace!(partition = p, epoch = table.epoch, %key, %value, ok = res.is_ok(), "put");
                        }
                        res?;
                        Ok(R::Put(proto::PutResponse {}))
                    }
                    Route::Remote(_) if forwarded => Err(self.not_owner(p)),
                    Route::Remote(addr) => self.forward_command(&addr, command::Op::Put(r)).await,
                }
            }
            command::Op::Delete(r) => {
                let meta = self.store.collection(&r.collection)?;
                let p = partition_for(&meta.name, &r.key, count);
                match self.route(&table, p)? {
                    Route::Local => {
                        let planned = self
                            .store
                            .plan_deletes(&r.collection, std::slice::from_ref(&r.key))?;
                        let live = self
                            .write(&table, vec![p], planned, |ops| {
                                self.store.apply_planned(ops)
                            })
                            .await?;
                        Ok(R::Delete(proto::DeleteResponse { deleted: live > 0 }))
                    }
                    Route::Remote(_) if forwarded => Err(self.not_owner(p)),
                    Route::Remote(addr) => {
                        self.forward_command(&addr, command::Op::Delete(r)).await
                    }
                }
            }
            command::Op::GetMany(r) => {
                let meta = self.store.collection(&r.collection)?;
                let groups = self.group(&table, &meta, r.keys, |k| k, forwarded)?;
                let mut entries = Vec::new();
                for (route, keys) in groups {
                    match route {
                        Route::Local => {
                            entries.extend(kvs(self.store.get_many(&r.collection, &keys)?))
                        }
                        Route::Remote(addr) => {
                            let op = command::Op::GetMany(proto::GetManyRequest {
                                collection: r.collection.clone(),
                                keys,
                            });
                            match self.forward_command(&addr, op).await? {
                                R::GetMany(g) => entries.extend(g.entries),
                                R::Error(e) => {
                                    return Err(Error::Remote {
                                        reason: e.reason,
                                        message: e.message,
                                    });
                                }
                                _ => return Err(Error::Internal("unexpected result".into())),
                            }
                        }
                    }
                }
                Ok(R::GetMany(proto::GetManyResponse { entries }))
            }
            command::Op::PutMany(r) => {
                let meta = self.store.collection(&r.collection)?;
                let groups = self.group(&table, &meta, r.entries, |kv| &kv.key, forwarded)?;
                for (route, entries) in groups {
                    match route {
                        Route::Local => {
                            let pairs: Vec<(Bytes, Bytes)> =
                                entries.into_iter().map(|kv| (kv.key, kv.value)).collect();
                            let planned = self.store.plan_puts(&r.collection, pairs, r.ttl_ms)?;
                            let parts = planned.iter().map(|(p, _)| *p).collect();
                            self.write(&table, parts, planned, |ops| self.store.apply_planned(ops))
                                .await?;
                        }
                        Route::Remote(addr) => {
                            let op = command::Op::PutMany(proto::PutManyRequest {
                                collection: r.collection.clone(),
                                entries,
                                ttl_ms: r.ttl_ms,
                            });
                            if let R::Error(e) = self.forward_command(&addr, op).await? {
                                return Err(Error::Remote {
                                    reason: e.reason,
                                    message: e.message,
                                });
                            }
                        }
                    }
                }
                Ok(R::PutMany(proto::PutManyResponse {}))
            }
            command::Op::DeleteMany(r) => {
                let meta = self.store.collection(&r.collection)?;
                let groups = self.group(&table, &meta, r.keys, |k| k, forwarded)?;
                let mut deleted = 0;
                for (route, keys) in groups {
                    match route {
                        Route::Local => {
                            let planned = self.store.plan_deletes(&r.collection, &keys)?;
                            let parts = planned.iter().map(|(p, _)| *p).collect();
                            deleted += self
                                .write(&table, parts, planned, |ops| self.store.apply_planned(ops))
                                .await?;
                        }
                        Route::Remote(addr) => {
                            let op = command::Op::DeleteMany(proto::DeleteManyRequest {
                                collection: r.collection.clone(),
                                keys,
                            });
                            match self.forward_command(&addr, op).await? {
                                R::DeleteMany(d) => deleted += d.deleted,
                                R::Error(e) => {
                                    return Err(Error::Remote {
                                        reason: e.reason,
                                        message: e.message,
                                    });
                                }
                                _ => return Err(Error::Internal("unexpected result".into())),
                            }
                        }
                    }
                }
                Ok(R::DeleteMany(proto::DeleteManyResponse { deleted }))
            }
        }
    }

    /// Groups batch items by the route of their partition.
    fn group<T>(
        &self,
        table: &Table,
        meta: &CollectionMeta,
        items: Vec<T>,
        key: impl Fn(&T) -> &Bytes,
        forwarded: bool,
    ) -> Result<Vec<(Route, Vec<T>)>> {
        let mut local = Vec::new();
        let mut remote: BTreeMap<String, Vec<T>> = BTreeMap::new();
        for item in items {
            let p = partition_for(&meta.name, key(&item), table.partition_count);
            match self.route(table, p)? {
                Route::Local => local.push(item),
                Route::Remote(_) if forwarded => return Err(self.not_owner(p)),
                Route::Remote(addr) => remote.entry(addr).or_default().push(item),
            }
        }
        let mut out = Vec::new();
        if !local.is_empty() {
            out.push((Route::Local, local));
        }
        out.extend(remote.into_iter().map(|(a, v)| (Route::Remote(a), v)));
        Ok(out)
    }

    // ------------------------------------------------------------ replicated writes

    /// Applies `f` (a write to partitions `parts`, all primary here) and
    /// replicates what it changed to the in-sync backups before returning.
    async fn write<R>(
        &self,
        table: &Table,
        mut parts: Vec<u32>,
        planned: Vec<(u32, ReplOp)>,
        apply: impl FnOnce(Vec<(u32, ReplOp)>) -> Result<(R, Written)>,
    ) -> Result<R> {
        let c = &self.cluster;
        if !c.quorum() {
            return Err(Error::QuorumLost(format!(
                "{} sees less than a majority of the expected members",
                self.name()
            )));
        }
        parts.sort_unstable();
        parts.dedup();
        let mut guards = Vec::with_capacity(parts.len());
        let t0 = std::time::Instant::now();
        for &p in &parts {
            guards.push(c.parts[p as usize].repl.lock().await);
        }
        if t0.elapsed() > Duration::from_millis(500) {
            tracing::warn!(elapsed = ?t0.elapsed(), ?parts, "slow partition lock");
        }
        let installs = c.installs.load(Ordering::SeqCst);
        let now = c.table();
        if now.epoch != table.epoch || installs % 2 == 1 {
            return Err(Error::Unavailable("partition table changed; retry".into()));
        }
        for &p in &parts {
            if table.role_of(&self.cluster.me, p) != Role::Primary {
                return Err(self.not_owner(p));
            }
        }
        // Write-ahead: the planned writes are logged before they are applied.
        self.log_ops(&planned).await?;
        let (r, written) = apply(planned)?;
        // Consequences known only after applying (LRU evictions, lock states).
        let after: Vec<(u32, ReplOp)> = written
            .evicted
            .iter()
            .chain(
                written
                    .ops
                    .iter()
                    .filter(|(_, op)| matches!(op, ReplOp::Lock { .. })),
            )
            .cloned()
            .collect();
        self.log_ops(&after).await?;
        let t1 = std::time::Instant::now();
        let rep = self.replicate(table, written.ops).await;
        if t1.elapsed() > Duration::from_millis(500) {
            tracing::warn!(elapsed = ?t1.elapsed(), ok = rep.is_ok(), "slow replication");
        }
        rep?;
        // A table install that began while this write ran may have changed
        // the partition's backups under it (install does not wait for the
        // partition lock, and publishes the table only at its end): then the
        // replication above may have skipped a backup that the new table
        // relies on, so the write is not acknowledged (it is indeterminate,
        // like a failed replication).
        if c.installs.load(Ordering::SeqCst) != installs {
            return Err(Error::Unavailable(
                "the partition table changed during the write; it may or may not have been applied"
                    .into(),
            ));
        }
        drop(guards);
        if !written.evicted_elsewhere.is_empty() {
            self.replicate_evictions(written.evicted_elsewhere).await;
        }
        Ok(r)
    }

    /// Logs `ops` (grouped per partition, in order) and waits for the log.
    pub(crate) async fn log_ops(&self, ops: &[(u32, ReplOp)]) -> Result<()> {
        let Some(wal) = &self.wal else { return Ok(()) };
        if ops.is_empty() {
            return Ok(());
        }
        let mut recs: Vec<crate::storage::wal::WalRecord> = Vec::new();
        for (p, op) in ops {
            match recs.last_mut() {
                Some(crate::storage::wal::WalRecord::Ops { partition, ops })
                    if *partition == *p =>
                {
                    ops.push(op.clone())
                }
                _ => recs.push(crate::storage::wal::WalRecord::Ops {
                    partition: *p,
                    ops: vec![op.clone()],
                }),
            }
        }
        wal.append_all(&recs).await
    }

    /// Sends `ops` to the in-sync backups of their partitions (partition
    /// locks held by the caller); a failure marks the backup out of sync.
    async fn replicate(&self, table: &Table, ops: Vec<(u32, ReplOp)>) -> Result<()> {
        if table.backup_count == 0 || ops.is_empty() {
            return Ok(());
        }
        let mut per_part: BTreeMap<u32, Vec<ReplOp>> = BTreeMap::new();
        for (p, op) in ops {
            per_part.entry(p).or_default().push(op);
        }
        let mut calls = Vec::new();
        for (p, ops) in per_part {
            let synced = self.cluster.parts[p as usize].synced.lock().clone();
            for b in table.backups(p).iter().filter(|b| synced.contains(*b)) {
                let Some(m) = table.member(b) else { continue };
                let req = Request::Replicate {
                    epoch: table.epoch,
                    partition: p,
                    ops: ops.clone(),
                };
                let (addr, name) = (m.peer.clone(), b.clone());
                calls.push(async move {
                    let r = self
                        .peers
                        .call(&addr, req, self.cluster.config.replication_timeout)
                        .await;
                    (p, name, r)
                });
            }
        }
        if calls.is_empty() {
            return Ok(());
        }
        let mut failed = Vec::new();
        for (p, b, r) in futures::future::join_all(calls).await {
            match r {
                Ok(Response::Ok) => {}
                Ok(Response::Error(e)) => {
                    tracing::debug!(partition = p, backup = %b, reason = e.reason, msg = %e.message, "replication refused");
                    failed.push((p, b));
                }
                Ok(_) | Err(_) => failed.push((p, b)),
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        self.report_unsynced(failed.clone()).await;
        Err(Error::Unavailable(format!(
            "replication to {} failed; the write may or may not have been applied",
            failed
                .iter()
                .map(|(p, b)| format!("{b}/p{p}"))
                .collect::<Vec<_>>()
                .join(",")
        )))
    }

    /// Replicates LRU evictions that landed in other partitions than the
    /// write's, each under its partition's lock (after the write's locks are
    /// released, so locks are never taken out of order). A failure marks the
    /// backup out of sync; anti-entropy repairs it.
    async fn replicate_evictions(&self, ops: Vec<(u32, ReplOp)>) {
        let mut per_part: BTreeMap<u32, Vec<(u32, ReplOp)>> = BTreeMap::new();
        for (p, op) in ops {
            per_part.entry(p).or_default().push((p, op));
        }
        for (p, ops) in per_part {
            let _g = self.cluster.parts[p as usize].repl.lock().await;
            let table = self.cluster.table();
            if table.role_of(&self.cluster.me, p) == Role::Primary
                && self.log_ops(&ops).await.is_ok()
            {
                let _ = self.replicate(&table, ops).await;
            }
        }
    }

    /// Marks backups out of sync and tells a majority before returning.
    pub(crate) async fn report_unsynced(&self, pairs: Vec<(u32, String)>) {
        let c = &self.cluster;
        // Numbered before the backups leave the synced sets, so any snapshot
        // taken after carries a larger number and outranks this report.
        let seq = c.seq.fetch_add(1, Ordering::SeqCst);
        for (p, b) in &pairs {
            c.parts[*p as usize].synced.lock().remove(b);
        }
        // (Not recorded here: as primary, this node's synced sets are the truth.)
        let (alive, _) = c.liveness();
        let calls = alive.iter().filter(|m| m.name != self.name()).map(|m| {
            let req = Request::Unsynced {
                name: self.name().to_string(),
                incarnation: c.me.incarnation,
                seq,
                pairs: pairs.clone(),
            };
            async move {
                self.peers
                    .call(&m.peer, req, c.config.replication_timeout)
                    .await
            }
        });
        futures::future::join_all(calls).await;
    }

    // ------------------------------------------------------------ whole-collection ops

    fn primary_here(&self, table: &Table) -> impl Fn(u32) -> bool + use<> {
        let owned: Vec<bool> = (0..table.partition_count)
            .map(|p| table.role_of(&self.cluster.me, p) == Role::Primary)
            .collect();
        move |p| owned.get(p as usize).copied().unwrap_or(false)
    }

    /// Live keys of the partitions this node is primary of.
    pub fn keys(&self, collection: &str) -> Result<Vec<Bytes>> {
        let t = self.cluster.table();
        self.store.keys(collection, self.primary_here(&t))
    }

    /// Live entries of the partitions this node is primary of.
    pub fn size(&self, collection: &str) -> Result<u64> {
        let t = self.cluster.table();
        self.store.size(collection, self.primary_here(&t))
    }

    /// Clears the collection in the partitions this node is primary of.
    pub async fn clear(&self, collection: &str) -> Result<u64> {
        let meta = self.store.collection(collection)?;
        let t = self.cluster.table();
        let mut removed = 0;
        for p in (0..t.partition_count).filter(|p| t.role_of(&self.cluster.me, *p) == Role::Primary)
        {
            let planned = vec![(
                p,
                ReplOp::Clear {
                    collection: meta.name.to_string(),
                },
            )];
            removed += self
                .write(&t, vec![p], planned, |ops| self.store.apply_planned(ops))
                .await?;
        }
        Ok(removed)
    }

    // ------------------------------------------------------------ collections

    /// Gets or creates a collection here and on every live member.
    pub async fn create_collection(
        &self,
        name: &str,
        ttl: u64,
        max: u64,
    ) -> Result<(Arc<CollectionMeta>, bool)> {
        if let Some(wal) = &self.wal
            && self.store.collection(name).is_err()
        {
            wal.append(&crate::storage::wal::WalRecord::CreateCollection {
                name: resolve_collection(name).to_string(),
                default_ttl_ms: ttl,
                max_entries: max,
            })
            .await?;
        }
        let (meta, created) = self.store.get_or_create_collection(name, ttl, max)?;
        if created {
            self.broadcast(CollectionOp::Create {
                name: meta.name.to_string(),
                default_ttl_ms: meta.default_ttl_ms,
                max_entries: meta.max_entries,
            })
            .await;
        }
        Ok((meta, created))
    }

    /// Deletes a collection here and on every live member.
    pub async fn delete_collection(&self, name: &str) -> Result<bool> {
        if let Some(wal) = &self.wal
            && self.store.collection(name).is_ok()
            && resolve_collection(name) != distcache_client::partition::DEFAULT_COLLECTION
        {
            wal.append(&crate::storage::wal::WalRecord::DeleteCollection {
                name: resolve_collection(name).to_string(),
            })
            .await?;
        }
        let deleted = self.store.delete_collection(name)?;
        self.broadcast(CollectionOp::Delete {
            name: resolve_collection(name).to_string(),
        })
        .await;
        Ok(deleted)
    }

    async fn broadcast(&self, op: CollectionOp) {
        let (alive, _) = self.cluster.liveness();
        let calls = alive.iter().filter(|m| m.name != self.name()).map(|m| {
            let req = Request::Collection(op.clone());
            async move {
                (
                    m.name.clone(),
                    self.peers
                        .call(&m.peer, req, self.cluster.config.request_timeout)
                        .await,
                )
            }
        });
        for (name, r) in futures::future::join_all(calls).await {
            if r.is_err() {
                tracing::warn!(member = %name, "collection change not delivered; it syncs later");
            }
        }
    }

    async fn apply_collection(&self, op: &CollectionOp) -> Result<()> {
        if let Some(wal) = &self.wal {
            let rec = match op {
                CollectionOp::Create {
                    name,
                    default_ttl_ms,
                    max_entries,
                } => crate::storage::wal::WalRecord::CreateCollection {
                    name: name.clone(),
                    default_ttl_ms: *default_ttl_ms,
                    max_entries: *max_entries,
                },
                CollectionOp::Delete { name } => {
                    crate::storage::wal::WalRecord::DeleteCollection { name: name.clone() }
                }
            };
            wal.append(&rec).await?;
        }
        match op {
            CollectionOp::Create {
                name,
                default_ttl_ms,
                max_entries,
            } => self
                .store
                .get_or_create_collection(name, *default_ttl_ms, *max_entries)
                .map(|_| ()),
            CollectionOp::Delete { name } => self.store.delete_collection(name).map(|_| ()),
        }
    }

    /// Creates collections the coordinator has and this node lacks.
    pub(crate) async fn pull_collections(&self) {
        let Some(coord) = self.coordinator().filter(|c| c != self.name()) else {
            return;
        };
        let Some(spec) = self.cluster.members().into_iter().find(|m| m.name == coord) else {
            return;
        };
        if let Ok(Response::Collections(list)) = self
            .peers
            .call(
                &spec.peer,
                Request::ListCollections,
                self.cluster.config.request_timeout,
            )
            .await
        {
            for (name, ttl, max) in list {
                if self.store.collection(&name).is_err() {
                    let op = CollectionOp::Create {
                        name,
                        default_ttl_ms: ttl,
                        max_entries: max,
                    };
                    let _ = self.apply_collection(&op).await;
                }
            }
        }
    }

    // ------------------------------------------------------------ locks

    async fn lock_route(&self, key: &Bytes) -> Result<(Arc<Table>, u32, Route)> {
        let table = self.cluster.table();
        let p = lock_partition_for(key, table.partition_count);
        let route = self.route(&table, p)?;
        Ok((table, p, route))
    }

    /// Replicates `key`'s lock state (after a change on this primary).
    async fn replicate_lock(&self, table: &Table, p: u32, key: &Bytes) -> Result<()> {
        self.write(table, vec![p], Vec::new(), |_| {
            let state = self.locks.replica(key);
            let ops = vec![(
                p,
                ReplOp::Lock {
                    key: key.clone(),
                    state,
                },
            )];
            Ok((
                (),
                Written {
                    ops,
                    ..Written::default()
                },
            ))
        })
        .await
    }

    /// Acquire (waiting), routed to the lock's owner.
    pub async fn lock_acquire(
        &self,
        r: proto::AcquireLockRequest,
        hold: u64,
        wait: Duration,
        forwarded: bool,
    ) -> Result<Grant> {
        let (table, p, route) = self.lock_route(&r.key).await?;
        match route {
            Route::Local => {
                if !self.cluster.quorum() {
                    return Err(Error::QuorumLost("no majority".into()));
                }
                let g = self.locks.acquire(&r.key, hold, wait).await?;
                if let Err(e) = self.replicate_lock(&table, p, &r.key).await {
                    let _ = self.locks.release(&r.key, g.token);
                    return Err(e);
                }
                Ok(g)
            }
            Route::Remote(_) if forwarded => Err(self.not_owner(p)),
            Route::Remote(addr) => {
                let t = self.cluster.config.request_timeout + wait;
                let b = self
                    .forward(&addr, Forward::Acquire(r.encode_to_vec().into()), t)
                    .await?;
                let g = decode::<proto::LockGrant>(&b)?;
                Ok(Grant {
                    token: g.fencing_token,
                    hold_ms: g.hold_ms,
                })
            }
        }
    }

    /// Try-acquire, routed to the lock's owner.
    pub async fn lock_try(
        &self,
        r: proto::TryAcquireLockRequest,
        hold: u64,
        forwarded: bool,
    ) -> Result<Option<Grant>> {
        let (table, p, route) = self.lock_route(&r.key).await?;
        match route {
            Route::Local => {
                if !self.cluster.quorum() {
                    return Err(Error::QuorumLost("no majority".into()));
                }
                let Some(g) = self.locks.try_acquire(&r.key, hold) else {
                    return Ok(None);
                };
                if let Err(e) = self.replicate_lock(&table, p, &r.key).await {
                    let _ = self.locks.release(&r.key, g.token);
                    return Err(e);
                }
                Ok(Some(g))
            }
            Route::Remote(_) if forwarded => Err(self.not_owner(p)),
            Route::Remote(addr) => {
                let t = self.cluster.config.request_timeout;
                let b = self
                    .forward(&addr, Forward::TryAcquire(r.encode_to_vec().into()), t)
                    .await?;
                let resp = decode::<proto::TryAcquireLockResponse>(&b)?;
                Ok(resp.grant.filter(|_| resp.acquired).map(|g| Grant {
                    token: g.fencing_token,
                    hold_ms: g.hold_ms,
                }))
            }
        }
    }

    /// Release, routed to the lock's owner.
    pub async fn lock_release(&self, r: proto::ReleaseLockRequest, forwarded: bool) -> Result<()> {
        let (table, p, route) = self.lock_route(&r.key).await?;
        match route {
            Route::Local => {
                let res = self.locks.release(&r.key, r.fencing_token);
                self.replicate_lock(&table, p, &r.key).await?;
                res
            }
            Route::Remote(_) if forwarded => Err(self.not_owner(p)),
            Route::Remote(addr) => {
                let t = self.cluster.config.request_timeout;
                self.forward(&addr, Forward::Release(r.encode_to_vec().into()), t)
                    .await?;
                Ok(())
            }
        }
    }

    /// Extend, routed to the lock's owner.
    pub async fn lock_extend(
        &self,
        r: proto::ExtendLockRequest,
        hold: u64,
        forwarded: bool,
    ) -> Result<Grant> {
        let (table, p, route) = self.lock_route(&r.key).await?;
        match route {
            Route::Local => {
                let g = self.locks.extend(&r.key, r.fencing_token, hold)?;
                self.replicate_lock(&table, p, &r.key).await?;
                Ok(g)
            }
            Route::Remote(_) if forwarded => Err(self.not_owner(p)),
            Route::Remote(addr) => {
                let t = self.cluster.config.request_timeout;
                let b = self
                    .forward(&addr, Forward::Extend(r.encode_to_vec().into()), t)
                    .await?;
                let g = decode::<proto::LockGrant>(&b)?;
                Ok(Grant {
                    token: g.fencing_token,
                    hold_ms: g.hold_ms,
                })
            }
        }
    }

    /// Force release, routed to the lock's owner.
    pub async fn lock_force_release(
        &self,
        r: proto::ForceReleaseLockRequest,
        forwarded: bool,
    ) -> Result<bool> {
        let (table, p, route) = self.lock_route(&r.key).await?;
        match route {
            Route::Local => {
                let released = self.locks.force_release(&r.key);
                self.replicate_lock(&table, p, &r.key).await?;
                Ok(released)
            }
            Route::Remote(_) if forwarded => Err(self.not_owner(p)),
            Route::Remote(addr) => {
                let t = self.cluster.config.request_timeout;
                let b = self
                    .forward(&addr, Forward::ForceRelease(r.encode_to_vec().into()), t)
                    .await?;
                Ok(decode::<proto::ForceReleaseLockResponse>(&b)?.released)
            }
        }
    }

    // ------------------------------------------------------------ backup sync

    /// Starts snapshot transfers to backups that are not in sync.
    pub(crate) async fn sync_backups(self: &Arc<Self>) {
        let t = self.cluster.table();
        let mut todo = Vec::new();
        for p in 0..t.partition_count {
            if t.role_of(&self.cluster.me, p) != Role::Primary {
                continue;
            }
            let synced = self.cluster.parts[p as usize].synced.lock().clone();
            for b in t.backups(p) {
                if !synced.contains(b) && self.cluster.alive(b) {
                    todo.push((p, b.clone()));
                }
            }
        }
        for (p, b) in todo {
            {
                let mut syncing = self.syncing.lock();
                if syncing.len() >= 8 || !syncing.insert((p, b.clone())) {
                    continue;
                }
            }
            let node = self.clone();
            self.tasks().spawn(async move {
                if let Err(e) = node.sync_one(p, &b).await {
                    tracing::debug!(partition = p, backup = %b, error = %e, "backup sync failed");
                }
                node.syncing.lock().remove(&(p, b));
            });
        }
    }

    async fn sync_one(&self, p: u32, b: &str) -> Result<()> {
        let st = &self.cluster.parts[p as usize];
        let _g = st.repl.lock().await;
        let t = self.cluster.table();
        if t.role_of(&self.cluster.me, p) != Role::Primary || !t.backups(p).iter().any(|x| x == b) {
            return Ok(());
        }
        let addr = t
            .member(b)
            .map(|m| m.peer.clone())
            .ok_or_else(|| Error::Internal("no such member".into()))?;
        let mut snapshot = self.store.snapshot(p);
        snapshot.locks = self.locks.snapshot(p);
        let req = Request::Snapshot {
            epoch: t.epoch,
            partition: p,
            snapshot,
            seq: self.cluster.seq.fetch_add(1, Ordering::SeqCst),
        };
        match self.peers.call(&addr, req, Duration::from_secs(30)).await? {
            Response::Ok => {
                st.synced.lock().insert(b.to_string());
                tracing::debug!(partition = p, backup = %b, "backup in sync");
                Ok(())
            }
            Response::Error(e) => Err(Error::Remote {
                reason: e.reason,
                message: e.message,
            }),
            _ => Err(Error::Internal("unexpected answer".into())),
        }
    }

    /// Compares each in-sync backup's digest with this primary's copy and
    /// re-syncs the ones that differ.
    pub(crate) async fn anti_entropy(&self) {
        let t = self.cluster.table();
        let mut diverged = Vec::new();
        for p in 0..t.partition_count {
            if t.role_of(&self.cluster.me, p) != Role::Primary {
                continue;
            }
            let st = &self.cluster.parts[p as usize];
            let _g = st.repl.lock().await;
            let mine = self.store.digest(p);
            let synced = st.synced.lock().clone();
            for b in synced {
                let Some(m) = t.member(&b) else { continue };
                let req = Request::Digest {
                    epoch: t.epoch,
                    partition: p,
                };
                if let Ok(Response::Digest(theirs)) = self
                    .peers
                    .call(&m.peer, req, self.cluster.config.request_timeout)
                    .await
                    && theirs != mine
                {
                    tracing::warn!(partition = p, backup = %b, "anti-entropy: backup diverged, re-syncing");
                    diverged.push((p, b));
                }
            }
        }
        if !diverged.is_empty() {
            self.report_unsynced(diverged).await;
        }
    }

    // ------------------------------------------------------------ peer requests

    /// Answers one request from a peer.
    pub(crate) async fn handle_peer(&self, req: Request) -> Response {
        let c = &self.cluster;
        match req {
            Request::Heartbeat(hb) => {
                let newer = hb.epoch > self.epoch();
                let from = hb.name.clone();
                c.record(hb);
                let reply = Response::Heartbeat(c.heartbeat(c.quorum()));
                if newer && let Some(m) = c.members().into_iter().find(|m| m.name == from) {
                    let timeout = c.config.request_timeout;
                    if let Ok(Response::Table(Some(t))) =
                        self.peers.call(&m.peer, Request::GetTable, timeout).await
                    {
                        self.install(t);
                    }
                }
                reply
            }
            Request::GetTable => {
                let t = c.table();
                Response::Table((t.epoch > 0).then(|| (*t).clone()))
            }
            Request::Propose(t) => {
                let mut promised = c.promised.lock();
                let current = c.table().epoch;
                if t.epoch > *promised && t.epoch > current {
                    *promised = t.epoch;
                    Response::Vote {
                        granted: true,
                        promised: t.epoch,
                    }
                } else {
                    Response::Vote {
                        granted: false,
                        promised: (*promised).max(current),
                    }
                }
            }
            Request::Commit(t) => {
                self.install(t);
                Response::Ok
            }
            Request::Forward(f) => match self.run_forwarded(f).await {
                Ok(b) => Response::Forwarded(b),
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::Replicate {
                epoch,
                partition,
                ops,
            } => match self.backup_check(epoch, partition) {
                Ok(()) => {
                    let _g = c.parts[partition as usize].repl.lock().await;
                    let logged: Vec<(u32, ReplOp)> =
                        ops.iter().map(|o| (partition, o.clone())).collect();
                    if let Err(e) = self.log_ops(&logged).await {
                        return Response::Error(e.to_wire());
                    }
                    tracing::trace!(partition, epoch, ops = ?ops, "replicated ops applied");
                    self.store.apply(partition, &ops);
                    for op in &ops {
                        if let ReplOp::Lock { key, state } = op {
                            self.locks.apply_replica(key, *state);
                        }
                    }
                    Response::Ok
                }
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::Snapshot {
                epoch,
                partition,
                snapshot,
                seq,
            } => {
                let t = c.table();
                if epoch != t.epoch || t.role_of(&self.cluster.me, partition) != Role::Backup {
                    return Response::Error(self.not_owner(partition).to_wire());
                }
                let st = &c.parts[partition as usize];
                let _g = st.repl.lock().await;
                if let Some(wal) = &self.wal {
                    let rec = crate::storage::wal::WalRecord::Install {
                        partition,
                        snapshot: snapshot.clone(),
                    };
                    if let Err(e) = wal.append(&rec).await {
                        return Response::Error(e.to_wire());
                    }
                }
                tracing::trace!(partition, epoch, "snapshot installed");
                self.store.install(partition, &snapshot);
                self.locks.install(partition, &snapshot.locks);
                st.snap_seq.store(seq, Ordering::SeqCst);
                st.loaded.store(true, Ordering::SeqCst);
                Response::Ok
            }
            Request::Digest { partition, .. } if partition < self.store.partition_count() => {
                Response::Digest(self.store.digest(partition))
            }
            Request::Digest { partition, .. } => {
                Response::Error(self.not_owner(partition).to_wire())
            }
            Request::Collection(op) => match self.apply_collection(&op).await {
                Ok(()) => Response::Ok,
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::ListCollections => Response::Collections(
                self.store
                    .list_collections()
                    .iter()
                    .map(|m| (m.name.to_string(), m.default_ttl_ms, m.max_entries))
                    .collect(),
            ),
            Request::Unsynced {
                name,
                incarnation,
                seq,
                pairs,
            } => {
                let count = self.store.partition_count();
                let pairs: Vec<(u32, String)> =
                    pairs.into_iter().filter(|(p, _)| *p < count).collect();
                c.record_unsynced(&name, incarnation, seq, &pairs);
                Response::Ok
            }
        }
    }

    fn backup_check(&self, epoch: u64, p: u32) -> Result<()> {
        let t = self.cluster.table();
        if epoch != t.epoch {
            return Err(Error::Unavailable(format!(
                "epoch {epoch} is not this node's {}",
                t.epoch
            )));
        }
        if t.role_of(&self.cluster.me, p) != Role::Backup {
            return Err(self.not_owner(p));
        }
        if !self.cluster.parts[p as usize].loaded.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(format!(
                "backup copy of partition {p} not in sync"
            )));
        }
        Ok(())
    }

    async fn run_forwarded(&self, f: Forward) -> Result<Bytes> {
        use crate::config::{DEFAULT_ACQUIRE_MS, DEFAULT_HOLD_MS};
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        Ok(match f {
            Forward::Command(b) => {
                let cmd = decode::<proto::Command>(&b)?;
                let op = cmd
                    .op
                    .ok_or_else(|| Error::InvalidArgument("command without op".into()))?;
                let result = self.run_command(op, true).await;
                proto::CommandResult {
                    id: 0,
                    result: Some(result),
                }
                .encode_to_vec()
            }
            Forward::Acquire(b) => {
                let r = decode::<proto::AcquireLockRequest>(&b)?;
                let (hold, wait) = (
                    or(r.hold_timeout_ms, DEFAULT_HOLD_MS),
                    or(r.acquire_timeout_ms, DEFAULT_ACQUIRE_MS),
                );
                let key = r.key.clone();
                let g = self
                    .lock_acquire(r, hold, Duration::from_millis(wait), true)
                    .await?;
                proto::LockGrant {
                    key,
                    fencing_token: g.token,
                    hold_ms: g.hold_ms,
                }
                .encode_to_vec()
            }
            Forward::TryAcquire(b) => {
                let r = decode::<proto::TryAcquireLockRequest>(&b)?;
                let hold = or(r.hold_timeout_ms, DEFAULT_HOLD_MS);
                let key = r.key.clone();
                let g = self.lock_try(r, hold, true).await?;
                proto::TryAcquireLockResponse {
                    acquired: g.is_some(),
                    grant: g.map(|g| proto::LockGrant {
                        key,
                        fencing_token: g.token,
                        hold_ms: g.hold_ms,
                    }),
                }
                .encode_to_vec()
            }
            Forward::Release(b) => {
                self.lock_release(decode(&b)?, true).await?;
                proto::ReleaseLockResponse {}.encode_to_vec()
            }
            Forward::Extend(b) => {
                let r = decode::<proto::ExtendLockRequest>(&b)?;
                let hold = or(r.hold_timeout_ms, DEFAULT_HOLD_MS);
                let key = r.key.clone();
                let g = self.lock_extend(r, hold, true).await?;
                proto::LockGrant {
                    key,
                    fencing_token: g.token,
                    hold_ms: g.hold_ms,
                }
                .encode_to_vec()
            }
            Forward::ForceRelease(b) => {
                let released = self.lock_force_release(decode(&b)?, true).await?;
                proto::ForceReleaseLockResponse { released }.encode_to_vec()
            }
        }
        .into())
    }
}

fn get_response(v: Option<Bytes>) -> proto::GetResponse {
    proto::GetResponse {
        found: v.is_some(),
        value: v.unwrap_or_default(),
    }
}
