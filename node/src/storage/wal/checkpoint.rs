//! Checkpoints: the whole state written beside the log, after which the
//! segments it replaces are deleted.

use std::fs::{self, File};
use std::io::Write;

use tokio::sync::oneshot;

use super::record::{WalRecord, frame};
use super::writer::{Job, Wal};
use super::{WalError, checkpoint_name, list, segment_name};

impl Wal {
    /// Writes a checkpoint of `state` (taken after this call rotated the log)
    /// and deletes the segments and checkpoints it makes obsolete. `state`
    /// is called after the rotation and must return the whole state.
    pub async fn checkpoint(
        &self,
        state: impl FnOnce() -> Vec<WalRecord>,
    ) -> Result<u64, WalError> {
        // Rotated while no change is between its record and its apply
        // (`applying`): a record in a segment this checkpoint replaces
        // belongs to a change already applied, so `state` holds it.
        let seq = {
            let _rotating = self.gate.write().await;
            let (done, rx) = oneshot::channel();
            self.send(Job::Rotate(done))?;
            rx.await.map_err(|_| WalError::Closed)??
        };
        let mut buf = Vec::new();
        for r in state() {
            buf.extend(frame(&r)?);
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<u64, WalError> {
            let tmp = dir.join("checkpoint.tmp");
            let io = |e: std::io::Error| WalError::io("writing checkpoint".into(), &e);
            let mut f = File::create(&tmp).map_err(io)?;
            f.write_all(&buf).map_err(io)?;
            f.sync_all().map_err(io)?;
            fs::rename(&tmp, dir.join(checkpoint_name(seq))).map_err(io)?;
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            let (cps, segs) = list(&dir)?;
            for s in segs.into_iter().filter(|s| *s < seq) {
                let _ = fs::remove_file(dir.join(segment_name(s)));
            }
            for c in cps.into_iter().filter(|c| *c < seq) {
                let _ = fs::remove_file(dir.join(checkpoint_name(c)));
            }
            Ok(buf.len() as u64)
        })
        .await
        .map_err(|e| WalError::Io(format!("checkpoint task: {e}")))?
    }
}
