//! The CA service's server: certificate requests over HTTP/2 with TLS (its own serving
//! certificate, `spiffe://<trust-domain>/ns/mesh-system/sa/mesh-ca`, from the CA it runs,
//! renewed at half-life and when the CA's files change), and `/metrics`, `/ready` and
//! `/healthz` over plain HTTP on the admin port. Every answer is counted by result, and
//! every certificate signed or refused is an audit line (target `mesh_agent::ca::audit`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};
use rustls::pki_types::{CertificateSigningRequestDer, pem::PemObject};
use tokio::{net::TcpListener, sync::Semaphore, time::timeout};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    ca::{
        CERTIFICATES_PATH, CertificateRequest, CertificateResponse, ErrorResponse, SIGNER_PATH,
        SignerResponse, pem,
        review::{Caller, Refusal, Reviewer},
    },
    identity::{
        CaFiles, FileCa, SpiffeId, issue,
        signer::SigningRequest,
        tls::{self, CertSlot},
    },
    system, warn_sampled,
};

/// The most connections open at once (agents keep one each).
const MAX_CONNECTIONS: usize = 8192;
/// Pings on an idle connection this often; a peer that answers none within as long is gone.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body taken (a CSR is well under 1 KiB).
const MAX_BODY: usize = 64 << 10;
/// How long the CA's own serving certificate lives.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the serving certificate's renewal is considered.
const SERVING_CHECK: Duration = Duration::from_secs(5);
/// The shortest certificate signed.
const MIN_TTL: Duration = Duration::from_secs(60);

/// How `mesh-agent ca serve` was started.
pub struct CaOptions {
    pub files: CaFiles,
    pub trust_domain: String,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub audience: String,
    pub max_ttl: Duration,
}

/// What the CA service counts.
pub struct CaMetrics {
    requests: Family<ResultLabels, Counter>,
    duration: Histogram,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl CaMetrics {
    /// Registers the metrics in `registry` (whose prefix should be `mesh_ca`).
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            // 100 µs to about 26 s.
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 4.0, 10,
            )),
        };
        registry.register(
            "requests",
            "Certificate requests answered, by result (issued, or why not)",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "How long certificate requests took to answer",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        metrics
    }
}

/// The CA service: the CA, who may ask, and its metrics.
pub struct CaService {
    pub ca: Arc<FileCa>,
    pub reviewer: Reviewer,
    pub trust_domain: String,
    pub max_ttl: Duration,
    pub metrics: CaMetrics,
}

type Body = Full<Bytes>;

/// Runs the CA service until SIGTERM or SIGINT.
pub async fn run(opts: CaOptions) -> Result<()> {
    let ca = Arc::new(FileCa::load(opts.files.clone()).context("cannot load the CA")?);
    let client = kube::Client::try_default().await.context(
        "cannot set up the Kubernetes API client: run in a pod with a service account, or \
         point KUBECONFIG at a kubeconfig",
    )?;
    let mut registry = Registry::with_prefix("mesh_ca");
    let service = Arc::new(CaService {
        ca,
        reviewer: Reviewer::new(client, &opts.audience, &opts.trust_domain),
        trust_domain: opts.trust_domain,
        max_ttl: opts.max_ttl,
        metrics: CaMetrics::new(&mut registry),
    });
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let admin = TcpListener::bind(opts.admin)
        .await
        .with_context(|| format!("cannot listen on {}", opts.admin))?;
    let stop = CancellationToken::new();
    let acceptor = service.acceptor().await?;
    let serving = tokio::spawn(service.clone().serve(listener, acceptor, stop.clone()));
    tokio::spawn(serve_admin(admin, Arc::new(registry), stop.clone()));
    info!(listen = %opts.listen, admin = %opts.admin, "CA service ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down");
    stop.cancel();
    Ok(serving.await?)
}

impl CaService {
    /// The TLS side of the service: its serving certificate, issued now and renewed from
    /// here on.
    pub async fn acceptor(&self) -> Result<TlsAcceptor> {
        let id = SpiffeId::ca(&self.trust_domain);
        let issued = issue(&*self.ca, &id, SERVING_TTL).await?;
        let slot = Arc::new(CertSlot::new(issued)?);
        tokio::spawn(keep_serving_certificate(
            self.ca.clone(),
            id,
            Arc::downgrade(&slot),
        ));
        Ok(TlsAcceptor::from(tls::plain_server_config(slot)?))
    }

