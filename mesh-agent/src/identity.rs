//! Workload identities: SPIFFE IDs and the certificate authority that vouches for them (a
//! [`FileCa`] signing in the agent, or the cluster's CA service: [`crate::ca`]); the trust
//! bundle peers are checked against (`bundle`); the certificates held for local workloads and
//! renewed (`certificates`), and the rustls configs and SPIFFE verifiers built on them (`tls`).

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use futures::future::BoxFuture;
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};

pub mod bundle;
pub mod certificates;
pub mod file_ca;
pub mod signer;
pub mod tls;

pub use file_ca::{CaFiles, FileCa};

/// The service account the agents themselves run as (the DaemonSet's); peers expect it on
/// port 15008.
pub const AGENT_NAMESPACE: &str = "mesh-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "mesh-agent";
/// The service account the CA service runs as; agents expect it when they ask for
/// certificates.
pub const CA_SERVICE_ACCOUNT: &str = "mesh-ca";

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// The identity of a workload running as `service_account` in `namespace`.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self(format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The identity every node agent of `trust_domain` holds.
    pub fn agent(trust_domain: &str) -> Self {
        Self::workload(trust_domain, AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)
    }

    /// The identity of the CA service of `trust_domain`.
    pub fn ca(trust_domain: &str) -> Self {
        Self::workload(trust_domain, AGENT_NAMESPACE, CA_SERVICE_ACCOUNT)
    }

    /// Parses a SPIFFE ID of the workload form.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let well_formed = matches!(parts.as_slice(), [td, "ns", ns, "sa", sa]
            if [td, ns, sa].iter().all(|p| !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))));
        if !well_formed {
            return Err(format!(
                "{uri:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            ));
        }
        Ok(Self(uri.to_owned()))
    }

    /// The SPIFFE ID in the URI SAN of a DER certificate; exactly one is allowed.
    pub fn from_certificate(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("unreadable subject alternative names: {e}"))?
            .ok_or("the certificate has no subject alternative names, so no SPIFFE ID")?;
        let mut uris = san.value.general_names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
        match (uris.next(), uris.next()) {
            (Some(uri), None) => Self::parse(uri),
            (None, _) => Err("the certificate has no URI SAN, so no SPIFFE ID".into()),
            (Some(_), Some(_)) => Err("the certificate has more than one URI SAN".into()),
        }
    }

    pub fn trust_domain(&self) -> &str {
        self.part(0)
    }

    pub fn namespace(&self) -> &str {
        self.part(2)
    }

    pub fn service_account(&self) -> &str {
        self.part(4)
    }

    /// The `i`th `/`-separated part after `spiffe://` (parse made sure there are five).
    fn part(&self, i: usize) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').nth(i).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A certificate with its private key, as issued.
pub struct Issued {
    /// The leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
    /// The CA certificate that signed it.
    pub signer: CertificateDer<'static>,
}

/// What a CA answers a signing request with.
pub struct Signed {
    /// The leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The CA certificate that signed it.
    pub signer: CertificateDer<'static>,
}

/// Whoever vouches for identities: it signs certificate requests, and the key pairs stay
/// with whoever asked. The file CA signs in the agent (lab, YAML mode); the CA service
/// signs for a whole cluster, only what the asking node may hold.
pub trait CertificateAuthority: Send + Sync {
    /// A certificate for the identity `csr` names (its one URI SAN), valid for `ttl`.
    fn sign(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Signed>>;

    /// The CA certificate signing now: when it changes, held certificates are renewed.
    fn signer(&self) -> BoxFuture<'_, Result<CertificateDer<'static>>>;
}

/// A certificate for `id` from `ca`, valid for `ttl`, on a fresh ECDSA P-256 key made here.
pub async fn issue(ca: &dyn CertificateAuthority, id: &SpiffeId, ttl: Duration) -> Result<Issued> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let signed = ca.sign(csr.der().clone(), ttl).await?;
    let leaf = signed.chain.first().context("the CA sent no certificate")?;
    let named = SpiffeId::from_certificate(leaf).map_err(anyhow::Error::msg)?;
    if named != *id {
        bail!("the CA signed {named} where {id} was asked for");
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)?;
    if parsed.public_key().raw != key.subject_public_key_info() {
        bail!("the CA signed another key than the one sent");
    }
    let not_after = parsed.validity().not_after.timestamp();
    Ok(Issued {
        chain: signed.chain,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after)?),
        signer: signed.signer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn spiffe_ids_parse_only_the_workload_form() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id, SpiffeId::workload("cluster.local", "shop", "cart"));
        for bad in [
            "https://cluster.local/ns/shop/sa/cart",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/cart/x",
            "spiffe://cluster.local/ns//sa/cart",
            "spiffe://Cluster.local/ns/shop/sa/cart",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn issued_certificates_carry_the_spiffe_id_and_chain_to_the_signer() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", std::process::id()));
        let files = FileCa::create(&dir, "cluster.local").unwrap();
        let ca = FileCa::load(files.clone()).unwrap();
        let id = SpiffeId::workload("cluster.local", "shop", "cart");
        let issued = issue(&ca, &id, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(SpiffeId::from_certificate(&issued.chain[0]).unwrap(), id);
        let root = CertificateDer::from_pem_file(&files.cert).unwrap();
        assert_eq!(issued.signer, root);

        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).unwrap();
        let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
        let key_mode = std::fs::metadata(&files.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_file_ca_signs_with_its_new_files_once_they_make_a_ca() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-rotate-{}", std::process::id()));
        let files = FileCa::create(&dir, "cluster.local").unwrap();
        let ca = FileCa::load(files.clone()).unwrap();
        let first = ca.signer().await.unwrap();
        // A half-written change (a new certificate with the old key) is not used.
        let (cert, key) = signer::Signer::self_signed("cluster.local").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&files.cert, &cert).unwrap();
        assert_eq!(ca.signer().await.unwrap(), first);
        file_ca::write_private(&files.key, &key).unwrap();
        let second = ca.signer().await.unwrap();
        assert_ne!(second, first);
        let id = SpiffeId::workload("cluster.local", "shop", "cart");
        let issued = issue(&ca, &id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(issued.signer, second);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn requests_must_name_one_spiffe_id() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let request = |sans: Vec<SanType>| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            let csr = params.serialize_request(&key).unwrap();
            signer::SigningRequest::parse(csr.der()).map(|r| r.id)
        };
        let uri = |u: &str| SanType::URI(u.try_into().unwrap());
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";
        assert_eq!(request(vec![uri(cart)]).unwrap().as_str(), cart);
        for sans in [
            vec![],
            vec![uri(cart), uri("spiffe://cluster.local/ns/shop/sa/web")],
            vec![uri(cart), SanType::DnsName("cart".try_into().unwrap())],
            vec![uri("https://cart.shop")],
        ] {
            assert!(request(sans).is_err());
        }
        let tampered = {
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![uri(cart)];
            let mut der = params.serialize_request(&key).unwrap().der().to_vec();
            let last = der.len() - 1;
            der[last] ^= 1;
            der
        };
        assert!(signer::SigningRequest::parse(&tampered.into()).is_err());
    }
}
