//! A CA's certificate and key, and what it signs: certificate requests naming one SPIFFE ID,
//! turned into short-lived workload certificates on the requester's own key.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};

use crate::identity::{Signed, SpiffeId};

/// How far back a new certificate's validity starts, for peers whose clocks lag.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A CA certificate with its key.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

/// A certificate request whose signature checked out, and the one identity it asks for.
pub struct SigningRequest {
    pub id: SpiffeId,
    csr: CertificateSigningRequestParams,
}

impl SigningRequest {
    /// Reads a DER certificate request: its signature must verify, and it must name exactly
    /// one SPIFFE ID (its only subject alternative name). Anything else it asks for is
    /// ignored: the CA decides the certificate's form.
    pub fn parse(der: &CertificateSigningRequestDer<'_>) -> Result<Self, String> {
        let csr = CertificateSigningRequestParams::from_der(der)
            .map_err(|e| format!("unusable certificate request: {e}"))?;
        let id = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => SpiffeId::parse(uri.as_str())?,
            _ => return Err("the request must name one SPIFFE ID as its only SAN".into()),
        };
        Ok(Self { id, csr })
    }
}

impl Signer {
    /// A CA from its PEM certificate and key, which must belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("not a PEM private key")?;
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("not a PEM certificate")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| anyhow::anyhow!("unreadable CA certificate: {e}"))?;
        if parsed.public_key().raw != key.subject_public_key_info() {
            bail!("the CA key does not belong to the CA certificate");
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).context("not a usable CA certificate")?;
        Ok(Self { issuer, cert })
    }

    /// Reads a CA's PEM certificate and key files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        };
        Self::from_pem(&read(cert)?, &read(key)?)
            .with_context(|| format!("{} and {}", cert.display(), key.display()))
    }

    /// A new self-signed CA for `trust_domain`, valid for ten years; its PEM certificate and
    /// key.
    pub fn self_signed(trust_domain: &str) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("mesh CA {trust_domain} {:08x}", fastrand::u32(..)),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A new self-signed CA for `trust_domain`, kept in memory.
    pub fn generate(trust_domain: &str) -> Result<Self> {
        let (cert, key) = Self::self_signed(trust_domain)?;
        Self::from_pem(&cert, &key)
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A workload certificate for what `request` asks, valid for `ttl` from now.
    pub fn sign(&self, request: &SigningRequest, ttl: Duration) -> Result<Signed> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(request.id.as_str().try_into()?)];
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
        let mut csr = request.csr.clone();
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        Ok(Signed {
            chain: vec![cert.der().clone()],
            signer: self.cert.clone(),
        })
    }
}
