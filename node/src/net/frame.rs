//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes.
//!
//! The length is checked against the maximum before anything is allocated;
//! once a frame has started it must complete within the frame timeout (a
//! slowloris peer is cut off). "Not enough bytes yet" is never an error: the
//! reader simply waits for more.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length exceeds the maximum.
    #[error("frame of {len} bytes exceeds the {max}-byte maximum")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Maximum.
        max: usize,
    },
    /// A started frame did not complete in time.
    #[error("frame not completed within {0:?}")]
    Timeout(Duration),
    /// The connection was idle for too long.
    #[error("connection idle for {0:?}")]
    Idle(Duration),
    /// The connection closed in the middle of a frame.
    #[error("connection closed mid-frame")]
    Truncated,
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes read per step of a frame (and the budget taken per step).
const CHUNK: usize = 64 * 1024;

/// One frame read, with the share of the in-flight byte budget it holds
/// (released when the frame is dropped or its permit is).
#[derive(Debug)]
pub struct Frame {
    /// Payload.
    pub bytes: Vec<u8>,
    /// Budget held for the payload (None: no budget given).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Reads one frame. `Ok(None)` = the peer closed cleanly between frames.
///
/// The payload is buffered as it arrives, in steps of at most 64 KiB: a
/// declared length is never allocated up front, and with a `budget` each
/// step first takes its size from it (a node-wide bound on bytes held by
/// frames being read or handled; reading waits while it is spent).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Duration,
    frame_timeout: Duration,
    budget: Option<&Arc<Semaphore>>,
) -> Result<Option<Frame>, FrameError> {
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout(idle, r.read(&mut first)).await {
        Ok(n) => n?,
        Err(_) => return Err(FrameError::Idle(idle)),
    };
    if n == 0 {
        return Ok(None);
    }
    let rest = async {
        let mut len_rest = [0u8; 3];
        r.read_exact(&mut len_rest).await?;
        let len = u32::from_be_bytes([first[0], len_rest[0], len_rest[1], len_rest[2]]) as usize;
        if len > max {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max,
            });
        }
        let mut buf = Vec::with_capacity(len.min(CHUNK));
        let mut held: Option<OwnedSemaphorePermit> = None;
        while buf.len() < len {
            let step = (len - buf.len()).min(CHUNK);
            if let Some(budget) = budget {
                let n = u32::try_from(step).unwrap_or(u32::MAX);
                let p = budget
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| std::io::Error::other("peer byte budget closed"))?;
                match held.as_mut() {
                    Some(h) => h.merge(p),
                    None => held = Some(p),
                }
            }
            let target = buf.len() + step;
            buf.reserve(step);
            while buf.len() < target {
                let want = (target - buf.len()) as u64;
                if (&mut *r).take(want).read_buf(&mut buf).await? == 0 {
                    return Err(FrameError::Truncated);
                }
            }
        }
        Ok(Frame {
            bytes: buf,
            permit: held,
        })
    };
    match tokio::time::timeout(frame_timeout, rest).await {
        Ok(Ok(frame)) => Ok(Some(frame)),
        Ok(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(FrameError::Truncated)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Timeout(frame_timeout)),
    }
}

/// Writes one frame (no flush).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn round_trip_and_clean_close() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, b"hello").await.expect("write");
        write_frame(&mut a, b"").await.expect("write");
        drop(a);
        assert_eq!(
            read_frame(&mut b, 100, S, S, None)
                .await
                .expect("read")
                .map(|f| f.bytes),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            read_frame(&mut b, 100, S, S, None)
                .await
                .expect("read")
                .map(|f| f.bytes),
            Some(Vec::new())
        );
        assert!(
            read_frame(&mut b, 100, S, S, None)
                .await
                .expect("read")
                .is_none()
        );
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0xFF, 0xFF, 0xFF, 0xFF])
            .await
            .expect("write");
        let e = read_frame(&mut b, 1 << 20, S, S, None)
            .await
            .expect_err("too large");
        assert!(
            matches!(
                e,
                FrameError::TooLarge {
                    len: 0xFFFF_FFFF,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn truncated_and_slow_frames_fail() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0, 0, 0, 10, 1, 2])
            .await
            .expect("write");
        drop(a);
        assert!(matches!(
            read_frame(&mut b, 100, S, S, None).await,
            Err(FrameError::Truncated)
        ));

        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0, 0])
            .await
            .expect("write");
        let e = read_frame(&mut b, 100, S, Duration::from_millis(50), None).await;
        assert!(matches!(e, Err(FrameError::Timeout(_))));
        drop(a);
    }

    #[tokio::test]
    async fn a_declared_length_takes_only_what_arrived_from_the_budget() {
        let budget = Arc::new(Semaphore::new(1 << 20));
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        // Announces 16 MiB, sends 100 KiB, then stalls.
        let stalled = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut a, &(16u32 << 20).to_be_bytes()).await?;
            tokio::io::AsyncWriteExt::write_all(&mut a, &vec![7u8; 100 * 1024]).await?;
            Ok::<_, std::io::Error>(a)
        });
        let read = read_frame(
            &mut b,
            32 << 20,
            S,
            Duration::from_millis(200),
            Some(&budget),
        );
        let e = read.await.expect_err("stalled frame times out");
        assert!(matches!(e, FrameError::Timeout(_)), "{e}");
        // Nothing is held once the frame failed.
        assert_eq!(budget.available_permits(), 1 << 20);
        drop(stalled.await);

        // A complete frame holds its size until dropped.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let payload = vec![1u8; 200 * 1024];
        let writer = tokio::spawn(async move {
            write_frame(&mut a, &payload).await.expect("write");
            a
        });
        let f = read_frame(&mut b, 32 << 20, S, S, Some(&budget))
            .await
            .expect("read")
            .expect("frame");
        assert_eq!(f.bytes.len(), 200 * 1024);
        assert_eq!(budget.available_permits(), (1 << 20) - 200 * 1024);
        drop(f);
        assert_eq!(budget.available_permits(), 1 << 20);
        drop(writer.await);
    }
}
