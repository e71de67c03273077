//! The client port's connections, bounded: at most `max_connections` at
//! once (a new one waits in the kernel's backlog until one closes, so a
//! flood cannot spin the accept loop or exhaust descriptors), accept errors
//! backed off, TLS handshakes run concurrently with a deadline, and a
//! connection that sends nothing for the idle timeout is closed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// Limits of the client port.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most connections at once.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed (None: never).
    pub idle_timeout: Option<Duration>,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
}

/// A connection holding one of the port's permits, closed when idle.
#[derive(Debug)]
pub struct Bounded<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl<S> Bounded<S> {
    fn new(inner: S, permit: OwnedSemaphorePermit, idle: Option<Duration>) -> Self {
        Bounded {
            inner,
            _permit: permit,
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before
                    && let Some((d, sleep)) = self.idle.as_mut()
                {
                    sleep.as_mut().reset(Instant::now() + *d);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let idle = match self.idle.as_mut() {
                    Some((_, sleep)) => sleep.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if idle {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle connection closed",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Bounded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepted TCP connections, each with a permit; waits for a permit before
/// accepting, and backs off after an accept error (e.g. out of descriptors).
fn accepted(
    listener: TcpListener,
    limits: ConnLimits,
) -> impl Stream<Item = (TcpStream, OwnedSemaphorePermit)> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    futures::stream::unfold(
        (listener, permits, false),
        |(listener, permits, mut warned)| async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return None;
                };
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        if permits.available_permits() == 0 && !warned {
                            tracing::warn!(
                                "client connection limit reached (--max-connections); new connections wait"
                            );
                            warned = true;
                        } else if permits.available_permits() > 0 {
                            warned = false;
                        }
                        return Some(((tcp, permit), (listener, permits, warned)));
                    }
                    Err(e) => {
                        drop(permit);
                        tracing::warn!(error = %e, "accept failed; backing off");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        },
    )
}

/// Plaintext connections.
pub fn plain(
    listener: TcpListener,
    limits: ConnLimits,
) -> impl Stream<Item = std::io::Result<Bounded<TcpStream>>> {
    accepted(listener, limits)
        .map(move |(tcp, permit)| Ok(Bounded::new(tcp, permit, limits.idle_timeout)))
}

/// TLS connections: handshakes run concurrently, each within the handshake
/// timeout; a failed handshake is logged and dropped.
pub fn tls(
    listener: TcpListener,
    limits: ConnLimits,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = std::io::Result<Bounded<tokio_rustls::server::TlsStream<TcpStream>>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    accepted(listener, limits)
        .map(move |(tcp, permit)| {
            let acceptor = acceptor.clone();
            async move {
                let peer = tcp.peer_addr().ok();
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => Some(Bounded::new(tls, permit, limits.idle_timeout)),
                    Ok(Err(e)) => {
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(?peer, "TLS handshake timed out");
                        None
                    }
                }
            }
        })
        .buffer_unordered(256)
        .filter_map(|c| async move { c.map(Ok) })
}
