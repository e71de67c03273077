//! The router every handle shares: the partition-table snapshot, one
//! connection per member, single-flight table refresh, and the one retry
//! loop (jittered exponential backoff) that data, lock, collection and
//! cluster calls all go through.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use parking_lot::{Mutex, RwLock};

use crate::config::ClientConfig;
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::partition::partition_for;
use crate::proto::{self, cluster_client::ClusterClient, command, command_result};
use crate::routing::{NodeConn, Routing};

/// Routes calls to members and retries them. Shared (`Arc`) by a
/// [`Client`](crate::Client) and every handle made from it.
pub(crate) struct Router {
    config: ClientConfig,
    routing: RwLock<Arc<Routing>>,
    conns: Mutex<HashMap<String, Arc<NodeConn>>>,
    refresh_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.routing.read();
        f.debug_struct("Router")
            .field("epoch", &r.epoch)
            .field("members", &r.members.len())
            .finish()
    }
}

/// The pause before retry number `attempt + 1`: exponential from 20 ms up
/// to 1.28 s, with full jitter over its upper half so that clients failed
/// over together do not retry in lockstep.
pub(crate) fn backoff_delay(attempt: u32) -> Duration {
    let ceiling = 20u64 << attempt.min(6);
    Duration::from_millis(ceiling / 2 + fastrand::u64(0..=ceiling / 2))
}

