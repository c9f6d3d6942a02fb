//! What a lab is made of, and the addresses its parts get (see DESIGN.md, "The lab").
//!
//! Node `k` (1-based) is 198.18.0.k and 2001:2::k; its pods live in 198.18.k.0/24 and
//! 2001:2:0:k::/64, with the node's pod bridge at .1 and pod `j` (1-based) at .(j+1). Host
//! `i` outside the mesh is 198.18.0.(200+i) and 2001:2::(200+i) (hex), beside the nodes.
//! Service addresses come from the test, inside 198.19.0.0/16 and 2001:2:ff::/64.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where service addresses come from.
pub const SERVICE_CIDR_V4: &str = "198.19.0.0/16";
pub const SERVICE_CIDR_V6: &str = "2001:2:ff::/64";

/// The parts of a lab.
#[derive(Debug, Clone, Default)]
pub struct LabSpec {
    /// Node names, in order: the first is node 1.
    pub nodes: Vec<String>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    /// How long workload certificates live (`90s`, `1h`); an hour if not given.
    pub certificate_ttl: Option<String>,
    /// The agents' `--log-level`; debug for the mesh's own targets if not given (the tests
    /// read those lines).
    pub agent_log_level: Option<String>,
    /// Run the agents with only these capabilities (`BPF`, `NET_ADMIN`, ...), as a
    /// container that is granted them; all of root's if not given.
    pub agent_capabilities: Option<Vec<String>>,
    /// More settings of every agent, each `key: value` in YAML flow style (`tracing: {...}`).
    pub settings: Vec<String>,
    /// Lay the pods' cgroups out as the kubelet does (`<node>/kubepods/pod<uid>`), for agents
    /// that find them from the Kubernetes API.
    pub kubelet_layout: bool,
    /// Hosts outside the mesh (third parties, a DNS server), on the nodes' network.
    pub outside: Vec<String>,
    /// Labels of nodes (a YAML flow mapping by node name).
    pub node_labels: Vec<(String, String)>,
}

/// A pod: its own network namespace and cgroup, on one node.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub node: String,
    /// Whether the node's agent meshes the pod's connects.
    pub enrolled: bool,
}

/// A service of the mesh: its addresses, one port, and the pods behind it.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    pub target_port: u16,
    /// Names of the pods that serve it.
    pub endpoints: Vec<String>,
    /// The port's protocol (`tcp` if not given) and its routes (a YAML flow list).
    pub protocol: Option<String>,
    pub routes: Option<String>,
    /// Endpoint labels by pod name (a YAML flow mapping, like `{ version: v1 }`).
    pub labels: Vec<(String, String)>,
    /// More fields of the port, each `key: value` in YAML flow style.
    pub port_fields: Vec<String>,
    /// More fields of the service, each `key: value` in YAML flow style.
    pub service_fields: Vec<String>,
}

impl ServiceSpec {
    /// A service on port 80 whose endpoints listen on 8080 (`mesh-testpod serve`).
    pub fn echo(name: &str, addresses: &[&str], endpoints: &[&str]) -> Self {
        Self {
            name: name.into(),
            addresses: addresses
                .iter()
                .map(|a| a.parse().unwrap_or_else(|e| panic!("address {a}: {e}")))
                .collect(),
            port: 80,
            target_port: 8080,
            endpoints: endpoints.iter().map(|e| (*e).into()).collect(),
            protocol: None,
            routes: None,
            labels: Vec::new(),
            port_fields: Vec::new(),
            service_fields: Vec::new(),
        }
    }

    /// Gives the service one more field (`key: value`, YAML flow style), such as
    /// `allowed_regions: [eu]`.
    pub fn service_field(mut self, field: &str) -> Self {
        self.service_fields.push(field.into());
        self
    }

    /// The port speaks `protocol`, with `routes` (a YAML flow list) if given.
    pub fn http(mut self, protocol: &str, routes: Option<&str>) -> Self {
        self.protocol = Some(protocol.into());
        self.routes = routes.map(String::from);
        self
    }

    /// Gives the port one more field (`key: value`, YAML flow style), such as
    /// `circuit_breakers: { max_requests: 4 }`.
    pub fn port_field(mut self, field: &str) -> Self {
        self.port_fields.push(field.into());
        self
    }

    /// Labels the endpoint `pod` with `labels` (a YAML flow mapping).
    pub fn label(mut self, pod: &str, labels: &str) -> Self {
        self.labels.push((pod.into(), labels.into()));
        self
    }
}

