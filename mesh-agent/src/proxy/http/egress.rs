//! HTTP to declared external hosts: the app speaks plain HTTP/1.1 to a host's address; each
//! request's Host names the declared host it is for (hosts may share addresses), and the
//! agent sends it there, opening TLS itself where the host's port says `tls: originate` (SNI
//! and certificate checked against the name). A request for a host nobody declared is
//! answered 403 under `registry_only` and passed on as it is under `allow_any`.
//!
//! A request for a host whose traffic leaves from egress nodes goes through the tunnel to one
//! of their agents, which serves it as its own pods'. Each client connection keeps its own
//! connection per host it calls (requests on one HTTP/1.1 connection come one after another).

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use http::{Request, Response, Uri, request::Parts};
use http_body_util::BodyExt;
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
    time::timeout,
};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    body::{Counted, Recorded},
    serve::{Answer, answer, authority, method_label, served_unless, strip_hop_by_hop},
    upstream::{Body, BoxError},
};
use crate::{
    config::egress::{OutboundPolicy, TlsMode},
    observability::{
        metrics::{Metrics, RouteLabels},
        request::RequestRecord,
    },
    proxy::{copy::Ended, dial::CONNECT_TIMEOUT, egress::Via},
    state::egress::{Exit, ExternalPort, ExternalTarget},
};

/// The route label of requests to external hosts.
pub const EGRESS_ROUTE: &str = "egress";

/// One client connection's calls to the external hosts of one port.
pub struct EgressHttp {
    pub metrics: Arc<Metrics>,
    pub port: Arc<ExternalPort>,
    pub policy: OutboundPolicy,
    /// Where the app connected: the address requests go to.
    pub dst: SocketAddr,
    /// The caller's namespace, workload and identity, as label values.
    pub source: [String; 3],
    /// How requests for hosts that leave from other nodes get there (a pod's own agent);
    /// none: they are refused (an egress node's agent, serving another node's pod).
    pub via: Option<Via>,
    upstreams: Mutex<HashMap<String, SendRequest<Body>>>,
}

impl EgressHttp {
    pub fn new(
        metrics: Arc<Metrics>,
        port: Arc<ExternalPort>,
        policy: OutboundPolicy,
        dst: SocketAddr,
        source: [String; 3],
        via: Option<Via>,
    ) -> Self {
        Self {
            metrics,
            port,
            policy,
            dst,
            source,
            via,
            upstreams: Mutex::default(),
        }
    }

