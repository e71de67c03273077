//! Replication: the primary's write path (`primary`), applying a primary's
//! ops and snapshots on a backup (`backup`), and bringing backups into sync
//! (`sync`: snapshot transfers, anti-entropy).

mod backup;
mod primary;
mod sync;
