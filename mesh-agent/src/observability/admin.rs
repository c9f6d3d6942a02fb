//! The admin API on port 15020: `/metrics` (OpenMetrics), `/healthz` and `/ready` for anyone
//! who can reach the port (Prometheus, the kubelet's probes); `/config` (the effective config
//! and state as JSON: the whole topology), `/connections` (the proxied connections open now,
//! as JSON) and `/logging` (the log filter, changeable at run time) only from the node itself.
//!
//! A connection must send its request's headers within [`HEADER_READ_TIMEOUT`] and is closed
//! after [`IDLE_TIMEOUT`] of silence; the node itself and everyone else each have their own
//! cap on open connections, so pods cannot starve the kubelet's probes.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tracing_subscriber::{EnvFilter, reload};

use crate::{
    identity::certificates::{Certificates, unix_seconds},
    observability::metrics::Metrics,
    proxy::{
        balance::EndpointStates,
        limit::Limit,
        liveness::SilenceLimit,
        open::OpenConnections,
        refusal::{Cap, Refusal},
    },
    state::routes::Routes,
    system, warn_sampled,
};

/// The admin port.
pub const ADMIN_PORT: u16 = 15020;
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay silent (between requests, say) before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections open at once from the node itself.
pub const MAX_NODE_CONNECTIONS: usize = 64;
/// Connections open at once from anywhere else (pods, Prometheus), and from each address.
pub const MAX_OTHER_CONNECTIONS: usize = 64;
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;

/// Changes the agent's log filter while it runs.
pub type LogFilter = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// What the admin API reads.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub open: Arc<OpenConnections>,
    /// Set once the agent serves (programs attached, certificates issued, config applied);
    /// cleared when it starts shutting down.
    pub ready: Arc<AtomicBool>,
    pub routes: watch::Receiver<Arc<Routes>>,
    pub states: Arc<EndpointStates>,
    pub certificates: Arc<Certificates>,
    pub log_filter: LogFilter,
}

impl Admin {
    /// Serves until `stop` is cancelled.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let from_node = Limit::new(MAX_NODE_CONNECTIONS, MAX_NODE_CONNECTIONS);
        let from_others = Limit::new(MAX_OTHER_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE);
        while let Some((tcp, peer)) = system::accept(&listener, &stop).await {
            let caller = if system::within_this_host(&tcp) {
                Caller::Node
            } else {
                Caller::Other
            };
            let limit = match caller {
                Caller::Node => &from_node,
                Caller::Other => &from_others,
            };
            let permit = match limit.enter(peer.ip()) {
                Ok(permit) => permit,
                Err(full) => {
                    let refusal = Refusal::Over(
                        full.pick(Cap::AdminConnections, Cap::AdminConnectionsPerSource),
                    );
                    self.metrics.refused(refusal.reason());
                    warn_sampled!(%peer, open = limit.open(), "admin connection refused: {refusal}");
                    continue;
                }
            };
            let this = self.clone();
            let service = service_fn(move |request| {
                let this = this.clone();
                async move { Ok::<_, Infallible>(this.answer(request, caller)) }
            });
            tokio::spawn(async move {
                let io = SilenceLimit::between_reads(tcp, IDLE_TIMEOUT);
                if let Err(e) = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(io), service)
                    .await
                {
                    debug!(%peer, "admin connection ended: {e}");
                }
                drop(permit);
            });
        }
    }

    fn answer(&self, request: Request<Incoming>, caller: Caller) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if caller == Caller::Other && matches!(path, "/config" | "/connections" | "/logging") {
            return text(
                StatusCode::FORBIDDEN,
                "only from the node itself (its own addresses or loopback)\n",
            );
        }
        match (request.method(), path) {
            (&Method::GET, "/metrics") => self.metrics(),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "alive\n"),
            (&Method::GET, "/ready") => {
                if self.ready.load(Ordering::Relaxed) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET, "/config") => self.config(),
            (&Method::GET, "/connections") => json_response(&self.open.list()),
            (&Method::GET, "/logging") => self.log_filter(),
            (&Method::PUT | &Method::POST, "/logging") => {
                let level = request.uri().query().and_then(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == "level")
                        .map(|(_, v)| v.into_owned())
                });
                self.set_log_filter(level)
            }
            (_, "/metrics" | "/healthz" | "/ready" | "/config" | "/connections" | "/logging") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz, /ready, /config, /connections or /logging\n",
            ),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut body = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &self.registry) {
            warn!("cannot encode the metrics: {e}");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            );
        }
        response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )
    }

    fn config(&self) -> Response<Full<Bytes>> {
        let routes = self.routes.borrow().clone();
        let certificates: Vec<_> = self
            .certificates
            .expiries()
            .into_iter()
            .map(|(id, not_after)| json!({ "identity": id.as_str(), "expires_unix": unix_seconds(not_after) }))
            .collect();
        let state = json!({
            "config": &**routes.config(),
            "endpoints": self.states.snapshot(),
            "certificates": certificates,
            "ready": self.ready.load(Ordering::Relaxed),
        });
        json_response(&state)
    }

    fn log_filter(&self) -> Response<Full<Bytes>> {
        let current = self
            .log_filter
            .with_current(|f| f.to_string())
            .unwrap_or_default();
        text(StatusCode::OK, &format!("{current}\n"))
    }

    /// Sets the log filter to `level` (tracing directives).
    fn set_log_filter(&self, level: Option<String>) -> Response<Full<Bytes>> {
        let Some(level) = level else {
            return text(StatusCode::BAD_REQUEST, "give the filter as ?level=...\n");
        };
        let filter = match EnvFilter::try_new(&level) {
            Ok(filter) => filter,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{level:?}: {e}\n")),
        };
        match self.log_filter.reload(filter) {
            Ok(()) => {
                info!(filter = level, "log filter changed");
                text(StatusCode::OK, &format!("{level}\n"))
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        }
    }
}

