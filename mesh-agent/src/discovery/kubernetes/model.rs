//! Kubernetes objects → the mesh's config: the same state the YAML file describes.
//!
//! - Nodes → this node and its peers (first InternalIP of each family, `spec.podCIDRs`).
//! - Pods scheduled on this node, in namespaces labelled [`ENROLL_LABEL`]`=true`, not on the
//!   host network, with an IP and a cgroup found → workloads (identity from the namespace
//!   and service account).
//! - Services with cluster IPs (not headless, not ExternalName) → services, TCP ports only;
//!   their EndpointSlices (label `kubernetes.io/service-name`) → endpoints. Each service port
//!   takes its endpoints' port from the slice port of the same name, so named target ports
//!   resolve per pod. Ready endpoints are used; when a service has none, its serving
//!   terminating ones are (as kube-proxy does). Headless services need nothing: their pods'
//!   addresses are meshed through the pod CIDRs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Namespace, Node as KubeNode, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};

use super::{
    authorization::{AuthorizationPolicy, authorization},
    egress::{ExternalHost, egress},
    gateway::{AnyRoute, GRPCRoute, HTTPRoute, routes_of},
    last_good::LastGood,
    policy::{TrafficPolicy, attach_policies},
};
use crate::{
    config::{
        CgroupPath, Config, Endpoint, Name, Node, Protocol, Service, ServicePort, Settings,
        Workload,
    },
    proxy::locality::{REGION_LABEL, TrafficDistribution, ZONE_LABEL},
};

/// The namespace label that enrolls a namespace's pods, with the value `true`.
pub const ENROLL_LABEL: &str = "mesh.dev/enrolled";
/// The EndpointSlice label naming its service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The prefix of the labels of the mesh's own (a Node's `mesh.dev/egress`, say).
const MESH_LABEL_PREFIX: &str = "mesh.dev/";
/// The Service annotation pinning it to regions: a comma-separated list
/// (`mesh.dev/allowed-regions: eu-west-1,eu-central-1`).
pub const ALLOWED_REGIONS_ANNOTATION: &str = "mesh.dev/allowed-regions";

/// The objects the agent watches, as the API returns them (shared with the watchers' stores).
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub namespaces: Vec<Arc<Namespace>>,
    pub nodes: Vec<Arc<KubeNode>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<KubeService>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub http_routes: Vec<Arc<HTTPRoute>>,
    pub grpc_routes: Vec<Arc<GRPCRoute>>,
    pub traffic_policies: Vec<Arc<TrafficPolicy>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// The authorization policies last seen good, kept from build to build.
    pub external_hosts: Vec<Arc<ExternalHost>>,
    pub last_good: LastGoods,
}

/// The last good version of each of the mesh's own objects, by kind.
#[derive(Debug, Clone, Default)]
pub struct LastGoods {
    pub authorization: LastGood<crate::config::authorization::AuthorizationPolicy>,
    pub egress: LastGood<crate::config::egress::ExternalHost>,
}

/// What the cluster's objects make for one node: the config, and what was left out and why.
#[derive(Debug)]
pub struct Discovered {
    pub config: Config,
    pub skipped: Vec<String>,
    /// Authorization policies the agent cannot use, object and field named.
    pub refused: Vec<String>,
    /// Pods whose cgroup is not there yet (the kubelet makes it as the pod starts): worth
    /// building again shortly.
    pub cgroups_pending: bool,
}

