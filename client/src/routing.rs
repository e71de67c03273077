//! Routing: the cached, epoch-versioned partition table and the connections
//! to each member.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{ClientConfig, DEFAULT_STREAMS_PER_NODE, MAX_ADVISED_STREAMS};
use crate::conn::{Conn, Token};
use crate::error::{Error, Result};
use crate::mux::Mux;
use crate::proto::PartitionTableResponse;

/// One member's connections: a Batch stream slot per connection.
pub(crate) struct NodeConn {
    pub(crate) address: String,
    token: Token,
    /// Room for every stream this member may get (the configured number,
    /// or [`MAX_ADVISED_STREAMS`] when the member advises); each connects
    /// on first use.
    slots: Vec<Slot>,
    /// Streams in use: the configured number, or (`advised`) 1 until the
    /// member's first stream brings its advice.
    active: AtomicUsize,
    advised: bool,
    next: AtomicUsize,
    open_lock: tokio::sync::Mutex<()>,
    max_message_bytes: usize,
}

struct Slot {
    channel: Channel,
    mux: RwLock<Option<Mux>>,
}

impl NodeConn {
    pub(crate) fn new(address: &str, config: &ClientConfig) -> Result<NodeConn> {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| Error::InvalidArgument(format!("bad endpoint {address}: {e}")))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        if let Some(tls) = &config.tls {
            let mut t = ClientTlsConfig::new();
            t = match &tls.ca_pem {
                Some(ca) => t.ca_certificate(Certificate::from_pem(ca)),
                None => t.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.identity_pem {
                t = t.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(t)
                .map_err(|e| Error::InvalidArgument(format!("TLS settings: {e}")))?;
        }
        let token = Token::new(config.token.as_deref())?;
        let advised = config.streams_per_node == 0;
        let room = if advised {
            MAX_ADVISED_STREAMS
        } else {
            config.streams_per_node
        };
        let slots = (0..room)
            .map(|_| Slot {
                channel: endpoint.connect_lazy(),
                mux: RwLock::new(None),
            })
            .collect();
        Ok(NodeConn {
            address: address.to_string(),
            token,
            active: AtomicUsize::new(if advised { 1 } else { room }),
            advised,
            slots,
            next: AtomicUsize::new(0),
            open_lock: tokio::sync::Mutex::new(()),
            max_message_bytes: config.max_message_bytes,
        })
    }

    /// A channel for unary calls (with the bearer token, if any).
    pub(crate) fn channel(&self) -> Conn {
        InterceptedService::new(self.slots[0].channel.clone(), self.token.clone())
    }

    /// A live Batch stream, opened on first use and reopened after a failure.
    pub(crate) async fn mux(&self) -> Result<Mux> {
        let active = self
            .active
            .load(Ordering::Relaxed)
            .clamp(1, self.slots.len());
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % active];
        if let Some(m) = slot.mux.read().as_ref().filter(|m| !m.is_closed()) {
            return Ok(m.clone());
        }
        let _single_flight = self.open_lock.lock().await;
        if let Some(m) = slot.mux.read().as_ref().filter(|m| !m.is_closed()) {
            return Ok(m.clone());
        }
        let conn = InterceptedService::new(slot.channel.clone(), self.token.clone());
        let (m, advice) = Mux::open(conn, self.max_message_bytes).await?;
        *slot.mux.write() = Some(m.clone());
        if self.advised {
            self.active
                .store(streams_to_use(advice, self.slots.len()), Ordering::Relaxed);
        }
        Ok(m)
    }
}

/// Streams to use on a member's advice (never trusted beyond `room`; none
/// or 0: [`DEFAULT_STREAMS_PER_NODE`]).
fn streams_to_use(advice: Option<usize>, room: usize) -> usize {
    match advice {
        Some(n) if n > 0 => n.min(room),
        _ => DEFAULT_STREAMS_PER_NODE.min(room),
    }
    .max(1)
}

/// A snapshot of the partition table, resolved to connections.
pub(crate) struct Routing {
    pub(crate) epoch: u64,
    pub(crate) partition_count: u32,
    /// Replicas per partition, primary first; empty when the table has no owner yet.
    owners: Vec<Vec<Arc<NodeConn>>>,
    /// Every member with a connection, in table order.
    pub(crate) members: Vec<Arc<NodeConn>>,
    /// Where to send when a partition has no known owner.
    fallback: Arc<NodeConn>,
}

impl Routing {
    /// Builds routing from a table answered by `from`, reusing connections
    /// from `conns` (by address) and adding new ones to it.
    pub(crate) fn build(
        table: &PartitionTableResponse,
        from: Arc<NodeConn>,
        conns: &mut HashMap<String, Arc<NodeConn>>,
        config: &ClientConfig,
    ) -> Result<Routing> {
        let mut by_name: HashMap<&str, Arc<NodeConn>> = HashMap::new();
        let mut members = Vec::new();
        for m in &table.members {
            if m.address.is_empty() {
                continue;
            }
            if config.gateway {
                by_name.insert(m.name.as_str(), from.clone());
                continue;
            }
            let conn = match conns.get(&m.address) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(NodeConn::new(&m.address, config)?);
                    conns.insert(m.address.clone(), c.clone());
                    c
                }
            };
            by_name.insert(m.name.as_str(), conn.clone());
            members.push(conn);
        }
        let partition_count = table.partition_count.max(1);
        let mut owners = vec![Vec::new(); partition_count as usize];
        for p in &table.partitions {
            if let Some(slot) = owners.get_mut(p.partition as usize) {
                *slot = std::iter::once(&p.primary)
                    .chain(&p.backups)
                    .filter_map(|m| by_name.get(m.as_str()).cloned())
                    .collect();
            }
        }
        if members.is_empty() {
            members.push(from.clone());
        }
        Ok(Routing {
            epoch: table.epoch,
            partition_count,
            owners,
            members,
            fallback: from,
        })
    }

    /// The connection for `partition`'s primary.
    pub(crate) fn owner(&self, partition: u32) -> Arc<NodeConn> {
        self.pick(partition, 0)
    }

    /// Attempt `n` at `partition`: the primary first, then its backups in
    /// turn (a backup forwards to the primary, or serves a read from its
    /// copy when the primary is unreachable).
    pub(crate) fn pick(&self, partition: u32, n: u32) -> Arc<NodeConn> {
        match self.owners.get(partition as usize) {
            Some(r) if !r.is_empty() => r[n as usize % r.len()].clone(),
            _ => self.fallback.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_advice_is_bounded_by_the_room_and_defaults_when_absent() {
        assert_eq!(streams_to_use(Some(1), MAX_ADVISED_STREAMS), 1);
        assert_eq!(streams_to_use(Some(3), MAX_ADVISED_STREAMS), 3);
        // A peer's number is never trusted beyond the room.
        assert_eq!(
            streams_to_use(Some(1_000_000), MAX_ADVISED_STREAMS),
            MAX_ADVISED_STREAMS
        );
        assert_eq!(
            streams_to_use(Some(0), MAX_ADVISED_STREAMS),
            DEFAULT_STREAMS_PER_NODE
        );
        assert_eq!(
            streams_to_use(None, MAX_ADVISED_STREAMS),
            DEFAULT_STREAMS_PER_NODE
        );
        assert_eq!(streams_to_use(None, 1), 1);
    }
}