impl Router {
    /// Connects to the first reachable seed endpoint and loads the table.
    pub(crate) async fn connect(config: ClientConfig) -> Result<Router> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidArgument("no endpoints given".into()));
        }
        let mut conns = HashMap::new();
        let mut last = String::new();
        for ep in &config.endpoints {
            let conn = Arc::new(NodeConn::new(ep, &config)?);
            match fetch_table(&conn, config.connect_timeout + config.request_timeout).await {
                Ok(table) => {
                    conns.insert(ep.clone(), conn.clone());
                    let routing = Routing::build(&table, conn, &mut conns, &config)?;
                    return Ok(Router {
                        config,
                        routing: RwLock::new(Arc::new(routing)),
                        conns: Mutex::new(conns),
                        refresh_lock: tokio::sync::Mutex::new(()),
                    });
                }
                // A refused credential is the answer, not a reason to try
                // the next seed.
                Err(e @ (Error::Unauthenticated(_) | Error::NotAuthorized(_))) => return Err(e),
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        Err(Error::Connect(last))
    }

    /// The configuration in use.
    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Epoch of the cached partition table.
    pub(crate) fn table_epoch(&self) -> u64 {
        self.routing.read().epoch
    }

    /// Partition count of the cluster.
    pub(crate) fn partition_count(&self) -> u32 {
        self.routing.read().partition_count
    }

    /// Largest message accepted.
    pub(crate) fn max_msg(&self) -> usize {
        self.config.max_message_bytes
    }

    fn routing(&self) -> Arc<Routing> {
        self.routing.read().clone()
    }

    /// Reloads the partition table from any reachable member (single-flight:
    /// callers that queue behind a refresh that already moved the epoch
    /// forward return at once).
    pub async fn refresh(&self) -> Result<()> {
        let seen = self.table_epoch();
        let _g = self.refresh_lock.lock().await;
        if self.table_epoch() > seen {
            return Ok(());
        }
        let current = self.routing();
        let mut candidates = current.members.clone();
        for ep in &self.config.endpoints {
            let known = candidates.iter().any(|c| &c.address == ep);
            if !known {
                candidates.push(Arc::new(NodeConn::new(ep, &self.config)?));
            }
        }
        // Ask every member at once and keep the newest table: a member cut
        // off on the minority side still answers with its stale epoch.
        let timeout = self.config.request_timeout.min(Duration::from_secs(2));
        let answers = join_all(candidates.into_iter().map(|conn| async move {
            let r = fetch_table(&conn, timeout).await;
            (conn, r)
        }))
        .await;
        let mut last = Error::Connect("no member reachable".into());
        let mut best: Option<(Arc<NodeConn>, proto::PartitionTableResponse)> = None;
        for (conn, r) in answers {
            match r {
                Ok(t)
                    if t.epoch >= current.epoch
                        && best.as_ref().is_none_or(|(_, b)| t.epoch > b.epoch) =>
                {
                    best = Some((conn, t));
                }
                Ok(_) => {}
                Err(e) => last = e,
            }
        }
        let Some((conn, table)) = best else {
            return Err(last);
        };
        let mut conns = self.conns.lock();
        let routing = Routing::build(&table, conn, &mut conns, &self.config)?;
        *self.routing.write() = Arc::new(routing);
        Ok(())
    }

    /// The one retry loop: runs `call(attempt, last_error)` until it
    /// succeeds, fails for good, or the retries are spent; between attempts
    /// refreshes the table after a routing or availability error and backs
    /// off with jitter.
    async fn retrying<R, F, Fut>(&self, call: F) -> Result<R>
    where
        F: FnMut(u32, Option<&Error>) -> Fut,
        Fut: std::future::Future<Output = Result<R>>,
    {
        self.retrying_when(Error::is_retryable, call).await
    }

    /// [`Router::retrying`], retrying only the errors `retry` accepts.
    async fn retrying_when<R, F, Fut>(&self, retry: fn(&Error) -> bool, mut call: F) -> Result<R>
    where
        F: FnMut(u32, Option<&Error>) -> Fut,
        Fut: std::future::Future<Output = Result<R>>,
    {
        let mut attempt = 0;
        let mut last: Option<Error> = None;
        loop {
            match call(attempt, last.as_ref()).await {
                Err(e) if retry(&e) && attempt < self.config.max_retries => {
                    if matches!(
                        e,
                        Error::NotOwner { .. } | Error::Unavailable(_) | Error::Connect(_)
                    ) {
                        let _ = self.refresh().await;
                    }
                    tokio::time::sleep(backoff_delay(attempt)).await;
                    attempt += 1;
                    last = Some(e);
                }
                other => return other,
            }
        }
    }

    /// Runs `op` on the owner of `partition` over a Batch stream, retrying
    /// routing/availability failures with backoff.
    pub(crate) async fn execute(
        &self,
        partition: u32,
        op: command::Op,
    ) -> Result<command_result::Result> {
        let mut replica = 0;
        self.retrying(|_, last| {
            // An unreachable node: try the next replica; a routing answer:
            // back to the (refreshed) primary.
            replica = match last {
                None => 0,
                Some(Error::Unavailable(_) | Error::Connect(_) | Error::QuorumLost(_)) => {
                    replica + 1
                }
                Some(_) => 0,
            };
            let node = self.routing().pick(partition, replica);
            let op = op.clone();
            async move { self.execute_on(&node, op).await }
        })
        .await
    }

    /// Runs a command that must not run twice (a conditional write, an
    /// increment) on the owner of `partition`: retried only after errors
    /// that guarantee it was not applied (routing, no quorum, no
    /// connection), never after an indeterminate one.
    pub(crate) async fn execute_once(
        &self,
        partition: u32,
        op: command::Op,
    ) -> Result<command_result::Result> {
        fn not_applied(e: &Error) -> bool {
            matches!(
                e,
                Error::NotOwner { .. }
                    | Error::QuorumLost(_)
                    | Error::ClusterNotReady(_)
                    | Error::Connect(_)
            )
        }
        let result = self
            .retrying_when(not_applied, |_, _| {
                let node = self.routing().owner(partition);
                let op = op.clone();
                async move { self.execute_on(&node, op).await }
            })
            .await;
        // Not retried, but the next call must not go to a dead owner again:
        // after an indeterminate failure the table is reloaded.
        if matches!(result, Err(Error::Unavailable(_) | Error::Timeout(_))) {
            let _ = self.refresh().await;
        }
        result
    }

    async fn execute_on(&self, node: &NodeConn, op: command::Op) -> Result<command_result::Result> {
        let t = self.config.request_timeout;
        match tokio::time::timeout(t, async { node.mux().await?.execute(op).await }).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(format!(
                "no answer from {} within {t:?}",
                node.address
            ))),
        }
    }

    /// Groups `items` by the owner of their partition and runs one command
    /// per owner in parallel; failed groups are re-routed and retried.
    pub(crate) async fn fan_out<T: Clone, R>(
        &self,
        collection: &str,
        items: Vec<T>,
        key_of: impl Fn(&T) -> &[u8],
        make: impl Fn(Vec<T>) -> command::Op,
        merge: impl FnMut(command_result::Result) -> Result<R>,
    ) -> Result<Vec<R>> {
        // (items still to do, results so far, merge)
        let state = Mutex::new((items, Vec::new(), merge));
        let (key_of, make) = (&key_of, &make);
        self.retrying(|_, _| {
            let state = &state;
            async move {
                let routing = self.routing();
                let mut groups: HashMap<String, (Arc<NodeConn>, Vec<T>)> = HashMap::new();
                for item in std::mem::take(&mut state.lock().0) {
                    let p = partition_for(collection, key_of(&item), routing.partition_count);
                    let node = routing.owner(p);
                    groups
                        .entry(node.address.clone())
                        .or_insert_with(|| (node, Vec::new()))
                        .1
                        .push(item);
                }
                let calls = groups.into_values().map(|(node, items)| {
                    let op = make(items.clone());
                    async move { (self.execute_on(&node, op).await, items) }
                });
                let mut first_err = None;
                for (res, items) in join_all(calls).await {
                    let mut st = state.lock();
                    match res {
                        Ok(r) => {
                            let merged = (st.2)(r)?;
                            st.1.push(merged);
                        }
                        Err(e) if e.is_retryable() => {
                            st.0.extend(items);
                            first_err.get_or_insert(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
        })
        .await?;
        Ok(state.into_inner().1)
    }

    /// Runs a unary call on the owner of `partition` (or, with None, on the
    /// members in turn), retrying routing/availability failures.
    pub(crate) async fn unary<R, F, Fut>(
        &self,
        partition: Option<u32>,
        timeout: Duration,
        call: F,
    ) -> Result<R>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        let call = &call;
        self.retrying(|attempt, _| async move {
            let routing = self.routing();
            let node = match partition {
                Some(p) => routing.owner(p),
                None => routing.members[attempt as usize % routing.members.len()].clone(),
            };
            match tokio::time::timeout(timeout, call(node.channel())).await {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::Timeout(format!(
                    "no answer from {} within {timeout:?}",
                    node.address
                ))),
            }
        })
        .await
    }

    /// Runs a unary call on any member with the request timeout.
    pub(crate) async fn any<R, F, Fut>(&self, call: F) -> Result<R>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        self.unary(None, self.config.request_timeout, call).await
    }
}

async fn fetch_table(conn: &NodeConn, timeout: Duration) -> Result<proto::PartitionTableResponse> {
    let mut c = ClusterClient::new(conn.channel()).max_decoding_message_size(64 << 20);
    match tokio::time::timeout(timeout, c.partition_table(proto::PartitionTableRequest {})).await {
        Ok(r) => Ok(r?.into_inner()),
        Err(_) => Err(Error::Timeout(format!("{} did not answer", conn.address))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_stays_in_its_window_and_is_jittered() {
        for attempt in 0..10 {
            let ceiling = 20u64 << attempt.min(6);
            let seen: Vec<u64> = (0..200)
                .map(|_| backoff_delay(attempt).as_millis() as u64)
                .collect();
            assert!(
                seen.iter().all(|ms| (ceiling / 2..=ceiling).contains(ms)),
                "attempt {attempt}: {seen:?} outside [{}, {ceiling}]",
                ceiling / 2
            );
            let distinct: std::collections::HashSet<_> = seen.iter().collect();
            assert!(
                distinct.len() > 5,
                "attempt {attempt}: not jittered: {distinct:?}"
            );
        }
    }
}
