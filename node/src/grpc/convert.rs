//! The one place protobuf messages become engine commands and outcomes
//! become protobuf (the engine never sees protobuf).

use bytes::Bytes;
use distcache_client::proto::{self, command, command_result};

use crate::command::{Command, Outcome};
use crate::config::{DEFAULT_ACQUIRE_MS, DEFAULT_HOLD_MS};
use crate::error::{Error, Result};
use crate::locking::Grant;

/// `ms`, or `default` when the client left it 0.
fn or_default(ms: u64, default: u64) -> u64 {
    if ms == 0 { default } else { ms }
}

/// A Batch-stream (or unary data) operation as an engine command.
pub fn command(op: command::Op) -> Command {
    match op {
        command::Op::Get(r) => Command::Get {
            collection: r.collection,
            key: r.key,
        },
        command::Op::Put(r) => Command::Put {
            collection: r.collection,
            key: r.key,
            value: r.value,
            ttl_ms: r.ttl_ms,
        },
        command::Op::Delete(r) => Command::Delete {
            collection: r.collection,
            key: r.key,
        },
        command::Op::PutIfAbsent(r) => Command::PutIfAbsent {
            collection: r.collection,
            key: r.key,
            value: r.value,
            ttl_ms: r.ttl_ms,
        },
        command::Op::CompareAndSet(r) => Command::CompareAndSet {
            collection: r.collection,
            key: r.key,
            expected: r.expected,
            value: r.value,
            ttl_ms: r.ttl_ms,
        },
        command::Op::Increment(r) => Command::Increment {
            collection: r.collection,
            key: r.key,
            delta: r.delta,
            ttl_ms: r.ttl_ms,
        },
        command::Op::GetMany(r) => Command::GetMany {
            collection: r.collection,
            keys: r.keys,
        },
        command::Op::PutMany(r) => Command::PutMany {
            collection: r.collection,
            entries: r.entries.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            ttl_ms: r.ttl_ms,
        },
        command::Op::DeleteMany(r) => Command::DeleteMany {
            collection: r.collection,
            keys: r.keys,
        },
    }
}

/// Acquire, with the default lease and wait applied.
pub fn acquire(r: proto::AcquireLockRequest) -> Command {
    Command::Acquire {
        key: r.key,
        hold_ms: or_default(r.hold_timeout_ms, DEFAULT_HOLD_MS),
        wait_ms: or_default(r.acquire_timeout_ms, DEFAULT_ACQUIRE_MS),
    }
}

/// Try-acquire, with the default lease applied.
pub fn try_acquire(r: proto::TryAcquireLockRequest) -> Command {
    Command::TryAcquire {
        key: r.key,
        hold_ms: or_default(r.hold_timeout_ms, DEFAULT_HOLD_MS),
    }
}

/// Extend, with the default lease applied.
pub fn extend(r: proto::ExtendLockRequest) -> Command {
    Command::Extend {
        key: r.key,
        token: r.fencing_token,
        hold_ms: or_default(r.hold_timeout_ms, DEFAULT_HOLD_MS),
    }
}

fn kvs(entries: Vec<(Bytes, Bytes)>) -> Vec<proto::KeyValue> {
    entries
        .into_iter()
        .map(|(key, value)| proto::KeyValue { key, value })
        .collect()
}

/// A lock grant on the wire.
pub fn grant(key: Bytes, g: Grant) -> proto::LockGrant {
    proto::LockGrant {
        key,
        fencing_token: g.token,
        hold_ms: g.hold_ms,
    }
}

/// A data command's outcome as a Batch-stream result.
pub fn result(outcome: Outcome) -> Result<command_result::Result> {
    use command_result::Result as R;
    Ok(match outcome {
        Outcome::Value(v) => R::Get(proto::GetResponse {
            found: v.is_some(),
            value: v.unwrap_or_default(),
        }),
        Outcome::Stored => R::Put(proto::PutResponse {}),
        Outcome::StoredMany => R::PutMany(proto::PutManyResponse {}),
        Outcome::Deleted(deleted) => R::Delete(proto::DeleteResponse { deleted }),
        Outcome::Counter(value) => R::Increment(proto::IncrementResponse { value }),
        Outcome::Inserted(stored) => R::PutIfAbsent(proto::PutIfAbsentResponse { stored }),
        Outcome::Swapped(swapped) => R::CompareAndSet(proto::CompareAndSetResponse { swapped }),
        Outcome::Entries(e) => R::GetMany(proto::GetManyResponse { entries: kvs(e) }),
        Outcome::DeletedCount(deleted) => R::DeleteMany(proto::DeleteManyResponse { deleted }),
        other => {
            return Err(Error::Internal(format!(
                "{other:?} is not a data command's outcome"
            )));
        }
    })
}

/// Unexpected outcome (its [`Outcome::kind`]) for the RPC that asked.
pub fn mismatch(kind: &str) -> Error {
    Error::Internal(format!("unexpected outcome {kind}"))
}

/// Keys page token: the (partition, key) the next page starts after.
pub fn page_token(last: Option<(u32, Bytes)>) -> Bytes {
    match last {
        Some((p, key)) => {
            let mut t = Vec::with_capacity(4 + key.len());
            t.extend_from_slice(&p.to_be_bytes());
            t.extend_from_slice(&key);
            t.into()
        }
        None => Bytes::new(),
    }
}

/// A Keys request as an engine command.
pub fn keys(r: proto::KeysRequest) -> Result<Command> {
    let after = match r.page_token.len() {
        0 => None,
        n if n >= 4 => {
            let p = u32::from_be_bytes([
                r.page_token[0],
                r.page_token[1],
                r.page_token[2],
                r.page_token[3],
            ]);
            Some((p, r.page_token.slice(4..)))
        }
        _ => {
            return Err(Error::InvalidArgument(
                "page_token is not one this service issued".into(),
            ));
        }
    };
    Ok(Command::Keys {
        collection: r.collection,
        partitions: None,
        after,
        limit: r.page_size,
    })
}
