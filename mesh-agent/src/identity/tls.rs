//! TLS 1.3 between agents: rustls configurations whose certificates can be swapped while
//! running, and verifiers that check the chain against the trust bundle and the peer's SPIFFE
//! ID instead of a host name.

use std::sync::{Arc, PoisonError, RwLock};

use anyhow::{Context, Result};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::identity::{Issued, SpiffeId, bundle::TrustBundle};

/// The one application protocol spoken on the tunnel.
const ALPN_H2: &[u8] = b"h2";

/// The crypto the mesh's TLS uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The current certificate and key of one identity; renewal swaps them and the next
/// handshake uses the new ones, while established connections go on untouched.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSlot {
    pub fn new(issued: Issued) -> Result<Self> {
        Ok(Self {
            current: RwLock::new(certified_key(issued)?),
        })
    }

    /// Puts a newly issued certificate in place.
    pub fn replace(&self, issued: Issued) -> Result<()> {
        let key = certified_key(issued)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn certified_key(issued: Issued) -> Result<Arc<CertifiedKey>> {
    let key = provider()
        .key_provider
        .load_private_key(issued.key)
        .context("the issued private key is unusable")?;
    Ok(Arc::new(CertifiedKey::new(issued.chain, key)))
}

impl ResolvesClientCert for CertSlot {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The client side of a tunnel: presents `slot`'s certificate (the source workload's) and
/// accepts only a peer agent of `trust_domain` whose chain leads to the bundle.
pub fn client_config(
    bundle: Arc<TrustBundle>,
    trust_domain: &str,
    slot: Arc<CertSlot>,
) -> Result<Arc<ClientConfig>> {
    let config = builder(bundle, SpiffeId::agent(trust_domain))?.with_client_cert_resolver(slot);
    Ok(Arc::new(with_h2(config)))
}

/// A client of the CA service: no certificate of its own (it shows a token instead), and it
/// accepts only the CA service of `trust_domain` whose chain leads to the bundle.
pub fn ca_client_config(bundle: Arc<TrustBundle>, trust_domain: &str) -> Result<Arc<ClientConfig>> {
    let config = builder(bundle, SpiffeId::ca(trust_domain))?.with_no_client_auth();
    Ok(Arc::new(with_h2(config)))
}

fn builder(
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        bundle,
        expected,
        algorithms: provider.signature_verification_algorithms,
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

fn with_h2(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config
}

/// The server side of a tunnel: presents the agent's certificate and requires a client
/// certificate with a SPIFFE ID of `trust_domain` whose chain leads to the bundle.
pub fn server_config(
    bundle: Arc<TrustBundle>,
    trust_domain: &str,
    slot: Arc<CertSlot>,
) -> Result<Arc<ServerConfig>> {
    let verifier = Arc::new(WorkloadVerifier {
        bundle,
        trust_domain: trust_domain.to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A server presenting `slot`'s certificate to clients that show none (the CA service's).
pub fn plain_server_config(slot: Arc<CertSlot>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The SPIFFE ID of a verified peer's certificate.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    SpiffeId::from_certificate(certs?.first()?).ok()
}

/// Why a handshake failed, as a metric label: a few fixed words.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return "connection";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "untrusted",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Other(other)
                if other.0.downcast_ref::<IdentityRejected>().is_some() =>
            {
                "identity"
            }
            _ => "invalid_certificate",
        },
        Error::AlertReceived(_) => "alert_received",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        _ => "protocol",
    }
}

fn identity_error(reason: impl Into<String>) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        IdentityRejected(reason.into()),
    ))))
}

/// A certificate that chains correctly but names the wrong identity.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct IdentityRejected(String);

