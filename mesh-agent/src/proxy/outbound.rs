//! The outbound listener: accepts captured connections, recovers where each was going, picks
//! an endpoint and connects to it: directly on this node, through a tunnel to another node's
//! agent otherwise. A failed connect is retried on another endpoint.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http::StatusCode;

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, debug_span};

use crate::{
    config::Protocol,
    observability::{
        access::{Direction, Metered, Record},
        metrics::{ConnectionLabels, Metrics},
    },
    proxy::{
        authorization::{self, Call},
        balance::{Lease, Unpicked},
        breaker::{Slot, Tripped},
        copy,
        dial::{CONNECT_TIMEOUT, DialError, LocalDialer},
        egress::Egress,
        http::{detect, serve::HttpProxy},
        open::{Authorized, OpenConnections},
        plan::{self, OutboundPlan},
        rate_limit,
        refusal::Refusal,
        shortcut::ShortcutStream,
        tunnel::{TunnelError, TunnelStream, Tunnels},
    },
    state::routes::{Hop, LocalWorkload, Route, Routes, ServicePort},
    system, warn_sampled,
};

/// Endpoints tried for one connection at most.
const MAX_ATTEMPTS: usize = 3;

/// What the kernel recorded of a captured connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturedConnect {
    /// Where its app meant to go.
    pub dst: SocketAddr,
    /// The enrolled cgroup it came from.
    pub cgroup: u64,
}

/// Where captured connections were going, by the client's address: the kernel's table
/// (`datapath::maps::OrigDstTable`), or one the in-process tests fill.
pub trait Captures: Send + 'static {
    /// Takes (returns and forgets) what was captured of the connection from `client`.
    fn take(&mut self, client: SocketAddr) -> Option<CapturedConnect>;
}

/// One table shared by every worker thread: a take is a lookup and a delete, too short to
/// contend.
impl<C: Captures> Captures for Arc<Mutex<C>> {
    fn take(&mut self, client: SocketAddr) -> Option<CapturedConnect> {
        let mut table = self.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        table.take(client)
    }
}

/// What every outbound connection needs.
#[derive(Clone)]
pub struct Outbound {
    pub routes: watch::Receiver<Arc<Routes>>,
    pub tunnels: Arc<Tunnels>,
    pub http: Arc<HttpProxy>,
    pub local: LocalDialer,
    pub metrics: Arc<Metrics>,
    pub open: Arc<OpenConnections>,
    pub tracker: TaskTracker,
    /// Cancelled to stop accepting.
    pub stop: CancellationToken,
    /// Cancelled to close open connections.
    pub abort: CancellationToken,
}

impl Outbound {
    /// Accepts captured connections until `stop` is cancelled.
    pub async fn serve(self, listener: TcpListener, mut captures: impl Captures) {
        while let Some((client, peer)) = system::accept(&listener, &self.stop).await {
            let Some(captured) = captures.take(peer) else {
                let here = client.local_addr().unwrap_or(peer);
                self.record(peer, here).refuse(Refusal::NotCaptured);
                continue;
            };
            let dst = captured.dst;
            let record = self.record(peer, dst);
            let planned = plan::outbound(&self.routes.borrow(), peer.ip(), captured.cgroup, dst);
            let OutboundPlan { source, route } = match planned {
                Ok(plan) => plan,
                Err(refusal) => {
                    if matches!(refusal, Refusal::CallerMismatch(_)) {
                        system::reset_on_close(&client);
                    }
                    record.refuse(refusal);
                    continue;
                }
            };
            let span = debug_span!("conn", %peer, %dst);
            let caller = Caller {
                addr: peer,
                workload: source,
                dst,
            };
            self.tracker.spawn(
                self.clone()
                    .forward(ShortcutStream::new(client), route, caller, record)
                    .instrument(span),
            );
        }
    }

    fn record(&self, source: SocketAddr, destination: SocketAddr) -> Record {
        Record::new(
            self.metrics.clone(),
            self.open.clone(),
            Direction::Outbound,
            source,
            destination,
        )
    }

