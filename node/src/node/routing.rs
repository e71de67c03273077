//! Routing: which node runs a command on a partition (here, or the
//! primary's peer address), and forwarding a command there.

use std::time::Duration;

use bytes::Bytes;
use distcache_client::partition::{lock_partition_for, partition_for};

use crate::cluster::table::{Role, Table};
use crate::command::{Command, Keyspace, Origin, Outcome};
use crate::error::{Error, Result};
use crate::net::message::{Request, Response, WireError};
use crate::node::Node;

/// Where an operation on a partition runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Route {
    /// Here: this node is the primary.
    Local,
    /// At the primary's peer address.
    Remote(String),
}

impl Node {
    /// Where partition `p` is served under `table`.
    pub(super) fn route(&self, table: &Table, p: u32) -> Result<Route> {
        let Some(primary) = table.primary(p) else {
            return Err(Error::ClusterNotReady("no partition table yet".into()));
        };
        if primary == self.name() {
            if !self.cluster.is_current() {
                return Err(Error::Unavailable(
                    "this node restarted; waiting for contact with the metadata leader".into(),
                ));
            }
            if table.role_of(self.cluster.me(), p) != Role::Primary {
                return Err(Error::Unavailable(
                    "this node restarted; waiting for a table that includes it".into(),
                ));
            }
            return Ok(Route::Local);
        }
        if !self.cluster.alive(primary) {
            let meta = self.cluster.meta();
            if meta.epoch() == table.epoch && !meta.isr_of(p).iter().any(|m| self.cluster.alive(m))
            {
                return Err(Error::PartitionUnavailable(format!(
                    "no in-sync replica of partition {p} is reachable (primary {primary}); it serves again when one returns"
                )));
            }
        }
        match table.member(primary) {
            Some(m) => Ok(Route::Remote(m.peer.clone())),
            None => Err(Error::ClusterNotReady(format!("primary {primary} unknown"))),
        }
    }

    /// The partition of `key` in `space` (the collection must exist).
    pub(super) fn partition_of(
        &self,
        table: &Table,
        space: Keyspace<'_>,
        key: &Bytes,
    ) -> Result<u32> {
        Ok(match space {
            Keyspace::Collection(name) => {
                let meta = self.store.collection(name)?;
                partition_for(&meta.name, key, table.partition_count)
            }
            Keyspace::Locks => lock_partition_for(key, table.partition_count),
        })
    }

    /// The route of `key`; a command from a peer is never sent on again.
    pub(super) fn route_key(
        &self,
        table: &Table,
        space: Keyspace<'_>,
        key: &Bytes,
        origin: Origin,
    ) -> Result<(u32, Route)> {
        let p = self.partition_of(table, space, key)?;
        Ok((p, self.route_from(table, p, origin)?))
    }

    /// The route of partition `p`; a command from a peer is never sent on again.
    pub(super) fn route_from(&self, table: &Table, p: u32, origin: Origin) -> Result<Route> {
        match self.route(table, p)? {
            Route::Remote(_) if origin == Origin::Peer => Err(self.not_owner(p)),
            route => Ok(route),
        }
    }

    /// NOT_OWNER for partition `p` at this node's epoch.
    pub(in crate::node) fn not_owner(&self, p: u32) -> Error {
        Error::NotOwner {
            partition: p,
            epoch: self.epoch(),
        }
    }

    /// Runs `cmd` on the node at peer address `addr` (its owner).
    pub(super) async fn forward(&self, addr: &str, cmd: Command) -> Result<Outcome> {
        let timeout = self
            .cluster
            .config()
            .request_timeout
            .saturating_add(Duration::from_millis(cmd.extra_wait_ms()));
        let t0 = std::time::Instant::now();
        let r = self.peers.call(addr, Request::Forward(cmd), timeout).await;
        if t0.elapsed() > Duration::from_millis(500) {
            tracing::warn!(peer = addr, elapsed = ?t0.elapsed(), ok = r.is_ok(), "slow forward");
        }
        match r? {
            Response::Forwarded(outcome) => Ok(outcome),
            Response::Error(WireError { reason, message }) => {
                Err(Error::Remote { reason, message })
            }
            other => Err(Error::Internal(format!("unexpected answer {other:?}"))),
        }
    }
}
