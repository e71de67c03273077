//! The client-facing gRPC layer.

mod admin;
pub mod auth;
pub mod budget;
mod convert;
pub mod inbound;
mod service;
mod slots;
mod status;

pub use service::Api;
pub use status::{to_proto, to_status};
