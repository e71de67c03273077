//! Client configuration: a plain struct with named defaults.

use std::time::Duration;

/// Default connect timeout (seed: 5 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default per-request timeout (seed: 10 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of Batch streams (each on its own connection) per node.
pub const DEFAULT_STREAMS_PER_NODE: usize = 2;
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
    /// Batch streams per node (default [`DEFAULT_STREAMS_PER_NODE`]).
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
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec!["127.0.0.1:7100".to_string()],
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            streams_per_node: DEFAULT_STREAMS_PER_NODE,
            max_retries: DEFAULT_MAX_RETRIES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            gateway: false,
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

    /// Sets the number of Batch streams per node.
    pub fn streams_per_node(mut self, n: usize) -> Self {
        self.streams_per_node = n.max(1);
        self
    }

    /// Sets the retry budget.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Routes every request through the seed (see [`ClientConfig::gateway`]).
    pub fn gateway(mut self, on: bool) -> Self {
        self.gateway = on;
        self
    }
}