    async fn forward(
        self,
        client: ShortcutStream,
        route: Route,
        caller: Caller,
        mut record: Record,
    ) {
        if let Route::External(external) = route {
            let egress = Egress::new(
                &self.routes.borrow(),
                self.metrics.clone(),
                self.abort.clone(),
            );
            // Boxed, as are the other steps below that a copying connection is past: its
            // task then holds the copy's state only (2.2 KB a connection, 10 KB unboxed).
            return Box::pin(egress.carry(self.tunnels.clone(), client, external, caller, record))
                .await;
        }
        if let Route::Service(port) = &route
            && self.speaks_http(&client, port, caller.dst).await
        {
            return Box::pin(self.serve_http(client, port.clone(), caller, record)).await;
        }
        let connected = match Box::pin(self.connect(&route, &caller)).await {
            Ok(connected) => connected,
            Err(NotConnected::Refused(refusal)) => return record.refuse(refusal),
            Err(NotConnected::Unreachable(why)) => {
                // As a connect of its own would have failed: the app sees a reset, never an
                // end it could take for an empty answer.
                system::reset_on_close(&client);
                return record.unreachable(why);
            }
        };
        if let Err(e) = client.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        let (hop, destination_workload) = match &connected.upstream {
            Upstream::Direct(_) => {
                let routes = self.routes.borrow();
                ("local", routes.workload_at(connected.target.ip()).cloned())
            }
            Upstream::Tunnel(_) => ("tunnel", None),
        };
        let into_workload = destination_workload.is_some();
        let [source_namespace, source_workload, source_identity] =
            LocalWorkload::label_values(caller.workload.as_deref());
        let labels = ConnectionLabels {
            direction: Direction::Outbound.as_str(),
            source_namespace,
            source_workload,
            source_identity,
            destination_service: match &route {
                Route::Service(port) => port.service.clone(),
                Route::Pod { .. } | Route::External(_) => String::new(),
            },
            destination_namespace: destination_workload
                .as_ref()
                .map(|w| w.namespace.clone())
                .unwrap_or_default(),
            destination_workload: destination_workload
                .map(|w| w.name.clone())
                .unwrap_or_default(),
            hop,
        };
        // A connection into a workload of this node is decided again when policies change.
        let cut = self.abort.child_token();
        if into_workload {
            record.into_pod(Authorized {
                source: caller.workload.as_ref().map(|w| w.id.clone()),
                source_address: Some(caller.addr.ip().to_canonical()),
                destination: connected.target,
                cut: cut.clone(),
            });
        }
        record.connected(labels, connected.target);
        let mut client = Metered::new(client);
        let ended = match connected.upstream {
            Upstream::Direct(mut pod) => {
                let ended = copy::until_done(&mut client, &mut pod, &cut).await;
                if !ended.is_complete() {
                    system::reset_on_close(&pod);
                }
                ended
            }
            // A tunnel stream dropped before its end is reset (RST_STREAM) by HTTP/2 itself.
            Upstream::Tunnel(mut tunnel) => {
                copy::until_done(&mut client, &mut tunnel, &self.abort).await
            }
        };
        if !ended.is_complete() {
            system::reset_on_close(client.get_ref());
        }
        record.copied(&client.traffic(), ended);
    }

    /// Whether a connection to `port` (at `dst`) is served as HTTP: by its protocol, or for
    /// an `auto` port by what the client sends first (unless the port is one of the opaque
    /// ones).
    async fn speaks_http(&self, client: &TcpStream, port: &ServicePort, dst: SocketAddr) -> bool {
        match port.protocol {
            Protocol::Tcp => false,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc => true,
            Protocol::Auto => {
                let (wait, opaque) = {
                    let routes = self.routes.borrow();
                    let settings = &routes.config().settings;
                    (
                        settings.protocol_detection_timeout.0,
                        settings.opaque_ports.contains(&dst.port()),
                    )
                };
                !opaque && detect::speaks_http(client, wait).await
            }
        }
    }

