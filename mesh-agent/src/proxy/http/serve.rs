//! Serves HTTP/1.1 and HTTP/2 (h2c) on a captured connection to an HTTP port, each request on
//! its own: the port's first route that takes it, a backend by weight, an endpoint per try
//! (balanced over requests outstanding), the route's timeout and retries. Upgrades (WebSocket)
//! and CONNECT pass through untouched once the endpoint agrees. When the agent answers itself
//! (no route, no endpoint, a timeout), the reply says why in a short body, or in
//! `grpc-status` for a gRPC client.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header, request::Parts,
};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn, upgrade::OnUpgrade};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    time::timeout,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    identity::SpiffeId,
    observability::{
        metrics::{Metrics, RouteLabels},
        request::RequestRecord,
        traces::Tracer,
    },
    proxy::{
        authorization::{self, Call, DENIED_BODY, Decision, HttpCall, SOURCE_ADDRESS},
        balance::{Answered, Lease, Unpicked},
        breaker::{Slot, Tripped},
        copy::Ended,
        http::{
            body::{Counted, InFlight, Recorded, Replay},
            retry::Tried,
            trace_context::SpanContext,
            upstream::{Body, BoxError, ConnectError, Connector, Upstreams},
            verdict::{self, Pending},
        },
        rate_limit::{self, Limited, global::GlobalLimiter},
    },
    state::{
        http::{HttpRoute, Upstream},
        routes::{Hop, LocalWorkload, Routes, ServicePort},
    },
};

/// The most of a request body kept to be sent again on a retry: a request whose body runs
/// longer is not retried.
const MAX_REPLAY: u64 = 64 << 10;

/// What every HTTP request needs.
pub struct HttpProxy {
    pub upstreams: Arc<Upstreams>,
    /// The current routes: the policies of local endpoints, decided per request.
    pub routes: watch::Receiver<Arc<Routes>>,
    pub metrics: Arc<Metrics>,
    /// Where request spans go, when tracing is on.
    pub tracer: Option<Arc<Tracer>>,
    /// The rate limit service, for endpoints on this node (the agent serving them).
    pub rate_limit_service: Option<Arc<GlobalLimiter>>,
}

/// Who calls which port: the same for every request of a connection.
struct Calling {
    port: Arc<ServicePort>,
    /// The caller's identity, if it has one.
    source: Option<SpiffeId>,
    /// The caller pod's address.
    address: IpAddr,
    /// The requests' metric labels, but for the route and the method.
    labels: RouteLabels,
    /// The port's upstream protocol, and the pool that speaks it as the caller.
    upstream: Upstream,
    client: Client<Connector, Body>,
}

impl Calling {
    fn new(
        upstreams: &Upstreams,
        source: Option<Arc<LocalWorkload>>,
        address: IpAddr,
        port: Arc<ServicePort>,
    ) -> Self {
        let upstream = port.http.as_ref().map_or(Upstream::Http1, |h| h.upstream);
        let client = upstreams.client(source.as_ref().map(|w| &w.id), upstream);
        let [source_namespace, source_workload, source_identity] =
            LocalWorkload::label_values(source.as_deref()).map(Arc::from);
        let labels = RouteLabels {
            direction: "outbound",
            source_namespace,
            source_workload,
            source_identity,
            destination_service: port.service.as_str().into(),
            route: Arc::from(""),
            method: "",
        };
        Self {
            port,
            source: source.map(|w| w.id.clone()),
            address,
            labels,
            upstream,
            client,
        }
    }
}

/// An endpoint's response, with its gRPC status still to report if that comes in the
/// trailers.
type Upstreamed = (Response<Incoming>, Option<Pending>);

/// Why the agent answers a request itself.
#[derive(Debug)]
pub(super) enum Answer {
    NoRoute,
    NoEndpoint,
    ConnectFailed(String),
    Reset(String),
    Timeout,
    CircuitOpen(Tripped),
    RateLimited(Limited),
    /// By this policy (see `proxy::authorization::Decision`), here or at the serving agent.
    Denied(Arc<str>),
    /// No endpoint left inside the service's allowed regions (see `Refusal::Pinned`).
    Pinned(String),
    /// For an external host nobody declared, under `registry_only`.
    UndeclaredHost(String),
    /// For an external host whose egress nodes this agent cannot send it to.
    NoEgressNode(String),
}

impl Answer {
    /// The HTTP status, the gRPC status, the access log's flag and the reply's text.
    fn parts(&self, service: &str) -> (StatusCode, u32, &'static str, String) {
        match self {
            Answer::NoRoute => (
                StatusCode::NOT_FOUND,
                12,
                "no_route",
                format!("no route of {service} takes this request"),
            ),
            Answer::NoEndpoint => (
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "no_endpoint",
                format!("{service} has no endpoint to send this request to"),
            ),
            Answer::ConnectFailed(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "connect_failure",
                format!("no endpoint of {service} could be reached: {e}"),
            ),
            Answer::Reset(e) => (
                StatusCode::BAD_GATEWAY,
                14,
                "reset",
                format!("the endpoint of {service} broke off: {e}"),
            ),
            Answer::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                4,
                "timeout",
                format!("{service} did not answer in time"),
            ),
            Answer::CircuitOpen(tripped) => (
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "circuit_open",
                format!("{service} is at its cap on {}", tripped.what()),
            ),
            Answer::RateLimited(limited) => (
                StatusCode::TOO_MANY_REQUESTS,
                8,
                "rate_limited",
                format!("{service} is over its {} rate limit", limited.by),
            ),
            Answer::Denied(_) => (StatusCode::FORBIDDEN, 7, "denied", DENIED_BODY.into()),
            Answer::Pinned(why) => (StatusCode::SERVICE_UNAVAILABLE, 14, "pinned", why.clone()),
            Answer::UndeclaredHost(why) => {
                (StatusCode::FORBIDDEN, 7, "undeclared_host", why.clone())
            }
            Answer::NoEgressNode(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "no_egress_node",
                why.clone(),
            ),
        }
    }
}

