//! Where a captured connection goes: a service address to one of its endpoints, a pod
//! address as it is; and whether the hop there is local or through a peer node's agent.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;

use crate::{
    config::{self, Name, Protocol},
    discovery::Snapshot,
    identity::SpiffeId,
    proxy::{
        authorization::{Governing, Policies},
        balance::{Answered, Balancer, EndpointStates, Lease, Unpicked},
        breaker::Breaker,
        locality::Locality,
        rate_limit::RateLimiter,
        refusal::Refusal,
    },
    state::{
        egress::{External, ExternalHosts},
        http::HttpPort,
    },
};

/// The port peer agents accept tunnels on.
pub const TUNNEL_PORT: u16 = 15008;

/// The routing table built from a config ([`Snapshot`]).
pub struct Routes {
    services: HashMap<SocketAddr, Arc<ServicePort>>,
    /// The service ports each endpoint on this node serves (usually one).
    served: HashMap<SocketAddr, Vec<Arc<ServicePort>>>,
    /// Every service endpoint and the hop to it.
    endpoint_hops: Arc<HashMap<SocketAddr, Hop>>,
    local_pod_cidrs: Vec<IpNet>,
    /// The pods of this node the state knows (see [`Routes::is_local_pod`]).
    local_pods: HashSet<IpAddr>,
    peer_pods: Vec<(IpNet, Hop)>,
    /// Local workloads by address: who is being called, and who claims to call.
    workloads: HashMap<IpAddr, Arc<LocalWorkload>>,
    /// Local workloads by cgroup id: who is calling.
    by_cgroup: HashMap<u64, Arc<LocalWorkload>>,
    external: ExternalHosts,
    /// What the table was built from.
    config: Snapshot,
}

/// A meshed workload of this node.
#[derive(Debug)]
pub struct LocalWorkload {
    pub name: String,
    pub namespace: String,
    pub id: SpiffeId,
    /// The authorization policies that govern calls to it.
    pub authorization: Governing,
}

impl LocalWorkload {
    /// The namespace, name and SPIFFE ID of `workload` as metric label values: empty ones for
    /// a caller the mesh does not know.
    pub fn label_values(workload: Option<&Self>) -> [String; 3] {
        workload.map_or_else(Default::default, |w| {
            [w.namespace.clone(), w.name.clone(), w.id.to_string()]
        })
    }
}

/// How to reach a destination from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// Dial it directly: it runs on this node.
    Local,
    /// Through the agent of the node it runs on (one, shared by all its destinations).
    Tunnel(Arc<PeerAgent>),
}

/// Another node's agent.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerAgent {
    /// Its node's name.
    pub node: String,
    /// Its tunnel address.
    pub agent: SocketAddr,
}

/// One port of one service: its endpoints and how to reach each; for an HTTP port, its
/// routes.
#[derive(Debug)]
pub struct ServicePort {
    pub service: String,
    balancer: Balancer,
    /// Its caps on connections, requests and retries at once.
    pub breaker: Breaker,
    /// How fast its endpoints on this node take requests or connections, if it says.
    /// Shared by every view of the port (its subsets, a route's backend): one set of buckets.
    pub rate_limits: Option<Arc<RateLimiter>>,
    /// Every service endpoint's hop (the table's, shared by its ports).
    hops: Arc<HashMap<SocketAddr, Hop>>,
    /// Set where pinning to regions left endpoints out.
    pub pinned: Option<Pinned>,
    /// The endpoints' port.
    target_port: u16,
    /// Set on ports that speak HTTP (`auto` ones included).
    pub http: Option<HttpPort>,
    pub protocol: Protocol,
}

/// A service pinned to regions that has endpoints outside them, which it never uses.
#[derive(Debug)]
pub struct Pinned {
    /// The allowed regions, comma-separated.
    pub regions: String,
    /// How many endpoints are outside them.
    pub left_out: usize,
}

impl Pinned {
    /// The refusal of a call to `service` that found no endpoint inside the pin.
    pub fn refusal(&self, service: &str) -> Refusal {
        Refusal::Pinned {
            service: service.to_owned(),
            regions: self.regions.clone(),
            left_out: self.left_out,
        }
    }
}

