//! TLS for the client (gRPC) port: the certificate and key are read from PEM
//! files and re-read when they change (rotation without a restart); with a
//! client CA, every client must present a certificate that CA signed.
//! rustls with the ring provider (the one crypto provider of the workspace).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use crate::error::{Error, Result};

/// Where the server's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA (PEM) whose certificates clients must present; None: no client
    /// certificate asked for.
    pub client_ca: Option<PathBuf>,
}

/// The workspace's one crypto provider (ring).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what} {}: {e}", path.display()))
}

/// The certificates of a PEM file (an error names the file and why; an
/// empty file is an error).
pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid("reading certificates", path, e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| invalid("reading certificates", path, e))?;
    if certs.is_empty() {
        return Err(invalid(
            "reading certificates",
            path,
            "no certificate in the file",
        ));
    }
    Ok(certs)
}

fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>> {
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| invalid("reading key", &files.key, e))?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid("loading key", &files.key, e))?;
    let ck = CertifiedKey::new(chain, key);
    ck.keys_match()
        .map_err(|e| invalid("certificate and key do not match:", &files.cert, e))?;
    Ok(Arc::new(ck))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The server certificate, swapped for the files' new content when they
/// change ([`ReloadingCert::reload_if_changed`], called periodically).
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ReloadingCert {
    /// Loads the certificate and key (an error names the file and why).
    pub fn load(files: TlsFiles) -> Result<Arc<ReloadingCert>> {
        let ck = certified_key(&files)?;
        let seen = (modified(&files.cert), modified(&files.key));
        Ok(Arc::new(ReloadingCert {
            files,
            current: RwLock::new(ck),
            seen: Mutex::new(seen),
        }))
    }

    /// Re-reads the files if either changed; a pair that does not load (a
    /// half-written rotation) is ignored and the current one kept. True when
    /// a new certificate is now served.
    pub fn reload_if_changed(&self) -> bool {
        let now = (modified(&self.files.cert), modified(&self.files.key));
        let mut seen = self.seen.lock();
        if *seen == now {
            return false;
        }
        match certified_key(&self.files) {
            Ok(ck) => {
                *self.current.write() = ck;
                *seen = now;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the current one");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// The rustls server configuration (HTTP/2 only) over `cert`.
pub fn server_config(files: &TlsFiles, cert: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| invalid("client CA", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| invalid("client CA", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The names a client certificate carries: its DNS subject alternative
/// names (how a user file's `cert_name` matches a client).
pub fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(der)
        .map(|c| c.valid_dns_names().map(String::from).collect())
        .unwrap_or_default()
}
