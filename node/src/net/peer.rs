//! Peer transport: what both sides share, and the client side (a small pool
//! of multiplexed connections per peer, and ordered connections of their
//! own for replication streams); the server side is in `peer_server`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::frame::{read_frame, write_frame};
use super::message::{
    Body, Envelope, PROTOCOL_VERSION, Request, Response, decode, encode, encode_into,
};
use crate::error::{Error, Result};
use crate::security::peer_tls::PeerTls;

/// Transport settings.
#[derive(Debug, Clone, Copy)]
pub struct PeerLimits {
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// A started frame must complete within this.
    pub frame_timeout: Duration,
    /// An inbound connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Connect timeout (seed default 5 s); also the TLS handshake's.
    pub connect_timeout: Duration,
    /// Connections per peer (seed default 4).
    pub pool_size: usize,
    /// Requests in flight per inbound connection.
    pub max_in_flight: usize,
    /// Most inbound connections at once (more wait in the kernel backlog).
    pub max_connections: usize,
    /// Most inbound connections from one IP address (more are closed).
    pub max_connections_per_ip: usize,
    /// Bytes of inbound frames being read or handled at once, node-wide.
    pub inflight_bytes: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_frame_bytes: 80 << 20,
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            pool_size: 4,
            max_in_flight: 1024,
            max_connections: 512,
            max_connections_per_ip: 64,
            inflight_bytes: 256 << 20,
        }
    }
}

/// Who is on the other end of an inbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The member names in the certificate the cluster CA signed (mTLS).
    Certified(Vec<String>),
    /// Unauthenticated (`--peer-insecure`): only the source IP is known.
    Address(IpAddr),
}

/// An inbound connection's identity and address, given to every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who it is.
    pub identity: Identity,
    /// Its address.
    pub addr: SocketAddr,
}

/// Handles one inbound request.
pub type Handler =
    Arc<dyn Fn(Caller, Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Decides, before any frame is read, whether a connection may speak at
/// all (its certificate or address belongs to a current member).
pub type Admit = Arc<dyn Fn(&Caller) -> std::result::Result<(), String> + Send + Sync>;

/// The inbound side of the peer port.
#[derive(Clone)]
pub struct PeerServer {
    /// Requests.
    pub handler: Handler,
    /// The gate.
    pub admit: Admit,
    /// mTLS (None: `--peer-insecure`).
    pub tls: Option<Arc<PeerTls>>,
    /// Limits.
    pub limits: PeerLimits,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;
type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The sending half of a connection of one task (see [`Peers::direct`]):
/// requests go out in order, several may wait for their answers, which
/// the backup writes in the same order on the [`DirectRx`] half. After any
/// error the connection is in an unknown state: drop both halves.
pub struct DirectTx {
    addr: String,
    wr: BufWriter<BoxWrite>,
    next_id: u64,
    /// The last frame's encoding, its buffer kept for the next (up to
    /// [`KEPT_ENCODE_BYTES`]).
    encoded: Vec<u8>,
}

/// Most bytes a [`DirectTx`] keeps allocated for encoding between frames
/// (a larger frame's buffer is freed after it is written).
const KEPT_ENCODE_BYTES: usize = 64 << 10;

/// The reading half of a [`DirectTx`]'s connection.
pub struct DirectRx {
    addr: String,
    rd: BoxRead,
    max_frame_bytes: usize,
}

impl std::fmt::Debug for DirectTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectTx")
            .field("addr", &self.addr)
            .finish()
    }
}

impl std::fmt::Debug for DirectRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectRx")
            .field("addr", &self.addr)
            .finish()
    }
}

impl DirectTx {
    /// Writes `req` (and flushes it) within `timeout`; returns its id,
    /// which its answer carries.
    pub async fn send(&mut self, req: Request, timeout: Duration) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        self.encoded.clear();
        encode_into(
            &mut self.encoded,
            &Envelope {
                version: PROTOCOL_VERSION,
                id,
                body: Body::Request(req),
            },
        )
        .map_err(|e| Error::Internal(format!("encode: {e}")))?;
        let addr = &self.addr;
        let write = async {
            write_frame(&mut self.wr, &self.encoded).await?;
            self.wr.flush().await
        };
        let written = tokio::time::timeout(timeout, write).await;
        if self.encoded.capacity() > KEPT_ENCODE_BYTES {
            self.encoded = Vec::new();
        }
        match written {
            Ok(Ok(())) => Ok(id),
            Ok(Err(e)) => Err(Error::Unavailable(format!("peer {addr}: {e}"))),
            Err(_) => Err(Error::Unavailable(format!(
                "peer {addr} took no request within {timeout:?}"
            ))),
        }
    }
}

impl DirectRx {
    /// Reads the next answer (its request's id and the response), waiting
    /// `timeout` at most. Takes the half and gives it back, so the read
    /// can be kept across the caller's other waits (a read cut off
    /// mid-frame would leave the connection unusable).
    pub async fn recv(mut self, timeout: Duration) -> (Self, Result<(u64, Response)>) {
        let read = read_frame(&mut self.rd, self.max_frame_bytes, timeout, timeout, None).await;
        let addr = &self.addr;
        let answer = match read {
            Err(e) => Err(Error::Unavailable(format!("peer {addr}: {e}"))),
            Ok(None) => Err(Error::Unavailable(format!(
                "peer {addr} closed the connection"
            ))),
            Ok(Some(frame)) => match decode(&frame.bytes) {
                Err(e) => Err(Error::Unavailable(format!(
                    "undecodable answer from {addr}: {e}"
                ))),
                Ok(env) => match env.body {
                    Body::Response(resp) if env.version == PROTOCOL_VERSION => Ok((env.id, resp)),
                    _ => Err(Error::Unavailable(format!("unexpected frame from {addr}"))),
                },
            },
        };
        (self, answer)
    }
}

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
    /// mTLS (None: `--peer-insecure`).
    tls: Option<Arc<PeerTls>>,
    /// The member name at a peer address (whose certificate it must show).
    directory: OnceLock<Directory>,
}