impl ServicePort {
    /// An endpoint not in `tried` and below its cap, and the hop to it.
    pub fn pick(&self, tried: &[SocketAddr]) -> Result<(Lease, Hop), Unpicked> {
        let lease = self.balancer.pick(tried)?;
        let hop = self
            .hops
            .get(&lease.endpoint().addr)
            .ok_or(Unpicked::NoEndpoint)?
            .clone();
        Ok((lease, hop))
    }

    pub fn endpoint_count(&self) -> usize {
        self.balancer.endpoint_count()
    }

    /// The endpoint of `lease` answered a request so; `true` if that ejected it.
    pub fn answered(&self, lease: &Lease, answered: Answered) -> bool {
        self.balancer.answered(lease, answered)
    }

    pub fn target_port(&self) -> u16 {
        self.target_port
    }
}

/// Where a captured connection may go.
pub enum Route {
    /// To one of a service port's endpoints.
    Service(Arc<ServicePort>),
    /// Straight to a pod, as dialled.
    Pod { target: SocketAddr, hop: Hop },
    /// To a declared external host.
    External(External),
}

/// A caller whose source address and cgroup name different workloads (or only one names any).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the connection from {addr} comes from the cgroup of {} but its address is {}",
    by_cgroup.as_deref().unwrap_or("no workload"),
    by_address.as_deref().map_or("no workload's".to_owned(), |w| format!("{w}'s"))
)]
pub struct CallerMismatch {
    pub addr: IpAddr,
    pub by_cgroup: Option<String>,
    pub by_address: Option<String>,
}

/// Why a captured connection has nowhere to go.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoRoute {
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    #[error("{0} is neither a service address, nor in a pod CIDR, nor a declared external host")]
    NotOwned(SocketAddr),
    #[error("{0} is in this node's pod CIDR but no pod the mesh knows has the address")]
    UnknownPod(SocketAddr),
}

