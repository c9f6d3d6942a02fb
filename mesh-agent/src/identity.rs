//! Workload identities: SPIFFE IDs, the certificate authority that vouches for them, and the
//! trust bundle peers are checked against; the certificates held for local workloads and
//! renewed (`certificates`), and the rustls configs and SPIFFE verifiers built on them (`tls`).

use std::{
    fmt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

pub mod certificates;
pub mod tls;

/// The service account the agents themselves run as (the DaemonSet's); peers expect it on
/// port 15008.
pub const AGENT_NAMESPACE: &str = "mesh-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "mesh-agent";
/// How far back a new certificate's validity starts, for peers whose clocks lag.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

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
}

/// Whoever vouches for identities. The file-based CA signs locally; a remote CA service would
/// take a CSR instead.
pub trait CertificateAuthority: Send + Sync {
    /// A certificate for `id` with a fresh ECDSA P-256 key, valid for `ttl` from now.
    fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Issued>;

    /// The certificates a peer's chain must lead to (more than one during a CA rotation).
    fn trust_bundle(&self) -> &[CertificateDer<'static>];
}

/// A CA whose certificate and key are files (or a Kubernetes Secret mounted as files).
pub struct FileCa {
    issuer: Issuer<'static, KeyPair>,
    bundle: Vec<CertificateDer<'static>>,
}

/// The files of a CA made by [`FileCa::create`].
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl FileCa {
    /// Reads the CA certificate and key (PEM); the trust bundle is `bundle` (PEM, any number of
    /// certificates) or else the CA certificate alone.
    pub fn load(cert: &Path, key: &Path, bundle: Option<&Path>) -> Result<Self> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let cert_pem = read(cert)?;
        let key_pair = KeyPair::from_pem(&read(key)?)
            .with_context(|| format!("{}: not a PEM private key", key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
            .with_context(|| format!("{}: not a PEM CA certificate", cert.display()))?;
        let bundle_file = bundle.unwrap_or(cert);
        let bundle = CertificateDer::pem_slice_iter(read(bundle_file)?.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: unreadable PEM", bundle_file.display()))?;
        if bundle.is_empty() {
            bail!(
                "{}: no certificate in the trust bundle",
                bundle_file.display()
            );
        }
        Ok(Self { issuer, bundle })
    }

    /// Makes a new self-signed CA for `trust_domain`, valid for ten years, and writes its
    /// certificate and key as `ca.crt` and `ca.key` (mode 0600) in `dir`.
    pub fn create(dir: &Path, trust_domain: &str) -> Result<CaFiles> {
        let (cert, key) = self_signed(trust_domain)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let files = CaFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        };
        std::fs::write(&files.cert, cert.pem())
            .with_context(|| format!("cannot write {}", files.cert.display()))?;
        write_private(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// A new self-signed CA for `trust_domain`, kept in memory (the in-process tests').
    #[cfg(test)]
    pub fn generate(trust_domain: &str) -> Result<Self> {
        let (cert, key) = self_signed(trust_domain)?;
        let bundle = vec![cert.der().clone()];
        let issuer = Issuer::from_ca_cert_der(cert.der(), key)?;
        Ok(Self { issuer, bundle })
    }
}

/// A new self-signed CA certificate for `trust_domain`, valid for ten years, and its key.
fn self_signed(trust_domain: &str) -> Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("mesh CA {trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

impl CertificateAuthority for FileCa {
    fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Issued> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from(fastrand::u64(..).to_be_bytes().to_vec()));
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            not_after: SystemTime::now() + ttl,
        })
    }

    fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn issued_certificates_carry_the_spiffe_id_and_chain_to_the_bundle() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", std::process::id()));
        let files = FileCa::create(&dir, "cluster.local").unwrap();
        let ca = FileCa::load(&files.cert, &files.key, None).unwrap();
        let id = SpiffeId::workload("cluster.local", "shop", "cart");
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(SpiffeId::from_certificate(&issued.chain[0]).unwrap(), id);

        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&ca.trust_bundle()[0]).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).unwrap();
        let key_mode = std::fs::metadata(&files.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