    /// Serves an HTTP connection: each request is routed on its own (`proxy::http`).
    async fn serve_http(
        self,
        client: ShortcutStream,
        port: Arc<ServicePort>,
        caller: Caller,
        mut record: Record,
    ) {
        let _slot = match port.breaker.connection() {
            Ok(slot) => slot,
            Err(tripped) => return record.refuse(self.circuit_open(&port, tripped)),
        };
        if let Err(e) = client.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        let [source_namespace, source_workload, source_identity] =
            LocalWorkload::label_values(caller.workload.as_deref());
        let labels = ConnectionLabels {
            direction: Direction::Outbound.as_str(),
            source_namespace,
            source_workload,
            source_identity,
            destination_service: port.service.clone(),
            destination_namespace: String::new(),
            destination_workload: String::new(),
            hop: "http",
        };
        record.connected(labels, caller.dst);
        let client = Metered::new(client);
        let traffic = client.traffic();
        let ended = self
            .http
            .clone()
            .serve(client, caller.workload, caller.addr.ip(), port, &self.abort)
            .await;
        record.copied(&traffic, ended);
    }

    /// Connects to the route's destination; for a service, tries up to [`MAX_ATTEMPTS`]
    /// endpoints. The lease keeps the endpoint's connection counted while it is open.
    async fn connect(&self, route: &Route, caller: &Caller) -> Result<Connected, NotConnected> {
        let port = match route {
            Route::Pod { target, hop } => {
                if *hop == Hop::Local {
                    self.authorize(*target, caller)
                        .map_err(NotConnected::Refused)?;
                }
                let upstream = match self.dial(*target, hop, caller, Dialled::Pod).await {
                    Ok(upstream) => upstream,
                    Err(Failed::Dial(e @ (DialError::Timeout | DialError::Failed(_)))) => {
                        self.metrics.connect_failed("", None);
                        return Err(NotConnected::Unreachable(e.to_string()));
                    }
                    Err(failed) => return Err(failed.into()),
                };
                return Ok(Connected {
                    upstream,
                    target: *target,
                    _lease: None,
                    _slot: None,
                });
            }
            Route::Service(port) => port,
            // Carried by `proxy::egress` before any connect.
            Route::External(e) => {
                return Err(NotConnected::Unreachable(format!(
                    "{} is an external host",
                    e.dialled
                )));
            }
        };
        let slot = port
            .breaker
            .connection()
            .map_err(|tripped| NotConnected::Refused(self.circuit_open(port, tripped)))?;
        let mut tried = Vec::new();
        while tried.len() < MAX_ATTEMPTS {
            let (lease, hop) = match port.pick(&tried) {
                Ok(picked) => picked,
                Err(Unpicked::NoEndpoint) => break,
                Err(Unpicked::AllBusy) => {
                    let refusal = self.circuit_open(port, Tripped::PerEndpoint);
                    return Err(NotConnected::Refused(refusal));
                }
            };
            let target = lease.endpoint().addr;
            if hop == Hop::Local {
                // This agent decides for the callee, before anything else is spent on the
                // connection (a rate limit's token); a denial is final.
                self.authorize(target, caller)
                    .map_err(NotConnected::Refused)?;
            }
            if hop == Hop::Local && port.protocol == Protocol::Tcp {
                // This agent serves the endpoint: the service's rate limits are its to keep.
                let source = caller.workload.as_ref().map(|w| &w.id);
                let service = self.http.rate_limit_service.as_deref();
                if let Err(limited) =
                    rate_limit::check(port, None, source, service, &self.metrics).await
                {
                    return Err(NotConnected::Refused(Refusal::RateLimited {
                        service: port.service.clone(),
                        by: limited.by,
                    }));
                }
            }
            match self.dial(target, &hop, caller, Dialled::Endpoint).await {
                Ok(upstream) => {
                    lease.endpoint().succeeded();
                    return Ok(Connected {
                        upstream,
                        target,
                        _lease: Some(lease),
                        _slot: Some(slot),
                    });
                }
                Err(Failed::Dial(e @ (DialError::Timeout | DialError::Failed(_)))) => {
                    let ejected = lease.endpoint().failed();
                    self.metrics
                        .endpoint_unreachable(&port.service, target, ejected);
                    warn_sampled!(source = %caller.addr, service = %port.service, endpoint = %target, "connect failed, trying another endpoint: {e}");
                    tried.push(target);
                }
                // This node's fault, or the caller's, not the endpoint's: no ejection, no
                // other endpoint.
                Err(failed) => return Err(failed.into()),
            }
        }
        if let Some(pinned) = &port.pinned {
            // Never to an endpoint outside the pin, however many inside failed.
            return Err(NotConnected::Refused(pinned.refusal(&port.service)));
        }
        Err(NotConnected::Unreachable(match tried.len() {
            0 => format!("service {} has no endpoint left to try", port.service),
            n => format!(
                "service {}: no endpoint answered in {n} tries",
                port.service
            ),
        }))
    }

