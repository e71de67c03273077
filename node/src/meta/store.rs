//! Raft log, vote and snapshot storage for the metadata group, plus the
//! state machine ([`MetaState`]). In memory, and persisted under
//! `<wal-dir>/raft/` when there is a WAL dir: the vote and the snapshot are
//! replaced atomically (write, fsync, rename), log entries are appended as
//! checksummed records and fsynced before Raft counts them; a torn tail is
//! dropped on start.

// openraft's trait methods return its (large) StorageError; the helpers here
// return the same type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::{MetaReply, MetaState, Shape};
use super::{MetaNode, MetaTypes, NodeId};

type SError = StorageError<NodeId>;

/// The committed metadata as the node sees it: the state and the index of
/// the last applied log entry.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The state.
    pub state: Arc<MetaState>,
    /// Index of the last applied entry (0: none).
    pub index: u64,
}

#[derive(Debug, Default)]
struct Inner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<MetaTypes>>,
    purged: Option<LogId<NodeId>>,
    state: MetaState,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, MetaNode>,
    snapshot: Option<(SnapshotMeta<NodeId, MetaNode>, Vec<u8>)>,
    snapshots_built: u64,
}

/// What a snapshot holds.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: MetaState,
}

/// The metadata store (cheap to clone: one shared inner state).
#[derive(Debug, Clone)]
pub struct MetaStore {
    inner: Arc<Mutex<Inner>>,
    dir: Option<PathBuf>,
    shape: Shape,
    applied_tx: Arc<watch::Sender<Applied>>,
}

fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// Writes `bytes` to `path` atomically and durably.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// One log record: length, crc32 of the body, msgpack body.
fn record(entry: &Entry<MetaTypes>) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let body = rmp_serde::to_vec(entry)?;
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads log records until the end or the first torn/corrupt one.
fn read_records(bytes: &[u8]) -> Vec<Entry<MetaTypes>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() >= at + 8 {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let Some(end) = (at + 8).checked_add(len as usize) else {
            break;
        };
        let Some(body) = bytes.get(at + 8..end) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        match rmp_serde::from_slice(body) {
            Ok(e) => out.push(e),
            Err(_) => break,
        }
        at = end;
    }
    out
}

impl MetaStore {
    /// A store; with `dir`, loads what a previous run persisted there.
    pub fn open(dir: Option<&Path>, shape: Shape) -> crate::error::Result<MetaStore> {
        let mut inner = Inner::default();
        let dir = match dir {
            Some(d) => {
                let d = d.join("raft");
                std::fs::create_dir_all(&d).map_err(|e| {
                    crate::error::Error::Internal(format!("raft dir {}: {e}", d.display()))
                })?;
                if let Ok(b) = std::fs::read(d.join("vote")) {
                    inner.vote = rmp_serde::from_slice(&b).ok();
                }
                if let Ok(b) = std::fs::read(d.join("committed")) {
                    inner.committed = rmp_serde::from_slice(&b).ok().flatten();
                }
                if let Ok(b) = std::fs::read(d.join("snapshot"))
                    && let Ok((meta, data)) =
                        rmp_serde::from_slice::<(SnapshotMeta<NodeId, MetaNode>, Vec<u8>)>(&b)
                    && let Ok(body) = rmp_serde::from_slice::<SnapshotBody>(&data)
                {
                    inner.state = body.state;
                    inner.applied = meta.last_log_id;
                    inner.purged = meta.last_log_id;
                    inner.membership = meta.last_membership.clone();
                    inner.snapshot = Some((meta, data));
                }
                if let Ok(b) = std::fs::read(d.join("log")) {
                    for e in read_records(&b) {
                        if Some(e.log_id) > inner.purged {
                            inner.log.insert(e.log_id.index, e);
                        }
                    }
                }
                tracing::info!(
                    entries = inner.log.len(),
                    epoch = inner.state.epoch(),
                    "raft metadata loaded"
                );
                Some(d)
            }
            None => None,
        };
        let applied = Applied {
            state: Arc::new(inner.state.clone()),
            index: inner.applied.map_or(0, |l| l.index),
        };
        Ok(MetaStore {
            inner: Arc::new(Mutex::new(inner)),
            dir,
            shape,
            applied_tx: Arc::new(watch::channel(applied).0),
        })
    }

    /// Follows the committed state.
    pub fn subscribe(&self) -> watch::Receiver<Applied> {
        self.applied_tx.subscribe()
    }

    /// The committed state now.
    pub fn applied(&self) -> Applied {
        self.applied_tx.borrow().clone()
    }

    /// Whether this store holds any Raft state (a vote or a log).
    pub fn has_state(&self) -> bool {
        let i = self.inner.lock();
        i.vote.is_some() || !i.log.is_empty() || i.snapshot.is_some()
    }

