//! The mesh's CA service (`mesh-agent ca serve`): the only holder of the CA key in a cluster.
//! Agents send it certificate requests over HTTP/2 with TLS, each with their projected
//! service-account token; it checks the token with the TokenReview API, learns the asking
//! agent's node from the token's pod, and signs only identities of pods the API says run on
//! that node, plus the agent's own (`review`). `server` serves it, `client` is the agents'
//! side, and this module holds what both speak.

use serde::{Deserialize, Serialize};

pub mod client;
pub mod review;
pub mod server;

/// The CA service's port (istiod's certificate port too).
pub const CA_PORT: u16 = 15012;
/// The port of its `/metrics`, `/ready` and `/healthz`.
pub const CA_ADMIN_PORT: u16 = 15014;
/// Where requests for certificates go.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// Where the certificate the CA signs with now is shown.
pub const SIGNER_PATH: &str = "/v1/signer";
/// The audience agents' tokens must be minted for (the DaemonSet's projected volume).
pub const DEFAULT_AUDIENCE: &str = "mesh-ca";

/// A certificate request, with the bearer token in the `authorization` header.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// PEM; its one URI SAN names the identity.
    pub csr: String,
    /// How long the certificate should live; the CA may cut it.
    pub ttl_seconds: u64,
}

/// A signed certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// PEM: the leaf first, then any intermediates.
    pub chain: Vec<String>,
    /// PEM: the CA certificate that signed it.
    pub signer: String,
}

/// The certificate the CA signs with now.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignerResponse {
    /// PEM.
    pub signer: String,
}

/// Why a request was not answered with a certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// A DER certificate as PEM.
pub fn pem(der: &[u8]) -> String {
    pem_of("CERTIFICATE", der)
}

/// DER as PEM with the tag `tag`, lines ending in `\n`.
pub fn pem_of(tag: &str, der: &[u8]) -> String {
    let unix = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(tag, der), unix)
}
