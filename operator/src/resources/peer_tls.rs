//! The peer port's certificates: one Secret per cluster, owned by the
//! `DistributedCacheCluster`, with the cluster CA (`ca.crt`; `ca.key` too
//! when the operator made the CA) and one certificate and key per member
//! (`<pod>.crt`, `<pod>.key`, the pod name as DNS name). Member
//! certificates are issued for 90 days and re-issued when fewer than 30
//! remain, or when the CA changed; the kubelet updates the mounted files
//! and the nodes re-read them (no restart).

use std::collections::BTreeMap;

use distcache_node::security::pki::Ca;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use sha2::Digest;

use super::{Names, meta};
use crate::crd::DistributedCacheCluster;

/// Where the peer TLS Secret is mounted.
pub const PEER_TLS_MOUNT: &str = "/etc/distcache/peer-tls";
/// Days a member certificate is valid.
pub const CERT_DAYS: i64 = 90;
/// A member certificate with fewer days left is re-issued.
pub const RENEW_DAYS: i64 = 30;
/// Days an operator-made CA is valid.
pub const CA_DAYS: i64 = 3650;
/// Annotation: member -> expiry (Unix seconds) of its certificate.
pub const EXPIRY_ANNOTATION: &str = "distcache.io/peer-cert-expiry";
/// Annotation: fingerprint of the CA that issued the member certificates.
pub const CA_ANNOTATION: &str = "distcache.io/peer-ca";

/// Name of the cluster's peer TLS Secret.
pub fn peer_tls_secret_name(dcc: &DistributedCacheCluster) -> String {
    format!("{}-peer-tls", dcc.name_any())
}