impl Cluster {
    /// The config of `this_node`'s agent; `cgroup_of` finds a pod's cgroup from its UID. `None`
    /// while this node is not (yet) among the Node objects.
    pub fn config(
        &self,
        this_node: &Name,
        settings: &Settings,
        cgroup_of: impl Fn(&str) -> Option<CgroupPath>,
    ) -> Option<Discovered> {
        let mut skipped = Vec::new();
        let mut nodes = Vec::new();
        for n in &self.nodes {
            match node(n) {
                Ok(node) => nodes.push(node),
                Err(why) => skipped.push(why),
            }
        }
        let this = nodes.iter().position(|n| n.name == *this_node)?;
        let this = nodes.remove(this);
        // The stores hold objects in no particular order; the config lists them in one, so
        // that the same objects always make the same config.
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let known: HashSet<&Name> = nodes.iter().chain([&this]).map(|n| &n.name).collect();
        let mut cgroups_pending = false;
        let (mut workloads, mut unmeshed_pods) =
            self.pods(&this.name, &cgroup_of, &mut skipped, &mut cgroups_pending);
        workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        unmeshed_pods.sort();
        let slices = self.slices_by_service();
        let mut services: Vec<Service> = self
            .services
            .iter()
            .filter_map(|s| service(s, &slices, &known, &mut skipped))
            .collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.attach_routes(&mut services, &mut skipped);
        // After the routes: a port they made HTTP takes HTTP policies.
        let rate_limit_service = settings.rate_limit_service.is_some();
        attach_policies(
            &self.traffic_policies,
            &mut services,
            rate_limit_service,
            &mut skipped,
        );
        let mut refused = Vec::new();
        let authorization = authorization(
            &self.authorization_policies,
            &self.namespaces,
            &self.last_good.authorization,
            &mut refused,
        );
        let egress = egress(
            &self.external_hosts,
            &self.namespaces,
            &self.last_good.egress,
            &mut refused,
        );
        let mut config = Config {
            node: this,
            peers: nodes,
            settings: settings.clone(),
            workloads,
            unmeshed_pods,
            services,
            authorization,
            egress,
        };
        config.shrink_to_fit();
        Some(Discovered {
            config,
            skipped,
            refused,
            cgroups_pending,
        })
    }

    /// Gives each service port the Gateway API routes attached to it; a TCP port with routes
    /// becomes HTTP (gRPC if a GRPCRoute attaches).
    fn attach_routes(&self, services: &mut [Service], skipped: &mut Vec<String>) {
        let routes: Vec<AnyRoute<'_>> = self
            .http_routes
            .iter()
            .map(|r| AnyRoute::from(&**r))
            .chain(self.grpc_routes.iter().map(|r| AnyRoute::from(&**r)))
            .collect();
        if routes.is_empty() {
            return;
        }
        let ports: HashSet<(String, u16)> = services
            .iter()
            .flat_map(|s| {
                s.ports
                    .iter()
                    .map(move |p| (format!("{}/{}", s.namespace, s.name), p.port))
            })
            .collect();
        for service in services.iter_mut() {
            let (namespace, name) = (service.namespace.to_string(), service.name.to_string());
            for port in &mut service.ports {
                let has_port =
                    |service: &str, number: u16| ports.contains(&(service.to_owned(), number));
                let attached =
                    routes_of(&routes, (&namespace, &name, port.port), has_port, skipped);
                if attached.is_empty() {
                    continue;
                }
                if port.protocol == Protocol::Tcp {
                    let grpc = routes
                        .iter()
                        .any(|r| r.grpc && r.attaches_to(&namespace, &name, port.port));
                    port.protocol = if grpc { Protocol::Grpc } else { Protocol::Http };
                }
                port.routes = attached;
            }
        }
    }

    /// The running pods of `node` (not on its host network): the workloads of enrolled
    /// namespaces, and the addresses of the others.
    fn pods(
        &self,
        node: &Name,
        cgroup_of: &impl Fn(&str) -> Option<CgroupPath>,
        skipped: &mut Vec<String>,
        cgroups_pending: &mut bool,
    ) -> (Vec<Workload>, Vec<IpAddr>) {
        let enrolled: HashSet<&str> = self
            .namespaces
            .iter()
            .filter(|ns| {
                ns.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(ENROLL_LABEL))
                    .is_some_and(|v| v == "true")
            })
            .filter_map(|ns| ns.metadata.name.as_deref())
            .collect();
        let mut workloads = Vec::new();
        let mut unmeshed = Vec::new();
        for pod in &self.pods {
            let (Some(spec), Some(name), Some(namespace)) = (
                pod.spec.as_ref(),
                pod.metadata.name.as_deref(),
                pod.metadata.namespace.as_deref(),
            ) else {
                continue;
            };
            if spec.node_name.as_deref() != Some(node.as_str()) || spec.host_network == Some(true) {
                continue;
            }
            let status = pod.status.as_ref();
            if matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ) {
                continue;
            }
            let addresses: Vec<IpAddr> = status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
                .unwrap_or_default();
            if addresses.is_empty() {
                continue; // Not started yet: it shows up again with its IP.
            }
            if !enrolled.contains(namespace) {
                unmeshed.extend(addresses);
                continue;
            }
            let Some(cgroup) = pod.metadata.uid.as_deref().and_then(cgroup_of) else {
                skipped.push(format!(
                    "pod {namespace}/{name}: no cgroup found for its UID"
                ));
                *cgroups_pending = true;
                continue;
            };
            let account = spec.service_account_name.as_deref().unwrap_or("default");
            match (name.parse(), namespace.parse(), account.parse()) {
                (Ok(name), Ok(namespace), Ok(service_account)) => workloads.push(Workload {
                    name,
                    namespace,
                    service_account,
                    addresses,
                    labels: pod.metadata.labels.clone().unwrap_or_default(),
                    cgroup,
                }),
                _ => skipped.push(format!("pod {namespace}/{name}: not a valid name")),
            }
        }
        (workloads, unmeshed)
    }

    /// The EndpointSlices (not FQDN) of each service, by (namespace, service name), in the
    /// order of their names.
    fn slices_by_service(&self) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &self.endpoint_slices {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let (Some(namespace), Some(service)) = (slice.metadata.namespace.as_deref(), service)
                && slice.address_type != "FQDN"
            {
                by_service
                    .entry((namespace, service))
                    .or_default()
                    .push(slice);
            }
        }
        for slices in by_service.values_mut() {
            slices.sort_by_key(|s| s.metadata.name.as_deref());
        }
        by_service
    }
}

