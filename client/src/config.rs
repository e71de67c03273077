//! Client configuration: a plain struct with named defaults.

use std::time::Duration;

/// Default connect timeout (seed: 5 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default per-request timeout (seed: 10 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Batch streams (each on its own connection) per node when the node does
/// not advise a number (a node from before the advice).
pub const DEFAULT_STREAMS_PER_NODE: usize = 2;
/// Most Batch streams per node taken on a node's advice.
pub const MAX_ADVISED_STREAMS: usize = 4;
/// Response header of a Batch stream in which the node advises how many
/// Batch streams a client should open to it: its worker threads (a
/// stream's commands run on one thread, so more streams than threads only
/// add connections and system calls).
pub const BATCH_STREAMS_HEADER: &str = "x-distcache-batch-streams";
/// Default retries of a routing/availability failure.
pub const DEFAULT_MAX_RETRIES: u32 = 5;
/// Default largest message the client sends or accepts.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How a [`crate::Client`] connects and behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Seed endpoints, `host:port` (default: `127.0.0.1:7100`).
    pub endpoints: Vec<String>,
    /// TCP connect timeout (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// Timeout of one request (default [`DEFAULT_REQUEST_TIMEOUT`]); lock
    /// acquisition adds its acquire timeout to this.
    pub request_timeout: Duration,
    /// Batch streams per node. 0 (the default): as many as each node
    /// advises when its first stream opens ([`BATCH_STREAMS_HEADER`], its
    /// worker threads), at most [`MAX_ADVISED_STREAMS`];
    /// [`DEFAULT_STREAMS_PER_NODE`] when a node gives no advice.
    pub streams_per_node: usize,
    /// Retries after NOT_OWNER / unavailable answers, with exponential
    /// backoff from 20 ms (default [`DEFAULT_MAX_RETRIES`]).
    pub max_retries: u32,
    /// Largest gRPC message sent or accepted (default [`DEFAULT_MAX_MESSAGE_BYTES`]).
    pub max_message_bytes: usize,
    /// Send everything through the seed that answered instead of to each
    /// key's owner (the node forwards): for clients that cannot reach the
    /// members' addresses, like one behind `kubectl port-forward`. One extra
    /// hop per request (default false).
    pub gateway: bool,
    /// TLS toward the nodes (None: plaintext).
    pub tls: Option<ClientTls>,
    /// Bearer token sent with every call (`authorization: Bearer <token>`).
    pub token: Option<String>,
}

/// TLS settings of a client.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct ClientTls {
    /// CA (PEM) that signs the nodes' certificates (None: the system roots).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM), for nodes that require one.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to verify the nodes' certificates against (default: the host
    /// of each address).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity_pem.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// Reads the CA and the client certificate and key from PEM files.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> crate::Result<ClientTls> {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| crate::Error::InvalidArgument(format!("reading {}: {e}", p.display())))
        };
        let identity_pem = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(crate::Error::InvalidArgument(
                    "a client certificate needs both --tls-cert and --tls-key".into(),
                ));
            }
        };
        Ok(ClientTls {
            ca_pem: ca.map(read).transpose()?,
            identity_pem,
            server_name: None,
        })
    }

    /// Verifies the nodes' certificates against `name`.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec!["127.0.0.1:7100".to_string()],
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            streams_per_node: 0,
            max_retries: DEFAULT_MAX_RETRIES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            gateway: false,
            tls: None,
            token: None,
        }
    }
}

impl ClientConfig {
    /// A default configuration with these seed endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    /// Sets the request timeout.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Sets the number of Batch streams per node (instead of each node's
    /// advice; at least 1).
    pub fn streams_per_node(mut self, n: usize) -> Self {
        self.streams_per_node = n.max(1);
        self
    }

    /// Sets the retry budget.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Connects with TLS.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sends `token` as the bearer credential with every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Routes every request through the seed (see [`ClientConfig::gateway`]).
    pub fn gateway(mut self, on: bool) -> Self {
        self.gateway = on;
        self
    }
}
