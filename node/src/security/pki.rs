//! Certificates for the peer port (rcgen): a cluster CA and member
//! certificates that name the member (DNS subject alternative name) and
//! serve both ends of a mutual-TLS connection. Used by `distcache-node
//! local` (a throwaway CA), by the operator (a CA and per-member
//! certificates in Secrets) and by tests.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};

fn pki_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what}: {e}"))
}

/// A certificate authority that can issue member certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM, PKCS#8).
    pub key_pem: String,
}

impl Ca {
    /// A new CA valid for `days` from now.
    pub fn generate(common_name: &str, days: i64) -> Result<Ca> {
        let key = KeyPair::generate().map_err(|e| pki_error("CA key", e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_error("CA", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(days);
        let cert = params.self_signed(&key).map_err(|e| pki_error("CA", e))?;
        let pem = cert.pem();
        Ok(Ca { cert, key, pem })
    }

    /// A CA from its PEM certificate and key (one the operator made earlier,
    /// or a user's, e.g. cert-manager's).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| pki_error("CA key", e))?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| pki_error("CA", e))?;
        // Re-signed with the same name and key: certificates it issues
        // verify against the original CA certificate.
        let cert = params.self_signed(&key).map_err(|e| pki_error("CA", e))?;
        Ok(Ca {
            cert,
            key,
            pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate (PEM) members trust.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// The CA's private key (PEM).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for member `name`, valid for `days` from now, usable
    /// as server and client certificate.
    pub fn issue(&self, name: &str, days: i64) -> Result<Issued> {
        let key = KeyPair::generate().map_err(|e| pki_error("member key", e))?;
        let mut params =
            CertificateParams::new(vec![name.to_string()]).map_err(|e| pki_error(name, e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(days);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| pki_error(name, e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `<dir>/ca.crt` and, per member, `<dir>/<name>.crt` and
/// `<dir>/<name>.key` (a throwaway PKI for `local` and tests). Returns the CA.
pub fn write_throwaway(dir: &std::path::Path, names: &[String]) -> Result<Ca> {
    let ca = Ca::generate("distcache throwaway peer CA", 365)?;
    let io = |e: std::io::Error| Error::Internal(format!("writing certificates: {e}"));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).map_err(io)?;
    for n in names {
        let issued = ca.issue(n, 365)?;
        std::fs::write(dir.join(format!("{n}.crt")), &issued.cert_pem).map_err(io)?;
        std::fs::write(dir.join(format!("{n}.key")), &issued.key_pem).map_err(io)?;
    }
    Ok(ca)
}