/// The mesh service a Service makes, with its endpoints from `slices`.
fn service(
    service: &KubeService,
    slices: &HashMap<(&str, &str), Vec<&EndpointSlice>>,
    nodes: &HashSet<&Name>,
    skipped: &mut Vec<String>,
) -> Option<Service> {
    let spec = service.spec.as_ref()?;
    let (name, namespace) = (
        service.metadata.name.as_deref()?,
        service.metadata.namespace.as_deref()?,
    );
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let addresses: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(&spec.cluster_ip)
        .filter_map(|ip| ip.parse().ok())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if addresses.is_empty() {
        return None; // Headless: meshed through the pod CIDRs.
    }
    let slices = slices
        .get(&(namespace, name))
        .map(Vec::as_slice)
        .unwrap_or_default();

    // Once per slice, whatever the ports: its endpoints traffic may go to.
    let any_ready = slices
        .iter()
        .any(|s| s.endpoints.iter().any(|e| conditions(e).0));
    let usable: Vec<(&EndpointSlice, Vec<(IpAddr, Endpoint)>)> = slices
        .iter()
        .map(|slice| (*slice, usable_endpoints(slice, any_ready, nodes, skipped)))
        .collect();

    let mut ports = Vec::new();
    // Per endpoint address: its port for each service port.
    let mut endpoint_ports: BTreeMap<IpAddr, (Endpoint, BTreeMap<u16, u16>)> = BTreeMap::new();
    for port in spec.ports.iter().flatten() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let Ok(service_port) = u16::try_from(port.port) else {
            continue;
        };
        let mut target_port = None;
        for (slice, endpoints) in &usable {
            let Some(slice_port) = slice
                .ports
                .iter()
                .flatten()
                // An unnamed service port is the slice's port named "".
                .find(|p| p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or(""))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            target_port.get_or_insert(slice_port);
            for (address, endpoint) in endpoints {
                endpoint_ports
                    .entry(*address)
                    .or_insert_with(|| (endpoint.clone(), BTreeMap::new()))
                    .1
                    .insert(service_port, slice_port);
            }
        }
        ports.push(ServicePort {
            port: service_port,
            target_port: Some(target_port.unwrap_or(service_port)),
            protocol: protocol_of(port.app_protocol.as_deref(), port.name.as_deref()),
            load_balancing: Default::default(),
            // A Service says nothing of outliers.
            outlier_detection: None,
            circuit_breakers: None,
            rate_limits: None,
            routes: Vec::new(),
        });
    }
    if ports.is_empty() {
        return None;
    }
    let endpoints = endpoint_ports
        .into_values()
        .map(|(mut endpoint, by_port)| {
            // Only where the endpoint's port differs from its service port's target.
            endpoint.target_ports = by_port
                .into_iter()
                .filter(|(service_port, target)| {
                    ports
                        .iter()
                        .find(|p| p.port == *service_port)
                        .is_some_and(|p| p.target_port() != *target)
                })
                .collect();
            endpoint
        })
        .collect();
    let traffic_distribution = match spec.traffic_distribution.as_deref() {
        Some("PreferSameNode") => TrafficDistribution::PreferSameNode,
        // PreferClose, PreferSameZone, none or one this agent does not know: the default,
        // closest first.
        _ => TrafficDistribution::PreferClose,
    };
    let allowed_regions = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALLOWED_REGIONS_ANNOTATION))
        .map(|regions| {
            regions
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    match (name.parse(), namespace.parse()) {
        (Ok(name), Ok(namespace)) => Some(Service {
            name,
            namespace,
            addresses,
            ports,
            endpoints,
            traffic_distribution,
            allowed_regions,
        }),
        _ => {
            skipped.push(format!("service {namespace}/{name}: not a valid name"));
            None
        }
    }
}

/// Whether an endpoint is ready, and whether it is serving while terminating. The API: nil
/// ready means ready; nil serving means as ready; nil terminating means not terminating.
fn conditions(e: &k8s_openapi::api::discovery::v1::Endpoint) -> (bool, bool) {
    let c = e.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready, serving && terminating)
}

