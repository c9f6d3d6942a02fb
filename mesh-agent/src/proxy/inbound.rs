//! The inbound tunnel on port 15008: peer agents connect with mutual TLS 1.3 and open one
//! HTTP/2 CONNECT stream per proxied connection to a pod of this node.

use std::{
    convert::Infallible,
    fmt::Display,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, debug_span, info_span};

use crate::{
    config::{Protocol, egress::ExternalProtocol},
    identity::{SpiffeId, tls},
    observability::{
        access::{Direction, Metered, Record},
        metrics::{ConnectionLabels, Metrics},
    },
    proxy::{
        authorization::{self, Call, DENIED_BY},
        copy,
        dial::{DialError, LocalDialer},
        egress::{self, Egress},
        http::serving::{HttpServing, Parties},
        limit::{Limit, Permit, Rate, RatePerSource},
        liveness::{Liveness, SilenceLimit},
        open::{Authorized, OpenConnections},
        plan::{self, InboundPlan},
        rate_limit,
        refusal::{Cap, Refusal},
        tunnel,
    },
    state::{
        egress::{Exit, External},
        http::Upstream,
        routes::Routes,
    },
    system, warn_sampled,
};

/// How long a peer may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once, in all and from one address (each holds ~12 KiB until
/// it ends: 10,000 held 124 MiB).
const MAX_HANDSHAKES: usize = 512;
const MAX_HANDSHAKES_PER_SOURCE: usize = 128;
/// New handshakes per second from one address (each costs ~0.2 ms of CPU), and at once (a
/// node's agent starting opens up to 4 per workload identity).
const HANDSHAKES_PER_SECOND: u32 = 100;
const HANDSHAKE_BURST: u32 = 500;
/// Tunnel connections open at once from one address, and in all (a peer's pool opens 4 per
/// workload identity, one more per 100 streams open beyond).
const MAX_CONNECTIONS_PER_PEER: usize = 256;
const MAX_CONNECTIONS: usize = 4096;
/// New streams per second on one tunnel connection, and at once: each stream dials a pod (a
/// peer's pool takes its connections in turn, 4 of them at least).
const STREAMS_PER_SECOND: u32 = 1000;
const STREAM_BURST: u32 = 1000;
/// Pending handshakes from which the heap's freed pages are given back once they are done.
const HANDSHAKE_BURST_TO_TRIM: usize = 64;
/// How long an authenticated peer may take to start HTTP/2 (send its preface).
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every inbound connection needs.
#[derive(Clone)]
pub struct Inbound {
    pub tls: Arc<ServerConfig>,
    /// Serves the streams that carry HTTP requests.
    pub http: Arc<HttpServing>,
    pub routes: watch::Receiver<Arc<Routes>>,
    pub tracker: TaskTracker,
    /// Cancelled to stop accepting: open tunnels are told to finish (HTTP/2 GOAWAY).
    pub stop: CancellationToken,
    /// Cancelled to close everything at once.
    pub abort: CancellationToken,
    /// Peers refused so far; each refusal's log line carries the total.
    pub refused: Arc<AtomicU64>,
    pub liveness: Liveness,
    pub admission: Arc<Admission>,
    pub local: LocalDialer,
    pub metrics: Arc<Metrics>,
    pub open: Arc<OpenConnections>,
}

/// What a peer may hold of the agent before its handshake: connections, handshakes in
/// progress, and their rate.
pub struct Admission {
    connections: Arc<Limit>,
    handshakes: Arc<Limit>,
    handshake_rate: RatePerSource,
    /// Set when many handshakes were in progress: their memory is given back when they end.
    burst: AtomicBool,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            connections: Limit::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER),
            handshakes: Limit::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE),
            handshake_rate: RatePerSource::new(HANDSHAKES_PER_SECOND, HANDSHAKE_BURST),
            burst: AtomicBool::new(false),
        }
    }
}

