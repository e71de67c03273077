//! Lock guards carrying their fencing token.

use std::time::Duration;

use bytes::Bytes;

use std::sync::Arc;

use crate::error::Result;
use crate::partition::lock_partition_for;
use crate::proto;
use crate::proto::locks_client::LocksClient;
use crate::router::Router;

/// Default lease length (seed: 60 s).
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(60);
/// Default wait for a lock (seed: 30 s).
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// How to acquire a lock.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LockOptions {
    /// Lease length; the lock is released automatically after it (default 60 s).
    pub hold_timeout: Duration,
    /// How long to wait in the queue (default 30 s).
    pub acquire_timeout: Duration,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
        }
    }
}

impl LockOptions {
    /// Sets the lease length.
    pub fn hold(mut self, d: Duration) -> Self {
        self.hold_timeout = d;
        self
    }
    /// Sets the wait.
    pub fn wait(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }
}

/// A held lock. Pass [`LockGuard::fencing_token`] to whatever the lock
/// protects so that writes by a holder whose lease lapsed can be refused.
///
/// Release it with [`LockGuard::release`] to see errors such as
/// `LockHoldTimeout`; dropping an unreleased guard releases it in the
/// background (when a tokio runtime is running) and ignores the outcome.
#[derive(Debug)]
pub struct LockGuard {
    router: Arc<Router>,
    key: Bytes,
    token: u64,
    hold: Duration,
    released: bool,
}

impl LockGuard {
    pub(crate) fn new(router: Arc<Router>, key: Bytes, grant: proto::LockGrant) -> Self {
        LockGuard {
            router,
            key,
            token: grant.fencing_token,
            hold: Duration::from_millis(grant.hold_ms),
            released: false,
        }
    }

    /// The fencing token: larger than every token granted before for this key.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The lock key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The lease length granted.
    pub fn hold_timeout(&self) -> Duration {
        self.hold
    }

    /// Releases the lock. Fails with `LockHoldTimeout` if the lease had
    /// expired, `LockNotHeld` if another holder has it now.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        release(&self.router, self.key.clone(), self.token).await
    }

    /// Gives up the handle without releasing: the lock stays held until its
    /// lease ends (or someone releases it with the returned token).
    pub fn detach(mut self) -> u64 {
        self.released = true;
        self.token
    }

    /// Renews the lease to `hold` from now.
    pub async fn extend(&mut self, hold: Duration) -> Result<()> {
        let g = extend(&self.router, self.key.clone(), self.token, hold).await?;
        self.hold = Duration::from_millis(g.hold_ms);
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (router, key, token) = (self.router.clone(), self.key.clone(), self.token);
            rt.spawn(async move {
                if let Err(e) = release(&router, key, token).await {
                    tracing::debug!(error = %e, "background lock release failed");
                }
            });
        }
    }
}

/// Releases lock `key` held with fencing `token`.
pub(crate) async fn release(router: &Router, key: Bytes, token: u64) -> Result<()> {
    let p = lock_partition_for(&key, router.partition_count());
    let req = proto::ReleaseLockRequest {
        key,
        fencing_token: token,
    };
    router
        .unary(Some(p), router.config().request_timeout, |ch| {
            let req = req.clone();
            async move { Ok(LocksClient::new(ch).release(req).await?.into_inner()) }
        })
        .await?;
    Ok(())
}

/// Renews the lease of lock `key` held with `token` to `hold` from now.
async fn extend(
    router: &Router,
    key: Bytes,
    token: u64,
    hold: Duration,
) -> Result<proto::LockGrant> {
    let p = lock_partition_for(&key, router.partition_count());
    let req = proto::ExtendLockRequest {
        key,
        fencing_token: token,
        hold_timeout_ms: hold.as_millis() as u64,
    };
    router
        .unary(Some(p), router.config().request_timeout, |ch| {
            let req = req.clone();
            async move { Ok(LocksClient::new(ch).extend(req).await?.into_inner()) }
        })
        .await
}