impl HttpProxy {
    /// Serves the connection `io` of `source` (at `address`) to `port` until its client is
    /// done or `abort` is cancelled.
    pub async fn serve<I>(
        self: Arc<Self>,
        io: I,
        source: Option<Arc<LocalWorkload>>,
        address: IpAddr,
        port: Arc<ServicePort>,
        abort: &CancellationToken,
    ) -> Ended
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let calling = Arc::new(Calling::new(&self.upstreams, source, address, port));
        let service = service_fn(move |request| {
            let (this, calling) = (self.clone(), calling.clone());
            async move { Ok::<_, Infallible>(this.handle(request, &calling).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        served_unless(connection, abort).await
    }

    async fn handle(&self, mut request: Request<Incoming>, calling: &Calling) -> Response<Body> {
        let upgrade = wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let port = &calling.port;
        let span = SpanContext::carry_on(self.tracer.as_ref(), &mut parts.headers);
        let labels = RouteLabels {
            method: method_label(&parts.method),
            ..calling.labels.clone()
        };
        let authority = authority(&parts);
        let mut record = RequestRecord::new(
            self.metrics.clone(),
            labels,
            authority,
            parts.uri.path(),
            span,
        );
        let grpc = is_grpc(&parts.headers);
        let Some(route) = port.http.as_ref().and_then(|h| h.route(&parts)) else {
            return answer(record, Answer::NoRoute, &port.service, grpc, parts.version);
        };
        record.routed(&route.name);
        route.retry.requested();
        let version = parts.version;
        let forwarded = self.forward(parts, body, upgrade, route, calling, &mut record);
        let forwarded = match route.timeout {
            Some(limit) => timeout(limit, forwarded)
                .await
                .unwrap_or(Err(Answer::Timeout)),
            None => forwarded.await,
        };
        match forwarded {
            Ok((mut response, in_flight)) => {
                route.response_headers.apply(response.headers_mut());
                *response.version_mut() = version;
                let grpc_status = verdict::grpc_status(response.headers());
                record.answered(response.status().as_u16(), grpc_status, None);
                response.map(|body| {
                    Recorded::new(body.map_err(BoxError::from), record, Some(in_flight))
                        .boxed_unsync()
                })
            }
            Err(why) => answer(record, why, &port.service, grpc, version),
        }
    }

    /// Sends the request to the route's backend, trying again as its policy says.
    async fn forward(
        &self,
        parts: Parts,
        body: Incoming,
        upgrade: Option<OnUpgrade>,
        route: &HttpRoute,
        calling: &Calling,
        record: &mut RequestRecord,
    ) -> Result<(Response<Incoming>, InFlight), Answer> {
        let backend = route.backend().ok_or(Answer::NoEndpoint)?;
        let slot = backend
            .breaker
            .request()
            .await
            .map_err(|tripped| self.circuit_open(backend, tripped))?;
        // A retry's place under the cap, held until the next try ends.
        let mut retry_slot = None;
        let body = Counted::new(body, record.request_bytes.clone());
        // What is read of the body is kept for another try, up to a limit; an upgrade's is not.
        let limit = if upgrade.is_none() && route.retry.attempts > 1 {
            MAX_REPLAY
        } else {
            0
        };
        let body = Replay::new(body, limit);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (lease, hop) = match backend.pick(&tried) {
                Err(Unpicked::NoEndpoint) => backend.pick(&[]),
                picked => picked,
            }
            .map_err(|unpicked| match unpicked {
                Unpicked::NoEndpoint => match &backend.pinned {
                    Some(pinned) => Answer::Pinned(pinned.refusal(&backend.service).to_string()),
                    None => Answer::NoEndpoint,
                },
                Unpicked::AllBusy => self.circuit_open(backend, Tripped::PerEndpoint),
            })?;
            if hop == Hop::Local
                && let Some(decision) = self.authorize(lease.endpoint().addr, calling, &parts)
                && !decision.allowed
            {
                // The endpoint's own policy, not its fault: no retry, no ejection.
                return Err(Answer::Denied(decision.policy));
            }
            if hop == Hop::Local && backend.rate_limits.is_some() {
                // This agent serves the endpoint: the service's rate limits are its to keep.
                // A route's limit counts the requests the route took; a backend that is
                // another service counts against that service's port as a whole.
                let same_service = backend.service == calling.port.service;
                rate_limit::check(
                    backend,
                    same_service.then_some(&*route.name),
                    calling.source.as_ref(),
                    self.rate_limit_service.as_deref(),
                    &self.metrics,
                )
                .await
                .map_err(Answer::RateLimited)?;
            }
            let endpoint = lease.endpoint().addr;
            record.tried(endpoint);
            let Some(this_try) = body.again() else {
                return Err(Answer::Reset(
                    "the request body cannot be sent again".into(),
                ));
            };
            let request = upstream_request(
                &parts,
                endpoint,
                calling.upstream,
                this_try.boxed_unsync(),
                route,
                upgrade.is_some(),
                (hop != Hop::Local).then_some(calling.address),
            );
            let sent = calling.client.request(request);
            let outcome = match route.retry.per_try_timeout {
                Some(limit) => timeout(limit, sent).await.ok(),
                None => Some(sent.await),
            };
            let (tried_now, this_answer) = self.settle(backend, &lease, outcome);
            let again = route
                .retry
                .again(&parts.method, body.replayable(), attempt, tried_now)
                && self.retry_slot(backend, &mut retry_slot);
            if !again {
                let (mut response, pending) = this_answer?;
                if let Some(upgrade) = upgrade {
                    splice(upgrade, &mut response, &parts.method);
                }
                return Ok((
                    response,
                    InFlight {
                        lease,
                        slot,
                        pending,
                    },
                ));
            }
            debug!(%endpoint, attempt, ?tried_now, "trying the request again");
            record.retried(tried_now.reason());
            tried.push(endpoint);
            tokio::time::sleep(route.retry.backoff(attempt)).await;
        }
    }

    /// What a try came to (`None`: out of time), as retries and the answer see it; the
    /// endpoint's health takes note, or, for a gRPC call whose status comes in its trailers,
    /// is told then (`Pending`).
    fn settle(
        &self,
        port: &Arc<ServicePort>,
        lease: &Lease,
        outcome: Option<Result<Response<Incoming>, hyper_util::client::legacy::Error>>,
    ) -> (Tried, Result<Upstreamed, Answer>) {
        match outcome {
            Some(Ok(response)) => {
                let grpc_status = verdict::grpc_status(response.headers());
                let pending = if status_in_trailers(&response, grpc_status) {
                    Some(Pending {
                        port: port.clone(),
                        metrics: self.metrics.clone(),
                    })
                } else {
                    let answered = verdict::answered_as(response.status(), grpc_status);
                    verdict::report(&self.metrics, port, lease, answered);
                    None
                };
                (
                    Tried::Answered(response.status(), grpc_status),
                    Ok((response, pending)),
                )
            }
            Some(Err(e)) if let Some(policy) = denied_there(&e) => {
                // As the serving agent answers a request its policies deny.
                let tried = Tried::Answered(StatusCode::FORBIDDEN, None);
                (tried, Err(Answer::Denied(policy)))
            }
            Some(Err(e)) if e.is_connect() => {
                let endpoint = lease.endpoint().addr;
                let ejected = lease.endpoint().failed();
                self.metrics
                    .endpoint_unreachable(&port.service, endpoint, ejected);
                (Tried::ConnectFailed, Err(Answer::ConnectFailed(causes(&e))))
            }
            Some(Err(e)) => {
                verdict::report(&self.metrics, port, lease, Answered::GatewayError);
                (Tried::Reset, Err(Answer::Reset(causes(&e))))
            }
            None => {
                verdict::report(&self.metrics, port, lease, Answered::GatewayError);
                (Tried::Reset, Err(Answer::Timeout))
            }
        }
    }

    /// The decision on a request for `endpoint` of this node, counted; none where no
    /// policy governs it.
    fn authorize(
        &self,
        endpoint: SocketAddr,
        calling: &Calling,
        parts: &Parts,
    ) -> Option<Decision> {
        let call = Call {
            source: calling.source.as_ref(),
            source_address: Some(calling.address),
            port: endpoint.port(),
            http: Some(HttpCall::of(parts, authority(parts))),
        };
        authorization::decide(&self.routes.borrow(), endpoint.ip(), &call, &self.metrics)
    }

    /// Counts `port`'s breaker turning a request away: the answer to give.
    fn circuit_open(&self, port: &ServicePort, tripped: Tripped) -> Answer {
        self.metrics.circuit_open(&port.service, tripped);
        Answer::CircuitOpen(tripped)
    }

    /// A place under `port`'s cap on retries in flight, kept in `held` (giving back the last
    /// one's); `false`, counted, if the cap is full.
    fn retry_slot(&self, port: &ServicePort, held: &mut Option<Slot>) -> bool {
        *held = None;
        match port.breaker.retry() {
            Ok(slot) => {
                *held = Some(slot);
                true
            }
            Err(tripped) => {
                self.metrics.circuit_open(&port.service, tripped);
                false
            }
        }
    }
}

/// How a connection's serving ended: done, failed, or cut when `abort` was cancelled.
pub(super) async fn served_unless<E>(
    served: impl Future<Output = Result<(), E>>,
    abort: &CancellationToken,
) -> Ended
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::select! {
        served = served => match served {
            Ok(()) => Ended::Done,
            Err(e) => Ended::Failed(std::io::Error::other(e)),
        },
        () = abort.cancelled() => Ended::Aborted,
    }
}

/// The request's authority: its URI's (HTTP/2, absolute form), else its `Host`.
pub(super) fn authority(parts: &Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(header::HOST)?.to_str().ok())
        .unwrap_or_default()
}

