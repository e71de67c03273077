//! Security of the client port: TLS with reloadable certificates (`tls`),
//! and users with per-collection grants from a reloadable file (`users`);
//! of the peer port: mutual TLS between members (`peer_tls`).

pub mod peer_tls;
pub mod pki;
pub mod tls;
pub mod users;
