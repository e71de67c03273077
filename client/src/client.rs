//! The smart client: routes each key to its owner over shared Batch streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use parking_lot::{Mutex, RwLock};

use crate::collection::{Collection, CollectionOptions};
use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::lock::{LockGuard, LockOptions};
use crate::partition::{DEFAULT_COLLECTION, lock_partition_for, partition_for};
use crate::proto::{self, cluster_client::ClusterClient, command, command_result};
use crate::proto::{collections_client::CollectionsClient, locks_client::LocksClient};
use crate::routing::{NodeConn, Routing};

/// A connection to a distcache cluster. Cheap to clone; clones share
/// connections, streams and the cached partition table.
///
/// ```no_run
/// # async fn demo() -> distcache_client::Result<()> {
/// use std::time::Duration;
/// let client = distcache_client::Client::connect(["127.0.0.1:7100"]).await?;
/// client.put("user:123", "alice").await?;
/// assert_eq!(client.get("user:123").await?.as_deref(), Some(&b"alice"[..]));
/// client.put_with_ttl("otp:42", "123456", Duration::from_secs(30)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    routing: RwLock<Arc<Routing>>,
    conns: Mutex<HashMap<String, Arc<NodeConn>>>,
    refresh_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.inner.routing.read();
        f.debug_struct("Client")
            .field("epoch", &r.epoch)
            .field("members", &r.members.len())
            .finish()
    }
}

