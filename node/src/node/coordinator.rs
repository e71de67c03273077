//! The coordinator: the oldest live member plans the next partition table
//! and installs it once a majority voted for its epoch (replaced by Raft
//! consensus in the control-plane work; kept here as it is).

use std::collections::HashSet;

use crate::cluster::membership::MemberSpec;
use crate::cluster::table::{MemberInfo, Table};
use crate::cluster::{placement, rebalancer};
use crate::net::message::{Request, Response};
use crate::node::Node;

impl Node {
    /// The coordinator of this node's view: the oldest live member.
    pub fn coordinator(&self) -> Option<String> {
        let (alive, _) = self.cluster.liveness();
        alive
            .iter()
            .filter_map(|m| {
                self.cluster
                    .incarnation(&m.name)
                    .map(|i| (i, m.name.clone()))
            })
            .min()
            .map(|(_, n)| n)
    }

    /// The owners this coordinator wants next, or None if nothing changes.
    pub(super) fn plan(&self) -> Option<Table> {
        let c = &self.cluster;
        let table = c.table();
        let (alive, _) = c.liveness();
        let valid = |m: &str| {
            c.alive(m)
                && table
                    .member(m)
                    .is_some_and(|info| c.incarnation(m) == Some(info.incarnation))
        };
        let mut eligible: Vec<String> = alive
            .iter()
            .filter(|m| !c.is_leaving(&m.name) && c.incarnation(&m.name).is_some())
            .map(|m| m.name.clone())
            .collect();
        eligible.sort();
        let current: Vec<Vec<String>> = table
            .owners
            .iter()
            .map(|o| o.iter().filter(|m| valid(m)).cloned().collect())
            .collect();
        let target = rebalancer::assign(
            table.partition_count,
            c.config().backup_count,
            &eligible,
            &current,
        );
        let mut owners = Vec::with_capacity(table.owners.len());
        for (p, o) in table.owners.iter().enumerate() {
            let primary = o.first().map(String::as_str).filter(|m| valid(m));
            let mut backups: Vec<&str> = o
                .iter()
                .skip(1)
                .map(String::as_str)
                .filter(|m| valid(m))
                .collect();
            // A replica holding a loaded copy (not vouched for yet, maybe
            // complete): kept through migrations, and on a failover with no
            // backup known in sync it beats one whose snapshot never came.
            let loaded = |m: &str| c.holds_copy(&table, p as u32, m);
            if primary.is_none() {
                backups.sort_by_key(|m| !loaded(m));
            }
            let fresh = o.is_empty();
            let in_sync = |m: &str| fresh || c.in_sync(&table, p as u32, m);
            let next =
                placement::next_owners_keeping(primary, &backups, &target[p], &in_sync, &loaded);
            owners.push(next);
        }
        let names: HashSet<&String> = owners.iter().flatten().collect();
        let members: Vec<MemberInfo> = c
            .members()
            .into_iter()
            .filter(|m| names.contains(&m.name))
            .filter_map(|m| {
                Some(MemberInfo {
                    incarnation: c.incarnation(&m.name)?,
                    name: m.name,
                    grpc: m.grpc,
                    peer: m.peer,
                })
            })
            .collect();
        if owners == table.owners && members == table.members {
            return None;
        }
        Some(Table {
            epoch: 0,
            coordinator: c.me().name.clone(),
            partition_count: table.partition_count,
            backup_count: c.config().backup_count,
            members,
            owners,
            since: Vec::new(),
        })
        .map(|mut t| {
            t.carry_since(&table);
            t
        })
    }

    pub(super) async fn coordinate(&self) {
        let c = &self.cluster;
        if !c.quorum() || self.coordinator().as_deref() != Some(c.me().name.as_str()) {
            return;
        }
        let Some(mut next) = self.plan() else { return };
        let (alive, expected) = c.liveness();
        let highest_seen = alive
            .iter()
            .filter_map(|m| c.view(&m.name).map(|h| h.epoch))
            .max()
            .unwrap_or(0);
        next.epoch = c.reserve_epoch(highest_seen);
        next.seal_since();
        let timeout = c.config().heartbeat_interval * 4;
        let others: Vec<MemberSpec> = alive
            .into_iter()
            .filter(|m| m.name != c.me().name)
            .collect();
        let votes = futures::future::join_all(others.iter().map(|m| {
            let t = next.clone();
            async move { self.peers.call(&m.peer, Request::Propose(t), timeout).await }
        }))
        .await;
        let mut granted = 1;
        for v in votes {
            match v {
                Ok(Response::Vote { granted: true, .. }) => granted += 1,
                Ok(Response::Vote { promised, .. }) => c.raise_promise(promised),
                _ => {}
            }
        }
        if granted <= expected / 2 {
            tracing::debug!(epoch = next.epoch, granted, expected, "proposal lost");
            return;
        }
        tracing::info!(
            epoch = next.epoch,
            members = next.members.len(),
            "installing partition table"
        );
        self.install(next.clone());
        let _ = futures::future::join_all(others.iter().map(|m| {
            let t = next.clone();
            async move { self.peers.call(&m.peer, Request::Commit(t), timeout).await }
        }))
        .await;
    }

    /// A vote request: granted if its epoch is above every epoch promised or
    /// installed here.
    pub(super) fn on_propose(&self, t: &Table) -> Response {
        match self.cluster.vote(t.epoch) {
            Ok(promised) => Response::Vote {
                granted: true,
                promised,
            },
            Err(promised) => Response::Vote {
                granted: false,
                promised,
            },
        }
    }
}
