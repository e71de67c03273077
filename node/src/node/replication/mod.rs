//! Replication: the primary's write path (`primary`), applying a primary's
//! ops and snapshots on a backup (`backup`), and bringing backups into sync
//! (`sync`: snapshot transfers, anti-entropy), and the ordered per-backup
//! streams writes travel on (`stream`).

mod backup;
mod primary;
pub mod stream;
mod sync;
