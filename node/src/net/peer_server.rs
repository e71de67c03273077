//! The peer port's server side: accept (bounded), admit, read frames,
//! dispatch, answer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame::{read_frame, write_frame};
use super::message::{Body, Envelope, PROTOCOL_VERSION, Request, Response, decode, encode};
use super::peer::{Caller, Identity, PeerServer};
use crate::security::peer_tls::peer_names;

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
            // A replication stream's frames must be applied in the order
            // they were sent (several may be in flight): each is handled
            // right here, without a task of its own, before the next one
            // is read.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::net::message::ReplItem;
    use crate::net::peer::{Handler, PeerLimits};

    const S: Duration = Duration::from_secs(5);

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
        let (conn, client) = spawn_connection(handler, Duration::from_secs(5), 1 << 16);
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

    /// A peer that sends requests but never reads the answers has its
    /// connection closed once an answer waits longer than the frame
    /// timeout (it does not hold the answering handlers forever).
    #[tokio::test]
    async fn a_peer_that_takes_no_answers_is_cut_off() {
        let handler: Handler = Arc::new(|_, _| Box::pin(async { big_answer() }));
        let (conn, client) = spawn_connection(handler, Duration::from_millis(200), 1024);
        let (_crd, mut cwr) = tokio::io::split(client);
        send(&mut cwr, 1, Request::ListCollections).await;
        let ended = tokio::time::timeout(S, conn).await;
        assert!(
            ended.is_ok(),
            "the connection stayed open with an answer nobody reads"
        );
        // And a replication frame answered inline is cut off the same way.
        let handler: Handler = Arc::new(|_, _| Box::pin(async { big_answer() }));
        let (conn, client) = spawn_connection(handler, Duration::from_millis(200), 1024);
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

    /// A server connection task fed through an in-memory pipe of `pipe`
    /// bytes; the other end of the pipe plays the peer.
    fn spawn_connection(
        handler: Handler,
        frame_timeout: Duration,
        pipe: usize,
    ) -> (
        tokio::task::JoinHandle<std::result::Result<(), String>>,
        tokio::io::DuplexStream,
    ) {
        let (client, far) = tokio::io::duplex(pipe);
        let (srd, swr) = tokio::io::split(far);
        let conn = tokio::spawn(connection(
            srd,
            swr,
            caller(),
            server(handler, frame_timeout),
            CancellationToken::new(),
            Arc::new(Semaphore::new(1 << 20)),
        ));
        (conn, client)
    }

    /// An answer far larger than the pipe between the two ends.
    fn big_answer() -> Response {
        Response::Error(Error::InvalidArgument("x".repeat(64 * 1024)).to_wire())
    }
}