/// A peer's places: its connection's, and its handshake's until it ends.
struct Admitted {
    _connection: Permit,
    handshake: Permit,
}

impl Admission {
    /// Places for a new connection from `peer`, or the cap that leaves none.
    fn admit(&self, peer: IpAddr) -> Result<Admitted, Cap> {
        let connection = self
            .connections
            .enter(peer)
            .map_err(|full| full.pick(Cap::TunnelConnections, Cap::TunnelConnectionsPerPeer))?;
        if !self.handshake_rate.take(peer) {
            return Err(Cap::HandshakeRate);
        }
        let handshake = self
            .handshakes
            .enter(peer)
            .map_err(|full| full.pick(Cap::Handshakes, Cap::HandshakesPerSource))?;
        if self.handshakes.open() >= HANDSHAKE_BURST_TO_TRIM {
            self.burst.store(true, Ordering::Relaxed);
        }
        Ok(Admitted {
            _connection: connection,
            handshake,
        })
    }

    /// Ends a handshake; the last of a burst gives the heap's freed pages back.
    fn handshake_done(&self, handshake: Permit) {
        drop(handshake);
        if self.handshakes.open() == 0 && self.burst.swap(false, Ordering::Relaxed) {
            system::release_freed_memory();
        }
    }
}

impl Inbound {
    /// Accepts peer agents until `stop` is cancelled.
    pub async fn serve(self, listener: TcpListener) {
        let acceptor = TlsAcceptor::from(self.tls.clone());
        while let Some((tcp, peer)) = system::accept(&listener, &self.stop).await {
            // Shed before any TLS work: a reset, no handshake, no buffers.
            let admitted = match self.admission.admit(peer.ip()) {
                Ok(admitted) => admitted,
                Err(cap) => {
                    let refusal = Refusal::Over(cap);
                    self.metrics.refused(refusal.reason());
                    warn_sampled!(%peer, reason = refusal.reason(), "tunnel peer shed: {refusal}");
                    system::reset_on_close(&tcp);
                    continue;
                }
            };
            let span = info_span!("tunnel", %peer);
            self.tracker.spawn(
                self.clone()
                    .serve_peer(acceptor.clone(), tcp, peer, admitted)
                    .instrument(span),
            );
        }
    }