impl LabSpec {
    /// The lab most tests start from: node `n1`, an enrolled pod `client`, and a pod
    /// `backend` behind the `echo` service at 198.19.0.10:80 (to 8080).
    pub fn client_and_echo() -> Self {
        Self::default()
            .node("n1")
            .pod("n1", "client", true)
            .pod("n1", "backend", false)
            .service(ServiceSpec::echo("echo", &["198.19.0.10"], &["backend"]))
    }

    /// Nodes `n1` and `n2`; an enrolled `client` on n1 and the `echo` service (at
    /// 198.19.0.10) of `backend`, not enrolled, on n2.
    pub fn client_and_echo_across_nodes() -> Self {
        Self::default()
            .node("n1")
            .node("n2")
            .pod("n1", "client", true)
            .pod("n2", "backend", false)
            .service(ServiceSpec::echo("echo", &["198.19.0.10"], &["backend"]))
    }

    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.into());
        self
    }

    pub fn pod(mut self, node: &str, name: &str, enrolled: bool) -> Self {
        self.pods.push(PodSpec {
            name: name.into(),
            node: node.into(),
            enrolled,
        });
        self
    }

    /// Gives every agent one more setting (`key: value`, YAML flow style).
    pub fn setting(mut self, setting: &str) -> Self {
        self.settings.push(setting.into());
        self
    }

    /// A host outside the mesh on the nodes' network (see [`outside_addrs`]).
    pub fn outside(mut self, name: &str) -> Self {
        self.outside.push(name.into());
        self
    }

    /// Labels `node` (a YAML flow mapping, like `{ topology.kubernetes.io/zone: a }`).
    pub fn node_labels(mut self, node: &str, labels: &str) -> Self {
        self.node_labels.push((node.into(), labels.into()));
        self
    }

    /// 1-based index of a host outside the mesh.
    pub fn outside_index(&self, name: &str) -> Option<u8> {
        let i = self.outside.iter().position(|n| n == name)?;
        u8::try_from(i + 1).ok()
    }

    pub fn certificate_ttl(mut self, ttl: &str) -> Self {
        self.certificate_ttl = Some(ttl.into());
        self
    }

    pub fn agent_log_level(mut self, level: &str) -> Self {
        self.agent_log_level = Some(level.into());
        self
    }

    pub fn kubelet_layout(mut self) -> Self {
        self.kubelet_layout = true;
        self
    }

    pub fn agent_capabilities(mut self, capabilities: &[&str]) -> Self {
        self.agent_capabilities = Some(capabilities.iter().map(|c| c.to_string()).collect());
        self
    }

    pub fn service(mut self, service: ServiceSpec) -> Self {
        self.services.push(service);
        self
    }

    /// 1-based index of a node.
    pub fn node_index(&self, node: &str) -> Option<u8> {
        let i = self.nodes.iter().position(|n| n == node)?;
        u8::try_from(i + 1).ok()
    }

    /// 1-based index of a pod among the pods of its node.
    fn pod_index(&self, pod: &str) -> Option<(u8, u8)> {
        let spec = self.pods.iter().find(|p| p.name == pod)?;
        let j = self
            .pods
            .iter()
            .filter(|p| p.node == spec.node)
            .position(|p| p.name == pod)?;
        Some((self.node_index(&spec.node)?, u8::try_from(j + 1).ok()?))
    }

    pub fn pod_spec(&self, pod: &str) -> Option<&PodSpec> {
        self.pods.iter().find(|p| p.name == pod)
    }

    /// A pod's addresses: IPv4 and IPv6.
    pub fn pod_addrs(&self, pod: &str) -> Option<(Ipv4Addr, Ipv6Addr)> {
        let (k, j) = self.pod_index(pod)?;
        Some(pod_addrs(k, j + 1))
    }
}

/// A node's own addresses.
pub fn node_addrs(k: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(198, 18, 0, k),
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, u16::from(k)),
    )
}

/// The addresses of host `i` outside the mesh: on the nodes' network, above every node.
pub fn outside_addrs(i: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(198, 18, 0, 200 + i),
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x200 + u16::from(i)),
    )
}

/// The address of host `h` in node `k`'s pod network (`h` = 1 is the node's bridge).
pub fn pod_addrs(k: u8, h: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(198, 18, k, h),
        Ipv6Addr::new(0x2001, 2, 0, u16::from(k), 0, 0, 0, u16::from(h)),
    )
}

/// A node's pod CIDRs, IPv4 and IPv6.
pub fn pod_cidrs(k: u8) -> [String; 2] {
    [format!("198.18.{k}.0/24"), format!("2001:2:0:{k}::/64")]
}