fn text(s: Option<&Secret>, key: &str) -> Option<String> {
    s?.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn fingerprint(pem: &str) -> String {
    let d = sha2::Sha256::digest(pem.as_bytes());
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// The Secret as it should be, or None when `existing` needs no change.
/// `user_ca` is the (certificate, key) PEM of `spec.tls.peer`'s Secret;
/// `members` how many ordinals need a certificate; `now` Unix seconds.
pub fn peer_tls_secret(
    dcc: &DistributedCacheCluster,
    existing: Option<&Secret>,
    user_ca: Option<(String, String)>,
    members: i32,
    now: i64,
) -> Result<Option<Secret>, String> {
    let err = |e: distcache_node::Error| e.to_string();
    let (ca, store_key) = match user_ca {
        Some((cert, key)) => (Ca::from_pem(&cert, &key).map_err(err)?, false),
        None => match (text(existing, "ca.crt"), text(existing, "ca.key")) {
            (Some(cert), Some(key)) => (Ca::from_pem(&cert, &key).map_err(err)?, true),
            _ => {
                let cn = format!("distcache {} peer CA", dcc.name_any());
                (Ca::generate(&cn, CA_DAYS).map_err(err)?, true)
            }
        },
    };
    let ca_id = fingerprint(ca.cert_pem());
    let annotations = existing
        .map(|s| s.annotations().clone())
        .unwrap_or_default();
    let same_ca = annotations.get(CA_ANNOTATION) == Some(&ca_id);
    let mut expiry: BTreeMap<String, i64> = annotations
        .get(EXPIRY_ANNOTATION)
        .and_then(|j| serde_json::from_str(j).ok())
        .filter(|_| same_ca)
        .unwrap_or_default();
    let mut data: BTreeMap<String, ByteString> = existing
        .and_then(|s| s.data.clone())
        .filter(|_| same_ca)
        .unwrap_or_default();
    let mut changed = !same_ca || existing.is_none();
    let n = Names::of(dcc);
    for i in 0..members.max(0) {
        let pod = format!("{}-{i}", n.cluster);
        let fresh = expiry
            .get(&pod)
            .is_some_and(|e| e - now > RENEW_DAYS * 86_400)
            && data.contains_key(&format!("{pod}.crt"))
            && data.contains_key(&format!("{pod}.key"));
        if fresh {
            continue;
        }
        let issued = ca.issue(&pod, CERT_DAYS).map_err(err)?;
        data.insert(
            format!("{pod}.crt"),
            ByteString(issued.cert_pem.into_bytes()),
        );
        data.insert(
            format!("{pod}.key"),
            ByteString(issued.key_pem.into_bytes()),
        );
        expiry.insert(pod, now + CERT_DAYS * 86_400);
        changed = true;
    }
    if !changed {
        return Ok(None);
    }
    data.insert(
        "ca.crt".into(),
        ByteString(ca.cert_pem().as_bytes().to_vec()),
    );
    if store_key {
        data.insert("ca.key".into(), ByteString(ca.key_pem().into_bytes()));
    } else {
        data.remove("ca.key");
    }
    let mut metadata = meta(dcc, &peer_tls_secret_name(dcc));
    metadata.annotations = Some(BTreeMap::from([
        (CA_ANNOTATION.to_string(), ca_id),
        (
            EXPIRY_ANNOTATION.to_string(),
            serde_json::to_string(&expiry).unwrap_or_default(),
        ),
    ]));
    Ok(Some(Secret {
        metadata,
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DistributedCacheClusterSpec;

    fn dcc() -> DistributedCacheCluster {
        let mut d = DistributedCacheCluster::new(
            "cache",
            serde_json::from_value::<DistributedCacheClusterSpec>(serde_json::json!({
                "replicas": 3, "image": "distcache/node:test"
            }))
            .expect("spec"),
        );
        d.metadata.namespace = Some("ns".into());
        d.metadata.uid = Some("uid-1".into());
        d
    }

    fn names_in(secret: &Secret, pod: &str) -> Vec<String> {
        let pem = text(Some(secret), &format!("{pod}.crt")).expect("member certificate");
        let der = rustls_pemfile_der(&pem);
        distcache_node::security::tls::certificate_names(&der)
    }

    fn rustls_pemfile_der(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
    }

    #[test]
    fn issues_a_ca_and_one_certificate_per_member_then_renews_only_when_due() {
        let d = dcc();
        let now = 1_800_000_000;
        let s = peer_tls_secret(&d, None, None, 3, now)
            .expect("secret")
            .expect("new secret");
        assert_eq!(s.metadata.name.as_deref(), Some("cache-peer-tls"));
        assert!(
            s.metadata.owner_references.is_some(),
            "owned by the cluster"
        );
        for i in 0..3 {
            assert_eq!(
                names_in(&s, &format!("cache-{i}")),
                vec![format!("cache-{i}")]
            );
        }
        assert!(text(Some(&s), "ca.key").is_some());
        // Nothing due: no change.
        assert!(
            peer_tls_secret(&d, Some(&s), None, 3, now + 86_400)
                .expect("ok")
                .is_none()
        );
        // Scale-up: one more certificate, the others kept.
        let s4 = peer_tls_secret(&d, Some(&s), None, 4, now)
            .expect("ok")
            .expect("changed");
        assert_eq!(
            text(Some(&s4), "cache-0.crt"),
            text(Some(&s), "cache-0.crt")
        );
        assert_eq!(text(Some(&s4), "ca.crt"), text(Some(&s), "ca.crt"));
        assert!(text(Some(&s4), "cache-3.crt").is_some());
        // 61 days later every certificate is due (fewer than 30 days left).
        let later = peer_tls_secret(&d, Some(&s4), None, 4, now + 61 * 86_400)
            .expect("ok")
            .expect("renewed");
        assert_ne!(
            text(Some(&later), "cache-0.crt"),
            text(Some(&s4), "cache-0.crt")
        );
        assert_eq!(text(Some(&later), "ca.crt"), text(Some(&s4), "ca.crt"));
    }

    #[test]
    fn a_users_ca_issues_and_its_key_is_not_copied() {
        let d = dcc();
        let ca = Ca::generate("user CA", 365).expect("CA");
        let s = peer_tls_secret(
            &d,
            None,
            Some((ca.cert_pem().to_string(), ca.key_pem())),
            2,
            1_800_000_000,
        )
        .expect("ok")
        .expect("secret");
        assert_eq!(text(Some(&s), "ca.crt").as_deref(), Some(ca.cert_pem()));
        assert!(text(Some(&s), "ca.key").is_none());
        assert!(peer_tls_secret(&d, None, Some(("junk".into(), "junk".into())), 2, 0).is_err());
    }
}
