//! The node's one error enum; mapped to the wire in `grpc::status` only.

use distcache_client::proto::ErrorReason;

/// Everything an engine operation can fail with.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The collection does not exist (or was deleted).
    #[error("collection not found: {0}")]
    CollectionNotFound(String),
    /// A size limit was exceeded; `limit` names it (as its flag).
    #[error("{limit} exceeded: {actual} > {max}")]
    LimitExceeded {
        /// The limit's flag name, e.g. `max-value-bytes`.
        limit: &'static str,
        /// The request's size.
        actual: u64,
        /// The configured limit.
        max: u64,
    },
    /// The entries would exceed `--max-memory` (reject policy, or nothing
    /// left to evict).
    #[error(
        "max-memory reached: {used} bytes of entries held, limit {max}; writes are refused, reads and deletes work"
    )]
    MemoryLimit {
        /// Bytes of entries held.
        used: u64,
        /// The limit.
        max: u64,
    },
    /// The request was malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The lock was not granted within the acquire timeout.
    #[error("lock {0:?} not acquired within the acquire timeout")]
    LockAcquireTimeout(String),
    /// The caller's lease expired before release/extend.
    #[error("lease of lock {0:?} expired before it was released")]
    LockHoldTimeout(String),
    /// The caller's token does not hold the lock.
    #[error("lock {0:?} is not held by this fencing token")]
    LockNotHeld(String),
    /// The node sees less than a majority of the expected cluster.
    #[error("quorum lost: {0}")]
    QuorumLost(String),
    /// This node does not own the partition.
    #[error("partition {partition} not owned by this node (epoch {epoch})")]
    NotOwner {
        /// The partition asked for.
        partition: u32,
        /// This node's table epoch.
        epoch: u64,
    },
    /// The cluster has not formed yet.
    #[error("cluster not ready: {0}")]
    ClusterNotReady(String),
    /// The node is shutting down or cannot serve right now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Every in-sync replica of a partition is unreachable (retriable).
    #[error("partition unavailable: {0}")]
    PartitionUnavailable(String),
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
    /// No valid credential.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller lacks a grant.
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// An error answered by another node (reason as `ErrorReason` value).
    #[error("{message}")]
    Remote {
        /// `distcache.v1.ErrorReason` value.
        reason: i32,
        /// Message.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The machine-readable reason sent to clients.
    pub fn reason(&self) -> ErrorReason {
        match self {
            Error::CollectionNotFound(_) => ErrorReason::CollectionNotFound,
            Error::LimitExceeded { .. } => ErrorReason::LimitExceeded,
            Error::MemoryLimit { .. } => ErrorReason::MemoryLimit,
            Error::InvalidArgument(_) => ErrorReason::InvalidArgument,
            Error::LockAcquireTimeout(_) => ErrorReason::LockAcquireTimeout,
            Error::LockHoldTimeout(_) => ErrorReason::LockHoldTimeout,
            Error::LockNotHeld(_) => ErrorReason::LockNotHeld,
            Error::QuorumLost(_) => ErrorReason::QuorumLost,
            Error::NotOwner { .. } => ErrorReason::NotOwner,
            Error::ClusterNotReady(_) => ErrorReason::ClusterNotReady,
            Error::Unavailable(_) => ErrorReason::Unavailable,
            Error::PartitionUnavailable(_) => ErrorReason::PartitionUnavailable,
            Error::Internal(_) => ErrorReason::Internal,
            Error::Unauthenticated(_) => ErrorReason::Unauthenticated,
            Error::NotAuthorized(_) => ErrorReason::NotAuthorized,
            Error::Remote { reason, .. } => {
                ErrorReason::try_from(*reason).unwrap_or(ErrorReason::Internal)
            }
        }
    }

    /// The gRPC status code sent to clients (a function of the reason).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self.reason() {
            ErrorReason::CollectionNotFound => Code::NotFound,
            ErrorReason::LimitExceeded | ErrorReason::MemoryLimit => Code::ResourceExhausted,
            ErrorReason::InvalidArgument => Code::InvalidArgument,
            ErrorReason::LockAcquireTimeout => Code::DeadlineExceeded,
            ErrorReason::LockHoldTimeout
            | ErrorReason::LockNotHeld
            | ErrorReason::QuorumLost
            | ErrorReason::NotOwner => Code::FailedPrecondition,
            ErrorReason::ClusterNotReady
            | ErrorReason::Unavailable
            | ErrorReason::PartitionUnavailable => Code::Unavailable,
            ErrorReason::Internal | ErrorReason::Unspecified => Code::Internal,
            ErrorReason::Unauthenticated => Code::Unauthenticated,
            ErrorReason::NotAuthorized => Code::PermissionDenied,
        }
    }

    /// The error as sent between nodes.
    pub fn to_wire(&self) -> crate::net::message::WireError {
        crate::net::message::WireError {
            reason: self.reason() as i32,
            message: self.to_string(),
        }
    }
}
