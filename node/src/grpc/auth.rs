//! Who is calling the client port, and may they: authentication (a bearer
//! token in the `authorization` metadata, or the TLS client certificate's
//! DNS name) and the grant every RPC checks before it runs. Without a users
//! file the port is open (the node warns at start).

use std::sync::Arc;

use distcache_client::partition::resolve_collection;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::command::{Command, Keyspace};
use crate::error::Result;
use crate::security::tls::certificate_names;
use crate::security::users::{LOCKS_COLLECTION, Role, User, Users};

/// The caller of one request (or Batch stream).
#[derive(Debug, Clone)]
pub enum Caller {
    /// No users file: everything is allowed.
    Open,
    /// An authenticated user.
    User(Arc<User>),
}

impl Caller {
    /// Refuses unless the caller holds `role` on `collection`.
    pub fn require(&self, collection: &str, role: Role) -> Result<()> {
        match self {
            Caller::Open => Ok(()),
            Caller::User(u) => u.require(resolve_collection(collection), role),
        }
    }

    /// Refuses unless the caller holds `role` on the locks.
    pub fn require_locks(&self, role: Role) -> Result<()> {
        self.require(LOCKS_COLLECTION, role)
    }

    /// Refuses unless the caller holds what `cmd` needs: `read` for reads,
    /// `write` for writes, `admin` to clear; locks as the collection
    /// `__locks__` (`write`, `admin` to force-release).
    pub fn authorize(&self, cmd: &Command) -> Result<()> {
        let role = match cmd {
            Command::Get { .. }
            | Command::GetMany { .. }
            | Command::Size { .. }
            | Command::Keys { .. } => Role::Read,
            Command::Put { .. }
            | Command::Delete { .. }
            | Command::PutIfAbsent { .. }
            | Command::CompareAndSet { .. }
            | Command::Increment { .. }
            | Command::PutMany { .. }
            | Command::DeleteMany { .. }
            | Command::Acquire { .. }
            | Command::TryAcquire { .. }
            | Command::Release { .. }
            | Command::Extend { .. } => Role::Write,
            Command::Clear { .. } | Command::ForceRelease { .. } => Role::Admin,
        };
        match cmd.keyspace() {
            Keyspace::Collection(c) => self.require(c, role),
            Keyspace::Locks => self.require_locks(role),
        }
    }

    /// Whether the caller may see that `collection` exists (any grant).
    pub fn sees(&self, collection: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::User(u) => u.sees(resolve_collection(collection)),
        }
    }
}

/// What a request presented to authenticate.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    token: Option<String>,
    names: Vec<String>,
}

/// The client port's access control.
#[derive(Debug, Clone, Default)]
pub struct Access {
    users: Option<Arc<Users>>,
}

impl Access {
    /// Access checked against `users` (None: open).
    pub fn new(users: Option<Arc<Users>>) -> Self {
        Access { users }
    }

    /// The users file behind this access control, if any.
    pub fn users(&self) -> Option<Arc<Users>> {
        self.users.clone()
    }

    /// Authenticates the request's caller.
    pub fn caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller> {
        self.authenticate(&self.credentials(req))
    }

    /// What the request presents: a bearer token and the client
    /// certificate's names.
    pub fn credentials<T>(&self, req: &tonic::Request<T>) -> Credentials {
        if self.users.is_none() {
            return Credentials::default();
        }
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .unwrap_or(v)
                    .trim()
                    .to_string()
            });
        let names = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(certificate_names))
            .unwrap_or_default();
        Credentials { token, names }
    }

    /// The caller `creds` identify under the current users file (a long
    /// stream re-authenticates each command, so a revocation reaches it).
    pub fn authenticate(&self, creds: &Credentials) -> Result<Caller> {
        match &self.users {
            None => Ok(Caller::Open),
            Some(users) => users
                .authenticate(creds.token.as_deref(), &creds.names)
                .map(Caller::User),
        }
    }
}
