//! Locks with fencing tokens.

mod lock_table;

pub use lock_table::{Grant, LockTable, show as show_key};
