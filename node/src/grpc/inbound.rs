//! A Batch stream's requests, decoded by the node rather than by tonic.
//!
//! tonic's decoder keeps, for the life of a stream, a buffer as large as
//! the largest message the stream ever sent (60 streams that each wrote
//! one 4 MiB value and then idled held 242 MiB), and a stream in the middle
//! of a message holds what arrived of it, up to `--max-message-bytes`,
//! whatever the number of streams. Here each message is copied out of the
//! HTTP/2 frames into a buffer of exactly its size, which its decoded
//! values share and nothing else keeps; and before a message over
//! [`SMALL_RESPONSE`] is read, it takes room for its size from a node-wide
//! budget (`--request-buffer-bytes`), given back once it is decoded. While
//! it waits, the stream is not read, so HTTP/2 flow control holds its
//! client back; small messages never wait.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::Body as _;
use http_body::Frame;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::PollSemaphore;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use super::budget::{MESSAGE_HEADER, ResponseBudget, SMALL_RESPONSE, room_for};

/// The length prefix of a gRPC message.
const HEADER: usize = MESSAGE_HEADER;

/// A Batch stream's request body, handed from [`RequestRoom`] to the
/// handler in the request's extensions (tonic is given an empty
/// body in its place).
#[derive(Debug, Clone)]
pub struct InboundBody(Arc<Mutex<Option<Body>>>);

impl InboundBody {
    /// Wraps a request's body for the trip through the extensions.
    pub fn new(body: Body) -> Self {
        InboundBody(Arc::new(Mutex::new(Some(body))))
    }

    /// The body, to the first who asks.
    pub fn take(&self) -> Option<Body> {
        self.0.lock().take()
    }
}

/// Decodes the messages of type `M` of one request body.
pub struct Inbound<M> {
    body: Body,
    /// Frames received and not yet consumed, and their total length.
    chunks: VecDeque<Bytes>,
    buffered: usize,
    /// The length of the message being received (its header consumed).
    next: Option<usize>,
    room: Option<OwnedSemaphorePermit>,
    budget: PollSemaphore,
    most_room: u32,
    /// `--max-message-bytes`.
    max: usize,
    ended: bool,
    message: PhantomData<fn() -> M>,
}

impl<M: Message + Default> Inbound<M> {
    /// Decodes `body`, whose messages may be at most `max` bytes and take
    /// room from `budget` when over [`SMALL_RESPONSE`].
    pub fn new(body: Body, budget: &ResponseBudget, max: usize) -> Self {
        let (budget, most_room) = budget.semaphore();
        Inbound {
            body,
            chunks: VecDeque::new(),
            buffered: 0,
            next: None,
            room: None,
            budget,
            most_room,
            max,
            ended: false,
            message: PhantomData,
        }
    }

    /// The next message; `None` once the client closed its side. Cancel
    /// safe: what arrived of a message stays here for the next call.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<M>, Status>> {
        loop {
            if self.next.is_none() && self.buffered >= HEADER {
                let header = self.take(HEADER);
                if header[0] != 0 {
                    return Poll::Ready(Err(Status::unimplemented(
                        "compressed messages are not accepted (send grpc-encoding identity)",
                    )));
                }
                let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > self.max {
                    return Poll::Ready(Err(Status::out_of_range(format!(
                        "a message of {len} bytes is over --max-message-bytes ({})",
                        self.max
                    ))));
                }
                self.next = Some(len);
            }
            if let Some(len) = self.next {
                if len > SMALL_RESPONSE && self.room.is_none() {
                    let room = room_for(len, self.most_room);
                    self.room = ready!(self.budget.poll_acquire_many(cx, room));
                }
                if self.buffered >= len {
                    self.next = None;
                    let bytes = self.take(len);
                    let decoded = M::decode(bytes)
                        .map_err(|e| Status::invalid_argument(format!("a malformed message: {e}")));
                    self.room = None;
                    return Poll::Ready(decoded.map(Some));
                }
            }
            if self.ended {
                return Poll::Ready(if self.buffered == 0 && self.next.is_none() {
                    Ok(None)
                } else {
                    Err(Status::invalid_argument(
                        "the request stream ended inside a message",
                    ))
                });
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers carry nothing a request needs.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.buffered += data.len();
                        self.chunks.push_back(data);
                    }
                }
                Some(Err(status)) => return Poll::Ready(Err(status)),
                None => self.ended = true,
            }
        }
    }

    /// The next `n` buffered bytes (`n <= buffered`), copied into a buffer
    /// of their own.
    fn take(&mut self, n: usize) -> Bytes {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let k = front.len().min(n - out.len());
            out.extend_from_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        self.buffered -= out.len();
        Bytes::from(out)
    }
}