/// The endpoints of `slice` traffic may go to: ready ones, or while the service has no
/// ready endpoint in any slice (`any_ready`), serving terminating ones. Endpoints on nodes
/// the mesh does not know are skipped.
fn usable_endpoints(
    slice: &EndpointSlice,
    any_ready: bool,
    nodes: &HashSet<&Name>,
    skipped: &mut Vec<String>,
) -> Vec<(IpAddr, Endpoint)> {
    slice
        .endpoints
        .iter()
        .filter(|e| {
            let (ready, serving_terminating) = conditions(e);
            if any_ready {
                ready
            } else {
                serving_terminating
            }
        })
        .filter_map(|e| {
            // The API: consumers use the first address.
            let address: IpAddr = e.addresses.first()?.parse().ok()?;
            let node = e.node_name.as_deref().and_then(|n| n.parse::<Name>().ok());
            let Some(node) = node.filter(|n| nodes.contains(n)) else {
                skipped.push(format!(
                    "endpoint {address}: on node {:?}, which is not a known node",
                    e.node_name
                ));
                return None;
            };
            let labels = e
                .zone
                .iter()
                .map(|zone| (ZONE_LABEL.to_owned(), zone.clone()))
                .collect();
            Some((
                address,
                Endpoint {
                    address,
                    node,
                    labels,
                    target_ports: BTreeMap::new(),
                },
            ))
        })
        .collect()
}

/// A Node object as a mesh node: its first InternalIP of each family, its pod CIDRs.
fn node(node: &KubeNode) -> Result<Node, String> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let invalid = |why: &str| format!("node {name}: {why}");
    let internal: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let mut addresses: Vec<IpAddr> = Vec::new();
    for family_v4 in [true, false] {
        if let Some(a) = internal.iter().find(|a| a.is_ipv4() == family_v4) {
            addresses.push(*a);
        }
    }
    if addresses.is_empty() {
        return Err(invalid("no InternalIP address"));
    }
    let spec = node.spec.as_ref();
    let pod_cidrs: Vec<IpNet> = spec
        .and_then(|s| s.pod_cidrs.clone())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    // Only what the mesh reads: its locality, and the mesh's own labels (egress nodes).
    let labels = node
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| {
            [REGION_LABEL, ZONE_LABEL].contains(&k.as_str()) || k.starts_with(MESH_LABEL_PREFIX)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Node {
        name: name.parse().map_err(|e: String| invalid(&e))?,
        addresses,
        pod_cidrs,
        labels,
    })
}

