//! Security of the client port: TLS with reloadable certificates (`tls`),
//! and users with per-collection grants from a reloadable file (`users`).

pub mod tls;
pub mod users;