/// A unary request's body (every service but Batch streams): the frames
/// pass as they come, except that the frame starting a message over
/// [`SMALL_RESPONSE`] waits for room for the message's size from the same
/// budget as [`Inbound`]'s, held until the body is dropped (tonic drops it
/// once it decoded the message) or the next message starts. tonic reads a
/// request's bytes as they come, so without this every stalled request
/// could hold up to `--max-message-bytes`.
pub struct RoomBody {
    inner: Body,
    budget: PollSemaphore,
    most_room: u32,
    room: Option<OwnedSemaphorePermit>,
    /// The header bytes seen of the next message.
    header: [u8; HEADER],
    have: usize,
    /// Bytes of the current message still to pass.
    left: usize,
    /// A frame that starts a large message, with the room it waits for.
    waiting: Option<(Frame<Bytes>, u32)>,
}

impl RoomBody {
    fn new(inner: Body, budget: &ResponseBudget) -> Self {
        let (budget, most_room) = budget.semaphore();
        RoomBody {
            inner,
            budget,
            most_room,
            room: None,
            header: [0; HEADER],
            have: 0,
            left: 0,
            waiting: None,
        }
    }

    /// Follows the message framing through `data`; the room the largest
    /// large message it starts needs, if any.
    fn scan(&mut self, mut data: &[u8]) -> Option<u32> {
        let mut needs = None;
        while !data.is_empty() {
            if self.left > 0 {
                let k = self.left.min(data.len());
                self.left -= k;
                data = &data[k..];
                continue;
            }
            let k = (HEADER - self.have).min(data.len());
            self.header[self.have..self.have + k].copy_from_slice(&data[..k]);
            self.have += k;
            data = &data[k..];
            if self.have == HEADER {
                self.have = 0;
                // A new message: the previous one's room is done.
                self.room = None;
                let h = self.header;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                self.left = usize::try_from(len).unwrap_or(usize::MAX);
                if self.left > SMALL_RESPONSE {
                    let room = room_for(self.left, self.most_room);
                    needs = Some(needs.map_or(room, |n: u32| n.max(room)));
                }
            }
        }
        needs
    }
}

impl http_body::Body for RoomBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.waiting.is_none() {
            let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            let needs = frame.data_ref().and_then(|d| self.scan(d));
            match needs {
                Some(room) => self.waiting = Some((frame, room)),
                None => return Poll::Ready(Some(Ok(frame))),
            }
        }
        let room = self.waiting.as_ref().map_or(1, |(_, room)| *room);
        let permit = ready!(self.budget.poll_acquire_many(cx, room));
        self.room = permit;
        Poll::Ready(self.waiting.take().map(|(frame, _)| Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.is_end_stream()
    }
}

/// Wraps a gRPC service so that its requests' bodies are [`RoomBody`]s,
/// except Batch streams', which go to the handler in the extensions
/// ([`InboundBody`]) for [`Inbound`] to read under the same budget.
#[derive(Debug, Clone)]
pub struct RequestRoom<S> {
    inner: S,
    budget: ResponseBudget,
}

impl<S> RequestRoom<S> {
    /// Wraps `inner`; large requests take room from `budget`.
    pub fn new(inner: S, budget: ResponseBudget) -> Self {
        RequestRoom { inner, budget }
    }
}

impl<S: NamedService> NamedService for RequestRoom<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for RequestRoom<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == BATCH_PATH {
            // The handler decodes it (`Inbound`): tonic gets an empty body.
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(InboundBody::new(body));
            return self
                .inner
                .call(http::Request::from_parts(parts, Body::empty()));
        }
        let budget = &self.budget;
        self.inner
            .call(req.map(|body| Body::new(RoomBody::new(body, budget))))
    }
}

/// The path of the Batch stream, whose requests [`Inbound`] decodes.
pub const BATCH_PATH: &str = "/distcache.v1.Cache/Batch";

#[cfg(test)]
mod tests {
    use distcache_client::proto::{BatchRequest, Command, GetRequest, command};
    use futures::FutureExt;

    use super::*;

    /// A body of the given frames.
    struct Frames(VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn framed(m: &BatchRequest) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
        out.extend_from_slice(&m.encode_to_vec());
        out
    }

    fn ask(id: u64, key: usize) -> BatchRequest {
        BatchRequest {
            commands: vec![Command {
                id,
                op: Some(command::Op::Get(GetRequest {
                    collection: String::new(),
                    key: vec![b'k'; key].into(),
                })),
            }],
        }
    }

    /// Cuts `bytes` into frames of `size`.
    fn inbound(bytes: &[u8], size: usize, budget: &ResponseBudget) -> Inbound<BatchRequest> {
        let frames = bytes.chunks(size).map(Bytes::copy_from_slice).collect();
        Inbound::new(Body::new(Frames(frames)), budget, 8 << 20)
    }