/// What a Service port speaks: its `appProtocol` (`http`, `kubernetes.io/h2c`, `grpc`), else
/// its name's prefix (`http-`, `http2-`, `grpc-`, or the bare word), else opaque TCP.
fn protocol_of(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let declared = match app_protocol {
        Some("http") => Some(Protocol::Http),
        Some("kubernetes.io/h2c" | "http2") => Some(Protocol::Http2),
        Some("grpc") => Some(Protocol::Grpc),
        Some(_) => Some(Protocol::Tcp),
        None => None,
    };
    declared.unwrap_or_else(|| {
        let prefix = name
            .unwrap_or_default()
            .split('-')
            .next()
            .unwrap_or_default();
        match prefix {
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            _ => Protocol::Tcp,
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::HashMap, path::PathBuf};

    use serde::de::DeserializeOwned;

    use super::*;

    /// The objects of a fixture list (`tests/fixtures/kubernetes/<name>`).
    pub(crate) fn fixture<T: DeserializeOwned>(name: &str) -> Vec<Arc<T>> {
        #[derive(serde::Deserialize)]
        struct List<T> {
            items: Vec<T>,
        }
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/kubernetes")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        serde_yaml::from_str::<List<T>>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .items
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    fn cluster() -> Cluster {
        Cluster {
            namespaces: fixture("namespaces.yaml"),
            nodes: fixture("nodes.yaml"),
            pods: fixture("pods.yaml"),
            services: fixture("services.yaml"),
            endpoint_slices: fixture("endpointslices.yaml"),
            http_routes: Vec::new(),
            grpc_routes: Vec::new(),
            traffic_policies: Vec::new(),
            authorization_policies: fixture("authorizationpolicies.yaml"),
            external_hosts: fixture("externalhosts.yaml"),
            last_good: LastGoods::default(),
        }
    }

    fn settings() -> Settings {
        serde_yaml::from_str(
            "identity: { ca_cert: ca.pem, ca_key: ca-key.pem, certificate_ttl: 1h }",
        )
        .unwrap()
    }

    /// Every pod has a cgroup, named after its UID.
    fn cgroup(uid: &str) -> Option<CgroupPath> {
        format!("/kubepods/pod{uid}").parse().ok()
    }

    fn discovered(node: &str) -> Discovered {
        cluster()
            .config(&node.parse().unwrap(), &settings(), cgroup)
            .unwrap()
    }

    fn service<'a>(config: &'a Config, name: &str) -> Option<&'a Service> {
        config.services.iter().find(|s| s.name.as_str() == name)
    }

    #[test]
    fn nodes_become_this_node_and_its_peers() {
        let d = discovered("worker-1");
        assert_eq!(d.config.node.name.as_str(), "worker-1");
        assert_eq!(
            d.config.node.addresses,
            [
                "10.0.0.11".parse::<IpAddr>().unwrap(),
                "fd00::11".parse().unwrap()
            ]
        );
        assert_eq!(
            d.config.node.pod_cidrs,
            [
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap()
            ]
        );
        let peers: Vec<&str> = d.config.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(peers, ["worker-2"]);
        assert!(
            d.skipped.iter().any(|s| s.contains("no-address")),
            "{:?}",
            d.skipped
        );
        assert!(
            cluster()
                .config(&"elsewhere".parse().unwrap(), &settings(), cgroup)
                .is_none()
        );
    }

    #[test]
    fn only_this_nodes_running_pods_of_enrolled_namespaces_are_workloads() {
        let d = discovered("worker-1");
        let names: Vec<&str> = d.config.workloads.iter().map(|w| w.name.as_str()).collect();
        // cart-1 runs on worker-2, legacy-0 is in a namespace not enrolled, host-agent is on
        // the host network, done-0 has succeeded, pending-0 has no IP yet.
        assert_eq!(names, ["cart-0", "orders-0"]);
        let cart = &d.config.workloads[0];
        assert_eq!(cart.namespace.as_str(), "shop");
        assert_eq!(cart.service_account.as_str(), "cart");
        assert_eq!(
            cart.addresses,
            [
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::5".parse().unwrap()
            ]
        );
        assert_eq!(
            cart.cgroup.to_string(),
            "/kubepods/pod1f3a5c2e-7b4d-4e8f-9a01-2b3c4d5e6f70"
        );
        assert_eq!(d.config.workloads[1].service_account.as_str(), "default");
        // The pod of the namespace not enrolled is known by its address (the tunnel may reach
        // it), the one on the host network is not.
        assert_eq!(
            d.config.unmeshed_pods,
            ["10.244.1.30".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn the_same_objects_in_any_order_make_the_same_config() {
        let mut reversed = cluster();
        reversed.namespaces.reverse();
        reversed.nodes.reverse();
        reversed.pods.reverse();
        reversed.services.reverse();
        reversed.endpoint_slices.reverse();
        let node = "worker-1".parse().unwrap();
        let config = |c: &Cluster| c.config(&node, &settings(), cgroup).unwrap().config;
        assert_eq!(config(&cluster()), config(&reversed));
    }

    #[test]
    fn a_pod_without_a_cgroup_is_skipped_and_said() {
        let d = cluster()
            .config(&"worker-1".parse().unwrap(), &settings(), |_| None)
            .unwrap();
        assert!(d.config.workloads.is_empty());
        assert!(d.cgroups_pending);
        assert!(
            d.skipped.iter().any(|s| s.contains("shop/cart-0")),
            "{:?}",
            d.skipped
        );
    }

    #[test]
    fn services_take_cluster_ips_tcp_ports_and_ready_endpoints() {
        let d = discovered("worker-1");
        let cart = service(&d.config, "cart").unwrap();
        // Dual stack: both cluster IPs; endpoints from the IPv4 and the IPv6 slice.
        assert_eq!(
            cart.addresses,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::10".parse().unwrap()
            ]
        );
        // Two TCP ports; the UDP one is left out.
        let ports: Vec<(u16, u16)> = cart
            .ports
            .iter()
            .map(|p| (p.port, p.target_port()))
            .collect();
        assert_eq!(ports, [(80, 8080), (9090, 9090)]);
        let endpoints: Vec<(String, &str)> = cart
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.node.as_str()))
            .collect();
        // 10.244.1.9 is not ready (and not terminating): left out while others are ready.
        assert_eq!(
            endpoints,
            [
                ("10.244.1.5".to_owned(), "worker-1"),
                ("10.244.2.7".to_owned(), "worker-2"),
                ("fd00:10:244:1::5".to_owned(), "worker-1"),
            ]
        );
        assert_eq!(
            cart.endpoints[1].labels.get(ZONE_LABEL).map(String::as_str),
            Some("eu-west-1b")
        );
    }

    #[test]
    fn locality_comes_from_nodes_slices_and_services() {
        let d = discovered("worker-1");
        let region = |n: &Node| n.labels.get(REGION_LABEL).cloned();
        assert_eq!(region(&d.config.node).as_deref(), Some("eu-west-1"));
        assert_eq!(
            d.config.node.labels.len(),
            2,
            "only topology labels are kept"
        );
        let orders = service(&d.config, "orders").unwrap();
        assert_eq!(
            orders.traffic_distribution,
            TrafficDistribution::PreferSameNode
        );
        assert_eq!(orders.allowed_regions, ["eu-west-1", "eu-central-1"]);
        let cart = service(&d.config, "cart").unwrap();
        assert_eq!(cart.traffic_distribution, TrafficDistribution::PreferClose);
        assert!(cart.allowed_regions.is_empty());
    }

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let d = discovered("worker-1");
        let orders = service(&d.config, "orders").unwrap();
        assert_eq!(orders.ports[0].target_port(), 8080);
        let by_address: HashMap<String, &BTreeMap<u16, u16>> = orders
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), &e.target_ports))
            .collect();
        // orders-0 serves "http" on 8080 (the port's target), orders-1 on 8081.
        assert!(by_address["10.244.1.6"].is_empty());
        assert_eq!(by_address["10.244.2.8"].get(&80), Some(&8081));
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let d = discovered("worker-1");
        let payments = service(&d.config, "payments").unwrap();
        let endpoints: Vec<String> = payments
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        // Nothing ready: the serving terminating endpoint, not the non-serving one.
        assert_eq!(endpoints, ["10.244.2.20"]);
    }

    #[test]
    fn headless_external_name_and_unknown_node_endpoints_are_left_out() {
        let d = discovered("worker-1");
        assert!(service(&d.config, "catalog-headless").is_none());
        assert!(service(&d.config, "stripe").is_none());
        let catalog = service(&d.config, "catalog").unwrap();
        assert!(catalog.endpoints.is_empty());
        assert!(
            d.skipped.iter().any(|s| s.contains("gone-node")),
            "{:?}",
            d.skipped
        );
    }

    #[test]
    fn a_ports_protocol_comes_from_its_app_protocol_then_its_name() {
        let rows = [
            // (appProtocol, name, protocol)
            (Some("http"), Some("tcp-x"), Protocol::Http),
            (Some("kubernetes.io/h2c"), None, Protocol::Http2),
            (Some("grpc"), Some("web"), Protocol::Grpc),
            (Some("mysql"), Some("http"), Protocol::Tcp),
            (None, Some("http-web"), Protocol::Http),
            (None, Some("http"), Protocol::Http),
            (None, Some("http2-api"), Protocol::Http2),
            (None, Some("grpc-orders"), Protocol::Grpc),
            (None, Some("https-web"), Protocol::Tcp),
            (None, Some("web"), Protocol::Tcp),
            (None, None, Protocol::Tcp),
        ];
        for (app_protocol, name, expected) in rows {
            assert_eq!(
                protocol_of(app_protocol, name),
                expected,
                "{app_protocol:?} {name:?}"
            );
        }
    }

    #[test]
    fn gateway_api_routes_attached_to_a_service_become_its_ports_routes() {
        let http_route: HTTPRoute = serde_yaml::from_str(
            "
metadata: { name: cart-routes, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: cart, port: 80 }]
  rules:
    - matches: [{ path: { type: PathPrefix, value: /api } }]
      backendRefs: [{ name: cart, port: 80 }]
      timeouts: { request: 2s, backendRequest: 500ms }
      retry: { codes: [503], attempts: 2, backoff: 10ms }
    - matches: [{ headers: [{ name: X-Canary, value: \"1\" }] }, { path: { type: Exact, value: /new } }]
      backendRefs: [{ name: cart, port: 80, weight: 90 }, { name: orders, port: 80, weight: 10 }]
      filters:
        - { type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: X-Mesh, value: yes }] } }
    - backendRefs: [{ name: nowhere, port: 80 }]
",
        )
        .unwrap();
        let elsewhere: HTTPRoute = serde_yaml::from_str(
            "
metadata: { name: theirs, namespace: other }
spec:
  parentRefs: [{ kind: Service, name: cart, namespace: shop }]
  rules: [{ backendRefs: [{ name: cart, namespace: shop, port: 80 }] }]
",
        )
        .unwrap();
        let grpc_route: GRPCRoute = serde_yaml::from_str(
            "
metadata: { name: orders-rpc, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: orders }]
  rules: [{ matches: [{ method: { service: shop.Orders, method: Place } }], backendRefs: [{ name: orders, port: 80 }] }]
",
        )
        .unwrap();
        let mut cluster = cluster();
        cluster.http_routes = vec![Arc::new(http_route), Arc::new(elsewhere)];
        cluster.grpc_routes = vec![Arc::new(grpc_route)];
        let d = cluster
            .config(&"worker-1".parse().unwrap(), &settings(), cgroup)
            .unwrap();
        d.config.check().unwrap();
        let port = |service: &str| {
            let s = d
                .config
                .services
                .iter()
                .find(|s| s.name.as_str() == service)
                .unwrap();
            s.ports.iter().find(|p| p.port == 80).unwrap().clone()
        };
        let cart = port("cart");
        let names: Vec<&str> = cart.routes.iter().map(|r| r.name.as_str()).collect();
        // By precedence: the exact path, then the prefix, then the header match.
        assert_eq!(
            names,
            ["cart-routes-r1-m1", "cart-routes-r0", "cart-routes-r1-m0"]
        );
        let api = &cart.routes[1];
        assert_eq!(
            api.timeout,
            Some(crate::config::Period(std::time::Duration::from_secs(2)))
        );
        let retry = api.retry.as_ref().unwrap();
        assert_eq!(retry.attempts, 3);
        assert!(
            retry
                .on
                .contains(&crate::config::http::RetryOn::Status(503))
        );
        let canary = &cart.routes[2];
        assert_eq!(canary.matches[0].headers[0].name, "x-canary");
        assert_eq!(canary.backends.len(), 2);
        assert_eq!(canary.backends[1].service.as_deref(), Some("shop/orders"));
        assert_eq!(canary.request_headers.set["x-mesh"], "yes");
        assert!(
            d.skipped
                .iter()
                .any(|s| s.contains("HTTPRoute shop/cart-routes rule 2")),
            "{:?}",
            d.skipped
        );
        let orders = port("orders");
        assert_eq!(orders.protocol, Protocol::Http, "named http: stays HTTP");
        assert_eq!(
            orders.routes[0].matches[0].path,
            Some(crate::config::http::PathMatch::Exact(
                "/shop.Orders/Place".into()
            ))
        );
    }
}