    /// Whether `caller` may connect to `target`, a pod of this node (this agent decides for
    /// the callee, as a peer's inbound would); the decision is counted.
    fn authorize(&self, target: SocketAddr, caller: &Caller) -> Result<(), Refusal> {
        let call = Call {
            source: caller.workload.as_ref().map(|w| &w.id),
            source_address: Some(caller.addr.ip().to_canonical()),
            port: target.port(),
            http: None,
        };
        let routes = self.routes.borrow();
        let Some(decision) = authorization::decide(&routes, target.ip(), &call, &self.metrics)
        else {
            return Ok(());
        };
        if decision.allowed {
            Ok(())
        } else {
            Err(Refusal::Denied {
                policy: decision.policy,
            })
        }
    }

    /// Counts `port`'s breaker turning a connection away: the refusal to answer with.
    fn circuit_open(&self, port: &ServicePort, tripped: Tripped) -> Refusal {
        self.metrics.circuit_open(&port.service, tripped);
        Refusal::CircuitOpen {
            service: port.service.clone(),
            tripped,
        }
    }

    async fn dial(
        &self,
        target: SocketAddr,
        hop: &Hop,
        caller: &Caller,
        dialled: Dialled,
    ) -> Result<Upstream, Failed> {
        match hop {
            Hop::Local => {
                let stream = match dialled {
                    Dialled::Pod => self.local.pod(target).await?,
                    Dialled::Endpoint => self.local.endpoint(target).await?,
                };
                debug!(%target, "connected on this node");
                Ok(Upstream::Direct(stream))
            }
            Hop::Tunnel(peer) => {
                let source = &caller
                    .workload
                    .as_ref()
                    .ok_or(Refusal::NoIdentity(caller.addr.ip().to_canonical()))?
                    .id;
                let tunnel = timeout(
                    CONNECT_TIMEOUT,
                    self.tunnels.open(
                        source,
                        Some(caller.addr.ip().to_canonical()),
                        &peer.node,
                        peer.agent,
                        target,
                        None,
                    ),
                )
                .await
                .map_err(|_| DialError::Timeout)?
                .map_err(|e| match e {
                    // The service's limit or the endpoint's policy, not the endpoint's
                    // fault: no ejection, no retry.
                    TunnelError::Refused {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        ..
                    } => Failed::Refused(Refusal::RateLimitedThere(target)),
                    TunnelError::Denied { policy, .. } => {
                        Failed::Refused(Refusal::DeniedThere { target, policy })
                    }
                    e => Failed::Dial(DialError::Failed(e.to_string())),
                })?;
                debug!(%target, node = %peer.node, %source, "connected over mTLS through the peer agent");
                Ok(Upstream::Tunnel(tunnel))
            }
        }
    }
}

/// The local workload behind a captured connection, and where it was going.
pub struct Caller {
    pub addr: SocketAddr,
    /// The workload of this node with the address, if any.
    pub workload: Option<Arc<LocalWorkload>>,
    /// The original destination.
    pub dst: SocketAddr,
}

/// What is dialled: an endpoint the state names, or an address the caller chose.
#[derive(Clone, Copy)]
enum Dialled {
    Endpoint,
    Pod,
}

/// A connection made: to what, and how.
struct Connected {
    upstream: Upstream,
    target: SocketAddr,
    /// Keeps the endpoint's connection counted as outstanding while it is open.
    _lease: Option<Lease>,
    /// Keeps it counted against the service port's cap on connections.
    _slot: Option<Slot>,
}

enum Upstream {
    Direct(TcpStream),
    Tunnel(TunnelStream),
}

/// Why one dial failed.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Dial(#[from] DialError),
}

/// Why no connection was made.
enum NotConnected {
    Refused(Refusal),
    Unreachable(String),
}

