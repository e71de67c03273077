//! Peer transport: the server side (accept, read frames, dispatch, answer)
//! and the client side (a small pool of multiplexed connections per peer).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame::{read_frame, write_frame};
use super::message::{Body, Envelope, PROTOCOL_VERSION, Request, Response, decode, encode};
use crate::error::{Error, Result};

/// Transport settings.
#[derive(Debug, Clone, Copy)]
pub struct PeerLimits {
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// A started frame must complete within this.
    pub frame_timeout: Duration,
    /// An inbound connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Connect timeout (seed default 5 s).
    pub connect_timeout: Duration,
    /// Connections per peer (seed default 4).
    pub pool_size: usize,
    /// Requests in flight per inbound connection.
    pub max_in_flight: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_frame_bytes: 256 << 20,
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            pool_size: 4,
            max_in_flight: 1024,
        }
    }
}

/// Handles one inbound request.
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Accepts peer connections until `shutdown` fires; connection tasks are
/// tracked by `tasks`.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    limits: PeerLimits,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, from)) => {
                let _ = stream.set_nodelay(true);
                let (handler, shutdown) = (handler.clone(), shutdown.clone());
                tasks.spawn(async move {
                    if let Err(why) = connection(stream, handler, limits, shutdown).await {
                        tracing::warn!(peer = %from, %why, "peer connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    handler: Handler,
    limits: PeerLimits,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let (mut rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    let writer = tokio::spawn(async move {
        let mut wr = BufWriter::new(wr);
        while let Some(frame) = rx.recv().await {
            if write_frame(&mut wr, &frame).await.is_err() {
                return;
            }
            while let Ok(frame) = rx.try_recv() {
                if write_frame(&mut wr, &frame).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    let result = loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            f = read_frame(&mut rd, limits.max_frame_bytes, limits.idle_timeout, limits.frame_timeout) => f,
        };
        let buf = match frame {
            Ok(Some(buf)) => buf,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        let env = match decode(&buf) {
            Ok(env) => env,
            Err(e) => break Err(format!("undecodable frame: {e}")),
        };
        if env.version != PROTOCOL_VERSION {
            break Err(format!(
                "protocol version {} (expected {PROTOCOL_VERSION})",
                env.version
            ));
        }
        let Body::Request(req) = env.body else {
            break Err("response frame on a server connection".to_string());
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break Ok(());
        };
        let (handler, tx, id) = (handler.clone(), tx.clone(), env.id);
        tokio::spawn(async move {
            let resp = handler(req).await;
            let env = Envelope {
                version: PROTOCOL_VERSION,
                id,
                body: Body::Response(resp),
            };
            if let Ok(bytes) = encode(&env) {
                let _ = tx.send(bytes).await;
            }
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    /// Set by the reader task when the connection is gone.
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.dead.load(Ordering::SeqCst)
    }
}

struct Pool {
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
}

/// Outbound connections to every peer, by peer address.
pub struct Peers {
    limits: PeerLimits,
    /// Source address of outgoing connections (this node's peer IP), so
    /// that per-address network rules see who talks to whom.
    bind_ip: Option<std::net::IpAddr>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    next_id: AtomicU64,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("pools", &self.pools.lock().len())
            .finish()
    }
}

impl Peers {
    /// An empty pool set; connection tasks end when `shutdown` fires.
    pub fn new(
        limits: PeerLimits,
        bind_ip: Option<std::net::IpAddr>,
        shutdown: CancellationToken,
    ) -> Self {
        Peers {
            limits,
            bind_ip: bind_ip.filter(|ip| !ip.is_unspecified()),
            pools: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown,
        }
    }

    fn pool(&self, addr: &str) -> Arc<Pool> {
        self.pools
            .lock()
            .entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(Pool {
                    slots: (0..self.limits.pool_size.max(1))
                        .map(|_| tokio::sync::Mutex::new(None))
                        .collect(),
                    next: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    async fn conn(&self, addr: &str) -> Result<Arc<Conn>> {
        let pool = self.pool(addr);
        let slot = &pool.slots[pool.next.fetch_add(1, Ordering::Relaxed) % pool.slots.len()];
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let connect = async {
            let target: std::net::SocketAddr = match addr.parse() {
                Ok(a) => a,
                Err(_) => tokio::net::lookup_host(addr)
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other("no address"))?,
            };
            match self.bind_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
                Some(ip) => {
                    let sock = if ip.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    sock.bind(std::net::SocketAddr::new(ip, 0))?;
                    sock.connect(target).await
                }
                None => TcpStream::connect(target).await,
            }
        };
        let stream = tokio::time::timeout(self.limits.connect_timeout, connect)
            .await
            .map_err(|_| Error::Unavailable(format!("connect to peer {addr} timed out")))?
            .map_err(|e| Error::Unavailable(format!("connect to peer {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let pending: Pending = Arc::default();
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conn = Arc::new(Conn {
            tx,
            pending: pending.clone(),
            dead: dead.clone(),
        });
        let limits = self.limits;
        let shutdown = self.shutdown.clone();
        let addr_owned = addr.to_string();
        tokio::spawn(async move {
            let mut wr = BufWriter::new(wr);
            'outer: while let Some(frame) = rx.recv().await {
                if write_frame(&mut wr, &frame).await.is_err() {
                    break;
                }
                while let Ok(frame) = rx.try_recv() {
                    if write_frame(&mut wr, &frame).await.is_err() {
                        break 'outer;
                    }
                }
                if wr.flush().await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    f = read_frame(&mut rd, limits.max_frame_bytes, Duration::from_secs(86_400), limits.frame_timeout) => f,
                };
                let env = match frame {
                    Ok(Some(buf)) => match decode(&buf) {
                        Ok(env) => env,
                        Err(e) => {
                            tracing::warn!(peer = %addr_owned, error = %e, "undecodable response");
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(peer = %addr_owned, error = %e, "peer connection lost");
                        break;
                    }
                };
                if let Body::Response(resp) = env.body
                    && let Some(reply) = pending.lock().remove(&env.id)
                {
                    let _ = reply.send(resp);
                }
            }
            // Mark the connection dead first, then fail every waiting call
            // (dropping their senders).
            dead.store(true, Ordering::SeqCst);
            pending.lock().clear();
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` to the peer at `addr` and waits up to `timeout` for the answer.
    pub async fn call(&self, addr: &str, req: Request, timeout: Duration) -> Result<Response> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode(&Envelope {
            version: PROTOCOL_VERSION,
            id,
            body: Body::Request(req),
        })
        .map_err(|e| Error::Internal(format!("encode: {e}")))?;
        let conn = tokio::time::timeout(timeout, self.conn(addr))
            .await
            .map_err(|_| Error::Unavailable(format!("connect to peer {addr} timed out")))??;
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(id, tx);
        if conn.is_closed() {
            conn.pending.lock().remove(&id);
            return Err(Error::Unavailable(format!("peer {addr} connection lost")));
        }
        let sent = async {
            conn.tx
                .send(bytes)
                .await
                .map_err(|_| Error::Unavailable(format!("peer {addr} connection closed")))?;
            rx.await
                .map_err(|_| Error::Unavailable(format!("peer {addr} connection lost")))
        };
        let r = match tokio::time::timeout(timeout, sent).await {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable(format!(
                "peer {addr} did not answer within {timeout:?}"
            ))),
        };
        conn.pending.lock().remove(&id);
        r
    }
}
