//! Leader election: the controller runs only while this replica holds the
//! leader Lease, and stops as soon as it loses it.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use distcache_operator::metrics::Metrics;
use distcache_operator::reconcile::MANAGER;
use kube::Client;
use tokio_util::sync::CancellationToken;

/// The leader Lease's settings.
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity.
    pub identity: String,
    /// Seconds a Lease stays valid without renewal.
    pub duration_secs: u64,
    /// Seconds before expiry the leader renews.
    pub grace_secs: u64,
}

/// Runs `run(lost)` each time this replica becomes leader, until `stop`;
/// `lost` fires when the Lease is lost. Releases the Lease at the end.
pub async fn run_while_leading<F, Fut>(
    client: Client,
    lease: LeaseSettings,
    metrics: &Metrics,
    stop: &CancellationToken,
    run: F,
) -> anyhow::Result<()>
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_secs)
        .with_grace(lease.grace_secs)
        .with_field_manager(format!("{MANAGER}-{}", lease.identity))
        .build()
        .await
        .context("leader Lease")?;
    let (mut leader, lease_task) = manager.watch().await;
    loop {
        // Wait until this replica leads (or shutdown).
        tokio::select! {
            _ = stop.cancelled() => break,
            ok = leader.wait_for(|l| *l) => if ok.is_err() { break },
        }
        tracing::info!(identity = %lease.identity, "leading: reconciling");
        metrics.leader.set(1);
        let lost = CancellationToken::new();
        let until = lost.clone();
        let mut watch = leader.clone();
        let stop2 = stop.clone();
        let guard = tokio::spawn(async move {
            tokio::select! {
                _ = stop2.cancelled() => {},
                _ = watch.wait_for(|l| !*l) => {},
            }
            until.cancel();
        });
        run(lost).await;
        guard.abort();
        metrics.leader.set(0);
        if stop.is_cancelled() {
            break;
        }
        tracing::warn!(identity = %lease.identity, "lost the leader Lease; standing by");
    }
    // Dropping the receiver makes the lease task release the Lease.
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("leader Lease released"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader Lease"),
        Ok(Err(e)) => tracing::warn!(error = %e, "lease task"),
        Err(_) => tracing::warn!("releasing the leader Lease timed out"),
    }
    Ok(())
}
