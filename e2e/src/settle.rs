//! Waiting for a process cluster to be quiet: no member migrating and one
//! epoch held (beyond [`ProcCluster::wait_safe`], which returns as soon as
//! every member is safe, possibly before the rebalancer's last moves).

use std::time::{Duration, Instant};

use distcache_client::{Client, ClientConfig};

use crate::cluster::ProcCluster;

impl ProcCluster {
    /// Waits until every running member answers, none runs a migration and
    /// all report one epoch, twice in a row a second apart; panics with the
    /// last view after `timeout`. A test that must not overlap a partition
    /// move (whose in-flight writes are refused by design) writes after this.
    pub async fn wait_settled(&mut self, timeout: Duration) {
        let end = Instant::now() + timeout;
        let mut last: Option<u64> = None;
        let mut seen = String::new();
        while Instant::now() < end {
            let mut epochs = Vec::new();
            let mut migrating = 0;
            for ep in self.endpoints() {
                match Client::with_config(ClientConfig::new([ep.clone()]).max_retries(0)).await {
                    Ok(client) => match client.health().await {
                        Ok(h) => {
                            epochs.push(h.epoch);
                            migrating += h.migrations_running;
                        }
                        Err(_) => migrating += 1,
                    },
                    Err(_) => migrating += 1,
                }
            }
            epochs.dedup();
            seen = format!("epochs {epochs:?}, migrations running {migrating}");
            let now = (migrating == 0 && epochs.len() == 1).then(|| epochs[0]);
            if now.is_some() && now == last {
                return;
            }
            last = now;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("the cluster did not settle within {timeout:?}: {seen}");
    }
}
