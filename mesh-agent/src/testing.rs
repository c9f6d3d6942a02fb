//! The in-process test tier: a mesh state built in code ([`Mesh`]), a CA in memory, metrics
//! with a registry of their own, and agents whose outbound, inbound and tunnel run over
//! loopback ([`Agent`]): no root, no eBPF, milliseconds per test. The netns lab (`tests/`)
//! stays for what needs the kernel.
//!
//! Each [`Loopback`] is a /16 of 127.0.0.0/8 of its own (`127.B.0.0`), so tests running at
//! once never share an address: node `k` is `127.B.k.1` (its agent's tunnel on port 15008),
//! its pods are `127.B.(100+k).0/24`.

pub mod collector;
pub mod rate_limit_service;
pub mod third_party;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{CgroupPath, Config, Endpoint, Name, Node, Protocol, Service, ServicePort, Workload},
    discovery::Snapshot,
    identity::{
        CertificateAuthority, FileCa, Signed, bundle::TrustBundle, certificates::Certificates,
        signer::Signer,
    },
    observability::{metrics::Metrics, traces::Tracer},
    proxy::{
        balance::{EndpointStates, Strategy},
        dial::LocalDialer,
        http::{serve::HttpProxy, serving::HttpServing, upstream::Upstreams},
        inbound::Inbound,
        liveness::Liveness,
        open::{self, OpenConnections},
        outbound::{CapturedConnect, Captures, Outbound},
        rate_limit::global::GlobalLimiter,
        tunnel::Tunnels,
    },
    state::routes::{Routes, TUNNEL_PORT},
};

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

/// The cgroup id the in-process tests give the `i`th workload of a state.
pub const fn cgroup_of(i: usize) -> u64 {
    1000 + i as u64
}

/// A mesh state built in code; [`Mesh::build`] checks it as a config file would be.
pub struct Mesh(Config);

impl Mesh {
    /// A state whose own node is `name` at `address`, running the pods of `pod_cidr`.
    pub fn node(name_: &str, address: IpAddr, pod_cidr: &str) -> Self {
        Self(Config {
            node: node(name_, address, pod_cidr),
            peers: Vec::new(),
            settings: serde_yaml::from_str(
                "identity: { ca_cert: ca.crt, ca_key: ca.key, certificate_ttl: 1h }",
            )
            .unwrap(),
            workloads: Vec::new(),
            unmeshed_pods: Vec::new(),
            services: Vec::new(),
            authorization: Default::default(),
            egress: Default::default(),
        })
    }

    pub fn peer(mut self, name_: &str, address: IpAddr, pod_cidr: &str) -> Self {
        self.0.peers.push(node(name_, address, pod_cidr));
        self
    }

    /// A meshed workload of this node, running as `namespace/service_account`; its cgroup id
    /// is [`cgroup_of`] its index.
    pub fn workload(
        mut self,
        namespace: &str,
        name_: &str,
        service_account: &str,
        address: IpAddr,
    ) -> Self {
        self.0.workloads.push(Workload {
            name: name(name_),
            namespace: name(namespace),
            service_account: name(service_account),
            addresses: vec![address],
            labels: [("app".to_owned(), service_account.to_owned())].into(),
            cgroup: format!("/{name_}").parse::<CgroupPath>().unwrap(),
        });
        self
    }

    pub fn unmeshed(mut self, address: IpAddr) -> Self {
        self.0.unmeshed_pods.push(address);
        self
    }