    fn rewrite_log(&self, inner: &Inner) -> Result<(), SError> {
        let Some(d) = &self.dir else { return Ok(()) };
        let mut bytes = Vec::new();
        for e in inner.log.values() {
            bytes.extend(record(e).map_err(|e| StorageIOError::write_logs(io_err(e)))?);
        }
        replace_file(&d.join("log"), &bytes)
            .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }

    fn publish(&self, inner: &Inner) {
        self.applied_tx.send_replace(Applied {
            state: Arc::new(inner.state.clone()),
            index: inner.applied.map_or(0, |l| l.index),
        });
    }
}

impl RaftLogReader<MetaTypes> for MetaStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<MetaTypes>>, SError> {
        let i = self.inner.lock();
        Ok(i.log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftSnapshotBuilder<MetaTypes> for MetaStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaTypes>, SError> {
        let mut i = self.inner.lock();
        let data = rmp_serde::to_vec(&SnapshotBody {
            state: i.state.clone(),
        })
        .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        i.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: i.applied,
            last_membership: i.membership.clone(),
            snapshot_id: format!("{}-{}", i.applied.map_or(0, |l| l.index), i.snapshots_built),
        };
        if let Some(d) = &self.dir {
            let bytes = rmp_serde::to_vec(&(&meta, &data))
                .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
            replace_file(&d.join("snapshot"), &bytes)
                .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        }
        i.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStorage<MetaTypes> for MetaStore {
    type LogReader = MetaStore;
    type SnapshotBuilder = MetaStore;

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SError> {
        if let Some(d) = &self.dir {
            let bytes =
                rmp_serde::to_vec(vote).map_err(|e| StorageIOError::write_vote(io_err(e)))?;
            replace_file(&d.join("vote"), &bytes)
                .map_err(|e| StorageIOError::write_vote(io_err(e)))?;
        }
        self.inner.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SError> {
        Ok(self.inner.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SError> {
        if let Some(d) = &self.dir
            && let Ok(bytes) = rmp_serde::to_vec(&committed)
        {
            // Not fsynced: only an optimisation (applied at start without
            // waiting for a leader); Raft re-derives it.
            let _ = std::fs::write(d.join("committed"), bytes);
        }
        self.inner.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SError> {
        Ok(self.inner.lock().committed)
    }

    async fn get_log_state(&mut self) -> Result<LogState<MetaTypes>, SError> {
        let i = self.inner.lock();
        let last = i.log.values().next_back().map(|e| e.log_id).or(i.purged);
        Ok(LogState {
            last_purged_log_id: i.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> Result<(), SError>
    where
        I: IntoIterator<Item = Entry<MetaTypes>> + Send,
    {
        let entries: Vec<Entry<MetaTypes>> = entries.into_iter().collect();
        if let Some(d) = &self.dir {
            let mut bytes = Vec::new();
            for e in &entries {
                bytes.extend(record(e).map_err(|e| StorageIOError::write_logs(io_err(e)))?);
            }
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(d.join("log"))?;
                f.write_all(&bytes)?;
                f.sync_data()
            };
            write().map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        }
        let mut i = self.inner.lock();
        for e in entries {
            i.log.insert(e.log_id.index, e);
        }
        Ok(())
    }

    async fn delete_conflict_logs_since(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        let mut i = self.inner.lock();
        i.log.split_off(&log_id.index);
        self.rewrite_log(&i)
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        let mut i = self.inner.lock();
        let keep = i.log.split_off(&(log_id.index + 1));
        i.log = keep;
        i.purged = Some(log_id);
        self.rewrite_log(&i)
    }

    async fn last_applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MetaNode>), SError> {
        let i = self.inner.lock();
        Ok((i.applied, i.membership.clone()))
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry<MetaTypes>],
    ) -> Result<Vec<MetaReply>, SError> {
        let mut i = self.inner.lock();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            i.applied = Some(e.log_id);
            match &e.payload {
                EntryPayload::Blank => out.push(MetaReply::Done),
                EntryPayload::Normal(cmd) => {
                    let r = i.state.apply(cmd.clone(), self.shape);
                    if let MetaReply::Refused(why) = &r {
                        tracing::warn!(index = e.log_id.index, reason = %why, "committed metadata command refused by the state machine");
                    }
                    out.push(r);
                }
                EntryPayload::Membership(m) => {
                    i.membership = StoredMembership::new(Some(e.log_id), m.clone());
                    out.push(MetaReply::Done);
                }
            }
        }
        self.publish(&i);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MetaNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = rmp_serde::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        if let Some(d) = &self.dir {
            let bytes = rmp_serde::to_vec(&(meta, &data))
                .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io_err(e)))?;
            replace_file(&d.join("snapshot"), &bytes)
                .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io_err(e)))?;
        }
        let mut i = self.inner.lock();
        i.state = body.state;
        i.applied = meta.last_log_id;
        i.membership = meta.last_membership.clone();
        i.snapshot = Some((meta.clone(), data));
        self.publish(&i);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<MetaTypes>>, SError> {
        let i = self.inner.lock();
        Ok(i.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}