impl From<Failed> for NotConnected {
    fn from(failed: Failed) -> Self {
        match failed {
            Failed::Refused(refusal) => NotConnected::Refused(refusal),
            Failed::Dial(DialError::OnHost(target)) => {
                NotConnected::Refused(Refusal::NodeAddress(target))
            }
            Failed::Dial(e) => NotConnected::Unreachable(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        proxy::breaker::Limits,
        testing::{
            Agent, Loopback, Mesh, cgroup_of, echo_pod, read_all, round_trip, sample,
            sample_reaches, test_ca, within,
        },
    };

    const VIP: [u8; 4] = [198, 19, 0, 10];

    fn vip(port: u16) -> SocketAddr {
        SocketAddr::from((VIP, port))
    }

    #[tokio::test]
    async fn a_service_connection_reaches_a_local_endpoint_and_is_recorded_once() {
        let net = Loopback::reserve();
        let (web, cart) = (net.pod(1, 9), net.pod(1, 2));
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .workload("shop", "cart-0", "cart", cart)
            .service("shop", "cart", VIP.into(), (80, 8080), &[(cart, "n1")])
            .build();
        let _pod = echo_pod((cart, 8080).into()).await;
        let agent = Agent::start(state, test_ca()).await;

        let mut conn = agent.connect(web, cgroup_of(0), vip(80)).await;
        // Open, it is listed with who calls and where it went.
        conn.write_all(b"hello").await.unwrap();
        let mut hello = [0; 5];
        conn.read_exact(&mut hello).await.unwrap();
        let open = agent.open.list();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].source.ip(), web);
        assert_eq!(
            open[0].source_identity,
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(open[0].destination, SocketAddr::from((cart, 8080)));
        assert_eq!(open[0].destination_service, "shop/cart");
        assert_eq!(round_trip(conn, b" cart").await.unwrap(), b" cart");

        let series = "mesh_connections_closed_total{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"shop/cart\",destination_namespace=\"shop\",destination_workload=\"cart-0\",hop=\"local\"}";
        sample_reaches(&agent.registry, series, 1.0).await;
        let r = &agent.registry;
        assert_eq!(sample(r, "mesh_connections_opened_total"), 1.0);
        assert_eq!(sample(r, "mesh_bytes_sent_total"), 10.0);
        assert_eq!(sample(r, "mesh_bytes_received_total"), 10.0);
        assert_eq!(sample(r, "mesh_refusals_total"), 0.0);
        assert!(agent.open.list().is_empty());
        agent.stop().await;
    }

    #[tokio::test]
    async fn an_endpoint_that_refuses_is_counted_and_the_next_one_tried() {
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
            .round_robin()
            .build();
        let _pod = echo_pod((alive, 8080).into()).await;
        let agent = Agent::start(state, test_ca()).await;

        // Round robin tries the dead endpoint first, then the live one.
        let conn = agent.connect(web, cgroup_of(0), vip(80)).await;
        assert_eq!(round_trip(conn, b"x").await.unwrap(), b"x");
        let failures = format!(
            "mesh_connect_failures_total{{service=\"shop/cart\",endpoint=\"{dead}:8080\"}}"
        );
        assert_eq!(sample(&agent.registry, &failures), 1.0);
        assert_eq!(
            sample(&agent.registry, "mesh_endpoint_ejections_total"),
            0.0
        );
        agent.stop().await;
    }

    #[tokio::test]
    async fn a_service_whose_endpoints_all_refuse_is_unreachable_and_ejects_them() {
        let net = Loopback::reserve();
        let web = net.pod(1, 9);
        let dead = [net.pod(1, 2), net.pod(1, 3)];
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service(
                "shop",
                "cart",
                VIP.into(),
                (80, 8080),
                &[(dead[0], "n1"), (dead[1], "n1")],
            )
            .build();
        let agent = Agent::start(state, test_ca()).await;
        for _ in 0..3 {
            let conn = agent.connect(web, cgroup_of(0), vip(80)).await;
            // Nothing reached: the client's connection is reset at once, as a connect of its
            // own would have failed.
            let err = read_all(conn).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        }
        // Two endpoints per connection, three connections: three failures in a row each.
        let r = &agent.registry;
        sample_reaches(r, "mesh_connect_failures_total", 6.0).await;
        assert_eq!(sample(r, "mesh_endpoint_ejections_total"), 2.0);
        assert_eq!(sample(r, "mesh_connections_opened_total"), 0.0);
        agent.stop().await;
    }

    #[tokio::test]
    async fn connections_over_a_services_cap_are_refused_until_one_closes() {
        let net = Loopback::reserve();
        let (web, cart) = (net.pod(1, 9), net.pod(1, 2));
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .service("shop", "cart", VIP.into(), (80, 8080), &[(cart, "n1")])
            .circuit_breakers(Limits {
                max_connections: Some(2),
                ..Limits::default()
            })
            .build();
        let _pod = echo_pod((cart, 8080).into()).await;
        let agent = Agent::start(state, test_ca()).await;
        let connect = || agent.connect(web, cgroup_of(0), vip(80));
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut conn = connect().await;
            conn.write_all(b"x").await.unwrap();
            within(conn.read_exact(&mut [0; 1])).await.unwrap();
            open.push(conn);
        }
        // The third is refused: closed with nothing read or echoed.
        let refused = round_trip(connect().await, b"x").await.unwrap_or_default();
        assert!(refused.is_empty());
        sample_reaches(
            &agent.registry,
            "mesh_circuit_breaker_rejections_total{service=\"shop/cart\",limit=\"connections\"}",
            1.0,
        )
        .await;
        let r = &agent.registry;
        assert_eq!(
            sample(r, "mesh_refusals_total{reason=\"circuit_open\"}"),
            1.0
        );
        // One closes: once the agent has seen it go, a new one passes.
        drop(open.pop());
        within(async {
            while round_trip(connect().await, b"y").await.unwrap_or_default() != b"y" {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn a_pod_using_another_workloads_address_is_reset() {
        let net = Loopback::reserve();
        let (web, cart) = (net.pod(1, 9), net.pod(1, 2));
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .workload("shop", "web-0", "web", web)
            .workload("shop", "cart-0", "cart", cart)
            .build();
        let _pod = echo_pod((cart, 8080).into()).await;
        let agent = Agent::start(state, test_ca()).await;

        // From web-0's address but cart-0's cgroup.
        let mut conn = agent.connect(web, cgroup_of(1), (cart, 8080).into()).await;
        let mut buf = [0; 1];
        let read = conn.read(&mut buf).await;
        assert_eq!(read.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
        sample_reaches(
            &agent.registry,
            "mesh_refusals_total{reason=\"caller_mismatch\"}",
            1.0,
        )
        .await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn refusals_without_a_dial() {
        let net = Loopback::reserve();
        let web = net.pod(1, 9);
        let state = Mesh::node("n1", net.node(1), &net.pod_cidr(1))
            .peer("n2", net.node(2), &net.pod_cidr(2))
            .workload("shop", "web-0", "web", web)
            .build();
        let agent = Agent::start(state, test_ca()).await;
        let stranger = net.pod(1, 50);
        let cases = [
            // (source, cgroup, original destination, refusal)
            (web, cgroup_of(0), net.pod(1, 77), "no_route"),
            (web, cgroup_of(0), "198.19.9.9".parse().unwrap(), "no_route"),
            // Not meshed, so no identity to present on another node.
            (stranger, 7, net.pod(2, 5), "no_identity"),
        ];
        for (i, (source, cgroup, dst, reason)) in cases.into_iter().enumerate() {
            let conn = agent.connect(source, cgroup, (dst, 80).into()).await;
            assert_eq!(read_all(conn).await.unwrap(), b"", "{dst}");
            sample_reaches(&agent.registry, "mesh_refusals_total", (i + 1) as f64).await;
            let series = format!("mesh_refusals_total{{reason=\"{reason}\"}}");
            assert!(
                sample(&agent.registry, &series) >= 1.0,
                "{dst}: not {reason}"
            );
        }
        // Not captured at all: no original destination.
        let conn = TcpStream::connect(agent.outbound).await.unwrap();
        assert_eq!(read_all(conn).await.unwrap(), b"");
        sample_reaches(
            &agent.registry,
            "mesh_refusals_total{reason=\"not_captured\"}",
            1.0,
        )
        .await;
        agent.stop().await;
    }
}
