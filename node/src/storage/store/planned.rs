//! Planned writes: a write is validated and planned (with absolute expiry)
//! before it is logged, then applied exactly as planned.

use bytes::Bytes;

use super::room::Room;
use super::{CollectionMeta, Store};
use crate::error::Result;
use crate::replica::{Ops, ReplOp, Written};

impl Store {
    // ------------------------------------------------------------ planned writes

    /// Validates a put and returns the op it will apply (with its absolute
    /// expiry) and its partition, without applying it.
    pub fn plan_put(
        &self,
        collection: &str,
        key: Bytes,
        value: Bytes,
        ttl_ms: Option<u64>,
    ) -> Result<((u32, ReplOp), Room<'_>)> {
        let meta = self.collection(collection)?;
        let expires_at = self.expiry(&meta, ttl_ms);
        self.plan_one(&meta, key, value, expires_at)
    }

    /// Validates a put that keeps an existing absolute expiry (0 = never).
    pub fn plan_put_expiring(
        &self,
        collection: &str,
        key: Bytes,
        value: Bytes,
        expires_at: u64,
    ) -> Result<((u32, ReplOp), Room<'_>)> {
        let meta = self.collection(collection)?;
        self.plan_one(&meta, key, value, expires_at)
    }

    /// Validates one put of `meta` expiring at `expires_at` (no batch
    /// buffers on the single-key path).
    fn plan_one(
        &self,
        meta: &CollectionMeta,
        key: Bytes,
        value: Bytes,
        expires_at: u64,
    ) -> Result<((u32, ReplOp), Room<'_>)> {
        self.check_key(&key)?;
        self.check_value(&value)?;
        let room = self.admit(key.len() + value.len() + super::ENTRY_OVERHEAD)?;
        let p = self.partition(meta, &key);
        let op = ReplOp::Put {
            collection: meta.name.to_string(),
            key,
            value,
            expires_at,
        };
        Ok(((p, op), room))
    }

    /// Validates puts (all or nothing) and returns their ops.
    pub fn plan_puts(
        &self,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
        ttl_ms: Option<u64>,
    ) -> Result<(Ops, Room<'_>)> {
        let meta = self.collection(collection)?;
        self.check_batch(entries.len())?;
        for (k, v) in &entries {
            self.check_key(k)?;
            self.check_value(v)?;
        }
        let room = self.admit(
            entries
                .iter()
                .map(|(k, v)| k.len() + v.len() + super::ENTRY_OVERHEAD)
                .sum(),
        )?;
        let expires_at = self.expiry(&meta, ttl_ms);
        let ops = entries
            .into_iter()
            .map(|(key, value)| {
                (
                    self.partition(&meta, &key),
                    ReplOp::Put {
                        collection: meta.name.to_string(),
                        key,
                        value,
                        expires_at,
                    },
                )
            })
            .collect();
        Ok((ops, room))
    }

    /// Validates deletes and returns their ops.
    pub fn plan_deletes(&self, collection: &str, keys: &[Bytes]) -> Result<Ops> {
        let meta = self.collection(collection)?;
        self.check_batch(keys.len())?;
        keys.iter().try_for_each(|k| self.check_key(k))?;
        Ok(keys
            .iter()
            .map(|k| {
                (
                    self.partition(&meta, k),
                    ReplOp::Delete {
                        collection: meta.name.to_string(),
                        key: k.clone(),
                    },
                )
            })
            .collect())
    }

    /// Applies planned ops as their primary (LRU included); returns how many
    /// deletes removed a live entry, and what changed.
    /// `room` is what planning the ops reserved; applying them uses it up
    /// (what is left is given back when it is dropped).
    pub fn apply_planned(&self, ops: Ops, mut room: Room<'_>) -> Result<(u64, Written)> {
        let mut w = Written::default();
        let mut live = 0;
        for (p, op) in ops {
            match op {
                ReplOp::Put {
                    collection,
                    key,
                    value,
                    expires_at,
                } => {
                    let meta = self.collection(&collection)?;
                    self.put_in(
                        &meta,
                        collection,
                        (key, value, expires_at),
                        &mut w,
                        &mut room,
                    )?;
                }
                ReplOp::Delete { collection, key } => {
                    let meta = self.collection(&collection)?;
                    if self.delete_in(&meta, &key, &mut w) {
                        live += 1;
                    }
                }
                ReplOp::Clear { collection } => {
                    let meta = self.collection(&collection)?;
                    live += self.clear_in(&meta, p);
                    w.ops.push((p, ReplOp::Clear { collection }));
                }
                ReplOp::Lock { .. } => {}
            }
        }
        Ok((live, w))
    }
}