    /// Messages split across frames, and frames holding several messages,
    /// decode in order; the end of the body is the end of the stream; a
    /// large message takes room until it is decoded.
    #[tokio::test]
    async fn messages_decode_whatever_the_frames_and_a_large_one_takes_room() {
        let budget = ResponseBudget::new(4 << 20);
        let asks = [ask(1, 3), ask(2, 2 << 20), ask(3, 10)];
        let bytes: Vec<u8> = asks.iter().flat_map(framed).collect();
        for size in [1, 7, 16 << 10, bytes.len()] {
            let mut stream = inbound(&bytes, size, &budget);
            for a in &asks {
                assert_eq!(stream.message().await.expect("decodes").as_ref(), Some(a));
                assert!(stream.room.is_none(), "room given back once decoded");
            }
            assert_eq!(stream.message().await.expect("the end"), None);
        }
        assert_eq!(budget.semaphore().0.available_permits(), 4 << 20);
    }

    /// A large message waits for room before it is read, and is read once
    /// the room comes back.
    #[tokio::test]
    async fn a_large_message_waits_for_room() {
        let budget = ResponseBudget::new(4 << 20);
        let held = budget
            .semaphore()
            .0
            .clone_inner()
            .acquire_many_owned(3 << 20)
            .await;
        let mut stream = inbound(&framed(&ask(1, 2 << 20)), 16 << 10, &budget);
        assert!(stream.message().now_or_never().is_none(), "waits for room");
        assert!(stream.buffered < 2 << 20, "and does not read it meanwhile");
        drop(held);
        assert_eq!(
            stream.message().await.expect("decodes"),
            Some(ask(1, 2 << 20))
        );
    }

    /// Bad input ends the stream with a clear status: a compressed
    /// message, one over the limit, one that does not decode, a body that
    /// ends inside a message.
    #[tokio::test]
    async fn bad_input_gets_a_clear_status() {
        let budget = ResponseBudget::new(4 << 20);
        let mut compressed = framed(&ask(1, 3));
        compressed[0] = 1;
        let mut over = vec![0];
        over.extend_from_slice(&(9u32 << 20).to_be_bytes());
        let garbage = [0u8, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        let cut = &framed(&ask(1, 30))[..20];
        for (bytes, code, says) in [
            (&compressed[..], tonic::Code::Unimplemented, "compressed"),
            (&over[..], tonic::Code::OutOfRange, "--max-message-bytes"),
            (&garbage[..], tonic::Code::InvalidArgument, "malformed"),
            (cut, tonic::Code::InvalidArgument, "ended inside a message"),
        ] {
            let status = inbound(bytes, 4, &budget)
                .message()
                .await
                .expect_err("refused");
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(says), "{status:?}");
        }
    }

    /// The Batch path is the generated Cache service's.
    #[test]
    fn the_batch_path_is_the_cache_services() {
        assert_eq!(
            BATCH_PATH,
            format!(
                "/{}/Batch",
                distcache_client::proto::cache_server::SERVICE_NAME
            )
        );
    }

    /// A unary body passes its frames as they come; the frame starting a
    /// large message waits while the budget is held, and its room is given
    /// back when the body is dropped. Small messages never wait.
    #[tokio::test]
    async fn a_unary_bodys_large_message_waits_for_room_until_the_body_is_dropped() {
        let budget = ResponseBudget::new(4 << 20);
        let bytes = [framed(&ask(1, 10)), framed(&ask(2, 2 << 20))].concat();
        let frames: VecDeque<Bytes> = bytes.chunks(16 << 10).map(Bytes::copy_from_slice).collect();
        let count = frames.len();
        let held = budget
            .semaphore()
            .0
            .clone_inner()
            .acquire_many_owned(3 << 20)
            .await;
        let mut body = RoomBody::new(Body::new(Frames(frames)), &budget);
        let mut next =
            || std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).now_or_never();
        // The first frame holds the small message and starts the large one.
        assert!(next().is_none(), "the large message waits for room");
        drop(held);
        let mut passed = 0;
        while let Some(Some(frame)) = next() {
            assert!(frame.expect("ok").is_data());
            passed += 1;
        }
        assert_eq!(passed, count);
        let left = budget.semaphore().0.available_permits();
        assert!(left < 4 << 20 && left > 1 << 20, "room held: {left} left");
        drop(body);
        assert_eq!(budget.semaphore().0.available_permits(), 4 << 20);

        let small: VecDeque<Bytes> = [Bytes::from(framed(&ask(3, 100)))].into();
        let _all = budget
            .semaphore()
            .0
            .clone_inner()
            .acquire_many_owned(4 << 20)
            .await;
        let mut body = RoomBody::new(Body::new(Frames(small)), &budget);
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .now_or_never()
            .expect("a small message never waits");
        assert!(frame.expect("a frame").expect("ok").is_data());
    }
}