impl Routes {
    /// The table of `config`; endpoints keep their load and health from `states`; `cgroups`
    /// are the workloads' cgroup ids, in order (see `datapath::maps::workload_cgroups`).
    pub fn new(config: Snapshot, states: &EndpointStates, cgroups: &[Option<u64>]) -> Self {
        // One per node, shared by its endpoints and pod CIDRs.
        let node_hops: HashMap<&str, Hop> = std::iter::once(&config.node)
            .chain(&config.peers)
            .map(|node| {
                let hop = if node.name == config.node.name {
                    Hop::Local
                } else {
                    Hop::Tunnel(Arc::new(PeerAgent {
                        node: node.name.to_string(),
                        agent: SocketAddr::new(node.addresses[0], TUNNEL_PORT),
                    }))
                };
                (node.name.as_str(), hop)
            })
            .collect();
        let limiters: HashMap<(&str, &str, u16), Arc<RateLimiter>> = config
            .services
            .iter()
            .flat_map(|s| s.ports.iter().map(move |port| (s, port)))
            .filter_map(|(s, port)| {
                let limiter = Arc::new(RateLimiter::new(port.rate_limits.as_ref()?));
                Some(((s.name.as_str(), s.namespace.as_str(), port.port), limiter))
            })
            .collect();
        let no_labels = BTreeMap::new();
        let node_labels: HashMap<&str, &BTreeMap<String, String>> = std::iter::once(&config.node)
            .chain(&config.peers)
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        let here = Locality::of(config.node.name.as_str(), &no_labels, &config.node.labels);
        let endpoint_hops: Arc<HashMap<SocketAddr, Hop>> = Arc::new(
            config
                .services
                .iter()
                .flat_map(|s| s.ports.iter().map(move |port| (s, port)))
                .flat_map(|(s, port)| {
                    s.endpoints.iter().filter_map(|e| {
                        let hop = node_hops.get(e.node.as_str())?;
                        Some((SocketAddr::new(e.address, e.target_port(port)), hop.clone()))
                    })
                })
                .collect(),
        );
        // Every port's endpoints first, so that HTTP routes can send to other services'.
        let port_of = |s: &config::Service,
                       port: &config::ServicePort,
                       keep: &dyn Fn(&config::Endpoint) -> bool| {
            let mut endpoints = Vec::new();
            let mut pinned_out = 0;
            for e in s.endpoints.iter().filter(|e| keep(e)) {
                let addr = SocketAddr::new(e.address, e.target_port(port));
                let labels_of_node = node_labels.get(e.node.as_str()).copied();
                let locality = Locality::of(
                    e.node.as_str(),
                    &e.labels,
                    labels_of_node.unwrap_or(&no_labels),
                );
                if !locality.within(&s.allowed_regions) {
                    pinned_out += 1;
                    continue;
                }
                if node_hops.contains_key(e.node.as_str()) {
                    let level = locality.level(&here, s.traffic_distribution);
                    endpoints.push((states.get(addr), level));
                }
            }
            let breaker = Breaker::new(port.circuit_breakers.unwrap_or_default());
            ServicePort {
                service: format!("{}/{}", s.namespace, s.name),
                balancer: Balancer::new(
                    port.load_balancing,
                    port.outlier_detection,
                    breaker.max_per_endpoint(),
                    endpoints,
                ),
                breaker,
                rate_limits: limiters
                    .get(&(s.name.as_str(), s.namespace.as_str(), port.port))
                    .cloned(),
                hops: endpoint_hops.clone(),
                pinned: (pinned_out > 0).then(|| Pinned {
                    regions: s.allowed_regions.join(","),
                    left_out: pinned_out,
                }),
                target_port: port.target_port(),
                http: None,
                protocol: port.protocol,
            }
        };
        let base: HashMap<(String, u16), Arc<ServicePort>> = config
            .services
            .iter()
            .flat_map(|s| s.ports.iter().map(move |port| (s, port)))
            .map(|(s, port)| {
                let name = format!("{}/{}", s.namespace, s.name);
                ((name, port.port), Arc::new(port_of(s, port, &|_| true)))
            })
            .collect();
        let mut services = HashMap::new();
        let mut served = HashMap::new();
        for s in &config.services {
            for port in &s.ports {
                let this = &base[&(format!("{}/{}", s.namespace, s.name), port.port)];
                let service_port = if port.protocol == Protocol::Tcp {
                    this.clone()
                } else {
                    let http = HttpPort::new(
                        port.protocol,
                        port,
                        this,
                        |name, number| base.get(&(name.to_owned(), number)).cloned(),
                        |subset| {
                            Arc::new(port_of(s, port, &|e| {
                                subset.iter().all(|(k, v)| e.labels.get(k) == Some(v))
                            }))
                        },
                    );
                    Arc::new(ServicePort {
                        http: Some(http),
                        ..port_of(s, port, &|_| true)
                    })
                };
                for addr in &s.addresses {
                    services.insert(SocketAddr::new(*addr, port.port), service_port.clone());
                }
                for e in s.endpoints.iter().filter(|e| e.node == config.node.name) {
                    served
                        .entry(SocketAddr::new(e.address, e.target_port(port)))
                        .or_insert_with(Vec::new)
                        .push(service_port.clone());
                }
            }
        }
        states.prune();
        let mut services_at: HashMap<IpAddr, HashSet<(&Name, &Name)>> = HashMap::new();
        for s in &config.services {
            for e in s.endpoints.iter().filter(|e| e.node == config.node.name) {
                let services = services_at.entry(e.address.to_canonical()).or_default();
                services.insert((&s.namespace, &s.name));
            }
        }
        let policies = Policies::new(&config.authorization);
        let no_services = HashSet::new();
        let mut workloads = HashMap::new();
        let mut by_cgroup = HashMap::new();
        let ids = cgroups.iter().copied().chain(std::iter::repeat(None));
        for (w, cgroup) in config.workloads.iter().zip(ids) {
            let services = w
                .addresses
                .iter()
                .find_map(|a| services_at.get(&a.to_canonical()))
                .unwrap_or(&no_services);
            let workload = Arc::new(LocalWorkload {
                authorization: policies.governing(w, services),
                name: w.name.to_string(),
                namespace: w.namespace.to_string(),
                id: SpiffeId::workload(
                    config.settings.trust_domain.as_str(),
                    w.namespace.as_str(),
                    w.service_account.as_str(),
                ),
            });
            if let Some(id) = cgroup {
                by_cgroup.insert(id, workload.clone());
            }
            for a in &w.addresses {
                workloads.insert(*a, workload.clone());
            }
        }
        let node = &config.node;
        let local_pods = config
            .workloads
            .iter()
            .flat_map(|w| &w.addresses)
            .chain(&config.unmeshed_pods)
            .chain(
                config
                    .services
                    .iter()
                    .flat_map(|s| &s.endpoints)
                    .filter(|e| e.node == node.name)
                    .map(|e| &e.address),
            )
            .map(|a| a.to_canonical())
            // The node's own addresses are never in its pod CIDRs (the config's checks).
            .filter(|a| node.pod_cidrs.iter().any(|net| net.contains(a)))
            .collect();
        Self {
            services,
            served,
            endpoint_hops,
            local_pod_cidrs: node.pod_cidrs.clone(),
            local_pods,
            peer_pods: config
                .peers
                .iter()
                .filter_map(|p| Some((p, node_hops.get(p.name.as_str())?)))
                .flat_map(|(p, hop)| p.pod_cidrs.iter().map(move |c| (*c, hop.clone())))
                .collect(),
            workloads,
            by_cgroup,
            external: ExternalHosts::new(&config),
            config,
        }
    }

