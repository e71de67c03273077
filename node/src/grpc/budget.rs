//! A byte budget, shared by the whole node, for large responses being sent
//! on Batch streams. A response over [`SMALL_RESPONSE`] takes room from the
//! budget when the transport takes it from the stream. The room travels with
//! the response's encoded bytes ([`AnswerBody`] for Batch streams,
//! [`HandoffBody`] for large unary answers, both installed by
//! [`HandoffService`] around the Cache service) and is given back when the
//! transport drops them, i.e. once they were written to the connection. A
//! client that never reads its responses (an HTTP/2 window that never
//! opens) therefore holds room for exactly the bytes the node keeps for it;
//! once the budget is held, further large responses wait, so the node's
//! memory for them stays bounded whatever the number of streams. Small
//! responses (the usual gets and puts) never wait: a well-behaved client is
//! not starved by the ones that stall. Responses still queued in a stream
//! hold no room: large values are shared with the store, not copied.
//!
//! A Batch stream's answers are encoded here, each into a buffer of its own
//! size, rather than by tonic's encoder: that one keeps, for the life of
//! the stream, a buffer as large as the largest answer it ever sent, so
//! streams that once read a large answer and then idle would hold memory
//! no budget counts (60 such streams of 16 MiB grew a node by 962 MiB).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use http::HeaderMap;
use http_body::Frame;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::PollSemaphore;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// The length prefix of a gRPC message: a compression flag and the
/// message's length (big-endian u32).
pub(super) const MESSAGE_HEADER: usize = 5;

/// Responses up to this size (bytes) pass without taking room.
pub const SMALL_RESPONSE: usize = 1 << 20;

