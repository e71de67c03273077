//! Typed errors mirroring the seed's exception table, and their mapping from
//! the wire (gRPC status + `distcache-reason` metadata, or a Batch `Error`).

use crate::proto;
use crate::proto::ErrorReason;

/// Metadata key carrying the machine-readable reason of a failed call.
pub const REASON_METADATA: &str = "distcache-reason";
/// Metadata key carrying the answering node's partition table epoch.
pub const EPOCH_METADATA: &str = "distcache-epoch";

/// Everything a distcache call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock was not acquired within the acquire timeout.
    #[error("{0}")]
    LockAcquireTimeout(String),
    /// The lock's lease expired while it was held (reported on release/extend).
    #[error("{0}")]
    LockHoldTimeout(String),
    /// The lock is not held by this handle's fencing token.
    #[error("{0}")]
    LockNotHeld(String),
    /// The answering node sees less than a majority of the cluster.
    #[error("{0}")]
    QuorumLost(String),
    /// The cluster has not formed yet (no partition table).
    #[error("{0}")]
    ClusterNotReady(String),
    /// The collection does not exist (or was deleted).
    #[error("{0}")]
    CollectionNotFound(String),
    /// The request reached a node that does not own the partition.
    #[error("partition not owned (node epoch {epoch}): {message}")]
    NotOwner {
        /// The answering node's table epoch.
        epoch: u64,
        /// Server message.
        message: String,
    },
    /// A size limit (key, value, message, batch) was exceeded; the message
    /// names the limit.
    #[error("{0}")]
    LimitExceeded(String),
    /// The node holds its `--max-memory` of entries: writes are refused,
    /// reads and deletes work (not retried).
    #[error("memory limit: {0}")]
    MemoryLimit(String),
    /// The request was malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The node (or the cluster) cannot serve the call right now.
    #[error("{0}")]
    Unavailable(String),
    /// The node failed internally.
    #[error("{0}")]
    Internal(String),
    /// No valid credential (token or client certificate) was presented.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credential lacks the grant the call needs; the message names it.
    #[error("{0}")]
    NotAuthorized(String),
    /// The request did not complete within the request timeout; a write may or
    /// may not have been applied.
    #[error("timeout: {0}")]
    Timeout(String),
    /// Could not connect to any endpoint.
    #[error("connect failed: {0}")]
    Connect(String),
    /// A value could not be (de)serialized by the typed helpers.
    #[error("codec: {0}")]
    Codec(String),
    /// Any other gRPC status (no distcache reason attached).
    #[error("grpc status {code:?}: {message}")]
    Status {
        /// gRPC status code.
        code: tonic::Code,
        /// Server message.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds the typed error for a reason and message.
    pub fn from_reason(reason: ErrorReason, message: String, epoch: u64) -> Self {
        match reason {
            ErrorReason::LockAcquireTimeout => Error::LockAcquireTimeout(message),
            ErrorReason::LockHoldTimeout => Error::LockHoldTimeout(message),
            ErrorReason::LockNotHeld => Error::LockNotHeld(message),
            ErrorReason::QuorumLost => Error::QuorumLost(message),
            ErrorReason::ClusterNotReady => Error::ClusterNotReady(message),
            ErrorReason::CollectionNotFound => Error::CollectionNotFound(message),
            ErrorReason::NotOwner => Error::NotOwner { epoch, message },
            ErrorReason::LimitExceeded => Error::LimitExceeded(message),
            ErrorReason::MemoryLimit => Error::MemoryLimit(message),
            ErrorReason::InvalidArgument => Error::InvalidArgument(message),
            ErrorReason::Unavailable => Error::Unavailable(message),
            ErrorReason::PartitionUnavailable => {
                Error::Unavailable(format!("partition unavailable: {message}"))
            }
            ErrorReason::Internal | ErrorReason::Unspecified => Error::Internal(message),
            ErrorReason::Unauthenticated => Error::Unauthenticated(message),
            ErrorReason::NotAuthorized => Error::NotAuthorized(message),
        }
    }

    /// Maps a gRPC status (with or without a distcache reason) to a typed error.
    pub fn from_status(status: &tonic::Status) -> Self {
        let md = status.metadata();
        let reason = md
            .get(REASON_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorReason::from_str_name);
        let epoch = md
            .get(EPOCH_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let message = status.message().to_string();
        match reason {
            Some(r) => Error::from_reason(r, message, epoch),
            None => match status.code() {
                tonic::Code::Unavailable | tonic::Code::Cancelled => Error::Unavailable(message),
                // A distcache node names the reason of every error it sends;
                // an Unknown status without one is tonic's mapping of a
                // broken connection ("transport error", the node died
                // mid-request): indeterminate, worth retrying elsewhere.
                tonic::Code::Unknown => Error::Unavailable(message),
                tonic::Code::InvalidArgument => Error::InvalidArgument(message),
                tonic::Code::Unauthenticated => Error::Unauthenticated(message),
                // tonic's own "message too large" errors.
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
                    Error::LimitExceeded(message)
                }
                code => Error::Status { code, message },
            },
        }
    }

    /// Maps a Batch-stream error.
    pub fn from_proto(e: proto::Error) -> Self {
        let reason = ErrorReason::try_from(e.reason).unwrap_or(ErrorReason::Internal);
        Error::from_reason(reason, e.message, e.epoch)
    }

    /// The machine-readable reason of this error, when it has one.
    pub fn reason(&self) -> Option<ErrorReason> {
        Some(match self {
            Error::LockAcquireTimeout(_) => ErrorReason::LockAcquireTimeout,
            Error::LockHoldTimeout(_) => ErrorReason::LockHoldTimeout,
            Error::LockNotHeld(_) => ErrorReason::LockNotHeld,
            Error::QuorumLost(_) => ErrorReason::QuorumLost,
            Error::ClusterNotReady(_) => ErrorReason::ClusterNotReady,
            Error::CollectionNotFound(_) => ErrorReason::CollectionNotFound,
            Error::NotOwner { .. } => ErrorReason::NotOwner,
            Error::LimitExceeded(_) => ErrorReason::LimitExceeded,
            Error::MemoryLimit(_) => ErrorReason::MemoryLimit,
            Error::InvalidArgument(_) => ErrorReason::InvalidArgument,
            Error::Unavailable(_) => ErrorReason::Unavailable,
            Error::Internal(_) => ErrorReason::Internal,
            Error::Unauthenticated(_) => ErrorReason::Unauthenticated,
            Error::NotAuthorized(_) => ErrorReason::NotAuthorized,
            Error::Timeout(_) | Error::Connect(_) | Error::Codec(_) | Error::Status { .. } => {
                return None;
            }
        })
    }

    /// True for errors worth retrying elsewhere or later (routing,
    /// availability, a node on the minority side of a partition), false for
    /// answers about the request itself.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotOwner { .. }
                | Error::Unavailable(_)
                | Error::ClusterNotReady(_)
                | Error::QuorumLost(_)
                | Error::Connect(_)
        )
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::from_status(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_with_reason_maps_to_typed_error() {
        let mut s = tonic::Status::failed_precondition("no majority");
        s.metadata_mut()
            .insert(REASON_METADATA, "QUORUM_LOST".parse().expect("ascii"));
        assert!(matches!(Error::from_status(&s), Error::QuorumLost(m) if m == "no majority"));

        let mut s = tonic::Status::failed_precondition("moved");
        s.metadata_mut()
            .insert(REASON_METADATA, "NOT_OWNER".parse().expect("ascii"));
        s.metadata_mut()
            .insert(EPOCH_METADATA, "42".parse().expect("ascii"));
        assert!(matches!(
            Error::from_status(&s),
            Error::NotOwner { epoch: 42, .. }
        ));
    }

    #[test]
    fn status_without_reason_maps_by_code() {
        let e = Error::from_status(&tonic::Status::unavailable("down"));
        assert!(e.is_retryable());
        let e = Error::from_status(&tonic::Status::unknown("transport error"));
        assert!(
            matches!(e, Error::Unavailable(_)) && e.is_retryable(),
            "{e:?}"
        );
        let e = Error::from_status(&tonic::Status::out_of_range("too large"));
        assert!(matches!(e, Error::LimitExceeded(_)));
        let e = Error::from_status(&tonic::Status::permission_denied("no"));
        assert!(matches!(
            e,
            Error::Status {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ));
    }

    #[test]
    fn every_reason_round_trips() {
        for r in 1..=13 {
            let reason = ErrorReason::try_from(r).expect("known reason");
            let e = Error::from_proto(proto::Error {
                reason: r,
                message: "m".into(),
                epoch: 3,
            });
            assert_eq!(e.reason(), Some(reason));
        }
    }
}
