//! The in-process test tier: a mesh state built in code ([`Mesh`]), a CA in memory, metrics
//! with a registry of their own, and agents whose outbound, inbound and tunnel run over
//! loopback ([`Agent`]): no root, no eBPF, milliseconds per test. The netns lab (`tests/`)
//! stays for what needs the kernel.
//!
//! Each [`Loopback`] is a /16 of 127.0.0.0/8 of its own (`127.B.0.0`), so tests running at
//! once never share an address: node `k` is `127.B.k.1` (its agent's tunnel on port 15008),
//! its pods are `127.B.(100+k).0/24`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{
        CgroupPath, Config, Endpoint, Identity, Name, Node, Period, Protocol, Service, ServicePort,
        Settings, Workload,
    },
    discovery::Snapshot,
    identity::{CertificateAuthority, FileCa, certificates::Certificates},
    observability::metrics::Metrics,
    proxy::{
        balance::{EndpointStates, Strategy},
        dial::LocalDialer,
        inbound::Inbound,
        liveness::Liveness,
        open::OpenConnections,
        outbound::{CapturedConnect, Captures, Outbound},
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
            settings: Settings {
                trust_domain: name("cluster.local"),
                identity: Identity {
                    ca_cert: "ca.crt".into(),
                    ca_key: "ca.key".into(),
                    trust_bundle: None,
                    certificate_ttl: Period(Duration::from_secs(3600)),
                },
            },
            workloads: Vec::new(),
            unmeshed_pods: Vec::new(),
            services: Vec::new(),
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
pub fn test_ca() -> Arc<dyn CertificateAuthority> {
    Arc::new(FileCa::generate("cluster.local").unwrap())
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

/// Waits (at most 10 s) until `registry`'s `series` is `value`.
pub async fn sample_reaches(registry: &Registry, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = sample(registry, series);
        if now == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {now}, not {value}, after 10 s"
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
    pub async fn start(snapshot: Snapshot, ca: Arc<dyn CertificateAuthority>) -> Self {
        let (registry, metrics) = metrics();
        let node = snapshot.node.addresses[0];
        let certificates = Arc::new(Certificates::new(
            ca,
            snapshot.settings.trust_domain.as_str(),
            snapshot.settings.identity.certificate_ttl.0,
            metrics.clone(),
        ));
        let routes = routes(snapshot);
        certificates.hold(&routes.identities()).unwrap();
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
        let outbound = Outbound {
            routes: routes_rx.clone(),
            tunnels: tunnels.clone(),
            local,
            metrics: metrics.clone(),
            open: open.clone(),
            tracker: tracker.clone(),
            stop: stop.clone(),
            abort: stop.clone(),
        };
        let inbound = Inbound {
            tls: certificates.server_config().unwrap(),
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
        socket.connect(self.outbound).await.unwrap()
    }

    /// The agent's tunnel client (its pool of connections to peer agents).
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Stops accepting and closes what is open.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("the agent's tasks did not end within 10 s of its stop");
    }
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

/// Everything `conn` reads until its end (at most 10 s).
pub async fn read_all(mut conn: TcpStream) -> std::io::Result<Vec<u8>> {
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::other("nothing came back within 10 s"))??;
    Ok(back)
}
