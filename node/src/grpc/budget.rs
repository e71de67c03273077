//! A byte budget, shared by the whole node, for large responses being sent
//! on Batch streams. A response over [`SMALL_RESPONSE`] takes room from the
//! budget when the transport takes it from the stream. The room travels with
//! the response's encoded bytes ([`HandoffBody`], installed by
//! [`HandoffService`] around the Cache service) and is given back when the
//! transport drops them, i.e. once they were written to the connection. A
//! client that never reads its responses (an HTTP/2 window that never
//! opens) therefore holds room for exactly the bytes the node keeps for it;
//! once the budget is held, further large responses wait, so the node's
//! memory for them stays bounded whatever the number of streams. Small
//! responses (the usual gets and puts) never wait: a well-behaved client is
//! not starved by the ones that stall. Responses still queued in a stream
//! hold no room: large values are shared with the store, not copied.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use http_body::Frame;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::PollSemaphore;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// Responses up to this size (bytes) pass without taking room.
pub const SMALL_RESPONSE: usize = 1 << 20;

/// The room a response of `len` encoded bytes takes from a budget of `max`
/// (a response larger than the whole budget takes all of it).
fn room_for(len: usize, max: u32) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX).clamp(1, max)
}

/// The node-wide budget.
#[derive(Debug, Clone)]
pub struct ResponseBudget {
    permits: Arc<Semaphore>,
    max: u32,
}

impl ResponseBudget {
    /// A budget of `bytes` (at least 1 MiB).
    pub fn new(bytes: u64) -> Self {
        let max = u32::try_from(bytes.max(1 << 20)).unwrap_or(u32::MAX);
        ResponseBudget {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// Waits for room for a large unary answer of `len` encoded bytes; the
    /// answer's body takes it along ([`HandoffBody`]).
    pub async fn hold(&self, len: usize) -> Arc<Handoff> {
        // The semaphore is never closed: the error case cannot happen.
        let room = self
            .permits
            .clone()
            .acquire_many_owned(room_for(len, self.max))
            .await
            .ok();
        Arc::new(Handoff {
            room: Mutex::new(room),
        })
    }
}

/// The room of the large response a stream last handed to the transport
/// (or of a unary answer), until its encoded bytes pass through the
/// response's [`HandoffBody`].
#[derive(Debug, Default)]
pub struct Handoff {
    room: Mutex<Option<OwnedSemaphorePermit>>,
}

/// The responses of one stream: (response, its encoded size) from the
/// stream's task, each large one holding room until its bytes are written.
#[derive(Debug)]
pub struct Budgeted<T> {
    rx: mpsc::Receiver<(T, usize)>,
    next: Option<(T, usize)>,
    handoff: Arc<Handoff>,
    room: PollSemaphore,
    max: u32,
}

impl<T> Budgeted<T> {
    /// Wraps the receiving end of a stream's response queue.
    pub fn new(rx: mpsc::Receiver<(T, usize)>, budget: &ResponseBudget) -> Self {
        Budgeted {
            rx,
            next: None,
            handoff: Arc::default(),
            room: PollSemaphore::new(budget.permits.clone()),
            max: budget.max,
        }
    }

    /// Where this stream's room meets its encoded bytes: put it in the
    /// response's extensions for [`HandoffService`].
    pub fn handoff(&self) -> Arc<Handoff> {
        self.handoff.clone()
    }
}

impl<T: Unpin> Stream for Budgeted<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // Asked for the next: the previous one was encoded and its bytes
        // passed the stream's body, which took its room along. Room still
        // here (no body took it) is given back now.
        self.handoff.room.lock().take();
        if self.next.is_none() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(item)) => self.next = Some(item),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        let len = self.next.as_ref().map_or(0, |(_, len)| *len);
        if len > SMALL_RESPONSE {
            let n = room_for(len, self.max);
            match self.room.poll_acquire_many(cx, n) {
                Poll::Ready(permit) => *self.handoff.room.lock() = permit,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(self.next.take().map(|(item, _)| item))
    }
}

/// Encoded bytes with the room they hold, given back when the transport
/// drops them.
struct Held {
    bytes: Bytes,
    _room: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A response body whose data frames take along the room handed off by
/// the stream's [`Budgeted`] (a large response's bytes leave the encoder as
/// one frame, before the next response is asked for).
pub struct HandoffBody {
    inner: Body,
    handoff: Arc<Handoff>,
}

impl http_body::Body for HandoffBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let frame = match frame.into_data() {
            Ok(bytes) => match self.handoff.room.lock().take() {
                Some(room) => Frame::data(Bytes::from_owner(Held { bytes, _room: room })),
                None => Frame::data(bytes),
            },
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A gRPC service whose responses carrying a [`Handoff`] (Batch streams
/// and large unary answers) get a [`HandoffBody`].
#[derive(Debug, Clone)]
pub struct HandoffService<S> {
    inner: S,
}

impl<S> HandoffService<S> {
    /// Wraps `inner` (the Cache service).
    pub fn new(inner: S) -> Self {
        HandoffService { inner }
    }
}

impl<S: NamedService> NamedService for HandoffService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for HandoffService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            let Some(handoff) = response.extensions().get::<Arc<Handoff>>().cloned() else {
                return Ok(response);
            };
            Ok(response.map(|inner| Body::new(HandoffBody { inner, handoff })))
        })
    }
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt, StreamExt};
    use http_body::Body as _;

    use super::*;

    /// A body of one data frame.
    struct One(Option<Bytes>);

    impl http_body::Body for One {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
        }
    }

    /// A large answer's room leaves the stream with it, rides on the bytes
    /// of the body frame that carries it, and comes back when the transport
    /// drops those bytes; the next large answer waits until then. Room no
    /// body took is given back when the next answer is asked for.
    #[tokio::test]
    async fn a_large_answers_room_lasts_as_long_as_its_bytes() {
        let budget = ResponseBudget::new(4 << 20);
        let (tx, rx) = mpsc::channel(4);
        let mut answers = Budgeted::new(rx, &budget);
        for i in 0..3u32 {
            tx.send((i, 3 << 20)).await.expect("send");
        }
        assert_eq!(answers.next().await, Some(0));
        assert_eq!(budget.permits.available_permits(), 1 << 20);
        let mut body = HandoffBody {
            inner: Body::new(One(Some(Bytes::from_static(b"encoded answer 0")))),
            handoff: answers.handoff(),
        };
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .await
            .expect("a frame")
            .expect("data");
        let bytes = frame.into_data().expect("data");
        assert_eq!(&bytes[..], b"encoded answer 0");
        assert!(
            answers.next().now_or_never().is_none(),
            "the next large answer waits while the bytes are held"
        );
        let copy = bytes.clone();
        drop(bytes);
        assert!(
            answers.next().now_or_never().is_none(),
            "a clone of the bytes still holds the room"
        );
        drop(copy);
        assert_eq!(answers.next().await, Some(1));
        // No body takes answer 1's room: asking for answer 2 gives it back.
        assert_eq!(answers.next().await, Some(2));
        drop(tx);
        assert_eq!(answers.next().await, None);
        assert_eq!(budget.permits.available_permits(), 4 << 20);
    }
}
