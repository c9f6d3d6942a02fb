//! A third party outside the mesh, for the egress tests: an HTTPS server (HTTP/1.1) whose
//! certificate a CA of its own issued for its names. It answers `third-party <host>` and
//! keeps the server name each client's ClientHello asked for.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http::Response;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::{
    ServerConfig,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A running third party.
pub struct ThirdParty {
    pub addr: SocketAddr,
    /// Its CA's certificate (PEM): what a client must trust to reach it.
    pub ca_pem: String,
    /// The server names its clients asked for (empty for none), in order.
    pub server_names: Arc<Mutex<Vec<String>>>,
}

/// A CA certificate (PEM) nobody's certificate chains to.
pub fn unrelated_ca() -> String {
    ca().pem()
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl ThirdParty {
    /// Starts one on `ip` (any port) with a certificate for `names`.
    pub async fn start(ip: std::net::IpAddr, names: &[&str]) -> Self {
        let issuer = ca();
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_names = Arc::new(Mutex::new(Vec::new()));
        let seen = server_names.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let accepting = acceptor.accept(conn);
                    let Ok(tls) = accepting.await else { return };
                    let name = tls.get_ref().1.server_name().unwrap_or_default();
                    seen.lock().unwrap().push(name.to_owned());
                    let service = service_fn(|request: http::Request<Incoming>| async move {
                        let host = request
                            .headers()
                            .get(http::header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            bytes::Bytes::from(format!("third-party {host}")),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_pem: issuer.pem(),
            server_names,
        }
    }
}