/// What went wrong, cause by cause (hyper-util's client error says only which step failed;
/// its sources say why).
/// What denied the connection to the endpoint, if its serving agent's policies did.
fn denied_there(error: &hyper_util::client::legacy::Error) -> Option<Arc<str>> {
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        if let Some(ConnectError::Denied(policy)) = e.downcast_ref() {
            return Some(policy.clone());
        }
        cause = e.source();
    }
    None
}

fn causes(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = String::new();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&e.to_string());
        cause = e.source();
    }
    if text.is_empty() {
        text = error.to_string();
    }
    text
}

/// The request as sent to `endpoint`: its URI names the endpoint (the pool's key), the
/// original authority stays in `Host`; hop-by-hop headers are dropped unless it upgrades, and
/// the route's header edits are applied.
fn upstream_request(
    parts: &Parts,
    endpoint: SocketAddr,
    upstream: Upstream,
    body: Body,
    route: &HttpRoute,
    upgrade: bool,
    source_address: Option<IpAddr>,
) -> Request<Body> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    // An endpoint's address and a path from a parsed request always make a URI.
    *request.uri_mut() = format!("http://{endpoint}{path}")
        .parse()
        .unwrap_or_default();
    let mut headers = parts.headers.clone();
    if !upgrade {
        strip_hop_by_hop(&mut headers);
    }
    match upstream {
        Upstream::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            if !headers.contains_key(header::HOST)
                && let Some(authority) = parts.uri.authority()
                && let Ok(host) = HeaderValue::from_str(authority.as_str())
            {
                headers.insert(header::HOST, host);
            }
        }
        Upstream::Http2 => {
            *request.version_mut() = Version::HTTP_2;
            headers.remove(header::HOST);
        }
    }
    route.request_headers.apply(&mut headers);
    // Only this agent says where a request comes from.
    headers.remove(SOURCE_ADDRESS);
    if let Some(address) = source_address
        && let Ok(value) = HeaderValue::try_from(address.to_string())
    {
        headers.insert(SOURCE_ADDRESS, value);
    }
    *request.headers_mut() = headers;
    request
}

/// Drops the headers that belong to one connection, not to the request (RFC 9110 7.6.1);
/// `te: trailers` stays (gRPC needs it).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// Whether the request asks to switch protocols (WebSocket) or to tunnel (CONNECT).
pub(super) fn wants_upgrade(request: &Request<Incoming>) -> bool {
    request.method() == Method::CONNECT
        || (request.version() == Version::HTTP_11
            && request.headers().contains_key(header::UPGRADE))
}

