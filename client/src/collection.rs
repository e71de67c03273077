//! A handle on one named collection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::partition::partition_for;
use crate::proto::{self, cache_client::CacheClient, command, command_result};
use crate::router::Router;

/// Settings used when a collection is created.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CollectionOptions {
    /// Time to live of entries put without their own TTL (default: none).
    pub default_ttl: Option<Duration>,
    /// Entry limit enforced by LRU eviction (default: none); see README for the rule.
    pub max_entries: Option<u64>,
}

impl CollectionOptions {
    /// Sets the default TTL.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }
    /// Sets the LRU entry limit.
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = Some(n);
        self
    }
}

/// A named key-value namespace. Cheap to clone.
///
/// ```no_run
/// # async fn demo(client: distcache_client::Client) -> distcache_client::Result<()> {
/// use std::time::Duration;
/// use distcache_client::CollectionOptions;
/// let sessions = client
///     .collection_with("sessions", CollectionOptions::default().default_ttl(Duration::from_secs(3600)))
///     .await?;
/// sessions.put_value("sess:abc", &vec![1u32, 2, 3], None).await?;
/// let v: Option<Vec<u32>> = sessions.get_value("sess:abc").await?;
/// assert_eq!(v, Some(vec![1, 2, 3]));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Collection {
    router: Arc<Router>,
    name: Arc<str>,
    settings: Option<proto::CollectionSettings>,
}

fn ttl_ms(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|d| (d.as_millis() as u64).max(1))
}

fn unexpected() -> Error {
    Error::Internal("unexpected result type".into())
}

impl Collection {
    pub(crate) fn new(router: Arc<Router>, name: Arc<str>) -> Self {
        Collection {
            router,
            name,
            settings: None,
        }
    }

    pub(crate) fn set_settings(&mut self, s: proto::CollectionSettings) {
        self.settings = Some(s);
    }

    /// The collection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Settings as the node reported them when this handle was made (none for
    /// the default-collection handle).
    pub fn settings(&self) -> Option<&proto::CollectionSettings> {
        self.settings.as_ref()
    }

    fn partition(&self, key: &[u8]) -> u32 {
        partition_for(&self.name, key, self.router.partition_count())
    }

