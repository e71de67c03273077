//! Bringing backups into sync: snapshot transfers to backups outside the
//! committed in-sync set (each ends with the primary committing the backup
//! into the set while it still holds the partition lock), removing dead
//! backups from the set ahead of the next write, and anti-entropy (digest
//! comparison) for the in-sync ones.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::table::Role;
use crate::error::{Error, Result};
use crate::meta::state::{MetaCmd, MetaReply};
use crate::net::message::{Request, Response};
use crate::node::Node;

use super::primary::Removal;

impl Node {
    /// Starts snapshot transfers to backups that are not in sync, and
    /// removes backups that stopped answering from the in-sync sets.
    pub(in crate::node) async fn sync_backups(self: &Arc<Self>) {
        let t = self.cluster.table();
        let meta = self.cluster.meta();
        if meta.epoch() != t.epoch {
            return;
        }
        let mut todo = Vec::new();
        let mut dead: Vec<Removal> = Vec::new();
        for p in 0..t.partition_count {
            if t.role_of(self.cluster.me(), p) != Role::Primary {
                continue;
            }
            for b in t.backups(p) {
                let alive = self.cluster.alive(b);
                match (meta.in_sync(p, b), alive) {
                    (false, true) => todo.push((p, b.clone())),
                    (true, false) => {
                        dead.push((p, b.clone(), "unanswered: heartbeats stopped".into()));
                    }
                    _ => {}
                }
            }
        }
        if !dead.is_empty() && self.lease_valid() {
            self.shrink_isr(&t, &dead).await;
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
        let st = self.cluster.part(p);
        let _g = st.repl.lock().await;
        let t = self.cluster.table();
        if t.role_of(self.cluster.me(), p) != Role::Primary || !t.backups(p).iter().any(|x| x == b)
        {
            return Ok(());
        }
        let addr = t
            .member(b)
            .map(|m| m.peer.clone())
            .ok_or_else(|| Error::Internal("no such member".into()))?;
        let snapshot = self.snapshot_of(p);
        // The stream position the snapshot holds (a stream is started if
        // this tenure wrote nothing yet).
        let (stream, seq) = {
            let mut s = st.stream.lock();
            if s.0 == 0 {
                *s = (self.cluster.tenure_stream_of(p, t.epoch), 0);
            }
            *s
        };
        let chunk_bytes = (self.config().peer_max_frame_bytes / 4).max(64 * 1024) as usize;
        let chunks = crate::replica::chunk_snapshot(snapshot, chunk_bytes);
        let n = chunks.len();
        let mut answer = Response::Ok;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let req = Request::Snapshot {
                from: self.name().to_string(),
                epoch: t.epoch,
                partition: p,
                chunk: u32::try_from(i).unwrap_or(u32::MAX),
                last: i + 1 == n,
                snapshot: chunk,
                stream,
                seq,
            };
            answer = self.peers.call(&addr, req, Duration::from_secs(30)).await?;
            if !matches!(answer, Response::Ok) {
                break;
            }
        }
        match answer {
            Response::Ok => {
                // Still under the partition lock: no write can slip between
                // the snapshot and the backup joining the in-sync set, and
                // the lock is held until this node applied the change (its
                // next writes wait for the backup).
                let cmd = MetaCmd::Expand {
                    epoch: t.epoch,
                    partition: p,
                    primary: self.name().to_string(),
                    member: b.to_string(),
                };
                // Written to from now on, whatever the outcome: the commit
                // may land even if its answer is lost.
                st.expanding.lock().push(b.to_string());
                match self.propose(cmd).await {
                    Ok((MetaReply::Done, index)) => {
                        if self.applied_up_to(index).await {
                            st.expanding.lock().retain(|x| x != b);
                        } else {
                            tracing::warn!(partition = p, backup = %b, "in-sync change committed but not applied here in time");
                        }
                        tracing::debug!(partition = p, backup = %b, "backup in sync");
                        self.metrics.backup_resynced();
                        Ok(())
                    }
                    Ok((MetaReply::Refused(why), _)) => {
                        st.expanding.lock().retain(|x| x != b);
                        Err(Error::Unavailable(why))
                    }
                    Err(e) => Err(e),
                }
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
    pub(in crate::node) async fn anti_entropy(&self) {
        let t = self.cluster.table();
        let mut diverged = Vec::new();
        let ack_wait = self.ack_wait();
        for p in 0..t.partition_count {
            if t.role_of(self.cluster.me(), p) != Role::Primary {
                continue;
            }
            let st = self.cluster.part(p);
            let _g = st.repl.lock().await;
            let mine = self.store.digest(p);
            let (stream, seq) = *st.stream.lock();
            // A write stamped within a write's wait for its answers may
            // still be on its way: a backup that does not follow this
            // tenure's stream yet may be about to (its first write), and if
            // it refuses the write instead, the write's own wait removes it.
            let recent = st
                .stamped_at
                .lock()
                .is_some_and(|at| at.elapsed() < ack_wait);
            let synced: Vec<String> = self
                .cluster
                .meta()
                .isr_of(p)
                .iter()
                .filter(|m| *m != self.name())
                .cloned()
                .collect();
            for b in synced {
                let Some(m) = t.member(&b) else { continue };
                let req = Request::Digest {
                    epoch: t.epoch,
                    partition: p,
                };
                let Ok(Response::Digest {
                    digest,
                    stream: theirs,
                    seq: at,
                }) = self
                    .peers
                    .call(&m.peer, req, self.cluster.config().request_timeout)
                    .await
                else {
                    continue;
                };
                let why = if stream == 0 || (theirs, at) == (stream, seq) {
                    // Same position (or nothing written this tenure): the
                    // copies must be equal.
                    (digest != mine).then_some("backup diverged")
                } else if (theirs == stream && at < seq) || recent {
                    // Writes still on their way to it.
                    None
                } else {
                    Some("backup does not follow this primary's stream")
                };
                if let Some(why) = why {
                    tracing::warn!(partition = p, backup = %b, why, "anti-entropy: re-syncing backup");
                    diverged.push((p, b, format!("anti-entropy: {why}")));
                }
            }
        }
        if !diverged.is_empty() {
            self.shrink_isr(&t, &diverged).await;
        }
    }
}