/// Accepts a server whose chain leads to the trust bundle and whose SPIFFE ID is `expected`
/// (the node agents', or the CA service's); the server name is not used.
struct PeerVerifier {
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.bundle.roots().store,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = SpiffeId::from_certificate(end_entity).map_err(identity_error)?;
        if id != self.expected {
            return Err(identity_error(format!(
                "the peer is {id}, not {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// webpki's client verification (chain, validity, client-auth usage) against the bundle as
/// it is at the handshake, then a SPIFFE ID of the trust domain.
struct WorkloadVerifier {
    bundle: Arc<TrustBundle>,
    trust_domain: String,
}

impl std::fmt::Debug for WorkloadVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for WorkloadVerifier {
    /// No hints: the roots may change between handshakes, and peers need none.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.bundle
            .roots()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = SpiffeId::from_certificate(end_entity).map_err(identity_error)?;
        if id.trust_domain() != self.trust_domain {
            return Err(identity_error(format!(
                "{id} is not of the trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.bundle
            .roots()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.bundle
            .roots()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle
            .roots()
            .client_verifier
            .supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::{FileCa, issue, signer::Signer};

    const DOMAIN: &str = "cluster.local";

    fn ca() -> FileCa {
        FileCa::in_memory(Signer::generate(DOMAIN).unwrap())
    }

    async fn issued(ca: &FileCa, id: &SpiffeId) -> Issued {
        issue(ca, id, Duration::from_secs(3600)).await.unwrap()
    }

    async fn slot(ca: &FileCa, id: &SpiffeId) -> Arc<CertSlot> {
        Arc::new(CertSlot::new(issued(ca, id).await).unwrap())
    }

    fn bundle(cas: &[&FileCa]) -> Arc<TrustBundle> {
        TrustBundle::fixed(
            cas.iter()
                .map(|ca| ca.signer_now().cert().clone())
                .collect(),
        )
        .unwrap()
    }

    fn web() -> SpiffeId {
        SpiffeId::workload(DOMAIN, "shop", "web")
    }

    /// A tunnel client presenting `client` to a server presenting `server`, both trusting
    /// `trusted`: what the server saw of the client (its SPIFFE ID) or why it refused, and
    /// whether the client accepted the server or why not.
    async fn handshake(
        trusted: &Arc<TrustBundle>,
        client: Option<Arc<CertSlot>>,
        server: Arc<CertSlot>,
    ) -> (Result<SpiffeId, &'static str>, Result<(), &'static str>) {
        let client_config = match client {
            Some(slot) => client_config(trusted.clone(), DOMAIN, slot).unwrap(),
            None => {
                let config = builder(trusted.clone(), SpiffeId::agent(DOMAIN))
                    .unwrap()
                    .with_no_client_auth();
                Arc::new(with_h2(config))
            }
        };
        let server_config = server_config(trusted.clone(), DOMAIN, server).unwrap();
        let (a, b) = tokio::io::duplex(64 << 10);
        let name = ServerName::try_from("198.18.0.2").unwrap();
        let (client, server) = crate::testing::within(async {
            tokio::join!(
                TlsConnector::from(client_config).connect(name, a),
                TlsAcceptor::from(server_config).accept(b),
            )
        })
        .await;
        let seen = server
            .map(|tls| peer_id(tls.get_ref().1.peer_certificates()).unwrap())
            .map_err(|e| failure_reason(&e));
        (seen, client.map(drop).map_err(|e| failure_reason(&e)))
    }

    #[tokio::test]
    async fn a_workload_and_a_node_agent_of_one_ca_agree() {
        let ca = ca();
        let agent = slot(&ca, &SpiffeId::agent(DOMAIN)).await;
        let client = Some(slot(&ca, &web()).await);
        let (seen, accepted) = handshake(&bundle(&[&ca]), client, agent).await;
        assert_eq!(seen, Ok(web()));
        assert_eq!(accepted, Ok(()));
    }

    #[tokio::test]
    async fn the_server_refuses_clients_it_cannot_trust() {
        let (ca, other) = (ca(), ca());
        let other_domain = SpiffeId::workload("other.domain", "shop", "web");
        let cases = [
            // (client certificate, the server's reason)
            (Some(slot(&other, &web()).await), "untrusted"),
            (Some(slot(&ca, &other_domain).await), "identity"),
            (None, "no_certificate"),
        ];
        for (client, reason) in cases {
            let agent = slot(&ca, &SpiffeId::agent(DOMAIN)).await;
            let (seen, _) = handshake(&bundle(&[&ca]), client, agent).await;
            assert_eq!(seen, Err(reason));
        }
    }

    #[tokio::test]
    async fn the_client_accepts_only_a_node_agent_of_its_trust_bundle() {
        let (ca, other) = (ca(), ca());
        let cases = [
            // (server certificate, the client's reason)
            (slot(&other, &SpiffeId::agent(DOMAIN)).await, "untrusted"),
            // A workload's certificate is no node agent's, though the CA is the same.
            (slot(&ca, &web()).await, "identity"),
        ];
        for (server, reason) in cases {
            let client = Some(slot(&ca, &web()).await);
            let (_, accepted) = handshake(&bundle(&[&ca]), client, server).await;
            assert_eq!(accepted, Err(reason));
        }
    }

    #[tokio::test]
    async fn a_renewed_certificate_takes_the_old_ones_place_and_verifies() {
        let ca = ca();
        let client = slot(&ca, &web()).await;
        let agent = slot(&ca, &SpiffeId::agent(DOMAIN)).await;
        let serial = |slot: &CertSlot| slot.get().cert[0].clone();
        let before = serial(&client);
        client.replace(issued(&ca, &web()).await).unwrap();
        assert_ne!(serial(&client), before);
        let (seen, accepted) = handshake(&bundle(&[&ca]), Some(client), agent).await;
        assert_eq!((seen, accepted), (Ok(web()), Ok(())));
    }

    #[tokio::test]
    async fn a_root_added_to_the_bundle_is_trusted_and_one_removed_is_not_from_the_next_handshake()
    {
        let (old, new) = (ca(), ca());
        let trusted = bundle(&[&old]);
        let agent = slot(&old, &SpiffeId::agent(DOMAIN)).await;
        let from_new = || async { Some(slot(&new, &web()).await) };
        let (seen, _) = handshake(&trusted, from_new().await, agent.clone()).await;
        assert_eq!(seen, Err("untrusted"));

        trusted
            .replace(vec![
                old.signer_now().cert().clone(),
                new.signer_now().cert().clone(),
            ])
            .unwrap();
        let (seen, accepted) = handshake(&trusted, from_new().await, agent.clone()).await;
        assert_eq!((seen, accepted), (Ok(web()), Ok(())));

        // The old root removed: the agent's certificate (of the old CA) is refused by the
        // client, until the agent's is renewed by the new CA.
        trusted
            .replace(vec![new.signer_now().cert().clone()])
            .unwrap();
        let (_, accepted) = handshake(&trusted, from_new().await, agent.clone()).await;
        assert_eq!(accepted, Err("untrusted"));
        agent
            .replace(issued(&new, &SpiffeId::agent(DOMAIN)).await)
            .unwrap();
        let (seen, accepted) = handshake(&trusted, from_new().await, agent).await;
        assert_eq!((seen, accepted), (Ok(web()), Ok(())));
    }
}
