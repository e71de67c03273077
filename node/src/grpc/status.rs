//! The one place engine errors become wire errors.

use distcache_client::error::{EPOCH_METADATA, REASON_METADATA};
use distcache_client::proto;
use tonic::metadata::MetadataValue;

use crate::error::Error;

/// A gRPC status carrying the error's reason and the node's epoch.
pub fn to_status(e: &Error, epoch: u64) -> tonic::Status {
    let mut s = tonic::Status::new(e.code(), e.to_string());
    let md = s.metadata_mut();
    md.insert(
        REASON_METADATA,
        MetadataValue::from_static(e.reason().as_str_name()),
    );
    md.insert(EPOCH_METADATA, MetadataValue::from(epoch));
    s
}

/// A Batch-stream error.
pub fn to_proto(e: &Error, epoch: u64) -> proto::Error {
    proto::Error {
        reason: e.reason() as i32,
        message: e.to_string(),
        epoch,
    }
}