/// Maps a peer address to the name of the member there.
pub type Directory = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

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
        tls: Option<Arc<PeerTls>>,
        shutdown: CancellationToken,
    ) -> Self {
        Peers {
            limits,
            bind_ip: bind_ip.filter(|ip| !ip.is_unspecified()),
            pools: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown,
            tls,
            directory: OnceLock::new(),
        }
    }

    /// Sets how a peer address maps to a member name (once; with mTLS a
    /// connection to an address no member has is refused).
    pub fn set_directory(&self, directory: Directory) {
        let _ = self.directory.set(directory);
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
        let (rd, wr) = self.open(addr).await?;
        let conn = self.spawn_conn(addr, rd, wr);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Connects to the peer at `addr` (from this node's peer IP, mTLS
    /// unless `--peer-insecure`), within the connect timeout.
    async fn open(&self, addr: &str) -> Result<(BoxRead, BoxWrite)> {
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
        match &self.tls {
            Some(tls) => {
                let name = self.directory.get().and_then(|d| d(addr)).ok_or_else(|| {
                    Error::Unavailable(format!("no member at peer address {addr}"))
                })?;
                let server_name = PeerTls::server_name(&name)?;
                let handshake = tls.connector().connect(server_name, stream);
                let tls_stream = tokio::time::timeout(self.limits.connect_timeout, handshake)
                    .await
                    .map_err(|_| {
                        Error::Unavailable(format!("TLS handshake with {name} at {addr} timed out"))
                    })?
                    .map_err(|e| {
                        Error::Unavailable(format!("TLS handshake with {name} at {addr}: {e}"))
                    })?;
                let (rd, wr) = tokio::io::split(tls_stream);
                Ok((Box::new(rd), Box::new(wr)))
            }
            None => {
                let (rd, wr) = stream.into_split();
                Ok((Box::new(rd), Box::new(wr)))
            }
        }
    }

    /// A connection of its own to the peer at `addr`, for one task that
    /// sends requests and reads their answers in order, several in flight
    /// (a replication stream): no pool, no writer or reader task in between.
    pub async fn direct(&self, addr: &str) -> Result<(DirectTx, DirectRx)> {
        let (rd, wr) = self.open(addr).await?;
        let tx = DirectTx {
            addr: addr.to_string(),
            wr: BufWriter::new(wr),
            next_id: 1,
            encoded: Vec::new(),
        };
        let rx = DirectRx {
            addr: addr.to_string(),
            rd,
            max_frame_bytes: self.limits.max_frame_bytes,
        };
        Ok((tx, rx))
    }

    /// Starts the writer and reader tasks of a new connection.
    fn spawn_conn<R, W>(&self, addr: &str, mut rd: R, wr: W) -> Arc<Conn>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
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
                    f = read_frame(&mut rd, limits.max_frame_bytes, Duration::from_secs(86_400), limits.frame_timeout, None) => f,
                };
                let env = match frame {
                    Ok(Some(frame)) => match decode(&frame.bytes) {
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
        conn
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const S: Duration = Duration::from_secs(5);

    /// Reads one request and answers it Ok, under its id plus `shift`.
    async fn answer_next(
        rd: &mut (impl AsyncRead + Unpin),
        wr: &mut (impl AsyncWrite + Unpin),
        shift: u64,
    ) {
        let f = read_frame(rd, 1 << 20, S, S, None)
            .await
            .expect("read")
            .expect("frame");
        let id = decode(&f.bytes).expect("decode").id;
        let answer = encode(&Envelope {
            version: PROTOCOL_VERSION,
            id: id + shift,
            body: Body::Response(Response::Ok),
        })
        .expect("encode");
        write_frame(wr, &answer).await.expect("write");
    }

    /// An ordered connection gives each answer with the id it carries
    /// (the caller matches it to its request) and reports a peer that
    /// closed.
    #[tokio::test]
    async fn a_direct_connection_gives_answers_with_their_ids() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (mut rd, mut wr) = s.into_split();
            // First request: answered with its own id; the second with another.
            answer_next(&mut rd, &mut wr, 0).await;
            answer_next(&mut rd, &mut wr, 7).await;
            // Third: the connection is closed.
            let _ = read_frame(&mut rd, 1 << 20, S, S, None).await;
        });
        let peers = Peers::new(PeerLimits::default(), None, None, CancellationToken::new());
        let (mut tx, rx) = peers.direct(&addr).await.expect("connect");
        let id = tx.send(Request::ListCollections, S).await.expect("send");
        let (rx, r) = rx.recv(S).await;
        assert!(matches!(r, Ok((got, Response::Ok)) if got == id), "{r:?}");
        let id = tx.send(Request::ListCollections, S).await.expect("send");
        let (rx, r) = rx.recv(S).await;
        assert!(matches!(r, Ok((got, _)) if got == id + 7), "{r:?}");
        let _ = tx.send(Request::ListCollections, S).await;
        let (_, r) = rx.recv(S).await;
        assert!(r.is_err(), "{r:?}");
        peer.await.expect("peer task");
    }
}