    /// Serves certificate requests on `listener` with `acceptor` until `stop` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
        stop: CancellationToken,
    ) {
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        while let Some((tcp, peer)) = system::accept(&listener, &stop).await {
            let Ok(place) = connections.clone().try_acquire_owned() else {
                warn_sampled!(%peer, "connection shed: {MAX_CONNECTIONS} are open");
                system::reset_on_close(&tcp);
                continue;
            };
            let (service, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _place = place;
                let _ = tcp.set_nodelay(true);
                let tls = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return warn_sampled!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => {
                        return warn_sampled!(%peer, "no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                    }
                };
                let handler = service_fn(move |request| {
                    let service = service.clone();
                    async move { Ok::<_, Infallible>(service.handle(request).await) }
                });
                let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(KEEPALIVE)
                    .keep_alive_timeout(KEEPALIVE)
                    .max_concurrent_streams(256)
                    .serve_connection(TokioIo::new(tls), handler)
                    .await;
                if let Err(e) = served {
                    debug!(%peer, "connection ended: {e}");
                }
            });
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, SIGNER_PATH) => {
                let signer = pem(self.ca.signer_now().cert());
                json(StatusCode::OK, &SignerResponse { signer })
            }
            (&Method::POST, CERTIFICATES_PATH) => {
                let started = Instant::now();
                let answer = self.certificate(request).await;
                let result = answer.as_ref().map_or_else(Refusal::label, |_| "issued");
                self.metrics
                    .requests
                    .get_or_create(&ResultLabels { result })
                    .inc();
                self.metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                match answer {
                    Ok(signed) => json(StatusCode::OK, &signed),
                    Err(refusal) => {
                        let error = refusal.to_string();
                        json(refusal.status(), &ErrorResponse { error })
                    }
                }
            }
            _ => json(
                StatusCode::NOT_FOUND,
                &ErrorResponse {
                    error: format!("no {} {}", request.method(), request.uri().path()),
                },
            ),
        }
    }

    /// Answers a certificate request: the caller by its token, then what it asks for.
    async fn certificate(
        &self,
        request: Request<Incoming>,
    ) -> Result<CertificateResponse, Refusal> {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        // The whole (small) body first, even for a refusal: an answer before the request
        // has been sent ends in a stream reset that some clients take for a failure.
        let body = Limited::new(request.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| Refusal::BadRequest(format!("unreadable body: {e}")))?
            .to_bytes();
        let token = token.ok_or_else(|| Refusal::Unauthenticated("no bearer token".into()))?;
        let asked: CertificateRequest = serde_json::from_slice(&body)
            .map_err(|e| Refusal::BadRequest(format!("not a certificate request: {e}")))?;
        let csr = CertificateSigningRequestDer::from_pem_slice(asked.csr.as_bytes())
            .map_err(|e| Refusal::BadRequest(format!("csr: {e}")))?;
        let signing = SigningRequest::parse(&csr).map_err(Refusal::BadRequest)?;
        let ttl = Duration::from_secs(asked.ttl_seconds)
            .min(self.max_ttl)
            .max(MIN_TTL);
        let refused = |node: &str, refusal: Refusal| {
            warn!(
                target: "mesh_agent::ca::audit",
                node,
                identity = %signing.id,
                reason = refusal.label(),
                "certificate refused: {refusal}"
            );
            refusal
        };
        let caller = match self.reviewer.caller(&token).await {
            Ok(caller) => caller,
            Err(refusal) => return Err(refused("-", refusal)),
        };
        match self.reviewer.may_hold(&caller, &signing.id).await {
            Ok(()) => self.sign(&caller, &signing, ttl),
            Err(refusal) => Err(refused(&caller.node, refusal)),
        }
    }

    fn sign(
        &self,
        caller: &Caller,
        signing: &SigningRequest,
        ttl: Duration,
    ) -> Result<CertificateResponse, Refusal> {
        let signer = self.ca.signer_now();
        let signed = signer
            .sign(signing, ttl)
            .map_err(|e| Refusal::BadRequest(format!("cannot sign: {e:#}")))?;
        let serial = signed
            .chain
            .first()
            .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
            .map(|(_, leaf)| leaf.raw_serial_as_string())
            .unwrap_or_default();
        info!(
            target: "mesh_agent::ca::audit",
            node = %caller.node,
            caller = %caller.pod,
            identity = %signing.id,
            serial,
            ttl_seconds = ttl.as_secs(),
            "certificate signed"
        );
        Ok(CertificateResponse {
            chain: signed.chain.iter().map(|c| pem(c)).collect(),
            signer: pem(&signed.signer),
        })
    }
}

/// Renews the CA's serving certificate at half-life, and at once when the CA's files
/// changed, until the slot is dropped.
async fn keep_serving_certificate(ca: Arc<FileCa>, id: SpiffeId, slot: std::sync::Weak<CertSlot>) {
    let mut signer = ca.signer_now().cert().clone();
    let mut issued_at = Instant::now();
    loop {
        tokio::time::sleep(SERVING_CHECK).await;
        let Some(slot) = slot.upgrade() else { return };
        let now = ca.signer_now().cert().clone();
        if now == signer && issued_at.elapsed() < SERVING_TTL / 2 {
            continue;
        }
        match issue(&*ca, &id, SERVING_TTL)
            .await
            .and_then(|issued| slot.replace(issued))
        {
            Ok(()) => {
                info!("serving certificate renewed");
                (signer, issued_at) = (now, Instant::now());
            }
            Err(e) => warn!("cannot renew the serving certificate, the current one stays: {e:#}"),
        }
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves `/metrics`, `/ready` and `/healthz` until `stop` is cancelled.
pub async fn serve_admin(listener: TcpListener, registry: Arc<Registry>, stop: CancellationToken) {
    while let Some((tcp, _)) = system::accept(&listener, &stop).await {
        let registry = registry.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |request: Request<Incoming>| {
                let registry = registry.clone();
                async move {
                    let response = match request.uri().path() {
                        "/metrics" => {
                            let mut text = String::new();
                            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                                Ok(()) => Response::new(Full::new(Bytes::from(text))),
                                Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                            }
                        }
                        "/ready" | "/healthz" => plain(StatusCode::OK, "ok\n".into()),
                        _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), handler)
                .await;
        });
    }
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
}