/// Once the endpoint has agreed to an upgrade, joins the client's upgraded connection to the
/// endpoint's and copies both ways in the background.
pub(super) fn splice(client: OnUpgrade, response: &mut Response<Incoming>, method: &Method) {
    let agreed = response.status() == StatusCode::SWITCHING_PROTOCOLS
        || (method == Method::CONNECT && response.status().is_success());
    if !agreed {
        return;
    }
    let endpoint = hyper::upgrade::on(response);
    tokio::spawn(async move {
        match tokio::try_join!(client, endpoint) {
            Ok((client, endpoint)) => {
                let (mut client, mut endpoint) = (TokioIo::new(client), TokioIo::new(endpoint));
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut endpoint).await {
                    debug!("an upgraded connection ended: {e}");
                }
            }
            Err(e) => debug!("an upgrade did not complete: {e}"),
        }
    });
}

/// The agent's own answer to a request.
pub(super) fn answer(
    mut record: RequestRecord,
    why: Answer,
    service: &str,
    grpc: bool,
    version: Version,
) -> Response<Body> {
    let (status, grpc_code, flag, text) = why.parts(service);
    match &why {
        Answer::Timeout => record.timed_out(),
        Answer::Denied(policy) => record.denied_by(policy.clone()),
        _ => {}
    }
    let mut response = Response::new(Body::default());
    *response.version_mut() = version;
    let headers = response.headers_mut();
    if let Answer::RateLimited(limited) = &why {
        limited.response_headers(headers);
    }
    let body = if grpc {
        // A trailers-only gRPC response: the status in the headers.
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(grpc_code));
        if let Ok(message) = HeaderValue::from_str(&text) {
            headers.insert("grpc-message", message);
        }
        record.answered(StatusCode::OK.as_u16(), Some(grpc_code), Some(flag));
        Bytes::new()
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        record.answered(status.as_u16(), None, Some(flag));
        *response.status_mut() = status;
        Bytes::from(text + "\n")
    };
    let body = Full::new(body).map_err(|never: Infallible| -> BoxError { match never {} });
    response.map(|_| Recorded::new(body, record, None).boxed_unsync())
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whether `response` is a gRPC call's whose status is still to come, in its trailers.
fn status_in_trailers(response: &Response<Incoming>, grpc_status: Option<u32>) -> bool {
    response.status() == StatusCode::OK && grpc_status.is_none() && is_grpc(response.headers())
}