    async fn serve_peer(
        self,
        acceptor: TlsAcceptor,
        tcp: TcpStream,
        peer: SocketAddr,
        admitted: Admitted,
    ) {
        let Admitted {
            _connection,
            handshake,
        } = admitted;
        self.liveness.tune(&tcp);
        let handshaken = timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
        self.admission.handshake_done(handshake);
        let tls = match handshaken {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.refuse(tls::failure_reason(&e), e),
            Err(_) => {
                let reason = format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                return self.refuse("timeout", reason);
            }
        };
        // The verifier accepted only certificates with a SPIFFE ID.
        let Some(caller) = tls::peer_id(tls.get_ref().1.peer_certificates()) else {
            return self.refuse("identity", "no SPIFFE ID after the handshake");
        };
        debug!(%caller, "tunnel peer accepted");
        let local = tls.get_ref().0.local_addr().unwrap_or(peer);
        let streams = Arc::new(Mutex::new(Rate::new(STREAMS_PER_SECOND, STREAM_BURST)));
        let service = {
            let this = self.clone();
            service_fn(move |request| {
                let admitted = streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                let record = Record::new(
                    this.metrics.clone(),
                    this.open.clone(),
                    Direction::Inbound,
                    peer,
                    local,
                );
                this.clone()
                    .connect(request, caller.clone(), record, admitted)
            })
        };
        let mut io = SilenceLimit::before_first_byte(tls, PREFACE_TIMEOUT);
        let served = {
            let connection = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(self.liveness.ping_interval)
                .keep_alive_timeout(self.liveness.ping_timeout)
                .max_concurrent_streams(tunnel::MAX_STREAMS_PER_CONNECTION)
                .initial_stream_window_size(tunnel::STREAM_WINDOW)
                .initial_connection_window_size(tunnel::CONNECTION_WINDOW)
                .max_frame_size(tunnel::MAX_FRAME)
                .max_send_buf_size(tunnel::SEND_BUFFER)
                .serve_connection(TokioIo::new(&mut io), service);
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => served,
                () = self.stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        served = connection.as_mut() => served,
                        () = self.abort.cancelled() => return,
                    }
                }
            }
        };
        if let Err(e) = served {
            debug!("tunnel connection ended: {e}");
        }
        tokio::select! {
            () = linger(io) => {}
            () = self.abort.cancelled() => {}
        }
    }

    /// The declared external destination `dst`, if its traffic may leave from this node: an
    /// HTTP port's (each request is checked), or a host's whose egress nodes this node is one
    /// of (or that names none).
    fn exit_here(&self, dst: SocketAddr) -> Option<External> {
        let external = self.routes.borrow().external().at(dst)?;
        if external.port.protocol == ExternalProtocol::Http {
            return Some(external);
        }
        let target = external.port.declaring(&external.dialled)?;
        (target.exit == Exit::Here).then_some(external)
    }

    /// A CONNECT stream from a peer's agent for the external host at `dst`, whose traffic
    /// leaves the mesh from this node: carried out as this node's own.
    fn egress(
        &self,
        request: Request<Incoming>,
        caller: SpiffeId,
        record: Record,
        external: External,
        dst: SocketAddr,
    ) -> Response<Empty<Bytes>> {
        let egress = Egress::new(
            &self.routes.borrow(),
            self.metrics.clone(),
            self.abort.clone(),
        );
        let source = [
            caller.namespace().to_owned(),
            String::new(),
            caller.to_string(),
        ];
        let host = match external.port.protocol {
            ExternalProtocol::Http => "",
            ExternalProtocol::Tcp => external.dialled.as_str(),
        };
        let mut labels = egress::labels(source, host, "egress");
        labels.direction = Direction::Inbound.as_str();
        let span = debug_span!("egress", %caller, %dst);
        self.tracker.spawn(
            async move {
                match hyper::upgrade::on(request).await {
                    Ok(upgraded) => {
                        let stream = TokioIo::new(upgraded);
                        let port = external.port;
                        egress.leave(stream, port, dst, labels, record, None).await;
                    }
                    Err(e) => debug!("the tunnel stream went away before it was used: {e}"),
                }
            }
            .instrument(span),
        );
        Response::new(Empty::new())
    }

    /// Counts and logs a peer whose handshake failed; `kind` is the metric's reason label.
    fn refuse(&self, kind: &'static str, reason: impl Display) {
        self.metrics.handshake_failed("inbound", kind);
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        warn_sampled!(refused_total = total, "tunnel peer refused: {reason}");
    }

    /// One CONNECT stream: dial the pod named by the authority, then copy both ways; unless
    /// the stream is over its connection's rate (`admitted` false).
    async fn connect(
        self,
        request: Request<Incoming>,
        caller: SpiffeId,
        mut record: Record,
        admitted: bool,
    ) -> Result<Response<Empty<Bytes>>, Infallible> {
        let status = |code| {
            let mut response = Response::new(Empty::new());
            *response.status_mut() = code;
            Ok(response)
        };
        if !admitted {
            record.refuse(Refusal::Over(Cap::StreamRate));
            return status(StatusCode::TOO_MANY_REQUESTS);
        }
        let planned = plan::inbound(
            &self.routes.borrow(),
            request.method(),
            request.uri().authority().map(|a| a.as_str()),
        );
        let InboundPlan {
            target,
            destination,
        } = match planned {
            Ok(plan) => plan,
            Err(Refusal::NotLocalPod(dst)) if let Some(external) = self.exit_here(dst) => {
                return Ok(self.egress(request, caller, record, external, dst));
            }
            Err(refusal) => {
                let code = match refusal {
                    Refusal::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
                    Refusal::BadAuthority(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::FORBIDDEN,
                };
                record.refuse(refusal);
                return status(code);
            }
        };
        let ports = self.routes.borrow().served_at(target).to_vec();
        let carries = request
            .headers()
            .get(Upstream::HEADER)
            .and_then(|token| Upstream::from_token(token.as_bytes()));
        // Policies whose rules look into requests decide each request of a stream that
        // carries them; the others decide here, for the whole stream.
        let per_request = carries.is_some()
            && destination
                .as_ref()
                .is_some_and(|w| w.authorization.needs_http());
        let source_address = authorization::source_address(request.headers());
        if let Some(workload) = destination.as_ref().filter(|_| !per_request)
            && !workload.authorization.is_open()
        {
            let decision = workload.authorization.decide(&Call {
                source: Some(&caller),
                source_address,
                port: target.port(),
                http: None,
            });
            self.metrics.authorized(&decision);
            if !decision.allowed {
                let mut response = Response::new(Empty::new());
                *response.status_mut() = StatusCode::FORBIDDEN;
                if let Ok(policy) = HeaderValue::from_str(&decision.policy) {
                    response.headers_mut().insert(DENIED_BY, policy);
                }
                record.refuse(Refusal::Denied {
                    policy: decision.policy,
                });
                return Ok(response);
            }
        }
        // HTTP is served request by request only where this agent has work to do with the
        // requests (a span to write, limits to keep, requests to authorize): else the bytes
        // are copied, which costs far less (gRPC across nodes: 0.42 of the HAProxy pair's
        // rate served, 0.6 copied).
        let serves_http = carries.filter(|_| {
            per_request
                || self.http.tracer.is_some()
                || ports.iter().any(|p| p.rate_limits.is_some())
        });
        let tcp_port = ports.iter().find(|p| p.protocol == Protocol::Tcp);
        if carries.is_none()
            && let Some(port) = tcp_port
        {
            let http = &self.http;
            let checked = rate_limit::check(
                port,
                None,
                Some(&caller),
                http.rate_limit_service.as_deref(),
                &http.metrics,
            )
            .await;
            if let Err(limited) = checked {
                record.refuse(Refusal::RateLimited {
                    service: port.service.clone(),
                    by: limited.by,
                });
                return status(StatusCode::TOO_MANY_REQUESTS);
            }
        }
        let mut pod = match self.local.pod(target).await {
            Ok(pod) => pod,
            Err(DialError::OnHost(target)) => {
                record.refuse(Refusal::NodeAddress(target));
                return status(StatusCode::FORBIDDEN);
            }
            Err(e) => {
                let code = match e {
                    DialError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                record.unreachable(format!("cannot reach the pod {target}: {e}"));
                return status(code);
            }
        };
        let labels = ConnectionLabels {
            direction: Direction::Inbound.as_str(),
            source_namespace: caller.namespace().to_owned(),
            source_workload: String::new(),
            source_identity: caller.to_string(),
            destination_service: String::new(),
            destination_namespace: destination
                .as_ref()
                .map(|w| w.namespace.clone())
                .unwrap_or_default(),
            destination_workload: destination
                .as_ref()
                .map(|w| w.name.clone())
                .unwrap_or_default(),
            hop: "tunnel",
        };
        // A connection into a workload is decided again when the policies change (one whose
        // requests are decided each on its own is left to them).
        let cut = self.abort.child_token();
        if destination.is_some() && !per_request {
            record.into_pod(Authorized {
                source: Some(caller.clone()),
                source_address,
                destination: target,
                cut: cut.clone(),
            });
        }
        let http = self.http.clone();
        let span = debug_span!("inbound", %caller, %target);
        self.tracker.spawn(
            async move {
                let mut tunnel = match hyper::upgrade::on(request).await {
                    Ok(upgraded) => Metered::new(TokioIo::new(upgraded)),
                    Err(e) => {
                        debug!("the tunnel stream went away before it was used: {e}");
                        return;
                    }
                };
                record.connected(labels, target);
                let traffic = tunnel.traffic();
                let ended = match serves_http {
                    Some(protocol) => {
                        let parties = Parties {
                            caller,
                            target,
                            per_request,
                            destination,
                            ports,
                        };
                        // Boxed: a TCP stream's task keeps only the copy's state.
                        Box::pin(http.serve(tunnel, pod, protocol, parties, &cut)).await
                    }
                    None => {
                        let ended = copy::until_done(&mut tunnel, &mut pod, &cut).await;
                        if !ended.is_complete() {
                            system::reset_on_close(&pod);
                        }
                        ended
                    }
                };
                record.copied(&traffic, ended);
            }
            .instrument(span),
        );
        status(StatusCode::OK)
    }
}

/// How long a closed tunnel connection waits for its peer to close too.
const LINGER: Duration = Duration::from_secs(2);

/// Closes a tunnel connection so that the peer gets everything sent: TLS close_notify and
/// FIN first, then whatever the peer still sends (window updates for the data on its way to
/// it) read and dropped until it closes too, for at most [`LINGER`]. A socket closed with
/// unread data in it resets the connection, and a reset throws away what was still on its
/// way to the peer: the end of a stream the drain had let finish.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    let drained = async {
        // After HTTP/2's own close, the write side may be shut already.
        let _ = io.shutdown().await;
        let mut sink = [0u8; 4096];
        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = timeout(LINGER, drained).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        Agent, Loopback, Mesh, cgroup_of, echo_pod, round_trip, sample, sample_reaches, test_ca,
        within,
    };

    /// Node 1 runs web-0; node 2 runs cart-0 (meshed) and db (not meshed).
    struct TwoNodes {
        net: Loopback,
        one: Agent,
        two: Agent,
    }

    async fn two_nodes() -> TwoNodes {
        let net = Loopback::reserve();
        let ca = test_ca();
        let (web, cart, db) = (net.pod(1, 9), net.pod(2, 2), net.pod(2, 3));
        let cart_service = |mesh: Mesh| {
            mesh.service(
                "shop",
                "cart",
                [198, 19, 0, 10].into(),
                (80, 8080),
                &[(cart, "n2")],
            )
        };
        let one = cart_service(
            Mesh::node("n1", net.node(1), &net.pod_cidr(1))
                .peer("n2", net.node(2), &net.pod_cidr(2))
                .workload("shop", "web-0", "web", web),
        )
        .build();
        let two = cart_service(
            Mesh::node("n2", net.node(2), &net.pod_cidr(2))
                .peer("n1", net.node(1), &net.pod_cidr(1))
                .workload("shop", "cart-0", "cart", cart)
                .unmeshed(db),
        )
        .build();
        echo_pod((cart, 8080).into()).await;
        echo_pod((db, 5432).into()).await;
        TwoNodes {
            one: Agent::start(one, ca.clone()).await,
            two: Agent::start(two, ca).await,
            net,
        }
    }

    /// A connection closed while the peer still sends (window updates, say) and is still
    /// to receive the end of what was sent: lingering, it gets every byte and a clean end,
    /// where a plain close would reset it and throw the end away.
    #[tokio::test]
    async fn a_lingering_close_loses_nothing_the_peer_has_yet_to_read() {
        const SENT: usize = 4 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        // Unread by the server when it closes.
        client.write_all(b"window update").await.unwrap();
        let closing = tokio::spawn(async move {
            server.write_all(&vec![7; SENT]).await.unwrap();
            linger(server).await;
        });
        // A slow reader: much of it is still on its way when the server is done writing.
        let mut got = 0;
        let mut buf = vec![0; 64 << 10];
        loop {
            match within(client.read(&mut buf)).await {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("after {got} of {SENT} bytes: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(got, SENT);
        drop(client);
        within(closing).await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_crosses_nodes_with_the_callers_identity() {
        let TwoNodes { net, one, two } = two_nodes().await;
        let web = net.pod(1, 9);
        let to_service = one
            .connect(web, cgroup_of(0), ([198, 19, 0, 10], 80).into())
            .await;
        assert_eq!(round_trip(to_service, b"cart?").await.unwrap(), b"cart?");
        let to_db = one
            .connect(web, cgroup_of(0), (net.pod(2, 3), 5432).into())
            .await;
        assert_eq!(round_trip(to_db, b"db?").await.unwrap(), b"db?");

        let web_id = "source_identity=\"spiffe://cluster.local/ns/shop/sa/web\"";
        let inbound = format!(
            "mesh_connections_closed_total{{direction=\"inbound\",source_namespace=\"shop\",source_workload=\"\",{web_id},destination_service=\"\",destination_namespace=\"shop\",destination_workload=\"cart-0\",hop=\"tunnel\"}}"
        );
        sample_reaches(&two.registry, &inbound, 1.0).await;
        sample_reaches(&two.registry, "mesh_connections_closed_total", 2.0).await;
        sample_reaches(&one.registry, "mesh_connections_closed_total", 2.0).await;
        let outbound = format!(
            "mesh_connections_opened_total{{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",{web_id},destination_service=\"shop/cart\",destination_namespace=\"\",destination_workload=\"\",hop=\"tunnel\"}}"
        );
        assert_eq!(sample(&one.registry, &outbound), 1.0);
        assert_eq!(sample(&two.registry, "mesh_bytes_sent_total"), 8.0);
        // Both streams share the one pooled connection, or one each: never more.
        let pooled = sample(&one.registry, "mesh_tunnel_connections{peer_node=\"n2\"}");
        assert!((1.0..=2.0).contains(&pooled), "{pooled} tunnel connections");
        assert_eq!(
            sample(&one.registry, "mesh_tls_handshake_failures_total"),
            0.0
        );
        one.stop().await;
        two.stop().await;
    }

    #[tokio::test]
    async fn streams_to_what_is_not_a_pod_of_the_node_are_refused() {
        let TwoNodes { net, one, two } = two_nodes().await;
        let id = SpiffeId::workload("cluster.local", "shop", "web");
        let agent = SocketAddr::new(net.node(2), tunnel_port());
        let cases = [
            // (target, status, refusal)
            (net.pod(1, 9), StatusCode::FORBIDDEN, "not_local_pod"),
            (net.pod(2, 77), StatusCode::FORBIDDEN, "not_local_pod"),
            (net.node(2), StatusCode::FORBIDDEN, "not_local_pod"),
        ];
        for (target, expected, reason) in cases {
            let opened =
                within(
                    one.tunnels()
                        .open(&id, None, "n2", agent, (target, 8080).into(), None),
                )
                .await;
            match opened {
                Err(tunnel::TunnelError::Refused { status, .. }) => {
                    assert_eq!(status, expected, "{target}")
                }
                Err(e) => panic!("{target}: {e}"),
                Ok(_) => panic!("{target}: the stream was opened"),
            }
            let series = format!("mesh_refusals_total{{reason=\"{reason}\"}}");
            assert!(sample(&two.registry, &series) >= 1.0, "{target}");
        }
        // A pod of the node that is down: the stream is answered, not refused.
        let down =
            within(
                one.tunnels()
                    .open(&id, None, "n2", agent, (net.pod(2, 2), 9).into(), None),
            )
            .await;
        assert!(
            matches!(down, Err(tunnel::TunnelError::Refused { status, .. }) if status == StatusCode::SERVICE_UNAVAILABLE),
            "{:?}",
            down.err()
        );
        assert_eq!(sample(&two.registry, "mesh_connections_opened_total"), 0.0);
        one.stop().await;
        two.stop().await;
    }

    fn tunnel_port() -> u16 {
        crate::state::routes::TUNNEL_PORT
    }
}
