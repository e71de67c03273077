//! The smart client: routes each key to its owner over shared Batch streams.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::collection::{Collection, CollectionOptions};
use crate::config::ClientConfig;
use crate::error::Result;
use crate::lock::{self, LockGuard, LockOptions};
use crate::partition::{DEFAULT_COLLECTION, lock_partition_for};
use crate::proto::{self, cluster_client::ClusterClient};
use crate::proto::{collections_client::CollectionsClient, locks_client::LocksClient};
use crate::router::Router;

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
#[derive(Clone, Debug)]
pub struct Client {
    router: Arc<Router>,
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
        Ok(Client {
            router: Arc::new(Router::connect(config).await?),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        self.router.config()
    }

    /// Epoch of the cached partition table.
    pub fn table_epoch(&self) -> u64 {
        self.router.table_epoch()
    }

    /// Partition count of the cluster.
    pub fn partition_count(&self) -> u32 {
        self.router.partition_count()
    }

    /// Reloads the partition table from any reachable member (single-flight:
    /// callers that queue behind a refresh that already moved the epoch
    /// forward return at once).
    pub async fn refresh(&self) -> Result<()> {
        self.router.refresh().await
    }

    // ------------------------------------------------------------ collections

    /// The default collection (`__default__`), which always exists.
    pub fn default_collection(&self) -> Collection {
        Collection::new(self.router.clone(), DEFAULT_COLLECTION.into())
    }

    /// A handle on collection `name` without creating it: its operations fail
    /// with [`crate::Error::CollectionNotFound`] while the collection does not exist.
    pub fn collection_handle(&self, name: &str) -> Collection {
        Collection::new(self.router.clone(), name.into())
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
        let max = self.router.max_msg();
        let resp = self
            .router
            .any(|ch| {
                let req = req.clone();
                async move {
                    let mut c = CollectionsClient::new(ch).max_decoding_message_size(max);
                    Ok(c.get_or_create(req).await?.into_inner())
                }
            })
            .await?;
        let settings = resp.settings.unwrap_or_default();
        let mut c = Collection::new(self.router.clone(), name.into());
        c.set_settings(settings);
        Ok(c)
    }

    /// Names and settings of every collection (that this client may see), in
    /// name order, page by page.
    pub async fn list_collections(&self) -> Result<Vec<proto::CollectionSettings>> {
        let max = self.router.max_msg();
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = proto::ListCollectionsRequest {
                page_size: 0,
                page_token: page_token.clone(),
            };
            let resp = self
                .router
                .any(|ch| {
                    let req = req.clone();
                    async move {
                        let mut c = CollectionsClient::new(ch).max_decoding_message_size(max);
                        Ok(c.list(req).await?.into_inner())
                    }
                })
                .await?;
            out.extend(resp.collections);
            if resp.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = resp.next_page_token;
        }
    }

    /// Whether collection `name` exists.
    pub async fn collection_exists(&self, name: &str) -> Result<bool> {
        let req = proto::CollectionExistsRequest { name: name.into() };
        let resp = self
            .router
            .any(|ch| {
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
            .router
            .any(|ch| {
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
        let timeout = self
            .config()
            .request_timeout
            .saturating_add(opts.acquire_timeout);
        let grant = self
            .router
            .unary(Some(p), timeout, |ch| {
                let req = req.clone();
                async move { Ok(LocksClient::new(ch).acquire(req).await?.into_inner()) }
            })
            .await?;
        Ok(LockGuard::new(self.router.clone(), key, grant))
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
            .router
            .unary(Some(p), self.config().request_timeout, |ch| {
                let req = req.clone();
                async move { Ok(LocksClient::new(ch).try_acquire(req).await?.into_inner()) }
            })
            .await?;
        Ok(match (resp.acquired, resp.grant) {
            (true, Some(grant)) => Some(LockGuard::new(self.router.clone(), key, grant)),
            _ => None,
        })
    }

    /// Releases lock `key` whoever holds it (admin operation); true if it was held.
    pub async fn force_release_lock(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let p = lock_partition_for(&key, self.partition_count());
        let req = proto::ForceReleaseLockRequest { key };
        let resp = self
            .router
            .unary(Some(p), self.config().request_timeout, |ch| {
                let req = req.clone();
                async move { Ok(LocksClient::new(ch).force_release(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.released)
    }

    /// Releases lock `key` held with fencing `token` (for tokens kept outside
    /// a [`LockGuard`], e.g. by the CLI).
    pub async fn release_lock_token(&self, key: impl AsRef<[u8]>, token: u64) -> Result<()> {
        lock::release(&self.router, Bytes::copy_from_slice(key.as_ref()), token).await
    }

    // ------------------------------------------------------------ cluster

    /// The partition table as some member sees it.
    pub async fn partition_table(&self) -> Result<proto::PartitionTableResponse> {
        let max = self.router.max_msg();
        self.router
            .any(|ch| async move {
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
            .router
            .any(|ch| async move {
                Ok(ClusterClient::new(ch)
                    .members(proto::MembersRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(resp.members)
    }

    /// Declares `member` gone for good (admin): its disk and process will
    /// not return, so partitions whose in-sync replicas were all on it
    /// restart empty, which is reported as data loss. Returns how many
    /// partitions the cluster has restarted empty so far.
    pub async fn forget_member(&self, member: &str) -> Result<u64> {
        let resp = self
            .router
            .any(|ch| {
                let member = member.to_string();
                async move {
                    Ok(ClusterClient::new(ch)
                        .forget(proto::ForgetMemberRequest { member })
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(resp.partitions_lost)
    }

    /// Health of the member this client talks to first.
    pub async fn health(&self) -> Result<proto::HealthResponse> {
        self.router
            .any(|ch| async move {
                Ok(ClusterClient::new(ch)
                    .health(proto::HealthRequest {})
                    .await?
                    .into_inner())
            })
            .await
    }
}