    /// The value of `key`, if present and not expired.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let op = command::Op::Get(proto::GetRequest {
            collection: self.name.to_string(),
            key: key.clone(),
        });
        match self.router.execute(self.partition(&key), op).await? {
            command_result::Result::Get(r) => Ok(r.found.then_some(r.value)),
            _ => Err(unexpected()),
        }
    }

    async fn put_inner(&self, key: &[u8], value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let key = Bytes::copy_from_slice(key);
        let p = self.partition(&key);
        let op = command::Op::Put(proto::PutRequest {
            collection: self.name.to_string(),
            key,
            value,
            ttl_ms: ttl_ms(ttl),
        });
        match self.router.execute(p, op).await? {
            command_result::Result::Put(_) => Ok(()),
            _ => Err(unexpected()),
        }
    }

    /// Stores `value` under `key`; the collection's default TTL applies.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<()> {
        self.put_inner(key.as_ref(), value.into(), None).await
    }

    /// Stores `value` under `key`, expiring after `ttl`.
    pub async fn put_with_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<()> {
        self.put_inner(key.as_ref(), value.into(), Some(ttl)).await
    }

    /// Stores `value` only if `key` holds no live entry; true if it did not
    /// (Redis `SET NX`). `ttl` None: the collection's default.
    pub async fn put_if_absent(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let p = self.partition(&key);
        let op = command::Op::PutIfAbsent(proto::PutIfAbsentRequest {
            collection: self.name.to_string(),
            key,
            value: value.into(),
            ttl_ms: ttl_ms(ttl),
        });
        match self.router.execute_once(p, op).await? {
            command_result::Result::PutIfAbsent(r) => Ok(r.stored),
            _ => Err(unexpected()),
        }
    }

    /// Replaces the value of `key` with `new` only if it is `expected`; true
    /// if it was replaced (an absent key never matches).
    pub async fn compare_and_set(
        &self,
        key: impl AsRef<[u8]>,
        expected: impl Into<Bytes>,
        new: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let p = self.partition(&key);
        let op = command::Op::CompareAndSet(proto::CompareAndSetRequest {
            collection: self.name.to_string(),
            key,
            expected: expected.into(),
            value: new.into(),
            ttl_ms: ttl_ms(ttl),
        });
        match self.router.execute_once(p, op).await? {
            command_result::Result::CompareAndSet(r) => Ok(r.swapped),
            _ => Err(unexpected()),
        }
    }

    /// Adds `delta` to the decimal integer at `key` (absent = 0) and returns
    /// the new value (Redis `INCRBY`); the entry keeps its expiry.
    ///
    /// Not retried after an indeterminate failure (it is not idempotent):
    /// an `Unavailable` or `Timeout` error means the increment may or may
    /// not have been applied.
    pub async fn increment(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let p = self.partition(&key);
        let op = command::Op::Increment(proto::IncrementRequest {
            collection: self.name.to_string(),
            key,
            delta,
            ttl_ms: None,
        });
        match self.router.execute_once(p, op).await? {
            command_result::Result::Increment(r) => Ok(r.value),
            _ => Err(unexpected()),
        }
    }

    /// Stores a serde value (MessagePack-encoded) under `key`.
    pub async fn put_value<T: Serialize + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let bytes = rmp_serde::to_vec_named(value).map_err(|e| Error::Codec(e.to_string()))?;
        self.put_inner(key.as_ref(), bytes.into(), ttl).await
    }

    /// Reads a serde value stored by [`Collection::put_value`].
    pub async fn get_value<T: DeserializeOwned>(&self, key: impl AsRef<[u8]>) -> Result<Option<T>> {
        match self.get(key).await? {
            Some(b) => rmp_serde::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Codec(e.to_string())),
            None => Ok(None),
        }
    }

    /// Removes `key`; true if it was present.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = Bytes::copy_from_slice(key.as_ref());
        let p = self.partition(&key);
        let op = command::Op::Delete(proto::DeleteRequest {
            collection: self.name.to_string(),
            key,
        });
        match self.router.execute(p, op).await? {
            command_result::Result::Delete(r) => Ok(r.deleted),
            _ => Err(unexpected()),
        }
    }

    /// The present values of `keys` (missing keys are absent from the map).
    /// Keys are grouped by owner and fetched in parallel.
    pub async fn get_many<K: AsRef<[u8]>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<HashMap<Bytes, Bytes>> {
        let parts = self
            .fan_out_keys(keys, |collection, keys| {
                (
                    command::Op::GetMany(proto::GetManyRequest { collection, keys }),
                    |r| match r {
                        command_result::Result::GetMany(r) => Some(r.entries),
                        _ => None,
                    },
                )
            })
            .await?;
        Ok(parts
            .into_iter()
            .flatten()
            .map(|kv| (kv.key, kv.value))
            .collect())
    }

    /// Stores every entry (with `ttl`, or the collection's default).
    pub async fn put_many<K: AsRef<[u8]>, V: Into<Bytes>>(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let entries: Vec<proto::KeyValue> = entries
            .into_iter()
            .map(|(k, v)| proto::KeyValue {
                key: Bytes::copy_from_slice(k.as_ref()),
                value: v.into(),
            })
            .collect();
        let name = self.name.to_string();
        let ttl_ms = ttl_ms(ttl);
        self.router
            .fan_out(
                &self.name,
                entries,
                |kv| &kv.key,
                |entries| {
                    command::Op::PutMany(proto::PutManyRequest {
                        collection: name.clone(),
                        entries,
                        ttl_ms,
                    })
                },
                |r| match r {
                    command_result::Result::PutMany(_) => Ok(()),
                    _ => Err(unexpected()),
                },
            )
            .await?;
        Ok(())
    }

    /// Removes `keys`; returns how many were present.
    pub async fn delete_many<K: AsRef<[u8]>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<u64> {
        let counts = self
            .fan_out_keys(keys, |collection, keys| {
                (
                    command::Op::DeleteMany(proto::DeleteManyRequest { collection, keys }),
                    |r| match r {
                        command_result::Result::DeleteMany(r) => Some(r.deleted),
                        _ => None,
                    },
                )
            })
            .await?;
        Ok(counts.into_iter().sum())
    }

    /// A keys-only batch (`make` builds the command for one owner's keys and
    /// names the answer it expects), fanned out by owner.
    async fn fan_out_keys<K: AsRef<[u8]>, R>(
        &self,
        keys: impl IntoIterator<Item = K>,
        make: impl Fn(String, Vec<Bytes>) -> (command::Op, fn(command_result::Result) -> Option<R>),
    ) -> Result<Vec<R>> {
        let keys: Vec<Bytes> = keys
            .into_iter()
            .map(|k| Bytes::copy_from_slice(k.as_ref()))
            .collect();
        let name = self.name.to_string();
        let pick = make(String::new(), Vec::new()).1;
        self.router
            .fan_out(
                &self.name,
                keys,
                |k| k,
                |keys| make(name.clone(), keys).0,
                |r| pick(r).ok_or_else(unexpected),
            )
            .await
    }

    /// Every live key, in the cluster's stable order (partition, then key
    /// bytes), fetched page by page from any member (each page answers for
    /// the whole cluster).
    pub async fn keys(&self) -> Result<Vec<Bytes>> {
        let max = self.router.max_msg();
        let mut out = Vec::new();
        let mut page_token = Bytes::new();
        loop {
            let req = proto::KeysRequest {
                collection: self.name.to_string(),
                page_size: 0,
                page_token: page_token.clone(),
            };
            let page = self
                .router
                .any(|ch| {
                    let req = req.clone();
                    async move {
                        let mut c = CacheClient::new(ch).max_decoding_message_size(max);
                        Ok(c.keys(req).await?.into_inner())
                    }
                })
                .await?;
            out.extend(page.keys);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    /// Number of live entries in the whole cluster.
    pub async fn size(&self) -> Result<u64> {
        let req = proto::SizeRequest {
            collection: self.name.to_string(),
        };
        self.router
            .any(|ch| {
                let req = req.clone();
                async move { Ok(CacheClient::new(ch).size(req).await?.into_inner().size) }
            })
            .await
    }

    /// Removes every entry in the whole cluster; returns how many were removed.
    pub async fn clear(&self) -> Result<u64> {
        let req = proto::ClearRequest {
            collection: self.name.to_string(),
        };
        self.router
            .any(|ch| {
                let req = req.clone();
                async move { Ok(CacheClient::new(ch).clear(req).await?.into_inner().removed) }
            })
            .await
    }
}
