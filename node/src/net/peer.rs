//! Peer transport: the server side (accept, read frames, dispatch, answer)
//! and the client side (a small pool of multiplexed connections per peer).

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame::{read_frame, write_frame};
use super::message::{Body, Envelope, PROTOCOL_VERSION, Request, Response, decode, encode};
use crate::error::{Error, Result};
use crate::security::peer_tls::{PeerTls, peer_names};

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

/// Open inbound connections per source IP; a slot is given back on drop.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot(Arc<PerIp>, IpAddr);

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = self.0.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Accepts peer connections until `shutdown` fires; connection tasks are
/// tracked by `tasks`. At most `max_connections` at once (the loop waits for
/// a slot before accepting, so a flood neither spins it nor takes the
/// descriptors gRPC clients need), `max_connections_per_ip` from one
/// address (more are closed at once), accept errors backed off (up to 1 s).
/// A connection is admitted (TLS handshake within the connect timeout, then
/// the gate) before a single frame of it is read.
pub async fn serve(
    listener: TcpListener,
    server: PeerServer,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let limits = server.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_ip = Arc::new(PerIp::default());
    let budget = Arc::new(Semaphore::new(
        limits.inflight_bytes.max(limits.max_frame_bytes),
    ));
    let mut backoff = Duration::from_millis(10);
    let mut warned_full = false;
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, from) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                drop(slot);
                tracing::warn!(error = %e, ?backoff, "peer accept failed; backing off");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if slots.available_permits() == 0 && !warned_full {
            tracing::warn!(
                max = limits.max_connections,
                "peer connection limit reached (--peer-max-connections); new connections wait"
            );
            warned_full = true;
        } else if slots.available_permits() > 0 {
            warned_full = false;
        }
        let Some(ip_slot) = per_ip.take(from.ip(), limits.max_connections_per_ip) else {
            tracing::debug!(peer = %from, max = limits.max_connections_per_ip, "too many peer connections from this address; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (server, shutdown, budget) = (server.clone(), shutdown.clone(), budget.clone());
        tasks.spawn(async move {
            let _held = (slot, ip_slot);
            if let Err(why) = admit_and_serve(stream, from, server, shutdown, budget).await {
                tracing::warn!(peer = %from, %why, "peer connection closed");
            }
        });
    }
}

async fn admit_and_serve(
    stream: TcpStream,
    from: SocketAddr,
    server: PeerServer,
    shutdown: CancellationToken,
    budget: Arc<Semaphore>,
) -> std::result::Result<(), String> {
    match &server.tls {
        Some(tls) => {
            let handshake = tls.acceptor().accept(stream);
            let stream = match tokio::time::timeout(server.limits.connect_timeout, handshake).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(format!("TLS handshake refused: {e}")),
                Err(_) => return Err("TLS handshake timed out".into()),
            };
            let names = peer_names(stream.get_ref().1.peer_certificates());
            let caller = Caller {
                identity: Identity::Certified(names),
                addr: from,
            };
            (server.admit)(&caller)?;
            let (rd, wr) = tokio::io::split(stream);
            connection(rd, wr, caller, server, shutdown, budget).await
        }
        None => {
            let caller = Caller {
                identity: Identity::Address(from.ip()),
                addr: from,
            };
            (server.admit)(&caller)?;
            // Plain TCP splits without a lock between the halves.
            let (rd, wr) = stream.into_split();
            connection(rd, wr, caller, server, shutdown, budget).await
        }
    }
}

