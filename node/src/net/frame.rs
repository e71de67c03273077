//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes.
//!
//! The length is checked against the maximum before anything is allocated;
//! once a frame has started it must complete within the frame timeout (a
//! slowloris peer is cut off). "Not enough bytes yet" is never an error: the
//! reader simply waits for more.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Reads one frame. `Ok(None)` = the peer closed cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Duration,
    frame_timeout: Duration,
) -> Result<Option<Vec<u8>>, FrameError> {
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
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).await?;
        Ok(buf)
    };
    match tokio::time::timeout(frame_timeout, rest).await {
        Ok(Ok(buf)) => Ok(Some(buf)),
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
            read_frame(&mut b, 100, S, S).await.expect("read"),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            read_frame(&mut b, 100, S, S).await.expect("read"),
            Some(Vec::new())
        );
        assert_eq!(read_frame(&mut b, 100, S, S).await.expect("read"), None);
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0xFF, 0xFF, 0xFF, 0xFF])
            .await
            .expect("write");
        let e = read_frame(&mut b, 1 << 20, S, S)
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
            read_frame(&mut b, 100, S, S).await,
            Err(FrameError::Truncated)
        ));

        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0, 0])
            .await
            .expect("write");
        let e = read_frame(&mut b, 100, S, Duration::from_millis(50)).await;
        assert!(matches!(e, Err(FrameError::Timeout(_))));
        drop(a);
    }
}