/// The room a response of `len` encoded bytes takes from a budget of `max`
/// (a response larger than the whole budget takes all of it).
pub(super) fn room_for(len: usize, max: u32) -> u32 {
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

    /// The budget's semaphore and the most room one message may take.
    pub fn semaphore(&self) -> (PollSemaphore, u32) {
        (PollSemaphore::new(self.permits.clone()), self.max)
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
/// (or of a unary answer), until its encoded bytes leave the response's
/// body ([`AnswerBody`], or [`HandoffBody`] for a unary answer).
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

/// A Batch stream's answers, handed from the handler to [`HandoffService`]
/// in the response's extensions (tonic's own body for the stream is
/// dropped unread: the handler gives tonic an empty stream).
#[derive(Debug)]
pub struct Answers<M>(Arc<Mutex<Option<AnswerStream<M>>>>);

/// A Batch stream's answers (or the status that ends it), budgeted.
type AnswerStream<M> = Budgeted<Result<M, Status>>;

impl<M> Clone for Answers<M> {
    fn clone(&self) -> Self {
        Answers(self.0.clone())
    }
}

impl<M> Answers<M> {
    /// Wraps a stream's answers for the trip through the extensions.
    pub fn new(answers: AnswerStream<M>) -> Self {
        Answers(Arc::new(Mutex::new(Some(answers))))
    }
}

/// The body of a Batch stream: each answer encoded as one gRPC message in a
/// buffer of exactly its size (dropped once written), a large one carrying
/// its room; the stream's end or error becomes the trailers.
pub struct AnswerBody<M> {
    answers: AnswerStream<M>,
    /// `--max-message-bytes`: a larger answer ends the stream with
    /// `OUT_OF_RANGE`, as tonic's encoder would.
    max: usize,
    done: bool,
}

impl<M> AnswerBody<M> {
    fn trailers(&mut self, status: &Status) -> Frame<Bytes> {
        self.done = true;
        let mut trailers = HeaderMap::new();
        if let Err(unencodable) = status.add_header(&mut trailers) {
            tracing::warn!(error = %unencodable, "a Batch stream's status could not be encoded");
            let _ = Status::internal("unencodable status").add_header(&mut trailers);
        }
        Frame::trailers(trailers)
    }
}

impl<M: Message + Unpin> http_body::Body for AnswerBody<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let answer = match ready!(Pin::new(&mut self.answers).poll_next(cx)) {
            Some(Ok(answer)) => answer,
            Some(Err(status)) => return Poll::Ready(Some(Ok(self.trailers(&status)))),
            None => return Poll::Ready(Some(Ok(self.trailers(&Status::ok(""))))),
        };
        let len = answer.encoded_len();
        let Some(prefix) = u32::try_from(len).ok().filter(|_| len <= self.max) else {
            let status = Status::out_of_range(format!(
                "an answer of {len} bytes is over --max-message-bytes ({})",
                self.max
            ));
            return Poll::Ready(Some(Ok(self.trailers(&status))));
        };
        let mut buf = Vec::with_capacity(MESSAGE_HEADER + len);
        buf.push(0);
        buf.extend_from_slice(&prefix.to_be_bytes());
        if let Err(e) = answer.encode(&mut buf) {
            // A Vec grows as needed: prost cannot run out of room.
            let status = Status::internal(format!("encoding an answer: {e}"));
            return Poll::Ready(Some(Ok(self.trailers(&status))));
        }
        let bytes = Bytes::from(buf);
        let bytes = match self.answers.handoff.room.lock().take() {
            Some(room) => Bytes::from_owner(Held { bytes, _room: room }),
            None => bytes,
        };
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A gRPC service whose Batch streams get an [`AnswerBody`] (answers of
/// type `M`) and whose large unary answers, carrying a [`Handoff`], get a
/// [`HandoffBody`].
#[derive(Debug)]
pub struct HandoffService<S, M> {
    inner: S,
    max: usize,
    answers: std::marker::PhantomData<fn() -> M>,
}

impl<S: Clone, M> Clone for HandoffService<S, M> {
    fn clone(&self) -> Self {
        HandoffService {
            inner: self.inner.clone(),
            max: self.max,
            answers: std::marker::PhantomData,
        }
    }
}

impl<S, M> HandoffService<S, M> {
    /// Wraps `inner` (the Cache service), whose answers may be at most
    /// `max` bytes encoded.
    pub fn new(inner: S, max: usize) -> Self {
        HandoffService {
            inner,
            max,
            answers: std::marker::PhantomData,
        }
    }
}

impl<S: NamedService, M> NamedService for HandoffService<S, M> {
    const NAME: &'static str = S::NAME;
}

impl<S, M> Service<http::Request<Body>> for HandoffService<S, M>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
    M: Message + Unpin + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(req);
        let max = self.max;
        Box::pin(async move {
            let response = call.await?;
            let answers = response
                .extensions()
                .get::<Answers<M>>()
                .and_then(|a| a.0.lock().take());
            if let Some(answers) = answers {
                return Ok(response.map(|_empty| {
                    Body::new(AnswerBody {
                        answers,
                        max,
                        done: false,
                    })
                }));
            }
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
            handoff: answers.handoff.clone(),
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

    /// A Batch stream's body: each answer one length-prefixed message in a
    /// buffer of its own (a large one carrying its room until its bytes are
    /// dropped), the end `grpc-status: 0`, an error its status, and an
    /// answer over the limit `OUT_OF_RANGE` instead of its bytes.
    #[tokio::test]
    async fn a_batch_streams_body_frames_each_answer_and_ends_with_its_status() {
        use distcache_client::proto;
        let answer = |n: usize| proto::BatchResponse {
            results: vec![proto::CommandResult {
                id: n as u64,
                result: Some(proto::command_result::Result::Get(proto::GetResponse {
                    found: true,
                    value: vec![1u8; n].into(),
                })),
            }],
        };
        let frames = |answers: Vec<Result<proto::BatchResponse, Status>>, max: usize| {
            let budget = ResponseBudget::new(4 << 20);
            let (tx, rx) = mpsc::channel(8);
            for a in answers {
                let len = a.as_ref().map_or(0, Message::encoded_len);
                tx.try_send((a, len)).expect("queued");
            }
            drop(tx);
            let body = AnswerBody {
                answers: Budgeted::new(rx, &budget),
                max,
                done: false,
            };
            (body, budget)
        };
        let trailers = |body: &mut AnswerBody<proto::BatchResponse>| {
            std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
                .now_or_never()
                .expect("ready")
                .expect("trailers")
                .expect("ok")
                .into_trailers()
                .expect("trailers")
        };
        let next = |body: &mut AnswerBody<proto::BatchResponse>| {
            std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
                .now_or_never()
                .expect("ready")
        };
        let (mut body, budget) = frames(vec![Ok(answer(3)), Ok(answer(2 << 20))], 64 << 20);
        for n in [3usize, 2 << 20] {
            let data = next(&mut body)
                .expect("a frame")
                .expect("ok")
                .into_data()
                .expect("data");
            let len = answer(n).encoded_len();
            assert_eq!(data.len(), 5 + len);
            assert_eq!(data[0], 0, "not compressed");
            assert_eq!(
                u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize,
                len
            );
            let decoded = proto::BatchResponse::decode(&data[5..]).expect("decodes");
            assert_eq!(decoded, answer(n));
            if n > SMALL_RESPONSE {
                assert_eq!(
                    budget.permits.available_permits(),
                    (4 << 20) - len,
                    "held while the bytes live"
                );
                drop(data);
                assert_eq!(
                    budget.permits.available_permits(),
                    4 << 20,
                    "back once dropped"
                );
            }
        }
        let end = trailers(&mut body);
        assert_eq!(
            end.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        assert!(body.is_end_stream());
        assert!(next(&mut body).is_none());

        let (mut body, _) = frames(vec![Err(Status::unavailable("leaving"))], 64 << 20);
        let end = trailers(&mut body);
        assert_eq!(
            end.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"14"[..])
        );
        assert_eq!(
            end.get("grpc-message").map(|v| v.as_bytes()),
            Some(&b"leaving"[..])
        );

        let (mut body, _) = frames(vec![Ok(answer(100))], 50);
        let end = trailers(&mut body);
        assert_eq!(
            end.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"11"[..]),
            "OUT_OF_RANGE"
        );
        assert!(next(&mut body).is_none());
    }
}