/// Who is calling: the node itself, or anyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Node,
    Other,
}

/// `value` as pretty JSON.
fn json_response(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(body) => response(StatusCode::OK, "application/json", body + "\n"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.to_owned())
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;
    use crate::testing::{self, Loopback, Mesh};

    /// An admin API over loopback (so the caller is the node itself) with the state of one node.
    async fn admin() -> (SocketAddr, Arc<OpenConnections>, CancellationToken) {
        let net = Loopback::reserve();
        let (registry, metrics) = testing::metrics();
        let snapshot = Mesh::node("n1", net.node(1), &net.pod_cidr(1)).build();
        let certificates = testing::certificates(
            testing::test_ca(),
            Duration::from_secs(3600),
            metrics.clone(),
        );
        let (_, log_filter) = reload::Layer::new(EnvFilter::new("info"));
        let open = Arc::new(OpenConnections::default());
        let admin = Admin {
            registry: Arc::new(registry),
            metrics,
            open: open.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            routes: watch::channel(Arc::new(testing::routes(snapshot))).1,
            states: Arc::default(),
            certificates,
            log_filter,
        };
        let listener = TcpListener::bind((net.node(1), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(admin.serve(listener, stop.clone()));
        (addr, open, stop)
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut response))
            .await
            .expect("no answer within 10 s")
            .unwrap();
        response
    }

    #[tokio::test]
    async fn the_open_connections_are_listed_for_the_node() {
        let (addr, open, stop) = admin().await;
        assert!(get(addr, "/connections").await.ends_with("\r\n[]\n"));
        let labels = crate::observability::metrics::ConnectionLabels {
            direction: "outbound",
            source_namespace: "shop".into(),
            source_workload: "web-0".into(),
            source_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            destination_service: "shop/cart".into(),
            destination_namespace: "shop".into(),
            destination_workload: "cart-0".into(),
            hop: "local",
        };
        let source = "198.18.1.9:40000".parse().unwrap();
        let registration = open.register(
            crate::proxy::open::OpenConnection::new(
                &labels,
                source,
                "198.18.1.2:8080".parse().unwrap(),
            ),
            None,
        );
        let listed = get(addr, "/connections").await;
        let body = listed.split_once("\r\n\r\n").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json[0]["source"], "198.18.1.9:40000");
        assert_eq!(
            json[0]["source_identity"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(json[0]["destination_service"], "shop/cart");
        drop(registration);
        assert!(get(addr, "/connections").await.ends_with("\r\n[]\n"));
        assert!(get(addr, "/nowhere").await.contains("/connections"));
        stop.cancel();
    }
}