    /// The snapshot the table was built from.
    pub fn config(&self) -> &Snapshot {
        &self.config
    }

    /// Where a connection whose original destination was `dst` may go.
    pub fn route(&self, dst: SocketAddr) -> Result<Route, NoRoute> {
        if let Some(port) = self.services.get(&dst) {
            // An HTTP port's routes may send elsewhere: its requests are answered 503 there.
            // A pinned port is refused as such when the connection tries to pick.
            if port.endpoint_count() == 0 && port.http.is_none() && port.pinned.is_none() {
                return Err(NoRoute::NoEndpoints(port.service.clone()));
            }
            return Ok(Route::Service(port.clone()));
        }
        if self
            .local_pod_cidrs
            .iter()
            .any(|net| net.contains(&dst.ip()))
        {
            if !self.is_local_pod(dst.ip()) {
                return Err(NoRoute::UnknownPod(dst));
            }
            return Ok(Route::Pod {
                target: dst,
                hop: Hop::Local,
            });
        }
        match self
            .peer_pods
            .iter()
            .find(|(net, _)| net.contains(&dst.ip()))
        {
            Some((_, hop)) => Ok(Route::Pod {
                target: dst,
                hop: hop.clone(),
            }),
            None => self
                .external
                .at(dst)
                .map(Route::External)
                .ok_or(NoRoute::NotOwned(dst)),
        }
    }

    /// The declared external hosts.
    pub fn external(&self) -> &ExternalHosts {
        &self.external
    }

    /// The service ports whose endpoint on this node `target` is.
    pub fn served_at(&self, target: SocketAddr) -> &[Arc<ServicePort>] {
        self.served.get(&target).map_or(&[], Vec::as_slice)
    }

    /// The hop to `endpoint`, an endpoint of some service.
    pub fn endpoint_hop(&self, endpoint: SocketAddr) -> Option<&Hop> {
        self.endpoint_hops.get(&endpoint)
    }

    /// Whether `addr` (IPv4-mapped or not) is a pod of this node the state knows: a workload's,
    /// an unmeshed pod's or an endpoint's address in this node's pod CIDRs (which never hold the node's own
    /// addresses; `system::within_this_host` checks the connection itself too). The only
    /// addresses inbound tunnels may reach, and pod addresses of this node dialled directly.
    pub fn is_local_pod(&self, addr: IpAddr) -> bool {
        self.local_pods.contains(&addr.to_canonical())
    }

    /// The local workload at `addr` (IPv4-mapped or not).
    pub fn workload_at(&self, addr: IpAddr) -> Option<&Arc<LocalWorkload>> {
        self.workloads.get(&addr.to_canonical())
    }