async fn connection<R, W>(
    mut rd: R,
    wr: W,
    caller: Caller,
    server: PeerServer,
    shutdown: CancellationToken,
    budget: Arc<Semaphore>,
) -> std::result::Result<(), String>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let limits = server.limits;
    // Answers are written by whoever produced them, one frame at a time
    // under this lock, each within the frame timeout (a peer that stops
    // reading closes its connection instead of holding handlers forever).
    let writer = Arc::new(tokio::sync::Mutex::new(BufWriter::new(wr)));
    let closed = shutdown.child_token();
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    let result = loop {
        let frame = tokio::select! {
            _ = closed.cancelled() => break Ok(()),
            f = read_frame(&mut rd, limits.max_frame_bytes, limits.idle_timeout, limits.frame_timeout, Some(&budget)) => f,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        let env = match decode(&frame.bytes) {
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
        // The frame's budget is held until the request is handled.
        let held = frame.permit;
        drop(frame.bytes);
        if matches!(req, Request::Replicate { .. }) {
            // A replication stream waits for each answer before it sends
            // its next frame, and its frames must be applied in order:
            // handled right here, without a task of its own.
            let resp = (server.handler)(caller.clone(), req).await;
            drop(held);
            if let Err(why) = answer(&writer, env.id, resp, limits.frame_timeout).await {
                break Err(why);
            }
            continue;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break Ok(());
        };
        let (handler, writer, id, caller, closed) = (
            server.handler.clone(),
            writer.clone(),
            env.id,
            caller.clone(),
            closed.clone(),
        );
        tokio::spawn(async move {
            let resp = handler(caller, req).await;
            drop(held);
            if let Err(why) = answer(&writer, id, resp, limits.frame_timeout).await {
                tracing::debug!(%why, "peer answer not written; closing the connection");
                closed.cancel();
            }
            drop(permit);
        });
    };
    closed.cancel();
    result
}

/// Writes one answer (and flushes it) within `timeout`.
async fn answer<W: AsyncWrite + Unpin>(
    writer: &tokio::sync::Mutex<BufWriter<W>>,
    id: u64,
    resp: Response,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let env = Envelope {
        version: PROTOCOL_VERSION,
        id,
        body: Body::Response(resp),
    };
    let bytes = encode(&env).map_err(|e| format!("encode: {e}"))?;
    let write = async {
        let mut w = writer.lock().await;
        write_frame(&mut *w, &bytes).await?;
        w.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("writing an answer: {e}")),
        Err(_) => Err(format!("an answer was not taken within {timeout:?}")),
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;
type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection used in lockstep by one task (see [`Peers::direct`]).
/// After any error the connection is in an unknown state: drop it.
pub struct Direct {
    addr: String,
    rd: BoxRead,
    wr: BufWriter<BoxWrite>,
    next_id: u64,
    max_frame_bytes: usize,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("addr", &self.addr).finish()
    }
}

impl Direct {
    /// Sends `req` and reads its answer, all within `timeout`.
    pub async fn call(&mut self, req: Request, timeout: Duration) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = encode(&Envelope {
            version: PROTOCOL_VERSION,
            id,
            body: Body::Request(req),
        })
        .map_err(|e| Error::Internal(format!("encode: {e}")))?;
        let addr = &self.addr;
        let exchange = async {
            let lost = |e: std::io::Error| Error::Unavailable(format!("peer {addr}: {e}"));
            write_frame(&mut self.wr, &bytes).await.map_err(lost)?;
            self.wr.flush().await.map_err(lost)?;
            let frame = read_frame(&mut self.rd, self.max_frame_bytes, timeout, timeout, None)
                .await
                .map_err(|e| Error::Unavailable(format!("peer {addr}: {e}")))?
                .ok_or_else(|| Error::Unavailable(format!("peer {addr} closed the connection")))?;
            let env = decode(&frame.bytes)
                .map_err(|e| Error::Unavailable(format!("undecodable answer from {addr}: {e}")))?;
            match env.body {
                Body::Response(resp) if env.id == id && env.version == PROTOCOL_VERSION => Ok(resp),
                _ => Err(Error::Unavailable(format!(
                    "answer from {addr} is not for request {id}"
                ))),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable(format!(
                "peer {addr} did not answer within {timeout:?}"
            ))),
        }
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
    /// waits for each answer before it sends the next request (a
    /// replication stream): no pool, no writer or reader task in between.
    pub async fn direct(&self, addr: &str) -> Result<Direct> {
        let (rd, wr) = self.open(addr).await?;
        Ok(Direct {
            addr: addr.to_string(),
            rd,
            wr: BufWriter::new(wr),
            next_id: 1,
            max_frame_bytes: self.limits.max_frame_bytes,
        })
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
    use crate::net::message::ReplItem;

    fn replicate(seq: u64) -> Request {
        Request::Replicate {
            from: "n1".into(),
            items: vec![ReplItem {
                partition: 0,
                epoch: 1,
                stream: 1,
                seq,
                ops: Vec::new(),
            }],
        }
    }

    fn server(handler: Handler, frame_timeout: Duration) -> PeerServer {
        PeerServer {
            handler,
            admit: Arc::new(|_| Ok(())),
            tls: None,
            limits: PeerLimits {
                frame_timeout,
                ..PeerLimits::default()
            },
        }
    }

    fn caller() -> Caller {
        Caller {
            identity: Identity::Address(IpAddr::from([127, 0, 0, 1])),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    async fn send(w: &mut (impl AsyncWrite + Unpin), id: u64, req: Request) {
        let bytes = encode(&Envelope {
            version: PROTOCOL_VERSION,
            id,
            body: Body::Request(req),
        })
        .expect("encode");
        write_frame(w, &bytes).await.expect("write");
        w.flush().await.expect("flush");
    }

    /// Two replication frames written back to back are handled one after
    /// the other (the second is not even read before the first is
    /// answered) and answered in order: a backup applies a stream's frames
    /// in the order they were sent.
    #[tokio::test]
    async fn replication_frames_are_handled_in_order_and_answered_in_order() {
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = log.clone();
        let handler: Handler = Arc::new(move |_, req| {
            let log = seen.clone();
            Box::pin(async move {
                let Request::Replicate { items, .. } = req else {
                    return Response::Ok;
                };
                let seq = items.first().map_or(0, |i| i.seq);
                log.lock().push(format!("start {seq}"));
                if seq == 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                log.lock().push(format!("end {seq}"));
                Response::Replicated(vec![None])
            })
        });
        let (client, far) = tokio::io::duplex(1 << 16);
        let (srd, swr) = tokio::io::split(far);
        let conn = tokio::spawn(connection(
            srd,
            swr,
            caller(),
            server(handler, Duration::from_secs(5)),
            CancellationToken::new(),
            Arc::new(Semaphore::new(1 << 20)),
        ));
        let (mut crd, mut cwr) = tokio::io::split(client);
        send(&mut cwr, 1, replicate(1)).await;
        send(&mut cwr, 2, replicate(2)).await;
        for want in [1, 2] {
            let frame = read_frame(&mut crd, 1 << 20, S, S, None)
                .await
                .expect("read")
                .expect("an answer");
            let env = decode(&frame.bytes).expect("decode");
            assert_eq!(env.id, want, "answers in request order");
            assert!(matches!(env.body, Body::Response(Response::Replicated(_))));
        }
        assert_eq!(
            *log.lock(),
            vec!["start 1", "end 1", "start 2", "end 2"],
            "the second frame was handled while the first still ran"
        );
        drop(cwr);
        drop(crd);
        let ended = tokio::time::timeout(S, conn).await;
        assert!(
            ended.is_ok(),
            "the connection task did not end after the peer left"
        );
    }

    const S: Duration = Duration::from_secs(5);

    /// A peer that sends requests but never reads the answers has its
    /// connection closed once an answer waits longer than the frame
    /// timeout (it does not hold the answering handlers forever).
    #[tokio::test]
    async fn a_peer_that_takes_no_answers_is_cut_off() {
        let handler: Handler = Arc::new(|_, _| Box::pin(async { big_answer() }));
        let (client, far) = tokio::io::duplex(1024);
        let (srd, swr) = tokio::io::split(far);
        let conn = tokio::spawn(connection(
            srd,
            swr,
            caller(),
            server(handler, Duration::from_millis(200)),
            CancellationToken::new(),
            Arc::new(Semaphore::new(1 << 20)),
        ));
        let (_crd, mut cwr) = tokio::io::split(client);
        send(&mut cwr, 1, Request::ListCollections).await;
        let ended = tokio::time::timeout(S, conn).await;
        assert!(
            ended.is_ok(),
            "the connection stayed open with an answer nobody reads"
        );
        // And a replication frame answered inline is cut off the same way.
        let handler: Handler = Arc::new(|_, _| Box::pin(async { big_answer() }));
        let (client, far) = tokio::io::duplex(1024);
        let (srd, swr) = tokio::io::split(far);
        let conn = tokio::spawn(connection(
            srd,
            swr,
            caller(),
            server(handler, Duration::from_millis(200)),
            CancellationToken::new(),
            Arc::new(Semaphore::new(1 << 20)),
        ));
        let (_crd, mut cwr) = tokio::io::split(client);
        send(&mut cwr, 1, replicate(1)).await;
        let ended = tokio::time::timeout(S, conn)
            .await
            .expect("connection task ended");
        let result = ended.expect("joined");
        assert!(
            result.as_ref().is_err_and(|why| why.contains("not taken")),
            "{result:?}"
        );
    }

    /// An answer far larger than the pipe between the two ends.
    fn big_answer() -> Response {
        Response::Error(Error::InvalidArgument("x".repeat(64 * 1024)).to_wire())
    }

    /// A lockstep connection refuses an answer that is not for its request
    /// and reports a peer that closed.
    #[tokio::test]
    async fn a_direct_call_takes_only_its_own_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (mut rd, mut wr) = s.into_split();
            // First request: answered with its own id.
            let f = read_frame(&mut rd, 1 << 20, S, S, None)
                .await
                .expect("read")
                .expect("frame");
            let id = decode(&f.bytes).expect("decode").id;
            let ok = encode(&Envelope {
                version: PROTOCOL_VERSION,
                id,
                body: Body::Response(Response::Ok),
            })
            .expect("encode");
            write_frame(&mut wr, &ok).await.expect("write");
            // Second: answered with another id.
            let f = read_frame(&mut rd, 1 << 20, S, S, None)
                .await
                .expect("read")
                .expect("frame");
            let id = decode(&f.bytes).expect("decode").id;
            let wrong = encode(&Envelope {
                version: PROTOCOL_VERSION,
                id: id + 7,
                body: Body::Response(Response::Ok),
            })
            .expect("encode");
            write_frame(&mut wr, &wrong).await.expect("write");
            // Third: the connection is closed.
            let _ = read_frame(&mut rd, 1 << 20, S, S, None).await;
        });
        let peers = Peers::new(PeerLimits::default(), None, None, CancellationToken::new());
        let mut direct = peers.direct(&addr).await.expect("connect");
        let r = direct.call(Request::ListCollections, S).await;
        assert!(matches!(r, Ok(Response::Ok)), "{r:?}");
        let r = direct.call(Request::ListCollections, S).await;
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("not for request")),
            "{r:?}"
        );
        let r = direct.call(Request::ListCollections, S).await;
        assert!(r.is_err(), "{r:?}");
        peer.await.expect("peer task");
    }
}