/// The method's metric label: a standard method's name, or `other`.
pub(super) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

    use http_body_util::Full;

    use super::*;
    use crate::{
        config::Protocol,
        proxy::{balance::OutlierDetection, breaker::Limits},
        testing::{
            Agent, Loopback, Mesh, cgroup_of, http_pod, http1_client, http2_client, sample,
            sample_reaches, test_ca, within,
        },
    };

    const VIP: [u8; 4] = [198, 19, 0, 10];

    fn vip() -> SocketAddr {
        SocketAddr::from((VIP, 80))
    }

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .uri(path)
            .header("host", "cart.shop")
            .body(Full::default())
            .unwrap()
    }

    fn pod_of<B>(response: &Response<B>) -> String {
        response.headers()["x-pod"].to_str().unwrap().to_owned()
    }

    /// web-0 on node 1 calls shop/cart, whose endpoints `cart-1`, `cart-2` (labelled v1, v2)
    /// run on node 1; the port speaks `protocol` with `routes`.
    async fn cart(
        protocol: Protocol,
        routes: &str,
    ) -> (Loopback, Agent, [Arc<crate::testing::PodLog>; 2]) {
        cart_with(protocol, routes, |mesh| mesh).await
    }

    /// [`cart`], its mesh changed by `change` before the agent starts.
    async fn cart_with(
        protocol: Protocol,
        routes: &str,
        change: impl FnOnce(Mesh) -> Mesh,
    ) -> (Loopback, Agent, [Arc<crate::testing::PodLog>; 2]) {
        let net = Loopback::reserve();
        let (web, one, two) = (net.pod(1, 9), net.pod(1, 2), net.pod(1, 3));
        let mesh = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service(
                "shop",
                "cart",
                VIP.into(),
                (80, 8080),
                &[(one, "n1"), (two, "n1")],
            )
            .http(protocol, routes)
            .label(one, "version", "v1")
            .label(two, "version", "v2");
        let state = change(mesh).build();
        let pods = [
            http_pod((one, 8080).into(), "cart-1").await,
            http_pod((two, 8080).into(), "cart-2").await,
        ];
        let agent = Agent::start(state, test_ca()).await;
        (net, agent, pods)
    }

    #[tokio::test]
    async fn requests_take_the_first_matching_route_and_are_recorded_each() {
        let routes = "
- name: canary
  matches: [{ headers: [{ name: x-canary, value: \"1\" }] }]
  backends: [{ subset: { version: v2 } }]
  request_headers: { set: { x-mesh: routed } }
  response_headers: { add: { x-route: canary } }
- name: stable
  matches: [{ path: { prefix: /api } }]
  backends: [{ subset: { version: v1 } }]
";
        let (net, agent, _pods) = cart(Protocol::Http, routes).await;
        let mut client = http1_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        // Keep-alive: every request on the one connection.
        for _ in 0..5 {
            let stable = within(client.send_request(get("/api/items")))
                .await
                .unwrap();
            assert_eq!(stable.status(), StatusCode::OK);
            assert_eq!(pod_of(&stable), "cart-1");
            // The original authority reaches the endpoint.
            assert_eq!(stable.headers()["x-host"], "cart.shop");
            let mut canary = get("/api/items");
            canary
                .headers_mut()
                .insert("x-canary", HeaderValue::from_static("1"));
            let canary = within(client.send_request(canary)).await.unwrap();
            assert_eq!(pod_of(&canary), "cart-2");
            assert_eq!(canary.headers()["x-route"], "canary");
        }
        let none = within(client.send_request(get("/other"))).await.unwrap();
        assert_eq!(none.status(), StatusCode::NOT_FOUND);
        let text = within(none.into_body().collect()).await.unwrap().to_bytes();
        assert_eq!(text, "no route of shop/cart takes this request\n");

        let r = &agent.registry;
        let series = |route: &str, code: u16| {
            format!(
                "mesh_requests_total{{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"shop/cart\",route=\"{route}\",method=\"GET\",code=\"{code}\",grpc_status=\"\"}}"
            )
        };
        sample_reaches(r, &series("stable", 200), 5.0).await;
        sample_reaches(r, &series("canary", 200), 5.0).await;
        sample_reaches(r, &series("", 404), 1.0).await;
        // One connection, recorded as HTTP.
        assert_eq!(
            sample(
                r,
                "mesh_connections_opened_total{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"shop/cart\",destination_namespace=\"\",destination_workload=\"\",hop=\"http\"}"
            ),
            1.0
        );
        agent.stop().await;
    }

    #[tokio::test]
    async fn keep_alive_requests_spread_over_endpoints_and_split_by_weight() {
        let routes = "
- name: split
  backends: [{ subset: { version: v1 }, weight: 90 }, { subset: { version: v2 }, weight: 10 }]
";
        let (net, agent, _pods) = cart(Protocol::Http, routes).await;
        let mut client = http1_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let mut counts = BTreeMap::<String, u32>::new();
        let n = 2000;
        for _ in 0..n {
            let response = within(client.send_request(get("/"))).await.unwrap();
            *counts.entry(pod_of(&response)).or_default() += 1;
        }
        // Binomial(2000, 0.1): mean 200, standard deviation about 13.4; 5 of them either way.
        let canary = counts.get("cart-2").copied().unwrap_or(0);
        assert!((133..=267).contains(&canary), "{counts:?}");
        agent.stop().await;
    }

    #[tokio::test]
    async fn retries_hide_a_failing_try_but_not_for_a_post() {
        let routes = "
- name: all
  backends: [{ subset: { version: v1 } }]
  retry: { attempts: 3, on: [gateway-error], backoff: 1ms }
";
        let (net, agent, pods) = cart(Protocol::Http, routes).await;
        let mut client = http1_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        pods[0].failures_left.store(2, Ordering::Relaxed);
        let response = within(client.send_request(get("/"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(pods[0].requests.load(Ordering::Relaxed), 3);

        pods[0].failures_left.store(1, Ordering::Relaxed);
        let post = Request::post("/orders")
            .header("host", "cart.shop")
            .body(Full::new(Bytes::from_static(b"order")))
            .unwrap();
        let response = within(client.send_request(post)).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(pods[0].requests.load(Ordering::Relaxed), 4);
        sample_reaches(
            &agent.registry,
            "mesh_request_retries_total{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"shop/cart\",route=\"all\",method=\"GET\",reason=\"status\"}",
            2.0,
        )
        .await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn an_endpoint_answering_errors_in_a_row_is_ejected() {
        let policy = OutlierDetection {
            consecutive_5xx: 3,
            max_ejected_percent: 50,
            ..OutlierDetection::default()
        };
        let (net, agent, pods) =
            cart_with(Protocol::Http, "[]", |mesh| mesh.outlier_detection(policy)).await;
        pods[0].failures_left.store(u32::MAX, Ordering::Relaxed);
        let mut client = http1_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let mut failed = 0;
        for _ in 0..100 {
            let response = within(client.send_request(get("/"))).await.unwrap();
            if response.status() != StatusCode::OK {
                assert_eq!(pod_of(&response), "cart-1");
                failed += 1;
            }
        }
        // Three 503s in a row from cart-1, then it is out (for 30 s) and cart-2 answers all.
        assert_eq!(failed, 3);
        assert_eq!(pods[0].requests.load(Ordering::Relaxed), 3);
        assert_eq!(pods[1].requests.load(Ordering::Relaxed), 97);
        let cart_1 = net.pod(1, 2);
        sample_reaches(
            &agent.registry,
            &format!(
                "mesh_endpoint_ejections_total{{service=\"shop/cart\",endpoint=\"{cart_1}:8080\"}}"
            ),
            1.0,
        )
        .await;
        agent.stop().await;
    }

    /// Sends a slow request (`/sleep/MS`) on a connection of its own; its status.
    async fn slow_request(
        agent: &Agent,
        net: &Loopback,
        ms: u64,
    ) -> tokio::task::JoinHandle<StatusCode> {
        let mut client = http1_client(agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let sent = client.send_request(get(&format!("/sleep/{ms}")));
        tokio::spawn(async move { within(sent).await.unwrap().status() })
    }

    /// Waits until the pods have received `n` requests in all.
    async fn received(pods: &[Arc<crate::testing::PodLog>], n: u32) {
        within(async {
            while pods
                .iter()
                .map(|p| p.requests.load(Ordering::Relaxed))
                .sum::<u32>()
                < n
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_when_every_endpoint_is_at_its_cap_gets_503_at_once() {
        let limits = Limits {
            max_per_endpoint: Some(1),
            ..Limits::default()
        };
        let (net, agent, pods) =
            cart_with(Protocol::Http, "[]", |mesh| mesh.circuit_breakers(limits)).await;
        let slow = [
            slow_request(&agent, &net, 1000).await,
            slow_request(&agent, &net, 1000).await,
        ];
        received(&pods, 2).await;
        // One each, whatever the balancer's choice.
        assert!(pods.iter().all(|p| p.requests.load(Ordering::Relaxed) == 1));
        let mut client = http1_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let response = within(client.send_request(get("/"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = within(response.into_body().collect()).await.unwrap();
        assert_eq!(
            body.to_bytes(),
            "shop/cart is at its cap on load on every endpoint\n"
        );
        for request in slow {
            assert_eq!(within(request).await.unwrap(), StatusCode::OK);
        }
        sample_reaches(
            &agent.registry,
            "mesh_circuit_breaker_rejections_total{service=\"shop/cart\",limit=\"per_endpoint\"}",
            1.0,
        )
        .await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn requests_over_the_cap_wait_among_the_pending_and_the_rest_get_503() {
        let limits = Limits {
            max_requests: Some(1),
            max_pending_requests: 1,
            ..Limits::default()
        };
        let (net, agent, pods) =
            cart_with(Protocol::Http, "[]", |mesh| mesh.circuit_breakers(limits)).await;
        let first = slow_request(&agent, &net, 300).await;
        received(&pods, 1).await;
        // Of two more, one waits for the first and the other finds the waiting room full.
        let more = [
            slow_request(&agent, &net, 0).await,
            slow_request(&agent, &net, 0).await,
        ];
        let mut statuses = Vec::new();
        for request in more {
            statuses.push(within(request).await.unwrap());
        }
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE]);
        assert_eq!(within(first).await.unwrap(), StatusCode::OK);
        assert_eq!(
            pods.iter()
                .map(|p| p.requests.load(Ordering::Relaxed))
                .sum::<u32>(),
            2
        );
        sample_reaches(
            &agent.registry,
            "mesh_circuit_breaker_rejections_total{service=\"shop/cart\",limit=\"pending_requests\"}",
            1.0,
        )
        .await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn a_request_out_of_time_gets_504_and_the_endpoint_sees_it_cancelled() {
        let routes = "
- name: slow
  timeout: 100ms
";
        let (net, agent, pods) = cart(Protocol::Http, routes).await;
        let mut client = http1_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let response = within(client.send_request(get("/sleep/5000")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let cancelled = || {
            pods.iter()
                .map(|p| p.cancelled.load(Ordering::Relaxed))
                .sum::<u32>()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while cancelled() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the endpoint never saw the cancellation"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sample_reaches(&agent.registry, "mesh_request_timeouts_total", 1.0).await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn bodies_pass_whole_both_ways_over_http2() {
        let (net, agent, _pods) = cart(Protocol::Http2, "[]").await;
        let mut client = http2_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let body: Bytes = (0..4 << 20)
            .map(|i: u32| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        let request = Request::post("http://cart.shop/echo")
            .body(Full::new(body.clone()))
            .unwrap();
        let response = within(client.send_request(request)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let back = within(response.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert!(
            back == body,
            "{} bytes came back of {}",
            back.len(),
            body.len()
        );
        let len = body.len() as f64;
        sample_reaches(&agent.registry, "mesh_request_bytes_total", len).await;
        sample_reaches(&agent.registry, "mesh_response_bytes_total", len).await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn an_upgrade_passes_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (net, agent, _pods) = cart(Protocol::Http, "[]").await;
        let mut client = http1_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let mut request = get("/ws");
        request
            .headers_mut()
            .insert("upgrade", HeaderValue::from_static("echo"));
        request
            .headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        let response = within(client.send_request(request)).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut upgraded = TokioIo::new(within(hyper::upgrade::on(response)).await.unwrap());
        upgraded.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), upgraded.read_exact(&mut pong))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&pong, b"ping");
        agent.stop().await;
    }

    #[tokio::test]
    async fn a_port_without_endpoints_answers_503_and_grpc_clients_get_a_grpc_status() {
        let net = Loopback::reserve();
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", net.pod(1, 9))
            .service("shop", "cart", VIP.into(), (80, 8080), &[])
            .http(Protocol::Grpc, "[]")
            .build();
        let agent = Agent::start(state, test_ca()).await;
        let mut client = http2_client(&agent, net.pod(1, 9), cgroup_of(0), vip()).await;
        let plain = within(client.send_request(get("http://cart.shop/")))
            .await
            .unwrap();
        assert_eq!(plain.status(), StatusCode::SERVICE_UNAVAILABLE);
        let mut grpc = get("http://cart.shop/shop.Cart/Get");
        grpc.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        let grpc = within(client.send_request(grpc)).await.unwrap();
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "14");
        sample_reaches(&agent.registry, "mesh_requests_total", 2.0).await;
        agent.stop().await;
    }
}

/// Requests across nodes, detection on `auto` ports, a dead endpoint without a retry policy.
#[cfg(test)]
mod paths {
    use std::{sync::atomic::Ordering, time::Duration};

    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        config::Protocol,
        testing::{
            Agent, Loopback, Mesh, cgroup_of, http_pod, http1_client, sample, sample_reaches,
            test_ca, within,
        },
    };

    const VIP: [u8; 4] = [198, 19, 0, 10];

    #[tokio::test]
    async fn requests_to_another_nodes_endpoint_go_through_the_tunnel_as_the_caller() {
        let net = Loopback::reserve();
        let ca = test_ca();
        let (web, cart) = (net.pod(1, 9), net.pod(2, 2));
        let service = |mesh: Mesh| {
            mesh.service("shop", "cart", VIP.into(), (80, 8080), &[(cart, "n2")])
                .http(Protocol::Http, "[]")
        };
        let one = service(
            Mesh::node("n1", net.node(1), &net.pod_cidr(1))
                .peer("n2", net.node(2), &net.pod_cidr(2))
                .workload("shop", "web-0", "web", web),
        )
        .build();
        let two = service(
            Mesh::node("n2", net.node(2), &net.pod_cidr(2))
                .peer("n1", net.node(1), &net.pod_cidr(1))
                .workload("shop", "cart-0", "cart", cart),
        )
        .build();
        let pod = http_pod((cart, 8080).into(), "cart-0").await;
        let (one, two) = (
            Agent::start(one, ca.clone()).await,
            Agent::start(two, ca).await,
        );
        let mut client = http1_client(&one, web, cgroup_of(0), (VIP, 80).into()).await;
        for _ in 0..10 {
            let request = Request::get("/")
                .header("host", "cart")
                .body(Full::default())
                .unwrap();
            let response = within(client.send_request(request)).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_eq!(pod.requests.load(Ordering::Relaxed), 10);
        // Ten requests over one pooled upstream connection: one tunnel stream on node 2,
        // opened as web.
        sample_reaches(
            &two.registry,
            "mesh_connections_opened_total{direction=\"inbound\",source_namespace=\"shop\",source_workload=\"\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\"",
            1.0,
        )
        .await;
        sample_reaches(&one.registry, "mesh_requests_total", 10.0).await;
        one.stop().await;
        two.stop().await;
    }

    #[tokio::test]
    async fn an_auto_port_serves_http_clients_as_http_and_server_first_protocols_as_tcp() {
        let net = Loopback::reserve();
        let (web, db) = (net.pod(1, 9), net.pod(1, 2));
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service("shop", "db", VIP.into(), (80, 8080), &[(db, "n1")])
            .http(Protocol::Auto, "[]")
            .detection_timeout(Duration::from_millis(50))
            .build();
        // A pod that greets first, then speaks HTTP: a server-first client waits for the
        // greeting, an HTTP client just sends.
        let listener = tokio::net::TcpListener::bind((db, 8080)).await.unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = conn.write_all(b"220 ready\r\n").await;
                    let mut request = [0u8; 1024];
                    if let Ok(n) = conn.read(&mut request).await
                        && request[..n].starts_with(b"GET")
                    {
                        let _ = conn
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        let agent = Agent::start(state, test_ca()).await;
        // Server first: nothing is sent, the greeting comes once detection gives up.
        let mut conn = agent.connect(web, cgroup_of(0), (VIP, 80).into()).await;
        let mut greeting = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut greeting))
            .await
            .expect("no greeting within 10 s")
            .unwrap();
        assert_eq!(&greeting, b"220 ready\r\n");
        drop(conn);
        assert_eq!(sample(&agent.registry, "mesh_requests_total"), 0.0);
        // An HTTP client on the same port is served as HTTP (the greeting, not HTTP, makes
        // the endpoint's answer a bad one: a 502 the agent records).
        let mut client = http1_client(&agent, web, cgroup_of(0), (VIP, 80).into()).await;
        let request = Request::get("/")
            .header("host", "db")
            .body(Full::default())
            .unwrap();
        let response = within(client.send_request(request)).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        sample_reaches(&agent.registry, "mesh_requests_total", 1.0).await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn without_a_retry_policy_a_dead_endpoint_is_passed_over() {
        let net = Loopback::reserve();
        let (web, dead, alive) = (net.pod(1, 9), net.pod(1, 2), net.pod(1, 3));
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service(
                "shop",
                "cart",
                VIP.into(),
                (80, 8080),
                &[(dead, "n1"), (alive, "n1")],
            )
            .http(Protocol::Http, "[]")
            .build();
        http_pod((alive, 8080).into(), "alive").await;
        let agent = Agent::start(state, test_ca()).await;
        let mut client = http1_client(&agent, web, cgroup_of(0), (VIP, 80).into()).await;
        for _ in 0..20 {
            let request = Request::get("/")
                .header("host", "cart")
                .body(Full::default())
                .unwrap();
            assert_eq!(
                within(client.send_request(request)).await.unwrap().status(),
                StatusCode::OK
            );
        }
        let failures = format!(
            "mesh_connect_failures_total{{service=\"shop/cart\",endpoint=\"{dead}:8080\"}}"
        );
        assert!(sample(&agent.registry, &failures) >= 1.0);
        agent.stop().await;
    }
}

/// gRPC through the agent with tonic's client and server (unary and server streaming): the
/// messages derive prost's `Message`, the services are written as tonic's generated code
/// would be.
#[cfg(test)]
mod grpc {
    use std::{
        future::Future,
        pin::Pin,
        sync::atomic::{AtomicU32, Ordering},
        task::{Context, Poll},
    };

    use http::uri::PathAndQuery;
    use tonic::{Status, codec::Streaming, server::UnaryService};
    use tonic_prost::ProstCodec;

    use super::*;
    use crate::{
        config::Protocol,
        testing::{Agent, Loopback, Mesh, cgroup_of, sample_reaches, test_ca, within},
    };

    const VIP: [u8; 4] = [198, 19, 0, 10];
    const UNARY: &str = "/shop.Cart/Get";
    const STREAM: &str = "/shop.Cart/List";

    #[derive(Clone, PartialEq, prost::Message)]
    struct Item {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(uint32, tag = "2")]
        count: u32,
    }

    /// Answers `Get` with the item it was given (or UNAVAILABLE while `failures` lasts), and
    /// `List` with `count` items.
    #[derive(Clone)]
    struct Cart {
        failures: Arc<AtomicU32>,
    }

    impl UnaryService<Item> for Cart {
        type Response = Item;
        type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Item>, Status>> + Send>>;

        fn call(&mut self, request: tonic::Request<Item>) -> Self::Future {
            let failing = self
                .failures
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            Box::pin(async move {
                if failing {
                    return Err(Status::unavailable("not yet"));
                }
                Ok(tonic::Response::new(request.into_inner()))
            })
        }
    }

    struct List;

    impl tonic::server::ServerStreamingService<Item> for List {
        type Response = Item;
        type ResponseStream = Pin<Box<dyn futures::Stream<Item = Result<Item, Status>> + Send>>;
        type Future = Pin<
            Box<dyn Future<Output = Result<tonic::Response<Self::ResponseStream>, Status>> + Send>,
        >;

        /// `count` items named after the one asked for; for the name `fail`, INTERNAL after
        /// them (a status in the trailers, after messages).
        fn call(&mut self, request: tonic::Request<Item>) -> Self::Future {
            let asked = request.into_inner();
            Box::pin(async move {
                let failing = asked.name == "fail";
                let items = (0..asked.count).map(move |i| {
                    Ok(Item {
                        name: format!("{}-{i}", asked.name),
                        count: i,
                    })
                });
                let end = failing.then(|| Err(Status::internal("broke off")));
                let stream: Self::ResponseStream =
                    Box::pin(futures::stream::iter(items.chain(end)));
                Ok(tonic::Response::new(stream))
            })
        }
    }

    /// A gRPC pod at `addr` (h2c) serving [`Cart`] and [`List`].
    async fn grpc_pod(addr: SocketAddr, cart: Cart) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                // Headers, message and trailers go out in separate writes.
                conn.set_nodelay(true).unwrap();
                let cart = cart.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let cart = cart.clone();
                    async move {
                        let codec = ProstCodec::<Item, Item>::default();
                        let mut grpc = tonic::server::Grpc::new(codec);
                        let response = match request.uri().path() {
                            UNARY => grpc.unary(cart, request).await,
                            STREAM => grpc.server_streaming(List, request).await,
                            _ => Status::unimplemented("no such method").into_http(),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(conn), service),
                );
            }
        });
    }

    /// A tonic client over an HTTP/2 connection (a captured one).
    #[derive(Clone)]
    struct Channel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

    impl tower_service::Service<Request<tonic::body::Body>> for Channel {
        type Response = Response<Incoming>;
        type Error = hyper::Error;
        type Future =
            Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
            Box::pin(self.0.send_request(request))
        }
    }

    async fn client(agent: &Agent, source: std::net::IpAddr) -> tonic::client::Grpc<Channel> {
        let conn = agent
            .connect(source, cgroup_of(0), (VIP, 50051).into())
            .await;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
                .await
                .unwrap();
        tokio::spawn(connection);
        let origin: http::Uri = "http://cart.shop:50051".parse().unwrap();
        tonic::client::Grpc::with_origin(Channel(sender), origin)
    }

    #[tokio::test]
    async fn unary_and_streaming_calls_pass_and_unavailable_is_retried() {
        let net = Loopback::reserve();
        let (web, pod) = (net.pod(1, 9), net.pod(1, 2));
        let routes = "
- name: get
  matches: [{ path: { exact: /shop.Cart/Get } }]
  retry: { attempts: 3, on: [grpc-unavailable], backoff: 1ms }
- name: list
";
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service("shop", "cart", VIP.into(), (50051, 50051), &[(pod, "n1")])
            .http(Protocol::Grpc, routes)
            .build();
        let failures = Arc::new(AtomicU32::new(2));
        grpc_pod(
            (pod, 50051).into(),
            Cart {
                failures: failures.clone(),
            },
        )
        .await;
        let agent = Agent::start(state, test_ca()).await;
        let mut grpc = client(&agent, web).await;

        // Unary: UNAVAILABLE twice (trailers-only answers), retried, then the answer.
        let item = Item {
            name: "apple".into(),
            count: 3,
        };
        within(grpc.ready()).await.unwrap();
        let answer: tonic::Response<Item> = within(grpc.unary(
            tonic::Request::new(item.clone()),
            PathAndQuery::from_static(UNARY),
            ProstCodec::default(),
        ))
        .await
        .unwrap();
        assert_eq!(answer.into_inner(), item);
        assert_eq!(failures.load(Ordering::Relaxed), 0);

        // Server streaming: every message, then the status in the trailers.
        within(grpc.ready()).await.unwrap();
        let asked = Item {
            name: "pear".into(),
            count: 100,
        };
        let mut stream: Streaming<Item> = within(grpc.server_streaming(
            tonic::Request::new(asked),
            PathAndQuery::from_static(STREAM),
            ProstCodec::default(),
        ))
        .await
        .unwrap()
        .into_inner();
        let mut got = Vec::new();
        while let Some(item) = within(stream.message()).await.unwrap() {
            got.push(item.count);
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());

        let series = |route: &str, grpc_status: &str| {
            format!(
                "mesh_requests_total{{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"shop/cart\",route=\"{route}\",method=\"POST\",code=\"200\",grpc_status=\"{grpc_status}\"}}"
            )
        };
        // The status of a streamed answer comes in its trailers.
        sample_reaches(&agent.registry, &series("get", "0"), 1.0).await;
        sample_reaches(&agent.registry, &series("list", "0"), 1.0).await;
        sample_reaches(
            &agent.registry,
            "mesh_request_retries_total{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"shop/cart\",route=\"get\",method=\"POST\",reason=\"grpc_status\"}",
            2.0,
        )
        .await;
        agent.stop().await;
    }

    /// A streamed call's status comes after its messages: outlier detection counts it there.
    #[tokio::test]
    async fn streams_failing_after_their_messages_eject_their_endpoint() {
        let net = Loopback::reserve();
        let (web, pod) = (net.pod(1, 9), net.pod(1, 2));
        let policy = crate::proxy::balance::OutlierDetection {
            consecutive_5xx: 3,
            ..Default::default()
        };
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service("shop", "cart", VIP.into(), (50051, 50051), &[(pod, "n1")])
            .http(Protocol::Grpc, "[]")
            .outlier_detection(policy)
            .build();
        let cart = Cart {
            failures: Arc::default(),
        };
        grpc_pod((pod, 50051).into(), cart).await;
        let agent = Agent::start(state, test_ca()).await;
        let mut grpc = client(&agent, web).await;
        let ejections = "mesh_endpoint_ejections_total";
        for (name, ejected) in [("ok", 0.0), ("fail", 0.0), ("fail", 0.0), ("fail", 1.0)] {
            within(grpc.ready()).await.unwrap();
            let asked = Item {
                name: name.into(),
                count: 2,
            };
            let mut stream: Streaming<Item> = within(grpc.server_streaming(
                tonic::Request::new(asked),
                PathAndQuery::from_static(STREAM),
                ProstCodec::default(),
            ))
            .await
            .unwrap()
            .into_inner();
            let mut got = 0;
            let end = loop {
                match within(stream.message()).await {
                    Ok(Some(_)) => got += 1,
                    Ok(None) => break None,
                    Err(status) => break Some(status.code()),
                }
            };
            assert_eq!(got, 2);
            let expected = (name == "fail").then_some(tonic::Code::Internal);
            assert_eq!(end, expected);
            sample_reaches(&agent.registry, ejections, ejected).await;
        }
        agent.stop().await;
    }

    /// Each call's request ends with an empty DATA frame; were it passed on as a chunk, the
    /// pod's h2 would close the pooled connection after 100 of them (its flood defence).
    #[tokio::test]
    async fn a_channel_makes_many_calls_over_one_pooled_connection() {
        let net = Loopback::reserve();
        let (web, pod) = (net.pod(1, 9), net.pod(1, 2));
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service("shop", "cart", VIP.into(), (50051, 50051), &[(pod, "n1")])
            .http(Protocol::Grpc, "[]")
            .build();
        let cart = Cart {
            failures: Arc::default(),
        };
        grpc_pod((pod, 50051).into(), cart).await;
        let agent = Agent::start(state, test_ca()).await;
        let mut grpc = client(&agent, web).await;
        for count in 0..300 {
            let item = Item {
                name: "apple".into(),
                count,
            };
            within(grpc.ready()).await.unwrap();
            let answer: tonic::Response<Item> = within(grpc.unary(
                tonic::Request::new(item.clone()),
                PathAndQuery::from_static(UNARY),
                ProstCodec::default(),
            ))
            .await
            .unwrap();
            assert_eq!(answer.into_inner(), item);
        }
        agent.stop().await;
    }
}