    /// A service at `vip:port` whose endpoints (address, node) listen on `target_port`.
    pub fn service(
        mut self,
        namespace: &str,
        name_: &str,
        vip: IpAddr,
        (port, target_port): (u16, u16),
        endpoints: &[(IpAddr, &str)],
    ) -> Self {
        self.0.services.push(Service {
            name: name(name_),
            namespace: name(namespace),
            addresses: vec![vip],
            ports: vec![ServicePort {
                port,
                target_port: Some(target_port),
                protocol: Protocol::Tcp,
                load_balancing: Strategy::default(),
                outlier_detection: None,
                circuit_breakers: None,
                rate_limits: None,
                routes: Vec::new(),
            }],
            endpoints: endpoints
                .iter()
                .map(|(address, node)| Endpoint {
                    address: *address,
                    node: name(node),
                    labels: Default::default(),
                    target_ports: Default::default(),
                })
                .collect(),
            traffic_distribution: Default::default(),
            allowed_regions: Vec::new(),
        });
        self
    }

    /// The last service's ports balance round robin (in the order of its endpoints).
    pub fn round_robin(mut self) -> Self {
        if let Some(service) = self.0.services.last_mut() {
            for port in &mut service.ports {
                port.load_balancing = Strategy::RoundRobin;
            }
        }
        self
    }

    /// The last service's ports speak `protocol`, with `routes` (YAML, a list of routes as
    /// in a config file).
    pub fn http(mut self, protocol: Protocol, routes: &str) -> Self {
        let routes: Vec<crate::config::http::HttpRoute> = serde_yaml::from_str(routes).unwrap();
        if let Some(service) = self.0.services.last_mut() {
            for port in &mut service.ports {
                port.protocol = protocol;
                port.routes = routes.clone();
            }
        }
        self
    }

    /// The last service's ports eject outliers as `policy` says.
    pub fn outlier_detection(mut self, policy: crate::proxy::balance::OutlierDetection) -> Self {
        if let Some(service) = self.0.services.last_mut() {
            for port in &mut service.ports {
                port.outlier_detection = Some(policy);
            }
        }
        self
    }

    /// The last service's ports have `limits` on what is sent to them at once.
    pub fn circuit_breakers(mut self, limits: crate::proxy::breaker::Limits) -> Self {
        if let Some(service) = self.0.services.last_mut() {
            for port in &mut service.ports {
                port.circuit_breakers = Some(limits);
            }
        }
        self
    }

    /// Gives the last service's ports the rate limits of `yaml`.
    pub fn rate_limits(mut self, yaml: &str) -> Self {
        let limits: crate::proxy::rate_limit::RateLimits = serde_yaml::from_str(yaml).unwrap();
        if let Some(service) = self.0.services.last_mut() {
            for port in &mut service.ports {
                port.rate_limits = Some(limits.clone());
            }
        }
        self
    }

    /// Asks the rate limit service at `service` (its failure mode as given).
    pub fn rate_limit_service(mut self, service: SocketAddr, failure_mode: &str) -> Self {
        self.0.settings.rate_limit_service = Some(
            serde_yaml::from_str(&format!(
                "{{ address: 'http://{service}', timeout: 500ms, failure_mode: {failure_mode} }}"
            ))
            .unwrap(),
        );
        self
    }

    /// Labels the last service's endpoint at `address` with `key: value`.
    pub fn label(mut self, address: IpAddr, key: &str, value: &str) -> Self {
        let endpoint = self
            .0
            .services
            .last_mut()
            .and_then(|s| s.endpoints.iter_mut().find(|e| e.address == address));
        if let Some(endpoint) = endpoint {
            endpoint.labels.insert(key.into(), value.into());
        }
        self
    }

    /// How long `auto` ports wait for a client's first bytes.
    pub fn detection_timeout(mut self, wait: Duration) -> Self {
        self.0.settings.protocol_detection_timeout = crate::config::Period(wait);
        self
    }

    /// Exports every request's span to the OTLP collector at `collector`.
    pub fn tracing(mut self, collector: SocketAddr) -> Self {
        self.0.settings.tracing = Some(crate::config::Tracing {
            otlp_endpoint: format!("http://{collector}"),
            sampling: 1.0,
            max_queued_spans: 1024,
        });
        self
    }

