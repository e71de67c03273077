//! Mutual TLS of the peer (node <-> node) port. Every member presents a
//! certificate for its member name (a DNS subject alternative name) signed
//! by the cluster CA, and checks the other side's: the server asks every
//! client for a certificate the CA signed, the client checks that the server
//! certificate names the member it meant to reach. Which names count as
//! members is decided per frame by the node (`crate::node` checks the names
//! against the current member list). The three files are re-read when one
//! changes: rotated certificates and CAs are used without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::tls::{certificate_names, certs, provider};
use crate::error::{Error, Result};

/// Where a member's peer TLS material lives (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    /// This member's certificate chain, leaf first (names the member).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The cluster CA: the one issuer of member certificates.
    pub ca: PathBuf,
}

struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The peer port's TLS configurations, rebuilt when the files change.
pub struct PeerTls {
    files: PeerTlsFiles,
    loaded: RwLock<Loaded>,
    seen: Mutex<[Option<SystemTime>; 3]>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("files", &self.files)
            .finish()
    }
}

fn invalid(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("peer TLS: {what} {}: {e}", path.display()))
}

fn modified(files: &PeerTlsFiles) -> [Option<SystemTime>; 3] {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    [m(&files.cert), m(&files.key), m(&files.ca)]
}

fn load(files: &PeerTlsFiles) -> Result<Loaded> {
    let chain = certs(&files.cert)?;
    if certificate_names(&chain[0]).is_empty() {
        return Err(invalid(
            "certificate",
            &files.cert,
            "names no member (no DNS subject alternative name)",
        ));
    }
    let key = || {
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| invalid("reading key", &files.key, e))
    };
    let mut roots = RootCertStore::empty();
    for c in certs(&files.ca)? {
        roots.add(c).map_err(|e| invalid("CA", &files.ca, e))?;
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| invalid("CA", &files.ca, e))?;
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key()?)
        .map_err(|e| invalid("certificate and key", &files.cert, e))?;
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key()?)
        .map_err(|e| invalid("certificate and key", &files.cert, e))?;
    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

impl PeerTls {
    /// Loads the three files (an error names the file and why).
    pub fn load(files: PeerTlsFiles) -> Result<Arc<PeerTls>> {
        let seen = modified(&files);
        let loaded = load(&files)?;
        Ok(Arc::new(PeerTls {
            files,
            loaded: RwLock::new(loaded),
            seen: Mutex::new(seen),
        }))
    }

    /// Re-reads the files if one changed; material that does not load (a
    /// half-written rotation) is ignored and the current one kept (retried
    /// on the next call). True when new material is now used.
    pub fn reload_if_changed(&self) -> bool {
        let now = modified(&self.files);
        let mut seen = self.seen.lock();
        if *seen == now {
            return false;
        }
        match load(&self.files) {
            Ok(l) => {
                *self.loaded.write() = l;
                *seen = now;
                tracing::info!(cert = %self.files.cert.display(), "peer TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer TLS files changed but do not load; keeping the current ones");
                false
            }
        }
    }

    /// An acceptor with the current material.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.loaded.read().server.clone())
    }

    /// A connector with the current material.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.loaded.read().client.clone())
    }

    /// The server name a connection to `member` must present.
    pub fn server_name(member: &str) -> Result<ServerName<'static>> {
        ServerName::try_from(member.to_string()).map_err(|_| {
            Error::InvalidArgument(format!(
                "member name {member:?} is not a DNS name (a certificate cannot name it)"
            ))
        })
    }
}

/// The member names an authenticated peer's leaf certificate carries.
pub fn peer_names(certs: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    certs
        .and_then(|c| c.first())
        .map(certificate_names)
        .unwrap_or_default()
}
