//! Certificates from the lab's CA (or a foreign one): probes of the inbound tunnel with good and
//! every kind of bad client certificate, and certificates for TLS peers that are not agents.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use mesh_agent::state::routes::TUNNEL_PORT;

use crate::{Lab, Output, lab::TRUST_DOMAIN, topology};

/// What a probe's client certificate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeCert {
    /// From the lab's CA, for a workload of the lab's trust domain.
    Valid,
    /// A well-formed workload certificate from a CA the mesh does not trust.
    OtherCa,
    /// From the lab's CA, but its validity ended an hour ago.
    Expired,
    /// From the lab's CA, for a workload of another trust domain.
    OtherTrustDomain,
    /// From the lab's CA, with a DNS name and no SPIFFE ID.
    NoSpiffeId,
}

/// The CA whose `ca.crt` and `ca.key` are in `dir`, ready to sign.
fn issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .with_context(|| format!("cannot read {file} of {}", dir.display()))
    };
    Ok(Issuer::from_ca_cert_pem(
        &read("ca.crt")?,
        KeyPair::from_pem(&read("ca.key")?)?,
    )?)
}

/// DER files of a client certificate and its PKCS#8 key.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Lab {
    /// Writes a client certificate of `kind` to the lab's scratch directory.
    pub fn probe_cert(&self, kind: ProbeCert) -> Result<CertFiles> {
        let ca_dir = if kind == ProbeCert::OtherCa {
            let dir = self.scratch_path("other-ca");
            mesh_agent::identity::FileCa::create(&dir, "elsewhere.example")?;
            dir
        } else {
            self.ca_dir()
        };
        let issuer = issuer(&ca_dir)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + Duration::from_secs(3600);
        let domain = match kind {
            ProbeCert::OtherTrustDomain => "elsewhere.example",
            _ => TRUST_DOMAIN,
        };
        let uri = format!("spiffe://{domain}/ns/lab/sa/probe");
        params.subject_alt_names = match kind {
            ProbeCert::NoSpiffeId => vec![SanType::DnsName("probe.lab.mesh".try_into()?)],
            _ => vec![SanType::URI(uri.as_str().try_into()?)],
        };
        if kind == ProbeCert::Expired {
            params.not_before = now - Duration::from_secs(7200);
            params.not_after = now - Duration::from_secs(3600);
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &issuer)?;

        let files = CertFiles {
            cert: self.scratch_path(&format!("probe-{kind:?}.crt.der")),
            key: self.scratch_path(&format!("probe-{kind:?}.key.der")),
        };
        std::fs::write(&files.cert, cert.der())?;
        std::fs::write(&files.key, key.serialize_der())?;
        Ok(files)
    }
}

impl Lab {
    /// Opens a tunnel to the agent of node 2 from node 1 as a peer agent would, with a client
    /// certificate of `cert` (none if `None`), and asks for `authority`: the output of
    /// `mesh-testpod probe` (`probe=status status=<code>` or `probe=refused error=...`).
    pub fn probe_node2(&self, cert: Option<ProbeCert>, authority: &str) -> Result<Output> {
        self.probe_node2_args(cert, authority, &[])
    }

    /// Like [`Lab::probe_node2`] with a valid certificate and more `mesh-testpod probe`
    /// arguments (`--streams N`, say).
    pub fn probe_node2_with(
        &self,
        cert: ProbeCert,
        authority: &str,
        more: &[&str],
    ) -> Result<Output> {
        self.probe_node2_args(Some(cert), authority, more)
    }

    fn probe_node2_args(
        &self,
        cert: Option<ProbeCert>,
        authority: &str,
        more: &[&str],
    ) -> Result<Output> {
        let mut args = vec![
            "probe".to_owned(),
            "--connect".into(),
            format!("{}:{TUNNEL_PORT}", topology::node_addrs(2).0),
            "--authority".into(),
            authority.into(),
        ];
        if let Some(kind) = cert {
            let files = self.probe_cert(kind)?;
            args.extend([
                "--cert".into(),
                files.cert.display().to_string(),
                "--key".into(),
                files.key.display().to_string(),
            ]);
        }
        args.extend(more.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_on_node(&self.spec.nodes[0], &args)
    }

    /// Writes a certificate from the lab's CA for a TLS peer that is not an agent (the
    /// benchmark's HAProxy pair): certificate then key, PEM, in one file; good for both ends.
    pub fn peer_pem(&self, name: &str) -> Result<PathBuf> {
        let issuer = issuer(&self.ca_dir())?;
        let mut params = CertificateParams::new(vec![format!("{name}.lab.mesh")])?;
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + Duration::from_secs(24 * 3600);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &issuer)?;
        let path = self.scratch_path(&format!("{name}.pem"));
        std::fs::write(&path, cert.pem() + &key.serialize_pem())?;
        Ok(path)
    }

    /// Writes the certificate of a third party outside the mesh, for `hosts`, from a CA of
    /// its own: certificate then key (PEM) in `<name>.pem`; returns that file and the CA's
    /// certificate (PEM), which its clients must trust.
    pub fn third_party_pem(&self, name: &str, hosts: &[&str]) -> Result<(PathBuf, String)> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key)?;
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &ca)?;
        let path = self.scratch_path(&format!("{name}.pem"));
        std::fs::write(&path, cert.pem() + &key.serialize_pem())?;
        Ok((path, ca.pem()))
    }
}