    /// Serves the client's HTTP/1.1 connection until it is done or `abort` is cancelled.
    pub async fn serve<I>(self, client: I, abort: &CancellationToken) -> Ended
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = Arc::new(self);
        let service = service_fn(move |request| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(client), service);
        served_unless(connection, abort).await
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let authority = authority(&parts).to_owned();
        let name = host_of(&authority).to_ascii_lowercase();
        let declared = self.port.host(&name);
        let [source_namespace, source_workload, source_identity] = self.source.clone();
        let labels = RouteLabels {
            direction: "outbound",
            source_namespace: source_namespace.into(),
            source_workload: source_workload.into(),
            source_identity: source_identity.into(),
            destination_service: declared.map_or("", |(_, n)| n.as_str()).into(),
            route: EGRESS_ROUTE.into(),
            method: method_label(&parts.method),
        };
        let mut record = RequestRecord::new(
            self.metrics.clone(),
            labels,
            &authority,
            parts.uri.path(),
            None,
        );
        let version = parts.version;
        let target = match declared {
            Some((target, _)) => Some(target),
            None if self.policy == OutboundPolicy::RegistryOnly => {
                self.metrics.egress_refused(&self.source, self.dst, 1);
                let why = Answer::UndeclaredHost(format!(
                    "{name} is no declared external host (outbound policy registry_only)"
                ));
                return answer(record, why, &name, false, version);
            }
            None => None,
        };
        record.tried(self.dst);
        let sent = match self.upstream(&name, target).await {
            Ok(mut upstream) => {
                // Origin form: the Host header names the host.
                parts.uri = origin_form(&parts);
                let body = Counted::new(body, record.request_bytes.clone())
                    .map_err(BoxError::from)
                    .boxed_unsync();
                let sent = upstream
                    .send_request(Request::from_parts(parts, body))
                    .await;
                // For the next request, once this one's response is read.
                self.upstreams.lock().await.insert(name.clone(), upstream);
                sent.map_err(|e| Answer::Reset(e.to_string()))
            }
            Err(why) => Err(why),
        };
        match sent {
            Ok(mut response) => {
                // This hop's framing, not the host's: an HTTP/1.0 answer ended by closing its
                // connection goes on as an HTTP/1.1 one (chunked), so the next hop's end
                // does not hang on a close that may race with its own writes.
                *response.version_mut() = version;
                strip_hop_by_hop(response.headers_mut());
                record.answered(response.status().as_u16(), None, None);
                response.map(|body| {
                    Recorded::new(body.map_err(BoxError::from), record, None).boxed_unsync()
                })
            }
            Err(why) => answer(record, why, &name, false, version),
        }
    }

    /// This connection's connection to `name` (a declared `target`, or an undeclared host
    /// reached as dialled), taken out of its place until the request is sent; made if it
    /// has none that is open: to the host, or through the tunnel to its egress node.
    async fn upstream(
        &self,
        name: &str,
        target: Option<&ExternalTarget>,
    ) -> Result<SendRequest<Body>, Answer> {
        let kept = self.upstreams.lock().await.remove(name);
        if let Some(mut open) = kept
            && open.ready().await.is_ok()
        {
            return Ok(open);
        }
        match target.map(|t| &t.exit) {
            Some(Exit::Nowhere) => Err(Answer::NoEgressNode(format!(
                "no node has the labels of {name}'s egress nodes"
            ))),
            Some(Exit::Via(nodes)) => {
                let Some(via) = &self.via else {
                    return Err(Answer::NoEgressNode(format!(
                        "{name} leaves the mesh from other nodes"
                    )));
                };
                let tunnel = via.open(nodes, self.dst).await.ok_or_else(|| {
                    Answer::ConnectFailed(format!("no egress node of {name} answered"))
                })?;
                // The egress node's agent serves the requests as its own pods'.
                handshake(TokioIo::new(tunnel))
                    .await
                    .map_err(|e| Answer::ConnectFailed(format!("{name}'s egress node: {e}")))
            }
            _ => self.connect(name, target).await,
        }
    }

    /// A connection from this node to `name` (a declared `target`, or an undeclared host
    /// reached as dialled), with TLS if the agent originates it.
    async fn connect(
        &self,
        name: &str,
        target: Option<&ExternalTarget>,
    ) -> Result<SendRequest<Body>, Answer> {
        let port = target.map_or(self.dst.port(), |t| t.target_port);
        let address = SocketAddr::new(self.dst.ip(), port);
        let failed = |e: &dyn std::fmt::Display| Answer::ConnectFailed(format!("{address}: {e}"));
        let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| failed(&"no answer in time"))?
            .map_err(|e| failed(&e))?;
        if let Err(e) = tcp.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        let originate = target.is_some() && self.port.tls == TlsMode::Originate;
        match target.and_then(|t| t.tls.clone()) {
            None if originate => Err(failed(&"TLS to the host is not set up (see the log)")),
            Some(tls) => {
                let server = ServerName::try_from(name.to_owned())
                    .map_err(|e| failed(&format!("{name} is no TLS server name: {e}")))?;
                let tls = timeout(
                    CONNECT_TIMEOUT,
                    TlsConnector::from(tls).connect(server, tcp),
                )
                .await
                .map_err(|_| failed(&"no TLS handshake in time"))?
                .map_err(|e| failed(&format!("TLS to {name}: {e}")))?;
                handshake(TokioIo::new(tls)).await.map_err(|e| failed(&e))
            }
            None => handshake(TokioIo::new(tcp)).await.map_err(|e| failed(&e)),
        }
    }
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own.
async fn handshake<I>(io: I) -> Result<SendRequest<Body>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("an external host's connection ended: {e}");
        }
    });
    Ok(sender)
}

/// An authority without its port (and an IPv6 address without its brackets).
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// The request's path and query alone.
fn origin_form(parts: &Parts) -> Uri {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    path.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_of("api.courier.example:8080"), "api.courier.example");
        assert_eq!(host_of("api.courier.example"), "api.courier.example");
        assert_eq!(host_of("[2001:db8::1]:80"), "2001:db8::1");
    }
}
