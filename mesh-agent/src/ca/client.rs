//! The agents' side of the CA service: certificate requests over one HTTP/2 connection (made
//! again when it breaks), each with the agent's projected service-account token as read from
//! its file at that moment (the kubelet rotates it).

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, StatusCode,
    client::conn::http2::{self, SendRequest},
    header,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName, pem::PemObject};
use serde::de::DeserializeOwned;
use tokio::{net::TcpStream, sync::Mutex, time::timeout};
use tokio_rustls::TlsConnector;

use crate::{
    ca::{
        CERTIFICATES_PATH, CertificateRequest, CertificateResponse, ErrorResponse, SIGNER_PATH,
        SignerResponse, pem_of,
    },
    identity::{CertificateAuthority, Signed, bundle::TrustBundle, tls},
};

/// How long one request (connecting included) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The CA service, as an agent asks it.
pub struct CaClient {
    /// `host:port`; the host may be a name (the Service's).
    address: String,
    token: PathBuf,
    tls: TlsConnector,
    connection: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl CaClient {
    /// A client of the CA service at `address` that shows the token in `token` and accepts
    /// only the CA service of `trust_domain` whose chain leads to `bundle`.
    pub fn new(
        address: &str,
        token: PathBuf,
        bundle: Arc<TrustBundle>,
        trust_domain: &str,
    ) -> Result<Self> {
        Ok(Self {
            address: address.to_owned(),
            token,
            tls: TlsConnector::from(tls::ca_client_config(bundle, trust_domain)?),
            connection: Mutex::new(None),
        })
    }

    /// The connection to the CA, made if there is none or it broke.
    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>> {
        let mut connection = self.connection.lock().await;
        if let Some(open) = connection.as_ref().filter(|c| !c.is_closed()) {
            return Ok(open.clone());
        }
        let tcp = TcpStream::connect(&self.address)
            .await
            .with_context(|| format!("cannot reach the CA service at {}", self.address))?;
        let _ = tcp.set_nodelay(true);
        let host = self.address.rsplit_once(':').map_or("", |(host, _)| host);
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .unwrap_or(ServerName::try_from("mesh-ca").context("a server name")?);
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with the CA service at {} failed", self.address))?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(tls))
            .await?;
        tokio::spawn(conn);
        *connection = Some(sender.clone());
        Ok(sender)
    }

    /// Sends `request`; the answer's JSON if it is a 200, else the CA's reason.
    async fn send<T: DeserializeOwned>(&self, request: Request<Full<Bytes>>) -> Result<T> {
        let answered = timeout(REQUEST_TIMEOUT, async {
            let mut sender = self.connection().await?;
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        })
        .await;
        let (status, body) = match answered {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                *self.connection.lock().await = None;
                return Err(e);
            }
            Err(_) => {
                *self.connection.lock().await = None;
                bail!("the CA service did not answer within {REQUEST_TIMEOUT:?}");
            }
        };
        if status != StatusCode::OK {
            let reason = serde_json::from_slice::<ErrorResponse>(&body)
                .map_or_else(|_| String::from_utf8_lossy(&body).into_owned(), |e| e.error);
            bail!("the CA service refused ({status}): {reason}");
        }
        serde_json::from_slice(&body).context("the CA service's answer is unreadable")
    }

    async fn sign_request(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        ttl: Duration,
    ) -> Result<Signed> {
        let token = tokio::fs::read_to_string(&self.token)
            .await
            .with_context(|| format!("cannot read the token {}", self.token.display()))?;
        let body = serde_json::to_vec(&CertificateRequest {
            csr: pem_of("CERTIFICATE REQUEST", csr.as_ref()),
            ttl_seconds: ttl.as_secs(),
        })?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{}{CERTIFICATES_PATH}", self.address))
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let answer: CertificateResponse = self.send(request).await?;
        let chain = answer
            .chain
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .context("the CA service sent an unreadable certificate")?;
        let signer = CertificateDer::from_pem_slice(answer.signer.as_bytes())
            .context("the CA service sent an unreadable signer")?;
        Ok(Signed { chain, signer })
    }

    async fn current_signer(&self) -> Result<CertificateDer<'static>> {
        let request = Request::builder()
            .uri(format!("https://{}{SIGNER_PATH}", self.address))
            .body(Full::new(Bytes::new()))?;
        let answer: SignerResponse = self.send(request).await?;
        CertificateDer::from_pem_slice(answer.signer.as_bytes())
            .context("the CA service sent an unreadable signer")
    }
}

impl CertificateAuthority for CaClient {
    fn sign(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Signed>> {
        Box::pin(self.sign_request(csr, ttl))
    }

    fn signer(&self) -> BoxFuture<'_, Result<CertificateDer<'static>>> {
        Box::pin(self.current_signer())
    }
}