    /// The mesh's authorization (YAML, as under `authorization:` in a config file).
    pub fn authorization(mut self, yaml: &str) -> Self {
        self.0.authorization = serde_yaml::from_str(yaml).unwrap();
        self
    }

    /// Labels the node `name_` (this one or a peer) with `key: value`.
    pub fn node_label(mut self, name_: &str, key: &str, value: &str) -> Self {
        let node = std::iter::once(&mut self.0.node)
            .chain(&mut self.0.peers)
            .find(|n| n.name.as_str() == name_)
            .unwrap_or_else(|| panic!("no node {name_}"));
        node.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The mesh's egress (YAML, as under `egress:` in a config file).
    pub fn egress(mut self, yaml: &str) -> Self {
        self.0.egress = serde_yaml::from_str(yaml).unwrap();
        self
    }

    /// The external host `name` resolves to `address`, as the agent's resolver would say.
    pub fn resolved(mut self, name_: &str, address: IpAddr) -> Self {
        let name_ = name_.parse().unwrap();
        self.0
            .egress
            .resolved
            .entry(name_)
            .or_default()
            .push(address);
        self
    }

    /// Changes the trust domain.
    pub fn trust_domain(mut self, trust_domain: &str) -> Self {
        self.0.settings.trust_domain = name(trust_domain);
        self
    }

    pub fn build(self) -> Snapshot {
        if let Err(e) = self.0.check() {
            panic!("the test's mesh state is invalid: {e}");
        }
        Arc::new(self.0)
    }
}

fn node(name_: &str, address: IpAddr, pod_cidr: &str) -> Node {
    Node {
        name: name(name_),
        addresses: vec![address],
        pod_cidrs: vec![pod_cidr.parse().unwrap()],
        labels: Default::default(),
    }
}

/// The routing table of `snapshot`, its workloads' cgroups numbered by [`cgroup_of`].
pub fn routes(snapshot: Snapshot) -> Routes {
    let cgroups: Vec<Option<u64>> = (0..snapshot.workloads.len())
        .map(|i| Some(cgroup_of(i)))
        .collect();
    Routes::new(snapshot, &EndpointStates::default(), &cgroups)
}

/// A CA of `cluster.local` in memory.
pub fn test_ca() -> Arc<FileCa> {
    Arc::new(FileCa::in_memory(
        Signer::generate("cluster.local").unwrap(),
    ))
}

/// A CA in memory, failing while `down` is set; `rotate` moves it to a new key.
pub struct FlakyCa {
    ca: Mutex<Arc<FileCa>>,
    down: AtomicBool,
}

impl FlakyCa {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ca: Mutex::new(test_ca()),
            down: AtomicBool::new(false),
        })
    }

    pub fn current(&self) -> Arc<FileCa> {
        self.ca.lock().unwrap().clone()
    }

    pub fn rotate(&self) {
        *self.ca.lock().unwrap() = Arc::new(FileCa::in_memory(
            Signer::generate("cluster.local").unwrap(),
        ));
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }
}