impl Client {
    /// Connects with default settings to the first reachable seed endpoint
    /// (`host:port`) and loads the partition table.
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Client::with_config(ClientConfig::new(endpoints)).await
    }

    /// Connects with `config`.
    pub async fn with_config(config: ClientConfig) -> Result<Client> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidArgument("no endpoints given".into()));
        }
        let mut conns = HashMap::new();
        let mut last = String::new();
        for ep in &config.endpoints {
            let conn = Arc::new(NodeConn::new(ep, &config)?);
            match fetch_table(&conn, config.connect_timeout + config.request_timeout).await {
                Ok(table) => {
                    conns.insert(ep.clone(), conn.clone());
                    let routing = Routing::build(&table, conn, &mut conns, &config)?;
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            config,
                            routing: RwLock::new(Arc::new(routing)),
                            conns: Mutex::new(conns),
                            refresh_lock: tokio::sync::Mutex::new(()),
                        }),
                    });
                }
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        Err(Error::Connect(last))
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Epoch of the cached partition table.
    pub fn table_epoch(&self) -> u64 {
        self.inner.routing.read().epoch
    }

    /// Partition count of the cluster.
    pub fn partition_count(&self) -> u32 {
        self.inner.routing.read().partition_count
    }

    fn routing(&self) -> Arc<Routing> {
        self.inner.routing.read().clone()
    }

    /// Reloads the partition table from any reachable member (single-flight:
    /// callers that queue behind a refresh that already moved the epoch
    /// forward return at once).
    pub async fn refresh(&self) -> Result<()> {
        let seen = self.table_epoch();
        let _g = self.inner.refresh_lock.lock().await;
        if self.table_epoch() > seen {
            return Ok(());
        }
        let current = self.routing();
        let mut candidates = current.members.clone();
        for ep in &self.inner.config.endpoints {
            let known = candidates.iter().any(|c| &c.address == ep);
            if !known {
                candidates.push(Arc::new(NodeConn::new(ep, &self.inner.config)?));
            }
        }
        // Ask every member at once and keep the newest table: a member cut
        // off on the minority side still answers with its stale epoch.
        let timeout = self
            .inner
            .config
            .request_timeout
            .min(Duration::from_secs(2));
        let answers = join_all(candidates.into_iter().map(|conn| async move {
            let r = fetch_table(&conn, timeout).await;
            (conn, r)
        }))
        .await;
        let mut last = Error::Connect("no member reachable".into());
        let mut best: Option<(Arc<NodeConn>, proto::PartitionTableResponse)> = None;
        for (conn, r) in answers {
            match r {
                Ok(t)
                    if t.epoch >= current.epoch
                        && best.as_ref().is_none_or(|(_, b)| t.epoch > b.epoch) =>
                {
                    best = Some((conn, t));
                }
                Ok(_) => {}
                Err(e) => last = e,
            }
        }
        let Some((conn, table)) = best else {
            return Err(last);
        };
        let mut conns = self.inner.conns.lock();
        let routing = Routing::build(&table, conn, &mut conns, &self.inner.config)?;
        *self.inner.routing.write() = Arc::new(routing);
        Ok(())
    }

    async fn backoff(&self, attempt: u32, err: &Error) {
        if matches!(
            err,
            Error::NotOwner { .. } | Error::Unavailable(_) | Error::Connect(_)
        ) {
            let _ = self.refresh().await;
        }
        let ms = 20u64 << attempt.min(6);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Runs `op` on the owner of `partition` over a Batch stream, retrying
    /// routing/availability failures with backoff.
    pub(crate) async fn execute(
        &self,
        partition: u32,
        op: command::Op,
    ) -> Result<command_result::Result> {
        let mut attempt = 0;
        let mut replica = 0;
        loop {
            let node = self.routing().pick(partition, replica);
            let res = self.execute_on(&node, op.clone()).await;
            match res {
                Err(e) if e.is_retryable() && attempt < self.inner.config.max_retries => {
                    // An unreachable node: try the next replica; a routing
                    // answer: back to the (refreshed) primary.
                    replica = match e {
                        Error::Unavailable(_) | Error::Connect(_) | Error::QuorumLost(_) => {
                            replica + 1
                        }
                        _ => 0,
                    };
                    self.backoff(attempt, &e).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn execute_on(&self, node: &NodeConn, op: command::Op) -> Result<command_result::Result> {
        let t = self.inner.config.request_timeout;
        match tokio::time::timeout(t, async { node.mux().await?.execute(op).await }).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(format!(
                "no answer from {} within {t:?}",
                node.address
            ))),
        }
    }

    /// Groups `items` by the owner of their partition and runs one command
    /// per owner in parallel; failed groups are re-routed and retried.
    pub(crate) async fn fan_out<T: Clone, R>(
        &self,
        collection: &str,
        items: Vec<T>,
        key_of: impl Fn(&T) -> &[u8],
        make: impl Fn(Vec<T>) -> command::Op,
        mut merge: impl FnMut(command_result::Result) -> Result<R>,
    ) -> Result<Vec<R>> {
        let mut out = Vec::new();
        let mut todo = items;
        let mut attempt = 0;
        while !todo.is_empty() {
            let routing = self.routing();
            let mut groups: HashMap<String, (Arc<NodeConn>, Vec<T>)> = HashMap::new();
            for item in todo.drain(..) {
                let p = partition_for(collection, key_of(&item), routing.partition_count);
                let node = routing.owner(p);
                groups
                    .entry(node.address.clone())
                    .or_insert_with(|| (node, Vec::new()))
                    .1
                    .push(item);
            }
            let calls = groups.into_values().map(|(node, items)| {
                let op = make(items.clone());
                async move { (self.execute_on(&node, op).await, items) }
            });
            let mut first_err = None;
            for (res, items) in join_all(calls).await {
                match res {
                    Ok(r) => out.push(merge(r)?),
                    Err(e) if e.is_retryable() && attempt < self.inner.config.max_retries => {
                        todo.extend(items);
                        first_err.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(e) = first_err {
                self.backoff(attempt, &e).await;
                attempt += 1;
            }
        }
        Ok(out)
    }

    /// Runs a unary call on every member (for keys/size/clear), re-running
    /// on all members after a retryable failure.
    pub(crate) async fn on_every_member<R, F, Fut>(&self, call: F) -> Result<Vec<R>>
    where
        F: Fn(tonic::transport::Channel) -> Fut,
        Fut: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            let routing = self.routing();
            let results = join_all(routing.members.iter().map(|m| call(m.channel()))).await;
            match results
                .into_iter()
                .map(|r| r.map_err(Error::from))
                .collect()
            {
                Err(e) if e.is_retryable() && attempt < self.inner.config.max_retries => {
                    self.backoff(attempt, &e).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Runs a unary call on one member chosen by `partition` (or any member),
    /// retrying routing/availability failures.
    pub(crate) async fn unary<R, F, Fut>(
        &self,
        partition: Option<u32>,
        timeout: Duration,
        call: F,
    ) -> Result<R>
    where
        F: Fn(tonic::transport::Channel) -> Fut,
        Fut: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            let routing = self.routing();
            let node = match partition {
                Some(p) => routing.owner(p),
                None => routing.members[attempt as usize % routing.members.len()].clone(),
            };
            let res = match tokio::time::timeout(timeout, call(node.channel())).await {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::Timeout(format!(
                    "no answer from {} within {timeout:?}",
                    node.address
                ))),
            };
            match res {
                Err(e) if e.is_retryable() && attempt < self.inner.config.max_retries => {
                    self.backoff(attempt, &e).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn max_msg(&self) -> usize {
        self.inner.config.max_message_bytes
    }

    // ------------------------------------------------------------ collections

    /// The default collection (`__default__`), which always exists.
    pub fn default_collection(&self) -> Collection {
        Collection::new(self.clone(), DEFAULT_COLLECTION.into())
    }

    /// A handle on collection `name` without creating it: its operations fail
    /// with [`Error::CollectionNotFound`] while the collection does not exist.
    pub fn collection_handle(&self, name: &str) -> Collection {
        Collection::new(self.clone(), name.into())
    }

    /// Gets or creates collection `name` with default settings.
    pub async fn collection(&self, name: &str) -> Result<Collection> {
        self.collection_with(name, CollectionOptions::default())
            .await
    }

    /// Gets or creates collection `name`; the options apply only when it is
    /// created (an existing collection keeps its settings, see
    /// [`Collection::settings`]).
    pub async fn collection_with(&self, name: &str, opts: CollectionOptions) -> Result<Collection> {
        let req = proto::GetOrCreateCollectionRequest {
            name: name.to_string(),
            default_ttl_ms: opts.default_ttl.map_or(0, |d| d.as_millis() as u64),
            max_entries: opts.max_entries.unwrap_or(0),
        };
        let max = self.max_msg();
        let resp = self
            .unary(None, self.inner.config.request_timeout, |ch| {
                let req = req.clone();
                async move {
                    let mut c = CollectionsClient::new(ch).max_decoding_message_size(max);
                    Ok(c.get_or_create(req).await?.into_inner())
                }
            })
            .await?;
        let settings = resp.settings.unwrap_or_default();
        let mut c = Collection::new(self.clone(), name.into());
        c.set_settings(settings);
        Ok(c)
    }

    /// Names and settings of every collection.
    pub async fn list_collections(&self) -> Result<Vec<proto::CollectionSettings>> {
        let max = self.max_msg();
        let resp = self
            .unary(None, self.inner.config.request_timeout, |ch| async move {
                let mut c = CollectionsClient::new(ch).max_decoding_message_size(max);
                Ok(c.list(proto::ListCollectionsRequest {}).await?.into_inner())
            })
            .await?;
        Ok(resp.collections)
    }

    /// Whether collection `name` exists.
    pub async fn collection_exists(&self, name: &str) -> Result<bool> {
        let req = proto::CollectionExistsRequest { name: name.into() };
        let resp = self
            .unary(None, self.inner.config.request_timeout, |ch| {
                let req = req.clone();
                async move { Ok(CollectionsClient::new(ch).exists(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.exists)
    }

    /// Clears and removes collection `name`; false if it did not exist.
    pub async fn delete_collection(&self, name: &str) -> Result<bool> {
        let req = proto::DeleteCollectionRequest { name: name.into() };
        let resp = self
            .unary(None, self.inner.config.request_timeout, |ch| {
                let req = req.clone();
                async move { Ok(CollectionsClient::new(ch).delete(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.deleted)
    }

    // ------------------------------------------------------------ default-collection ops

    /// Value of `key` in the default collection.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.default_collection().get(key).await
    }

    /// Stores `value` under `key` in the default collection (its default TTL applies).
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<()> {
        self.default_collection().put(key, value).await
    }

    /// Stores `value` under `key` in the default collection for `ttl`.
    pub async fn put_with_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<()> {
        self.default_collection()
            .put_with_ttl(key, value, ttl)
            .await
    }

    /// Removes `key` from the default collection; true if it was there.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.default_collection().delete(key).await
    }

    // ------------------------------------------------------------ locks

    /// Acquires lock `key`, waiting up to `opts.acquire_timeout` in a fair
    /// (FIFO) queue on the owning node.
    ///
    /// ```no_run
    /// # async fn demo(client: distcache_client::Client) -> distcache_client::Result<()> {
    /// use distcache_client::LockOptions;
    /// let lock = client.acquire_lock("resource-x", LockOptions::default()).await?;
    /// println!("fencing token {}", lock.fencing_token());
    /// lock.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn acquire_lock(
        &self,
        key: impl AsRef<[u8]>,
        opts: LockOptions,
    ) -> Result<LockGuard> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let req = proto::AcquireLockRequest {
            key: key.clone(),
            hold_timeout_ms: opts.hold_timeout.as_millis() as u64,
            acquire_timeout_ms: opts.acquire_timeout.as_millis() as u64,
        };
        let p = lock_partition_for(&key, self.partition_count());
        let timeout = self.inner.config.request_timeout + opts.acquire_timeout;
        let grant = self
            .unary(Some(p), timeout, |ch| {
                let req = req.clone();
                async move { Ok(LocksClient::new(ch).acquire(req).await?.into_inner()) }
            })
            .await?;
        Ok(LockGuard::new(self.clone(), key, grant))
    }

    /// Tries lock `key` once; `None` when another holder has it.
    pub async fn try_acquire_lock(
        &self,
        key: impl AsRef<[u8]>,
        hold_timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let req = proto::TryAcquireLockRequest {
            key: key.clone(),
            hold_timeout_ms: hold_timeout.as_millis() as u64,
        };
        let p = lock_partition_for(&key, self.partition_count());
        let resp = self
            .unary(Some(p), self.inner.config.request_timeout, |ch| {
                let req = req.clone();
                async move { Ok(LocksClient::new(ch).try_acquire(req).await?.into_inner()) }
            })
            .await?;
        Ok(match (resp.acquired, resp.grant) {
            (true, Some(grant)) => Some(LockGuard::new(self.clone(), key, grant)),
            _ => None,
        })
    }

    /// Releases lock `key` whoever holds it (admin operation); true if it was held.
    pub async fn force_release_lock(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let p = lock_partition_for(&key, self.partition_count());
        let req = proto::ForceReleaseLockRequest { key };
        let resp = self
            .unary(Some(p), self.inner.config.request_timeout, |ch| {
                let req = req.clone();
                async move { Ok(LocksClient::new(ch).force_release(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.released)
    }

    /// Releases lock `key` held with fencing `token` (for tokens kept outside
    /// a [`LockGuard`], e.g. by the CLI).
    pub async fn release_lock_token(&self, key: impl AsRef<[u8]>, token: u64) -> Result<()> {
        self.release_lock(Bytes::copy_from_slice(key.as_ref()), token)
            .await
    }

    pub(crate) async fn release_lock(&self, key: Bytes, token: u64) -> Result<()> {
        let p = lock_partition_for(&key, self.partition_count());
        let req = proto::ReleaseLockRequest {
            key,
            fencing_token: token,
        };
        self.unary(Some(p), self.inner.config.request_timeout, |ch| {
            let req = req.clone();
            async move { Ok(LocksClient::new(ch).release(req).await?.into_inner()) }
        })
        .await?;
        Ok(())
    }

    pub(crate) async fn extend_lock(
        &self,
        key: Bytes,
        token: u64,
        hold: Duration,
    ) -> Result<proto::LockGrant> {
        let p = lock_partition_for(&key, self.partition_count());
        let req = proto::ExtendLockRequest {
            key,
            fencing_token: token,
            hold_timeout_ms: hold.as_millis() as u64,
        };
        self.unary(Some(p), self.inner.config.request_timeout, |ch| {
            let req = req.clone();
            async move { Ok(LocksClient::new(ch).extend(req).await?.into_inner()) }
        })
        .await
    }

    // ------------------------------------------------------------ cluster

    /// The partition table as some member sees it.
    pub async fn partition_table(&self) -> Result<proto::PartitionTableResponse> {
        let max = self.max_msg();
        self.unary(None, self.inner.config.request_timeout, |ch| async move {
            let mut c = ClusterClient::new(ch).max_decoding_message_size(max);
            Ok(c.partition_table(proto::PartitionTableRequest {})
                .await?
                .into_inner())
        })
        .await
    }

    /// The members as some member sees them.
    pub async fn members(&self) -> Result<Vec<proto::Member>> {
        let resp = self
            .unary(None, self.inner.config.request_timeout, |ch| async move {
                Ok(ClusterClient::new(ch)
                    .members(proto::MembersRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(resp.members)
    }

    /// Health of the member this client talks to first.
    pub async fn health(&self) -> Result<proto::HealthResponse> {
        self.unary(None, self.inner.config.request_timeout, |ch| async move {
            Ok(ClusterClient::new(ch)
                .health(proto::HealthRequest {})
                .await?
                .into_inner())
        })
        .await
    }
}

async fn fetch_table(conn: &NodeConn, timeout: Duration) -> Result<proto::PartitionTableResponse> {
    let mut c = ClusterClient::new(conn.channel()).max_decoding_message_size(64 << 20);
    match tokio::time::timeout(timeout, c.partition_table(proto::PartitionTableRequest {})).await {
        Ok(r) => Ok(r?.into_inner()),
        Err(_) => Err(Error::Timeout(format!("{} did not answer", conn.address))),
    }
}
