//! Node <-> node networking: frames, the message enum, the transport.

pub mod frame;
pub mod message;
pub mod peer;
pub mod peer_server;
