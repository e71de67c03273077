//! Time as the engine sees it: wall-clock milliseconds for TTLs (absolute, so
//! they survive restarts) and monotonic milliseconds for lock leases (immune
//! to clock steps). Tests swap in [`ManualClock`] to move time by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// A source of time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// Monotonic milliseconds (arbitrary origin).
    fn mono_ms(&self) -> u64;
    /// Signalled when time jumps (manual clocks only); real clocks return
    /// `None` and waiters rely on timers.
    fn jumps(&self) -> Option<&Notify> {
        None
    }
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
    fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
    jumps: Notify,
}

impl ManualClock {
    /// A manual clock at `start_ms` (used for both wall and monotonic time).
    pub fn new(start_ms: u64) -> Arc<Self> {
        Arc::new(ManualClock {
            now: AtomicU64::new(start_ms),
            jumps: Notify::new(),
        })
    }

    /// Moves time forward and wakes everything that waits on time.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
        self.jumps.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn wall_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
    fn mono_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
    fn jumps(&self) -> Option<&Notify> {
        Some(&self.jumps)
    }
}

/// The system's wall clock in milliseconds since the Unix epoch (0 if it
/// reads before 1970): what heartbeats carry for clock-offset checks.
pub fn system_wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