    /// The local workload whose (enrolled) cgroup is `cgroup`.
    pub fn workload_of_cgroup(&self, cgroup: u64) -> Option<&Arc<LocalWorkload>> {
        self.by_cgroup.get(&cgroup)
    }

    /// Who calls from `addr` in the enrolled cgroup `cgroup`: the workload of that cgroup,
    /// which must also be the one with that address. A pod that took another's address (or
    /// an address no workload has) is refused rather than given the other's identity.
    pub fn caller(
        &self,
        addr: IpAddr,
        cgroup: u64,
    ) -> Result<Option<Arc<LocalWorkload>>, CallerMismatch> {
        let by_cgroup = self.by_cgroup.get(&cgroup);
        let by_address = self.workload_at(addr);
        match (by_cgroup, by_address) {
            (None, None) => Ok(None),
            (Some(w), Some(a)) if Arc::ptr_eq(w, a) => Ok(Some(w.clone())),
            (w, a) => Err(CallerMismatch {
                addr: addr.to_canonical(),
                by_cgroup: w.map(|w| format!("{}/{}", w.namespace, w.name)),
                by_address: a.map(|a| format!("{}/{}", a.namespace, a.name)),
            }),
        }
    }

    /// Every local workload identity.
    pub fn identities(&self) -> BTreeSet<SpiffeId> {
        self.workloads.values().map(|w| w.id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn routes() -> Routes {
        let config = Config::parse(
            Path::new("t.yaml"),
            "\
node: { name: n1, addresses: [198.18.0.1], pod_cidrs: [198.18.1.0/24] }
peers: [{ name: n2, addresses: [198.18.0.2], pod_cidrs: [198.18.2.0/24] }]
identity: { ca_cert: ca.crt, ca_key: ca.key }
workloads:
  - { name: web-0, namespace: shop, service_account: web, addresses: [198.18.1.9], cgroup: /w }
services:
  - name: cart
    namespace: shop
    addresses: [198.19.0.10, \"2001:2:ff::10\"]
    ports: [{ port: 80, target_port: 8080, load_balancing: round_robin }, { port: 81 }]
    endpoints: [{ address: 198.18.1.2, node: n1 }, { address: 198.18.2.3, node: n2 }]
  - name: empty
    namespace: shop
    addresses: [198.19.0.11]
    ports: [{ port: 80 }]
  - name: on-the-host
    namespace: shop
    addresses: [198.19.0.12]
    ports: [{ port: 80 }]
    endpoints: [{ address: 198.18.0.1, node: n1 }, { address: 127.0.0.1, node: n1 }]
",
        )
        .unwrap();
        Routes::new(
            Arc::new(config),
            &EndpointStates::default(),
            &[Some(WEB_CGROUP)],
        )
    }

    const WEB_CGROUP: u64 = 4242;

    fn service(r: &Routes, dst: &str) -> Arc<ServicePort> {
        match r.route(dst.parse().unwrap()) {
            Ok(Route::Service(port)) => port,
            _ => panic!("{dst} is not a service"),
        }
    }

    #[test]
    fn service_ports_reach_local_and_remote_endpoints() {
        let r = routes();
        let port = service(&r, "198.19.0.10:80");
        assert_eq!(port.service, "shop/cart");
        let picks: Vec<(SocketAddr, Hop)> = (0..2)
            .map(|_| {
                let (lease, hop) = port.pick(&[]).unwrap();
                (lease.endpoint().addr, hop)
            })
            .collect();
        let tunnel = Hop::Tunnel(Arc::new(PeerAgent {
            node: "n2".into(),
            agent: "198.18.0.2:15008".parse().unwrap(),
        }));
        assert_eq!(
            picks,
            vec![
                ("198.18.1.2:8080".parse().unwrap(), Hop::Local),
                ("198.18.2.3:8080".parse().unwrap(), tunnel)
            ]
        );
        assert_eq!(service(&r, "[2001:2:ff::10]:81").target_port(), 81);
    }

    #[test]
    fn pod_addresses_route_as_they_are() {
        let r = routes();
        let Ok(Route::Pod { target, hop }) = r.route("198.18.2.7:9000".parse().unwrap()) else {
            panic!("not a pod route");
        };
        assert_eq!(target, "198.18.2.7:9000".parse().unwrap());
        assert!(matches!(hop, Hop::Tunnel(peer) if peer.node == "n2"));
        let Ok(Route::Pod { hop, .. }) = r.route("198.18.1.9:9000".parse().unwrap()) else {
            panic!("not a pod route");
        };
        assert_eq!(hop, Hop::Local);
    }

    #[test]
    fn local_pods_are_those_the_state_knows_never_the_node_itself() {
        let r = routes();
        let local = |a: &str| r.is_local_pod(a.parse().unwrap());
        // A workload and a service endpoint of this node, in either address form.
        assert!(local("198.18.1.9"));
        assert!(local("::ffff:198.18.1.9"));
        assert!(local("198.18.1.2"));
        // Another node's pod, an address of the CIDR no pod has (the bridge's), and the
        // node's own address and loopback even as endpoints of this node.
        for other in [
            "198.18.2.3",
            "198.18.1.1",
            "::ffff:198.18.1.1",
            "198.18.0.1",
            "127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!local(other), "{other}");
        }
        let unknown: SocketAddr = "198.18.1.1:15020".parse().unwrap();
        assert_eq!(r.route(unknown).err(), Some(NoRoute::UnknownPod(unknown)));
    }

    #[test]
    fn callers_are_known_by_address() {
        let r = routes();
        let web = SpiffeId::workload("cluster.local", "shop", "web");
        let at = |a: &str| r.workload_at(a.parse().unwrap()).map(|w| w.id.clone());
        assert_eq!(at("198.18.1.9"), Some(web.clone()));
        assert_eq!(at("::ffff:198.18.1.9"), Some(web.clone()));
        assert_eq!(
            r.workload_at("198.18.1.9".parse().unwrap()).unwrap().name,
            "web-0"
        );
        assert_eq!(at("198.18.1.2"), None);
        assert_eq!(r.identities().into_iter().collect::<Vec<_>>(), vec![web]);
    }

    #[test]
    fn a_caller_is_who_its_cgroup_says_if_its_address_agrees() {
        let r = routes();
        let caller = |addr: &str, cgroup| {
            r.caller(addr.parse().unwrap(), cgroup)
                .map(|w| w.map(|w| w.name.clone()))
        };
        let mismatch = |by_cgroup: Option<&str>, by_address: Option<&str>| CallerMismatch {
            addr: "198.18.1.7".parse().unwrap(),
            by_cgroup: by_cgroup.map(String::from),
            by_address: by_address.map(String::from),
        };
        // The same workload by cgroup and by address, in either address family form.
        assert_eq!(caller("198.18.1.9", WEB_CGROUP), Ok(Some("web-0".into())));
        assert_eq!(
            caller("::ffff:198.18.1.9", WEB_CGROUP),
            Ok(Some("web-0".into()))
        );
        // Neither knows it: no workload, no identity.
        assert_eq!(caller("198.18.1.7", 1), Ok(None));
        // web-0's cgroup with an address that is not web-0's: it changed its address.
        assert_eq!(
            caller("198.18.1.7", WEB_CGROUP),
            Err(mismatch(Some("shop/web-0"), None))
        );
        // web-0's address from another cgroup: another pod took web-0's address.
        let spoofed = r.caller("198.18.1.9".parse().unwrap(), 1).unwrap_err();
        assert_eq!(spoofed.by_cgroup, None);
        assert_eq!(spoofed.by_address.as_deref(), Some("shop/web-0"));
    }

    #[test]
    fn unroutable_destinations_say_why() {
        let r = routes();
        assert_eq!(
            r.route("198.19.0.11:80".parse().unwrap()).err(),
            Some(NoRoute::NoEndpoints("shop/empty".into()))
        );
        let stray: SocketAddr = "198.19.0.10:8080".parse().unwrap();
        assert_eq!(r.route(stray).err(), Some(NoRoute::NotOwned(stray)));
    }

    /// n1 (this node) and n2 in eu-west (zones a and b), n3 in us-east; `payments` pinned to
    /// eu-west with an endpoint on each node, `catalog` unpinned likewise, and `ledger` pinned
    /// with endpoints only outside.
    fn regional_routes() -> Routes {
        let config = Config::parse(
            Path::new("t.yaml"),
            "\
node:
  name: n1
  addresses: [198.18.0.1]
  pod_cidrs: [198.18.1.0/24]
  labels: { topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: eu-west-a }
peers:
  - name: n2
    addresses: [198.18.0.2]
    pod_cidrs: [198.18.2.0/24]
    labels: { topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: eu-west-b }
  - name: n3
    addresses: [198.18.0.3]
    pod_cidrs: [198.18.3.0/24]
    labels: { topology.kubernetes.io/region: us-east, topology.kubernetes.io/zone: us-east-a }
identity: { ca_cert: ca.crt, ca_key: ca.key }
services:
  - name: payments
    namespace: shop
    addresses: [198.19.0.10]
    ports: [{ port: 80 }]
    allowed_regions: [eu-west]
    endpoints:
      - { address: 198.18.1.2, node: n1 }
      - { address: 198.18.2.2, node: n2 }
      - { address: 198.18.3.2, node: n3 }
  - name: catalog
    namespace: shop
    addresses: [198.19.0.11]
    ports: [{ port: 80 }]
    endpoints:
      - { address: 198.18.2.3, node: n2 }
      - { address: 198.18.3.3, node: n3 }
      # Its own label wins over its node's.
      - { address: 198.18.3.4, node: n3, labels: { topology.kubernetes.io/region: eu-west } }
  - name: ledger
    namespace: shop
    addresses: [198.19.0.12]
    ports: [{ port: 80 }]
    allowed_regions: [eu-west]
    endpoints: [{ address: 198.18.3.5, node: n3 }]
",
        )
        .unwrap();
        Routes::new(Arc::new(config), &EndpointStates::default(), &[])
    }

    fn picked(port: &ServicePort, tried: &[SocketAddr]) -> Option<SocketAddr> {
        port.pick(tried)
            .ok()
            .map(|(lease, _)| lease.endpoint().addr)
    }

    #[test]
    fn pinned_services_never_pick_outside_their_regions() {
        let r = regional_routes();
        let payments = service(&r, "198.19.0.10:80");
        assert_eq!(payments.endpoint_count(), 2);
        let pinned = payments.pinned.as_ref().unwrap();
        assert_eq!((pinned.regions.as_str(), pinned.left_out), ("eu-west", 1));
        // The zone first, then the region; never n3, not even with both tried.
        let zone: SocketAddr = "198.18.1.2:80".parse().unwrap();
        let region: SocketAddr = "198.18.2.2:80".parse().unwrap();
        assert_eq!(picked(&payments, &[]), Some(zone));
        assert_eq!(picked(&payments, &[zone]), Some(region));
        assert_eq!(picked(&payments, &[zone, region]), None);
        // Only endpoints outside: routed, then refused as pinned when it picks.
        let ledger = service(&r, "198.19.0.12:80");
        assert_eq!(ledger.endpoint_count(), 0);
        let refusal = ledger.pinned.as_ref().unwrap().refusal(&ledger.service);
        assert_eq!(refusal.reason(), "pinned");
        assert_eq!(
            refusal.to_string(),
            "service shop/ledger has no endpoint left in its allowed regions (eu-west); 1 outside them are never used"
        );
    }

    #[test]
    fn unpinned_services_prefer_the_region_then_go_anywhere() {
        let r = regional_routes();
        let catalog = service(&r, "198.19.0.11:80");
        assert!(catalog.pinned.is_none());
        let eu: Vec<SocketAddr> = ["198.18.2.3:80", "198.18.3.4:80"]
            .map(|a| a.parse().unwrap())
            .into();
        for _ in 0..20 {
            assert!(eu.contains(&picked(&catalog, &[]).unwrap()));
        }
        assert_eq!(
            picked(&catalog, &eu),
            Some("198.18.3.3:80".parse().unwrap())
        );
    }
}