impl CertificateAuthority for FlakyCa {
    fn sign(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Signed>> {
        let ca = self.current();
        let down = self.down.load(Ordering::Relaxed);
        Box::pin(async move {
            if down {
                anyhow::bail!("the CA is down");
            }
            ca.sign(csr, ttl).await
        })
    }

    fn signer(&self) -> BoxFuture<'_, Result<CertificateDer<'static>>> {
        let ca = self.current();
        let down = self.down.load(Ordering::Relaxed);
        Box::pin(async move {
            if down {
                anyhow::bail!("the CA is down");
            }
            ca.signer().await
        })
    }
}

/// A trust bundle of `ca`'s certificate alone.
pub fn bundle_of(ca: &FileCa) -> Arc<TrustBundle> {
    TrustBundle::fixed(vec![ca.signer_now().cert().clone()]).unwrap()
}

/// Certificates of `ca` (trusting it alone) for identities of `cluster.local`, living `ttl`.
pub fn certificates(ca: Arc<FileCa>, ttl: Duration, metrics: Arc<Metrics>) -> Arc<Certificates> {
    let bundle = bundle_of(&ca);
    Arc::new(Certificates::new(ca, bundle, "cluster.local", ttl, metrics))
}

/// Metrics registered in a registry of their own.
pub fn metrics() -> (Registry, Arc<Metrics>) {
    let mut registry = Registry::with_prefix("mesh");
    let metrics = Arc::new(Metrics::new(&mut registry));
    (registry, metrics)
}

/// The value of the sample of `registry` whose line starts with `series` (a name and any
/// leading labels), summed over the series that match; 0 if none.
pub fn sample(registry: &Registry, series: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits (at most [`PATIENCE`]) until `registry`'s `series` is `value`.
pub async fn sample_reaches(registry: &Registry, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = sample(registry, series);
        if now == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {now}, not {value}, after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A /16 of loopback addresses of one test's own.
pub struct Loopback(u8);

impl Loopback {
    /// A /16 no other test of this process has.
    pub fn reserve() -> Self {
        // 127.0.0.0/16 holds the host's own loopback names; the rest is free.
        static NEXT: AtomicU8 = AtomicU8::new(1);
        let b = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(b < 255, "more in-process tests than loopback /16s");
        Self(b)
    }

    /// Node `k`'s address.
    pub fn node(&self, k: u8) -> IpAddr {
        Ipv4Addr::new(127, self.0, k, 1).into()
    }

    /// Node `k`'s pod CIDR.
    pub fn pod_cidr(&self, k: u8) -> String {
        format!("127.{}.{}.0/24", self.0, 100 + k)
    }

    /// Pod `i` of node `k`.
    pub fn pod(&self, k: u8, i: u8) -> IpAddr {
        Ipv4Addr::new(127, self.0, 100 + k, i).into()
    }
}

/// Captured connections as a test records them.
#[derive(Clone, Default)]
pub struct TestCaptures(Arc<Mutex<HashMap<SocketAddr, CapturedConnect>>>);

impl Captures for TestCaptures {
    fn take(&mut self, client: SocketAddr) -> Option<CapturedConnect> {
        self.0.lock().unwrap().remove(&client)
    }
}

/// One node's agent, in process: outbound on an ephemeral port of the node's address, the
/// inbound tunnel on its port 15008.
pub struct Agent {
    pub routes: watch::Sender<Arc<Routes>>,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub certificates: Arc<Certificates>,
    pub outbound: SocketAddr,
    pub open: Arc<OpenConnections>,
    tunnels: Arc<Tunnels>,
    captures: TestCaptures,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Agent {
    /// Starts the agent of `snapshot`'s node with certificates of `ca`.
    pub async fn start(snapshot: Snapshot, ca: Arc<FileCa>) -> Self {
        let (registry, metrics) = metrics();
        let node = snapshot.node.addresses[0];
        let bundle = bundle_of(&ca);
        let certificates = Arc::new(Certificates::new(
            ca,
            bundle,
            snapshot.settings.trust_domain.as_str(),
            snapshot.settings.identity.certificate_ttl.0,
            metrics.clone(),
        ));
        let tracer = snapshot.settings.tracing.as_ref().map(|tracing| {
            Tracer::start(tracing, snapshot.node.name.as_str(), metrics.clone()).unwrap()
        });
        let rate_limit_service = snapshot
            .settings
            .rate_limit_service
            .as_ref()
            .map(|service| Arc::new(GlobalLimiter::new(service, metrics.clone()).unwrap()));
        let routes = routes(snapshot);
        certificates.hold(&routes.identities());
        within(certificates.issued(&routes.identities())).await;
        let (routes, routes_rx) = watch::channel(Arc::new(routes));
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let liveness = Liveness::every(Duration::from_secs(10));
        let local = LocalDialer { allow_host: true };
        let open = Arc::new(OpenConnections::default());
        let tunnels = Arc::new(Tunnels::new(
            certificates.clone(),
            liveness,
            metrics.clone(),
        ));
        let http = Arc::new(HttpProxy {
            routes: routes_rx.clone(),
            upstreams: Arc::new(Upstreams::new(routes_rx.clone(), tunnels.clone(), local)),
            metrics: metrics.clone(),
            tracer: tracer.clone(),
            rate_limit_service: rate_limit_service.clone(),
        });
        let outbound = Outbound {
            routes: routes_rx.clone(),
            tunnels: tunnels.clone(),
            http,
            local,
            metrics: metrics.clone(),
            open: open.clone(),
            tracker: tracker.clone(),
            stop: stop.clone(),
            abort: stop.clone(),
        };
        let inbound = Inbound {
            tls: certificates.server_config().await.unwrap(),
            http: Arc::new(HttpServing {
                metrics: metrics.clone(),
                routes: routes_rx.clone(),
                tracer: tracer.clone(),
                rate_limit_service,
            }),
            routes: routes_rx,
            tracker: tracker.clone(),
            stop: stop.clone(),
            abort: stop.clone(),
            refused: Arc::default(),
            liveness,
            admission: Arc::default(),
            local,
            metrics: metrics.clone(),
            open: open.clone(),
        };
        // Ends when the agent (the routes' sender) is dropped.
        tokio::spawn(open::cut_denied_on_change(
            open.clone(),
            routes.subscribe(),
            metrics.clone(),
        ));
        let outbound_listener = TcpListener::bind((node, 0)).await.unwrap();
        let outbound_addr = outbound_listener.local_addr().unwrap();
        let inbound_listener = TcpListener::bind((node, TUNNEL_PORT)).await.unwrap();
        let captures = TestCaptures::default();
        tracker.spawn(outbound.serve(outbound_listener, captures.clone()));
        tracker.spawn(inbound.serve(inbound_listener));
        Self {
            routes,
            registry,
            metrics,
            certificates,
            outbound: outbound_addr,
            open,
            tunnels,
            captures,
            stop,
            tracker,
        }
    }

    /// A connection from `source` (in the cgroup `cgroup`) to `dst`, captured as the kernel
    /// would capture it: sent to the outbound listener, its original destination recorded.
    pub async fn connect(&self, source: IpAddr, cgroup: u64, dst: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let client = socket.local_addr().unwrap();
        self.captures
            .0
            .lock()
            .unwrap()
            .insert(client, CapturedConnect { dst, cgroup });
        let conn = socket.connect(self.outbound).await.unwrap();
        // As clients that care about latency (gRPC's among them) do.
        conn.set_nodelay(true).unwrap();
        conn
    }

    /// The agent's tunnel client (its pool of connections to peer agents).
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Stops accepting and closes what is open.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(PATIENCE, self.tracker.wait())
            .await
            .unwrap_or_else(|_| {
                panic!("the agent's tasks did not end within {PATIENCE:?} of its stop")
            });
    }
}

/// How long an in-process test waits for any one answer before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// `work`'s output, if it comes within [`PATIENCE`]; the test fails otherwise.
pub async fn within<F: std::future::Future>(work: F) -> F::Output {
    tokio::time::timeout(PATIENCE, work)
        .await
        .unwrap_or_else(|_| panic!("no answer within {PATIENCE:?}"))
}

/// A pod at `addr` that sends back what it reads until its peer is done.
pub async fn echo_pod(addr: SocketAddr) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// Sends `message` over `conn`, ends its side, and reads everything that comes back.
pub async fn round_trip(mut conn: TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    conn.write_all(message).await?;
    conn.shutdown().await?;
    read_all(conn).await
}

/// Everything `conn` reads until its end (at most [`PATIENCE`]).
pub async fn read_all(mut conn: TcpStream) -> std::io::Result<Vec<u8>> {
    let mut back = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::other(format!("nothing came back within {PATIENCE:?}")))??;
    Ok(back)
}

/// What an [`http_pod`] saw.
#[derive(Debug, Default)]
pub struct PodLog {
    /// Requests received.
    pub requests: std::sync::atomic::AtomicU32,
    /// Requests whose answer the client stopped waiting for.
    pub cancelled: std::sync::atomic::AtomicU32,
    /// Requests still to be answered 503 before the pod answers normally.
    pub failures_left: std::sync::atomic::AtomicU32,
}

/// An HTTP pod at `addr` (HTTP/1.1 and h2c): answers `x-pod: name`, the request's `host` as
/// `x-host`, its `traceparent` as `x-traceparent`, its `mesh-source-address` (which it should
/// never get) as `x-mesh-source-address`, and its body back; `/status/N` answers N; `/sleep/MS` answers after MS
/// milliseconds; an `upgrade: echo` request switches to echoing bytes. While
/// `failures_left` is above 0 it answers 503 and counts down.
pub async fn http_pod(addr: SocketAddr, name: &'static str) -> Arc<PodLog> {
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, StatusCode};

    let log = Arc::new(PodLog::default());
    let listener = TcpListener::bind(addr).await.unwrap();
    let served = log.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let log = served.clone();
            let service =
                hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        log.requests.fetch_add(1, Ordering::Relaxed);
                        let mut response = Response::new(Full::new(bytes::Bytes::new()));
                        response
                            .headers_mut()
                            .insert("x-pod", name.parse().unwrap());
                        if let Some(host) = request.headers().get("host") {
                            response.headers_mut().insert("x-host", host.clone());
                        }
                        // What only agents may say, if it came this far.
                        if let Some(address) = request.headers().get("mesh-source-address") {
                            response
                                .headers_mut()
                                .insert("x-mesh-source-address", address.clone());
                        }
                        if let Some(parent) = request.headers().get("traceparent") {
                            response
                                .headers_mut()
                                .insert("x-traceparent", parent.clone());
                        }
                        let path = request.uri().path().to_owned();
                        let failing = log
                            .failures_left
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok();
                        if failing {
                            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        } else if let Some(code) = path.strip_prefix("/status/") {
                            *response.status_mut() =
                                StatusCode::from_u16(code.parse().unwrap()).unwrap();
                        } else if let Some(ms) = path.strip_prefix("/sleep/") {
                            struct Cancelled(Arc<PodLog>, bool);
                            impl Drop for Cancelled {
                                fn drop(&mut self) {
                                    if !self.1 {
                                        self.0.cancelled.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            let mut guard = Cancelled(log.clone(), false);
                            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                            guard.1 = true;
                        } else if request
                            .headers()
                            .get("upgrade")
                            .is_some_and(|u| u == "echo")
                        {
                            let upgrade = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                if let Ok(upgraded) = upgrade.await {
                                    let (mut r, mut w) =
                                        tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            response
                                .headers_mut()
                                .insert("upgrade", "echo".parse().unwrap());
                            response
                                .headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                        } else {
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            *response.body_mut() = Full::new(body);
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let _ = builder
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(conn), service)
                    .await;
            });
        }
    });
    log
}

/// An HTTP/1.1 client on a connection captured from `source` in `cgroup` to `dst`.
pub async fn http1_client(
    agent: &Agent,
    source: IpAddr,
    cgroup: u64,
    dst: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let conn = agent.connect(source, cgroup, dst).await;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(connection.with_upgrades());
    sender
}

/// An HTTP/2 (h2c) client on a connection captured from `source` in `cgroup` to `dst`.
pub async fn http2_client(
    agent: &Agent,
    source: IpAddr,
    cgroup: u64,
    dst: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let conn = agent.connect(source, cgroup, dst).await;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(conn),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}
