//! The agent's YAML configuration: what this node is, which local workloads are meshed, and
//! the services the mesh knows.
//!
//! Every check runs while the YAML is read, so an error names the file, the line and the
//! field (`config.yaml:12:7: services[1].ports[0].port: ...`) and nothing half-read is used.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    marker::PhantomData,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, DeserializeSeed, SeqAccess, Visitor},
};

/// A configuration that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {reason}")]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
}

/// The whole configuration of one node's agent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, try_from = "RawConfig")]
pub struct Config {
    pub node: Node,
    pub trust_domain: Name,
    /// Address ranges the mesh owns at every port (pod CIDRs of all nodes).
    pub pod_cidrs: Vec<IpNet>,
    /// Meshed workloads (pods) running on this node.
    pub workloads: Vec<Workload>,
    /// Services: addresses and ports the mesh owns, and their endpoints.
    pub services: Vec<Service>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Node,
    #[serde(default = "default_trust_domain")]
    trust_domain: Name,
    #[serde(default)]
    pod_cidrs: Vec<IpNet>,
    #[serde(default)]
    workloads: Unique<Workload>,
    #[serde(default)]
    services: Unique<Service>,
}

fn default_trust_domain() -> Name {
    Name("cluster.local".into())
}

impl TryFrom<RawConfig> for Config {
    type Error = String;

    fn try_from(raw: RawConfig) -> Result<Self, String> {
        for cidr in &raw.pod_cidrs {
            if let Some(addr) = raw.node.addresses.iter().find(|a| cidr.contains(*a)) {
                return Err(format!(
                    "pod_cidrs: {cidr} contains the node address {addr}; \
                     the agent's own address must not be captured"
                ));
            }
        }
        Ok(Config {
            node: raw.node,
            trust_domain: raw.trust_domain,
            pod_cidrs: raw.pod_cidrs,
            workloads: raw.workloads.0,
            services: raw.services.0,
        })
    }
}

impl Config {
    /// Reads and validates the configuration in `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Validates `text`, naming `file` in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let message = e.to_string();
            // serde_yaml appends " at line L column C"; the location leads our message instead.
            let reason = match message.rsplit_once(" at line ") {
                Some((reason, _)) => reason.to_owned(),
                None => message,
            };
            ConfigError::Invalid {
                file: file.to_owned(),
                line,
                column,
                reason,
            }
        })
    }
}

/// This node.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, try_from = "RawNode")]
pub struct Node {
    pub name: Name,
    /// The node's addresses, at most one per family: where captured connects are sent.
    pub addresses: Vec<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Name,
    addresses: Vec<IpAddr>,
}

impl TryFrom<RawNode> for Node {
    type Error = String;

    fn try_from(raw: RawNode) -> Result<Self, String> {
        if raw.addresses.is_empty() {
            return Err("addresses: the node needs at least one address".into());
        }
        let v4 = raw.addresses.iter().filter(|a| a.is_ipv4()).count();
        if v4 > 1 || raw.addresses.len() - v4 > 1 {
            return Err("addresses: at most one IPv4 and one IPv6 address".into());
        }
        if let Some(a) = raw
            .addresses
            .iter()
            .find(|a| a.is_unspecified() || a.is_multicast())
        {
            return Err(format!("addresses: {a} cannot be a node address"));
        }
        Ok(Node {
            name: raw.name,
            addresses: raw.addresses,
        })
    }
}

impl Node {
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    pub fn ipv6(&self) -> Option<std::net::Ipv6Addr> {
        self.addresses.iter().find_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }
}

/// A meshed workload (pod) on this node.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: Name,
    pub namespace: Name,
    pub service_account: Name,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The workload's cgroup v2 directory, relative to the cgroup v2 mount.
    pub cgroup: CgroupPath,
}

/// A service: addresses and ports the mesh owns, and the endpoints behind them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, try_from = "RawService")]
pub struct Service {
    pub name: Name,
    pub namespace: Name,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Name,
    namespace: Name,
    addresses: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

impl TryFrom<RawService> for Service {
    type Error = String;

    fn try_from(raw: RawService) -> Result<Self, String> {
        let id = format!("service {}/{}", raw.namespace, raw.name);
        if raw.addresses.is_empty() {
            return Err(format!("{id}: addresses: at least one address is needed"));
        }
        if raw.ports.is_empty() {
            return Err(format!("{id}: ports: at least one port is needed"));
        }
        let mut seen = HashSet::new();
        if let Some(p) = raw.ports.iter().find(|p| !seen.insert(p.port)) {
            return Err(format!("{id}: ports: port {} is listed twice", p.port));
        }
        Ok(Service {
            name: raw.name,
            namespace: raw.namespace,
            addresses: raw.addresses,
            ports: raw.ports,
            endpoints: raw.endpoints,
        })
    }
}

/// One port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, try_from = "RawServicePort")]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port.
    pub target_port: u16,
    pub protocol: Protocol,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServicePort {
    port: u16,
    target_port: Option<u16>,
    #[serde(default)]
    protocol: Protocol,
}

impl TryFrom<RawServicePort> for ServicePort {
    type Error = String;

    fn try_from(raw: RawServicePort) -> Result<Self, String> {
        let target_port = raw.target_port.unwrap_or(raw.port);
        if raw.port == 0 || target_port == 0 {
            return Err("ports: port 0 is not a port".into());
        }
        Ok(ServicePort {
            port: raw.port,
            target_port,
            protocol: raw.protocol,
        })
    }
}

/// What a service port speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
}

/// A backend of a service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: IpAddr,
    /// The node the endpoint runs on.
    pub node: Name,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A lowercase DNS-1123 name: a node, namespace, workload, service account or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if s.len() > 253 || !s.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is not a valid name (lowercase letters, digits, '-' and '.', \
                 at most 253 characters)"
            ));
        }
        Ok(Name(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A cgroup v2 directory relative to the cgroup v2 mount, like `/kubepods/pod1234`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// The directory under the cgroup v2 mount point `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(self.0.trim_start_matches('/'))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CgroupPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') || s.split('/').any(|c| c == ".." || c == ".") {
            return Err(de::Error::custom(format!(
                "cgroup {s:?} must be an absolute path under the cgroup v2 mount, without '.' or '..'"
            )));
        }
        Ok(CgroupPath(s))
    }
}

/// What must be unique across the items of a list, with a description for the error.
trait UniqueKeys {
    fn unique_keys(&self) -> Vec<String>;
}

impl UniqueKeys for Workload {
    fn unique_keys(&self) -> Vec<String> {
        vec![
            format!("workload {}/{}", self.namespace, self.name),
            format!("cgroup {}", self.cgroup),
        ]
    }
}

impl UniqueKeys for Service {
    fn unique_keys(&self) -> Vec<String> {
        let mut keys = vec![format!("service {}/{}", self.namespace, self.name)];
        for addr in &self.addresses {
            for port in &self.ports {
                keys.push(format!(
                    "service address {}",
                    std::net::SocketAddr::new(*addr, port.port)
                ));
            }
        }
        keys
    }
}

/// A list whose items share no [`UniqueKeys`] key. A duplicate is reported at its own line.
#[derive(Debug)]
struct Unique<T>(Vec<T>);

impl<T> Default for Unique<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, T: Deserialize<'de> + UniqueKeys> Deserialize<'de> for Unique<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(UniqueVisitor(PhantomData))
    }
}

struct UniqueVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de> + UniqueKeys> Visitor<'de> for UniqueVisitor<T> {
    type Value = Unique<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique<T>, A::Error> {
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(UniqueItem {
            seen: &mut seen,
            _item: PhantomData,
        })? {
            items.push(item);
        }
        Ok(Unique(items))
    }
}

/// Reads one item and checks its keys against the items before it, so that the error
/// carries the location of the duplicate.
struct UniqueItem<'a, T> {
    seen: &'a mut HashSet<String>,
    _item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de> + UniqueKeys> DeserializeSeed<'de> for UniqueItem<'_, T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        let item = T::deserialize(d)?;
        for key in item.unique_keys() {
            if self.seen.contains(&key) {
                return Err(de::Error::custom(format!("{key} is defined twice")));
            }
            self.seen.insert(key);
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
node:
  name: node-1
  addresses: [198.18.0.1, \"2001:2::1\"]
pod_cidrs: [198.18.1.0/24, \"2001:2:0:1::/64\"]
workloads:
  - name: cart-0
    namespace: shop
    service_account: cart
    addresses: [198.18.1.2]
    cgroup: /mesh-lab/node-1/cart-0
services:
  - name: cart
    namespace: shop
    addresses: [198.19.0.10]
    ports: [{ port: 80, target_port: 8080 }]
    endpoints: [{ address: 198.18.1.2, node: node-1, labels: { version: v1 } }]
";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("node.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn valid_config_is_read_whole() {
        let c = parse(VALID).unwrap();
        assert_eq!(c.node.name.as_str(), "node-1");
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.node.ipv4(), Some("198.18.0.1".parse().unwrap()));
        assert_eq!(c.node.ipv6(), Some("2001:2::1".parse().unwrap()));
        assert_eq!(c.pod_cidrs.len(), 2);
        assert_eq!(c.workloads[0].cgroup.to_string(), "/mesh-lab/node-1/cart-0");
        let port = c.services[0].ports[0];
        assert_eq!((port.port, port.target_port), (80, 8080));
        assert_eq!(port.protocol, Protocol::Tcp);
        assert_eq!(c.services[0].endpoints[0].labels["version"], "v1");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let bad_port = VALID.replace("port: 80,", "port: 80000,");
        let e = parse(&bad_port).unwrap_err();
        assert!(e.starts_with("node.yaml:15:"), "{e}");
        assert!(e.contains("services[0].ports[0].port"), "{e}");

        let unknown = VALID.replace("service_account: cart", "service_acount: cart");
        let e = parse(&unknown).unwrap_err();
        assert!(e.starts_with("node.yaml:8:"), "{e}");
        assert!(e.contains("unknown field `service_acount`"), "{e}");

        let bad_name = VALID.replace(
            "namespace: shop\n    service",
            "namespace: Shop\n    service",
        );
        let e = parse(&bad_name).unwrap_err();
        assert!(e.starts_with("node.yaml:7:"), "{e}");
        assert!(e.contains("\"Shop\" is not a valid name"), "{e}");
    }

    #[test]
    fn duplicates_are_reported_at_the_duplicate() {
        let twice = format!(
            "{VALID}  - name: cart2\n    namespace: shop\n    addresses: [198.19.0.10]\n    ports: [{{ port: 80 }}]\n"
        );
        let e = parse(&twice).unwrap_err();
        assert!(e.starts_with("node.yaml:17:"), "{e}");
        assert!(
            e.contains("service address 198.19.0.10:80 is defined twice"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_are_explained() {
        let cases = [
            (
                VALID.replace("[198.18.1.0/24,", "[198.18.0.0/16,"),
                "contains the node address",
            ),
            (
                VALID.replace("ports: [{ port: 80, target_port: 8080 }]", "ports: []"),
                "at least one port",
            ),
            (
                VALID.replace("cgroup: /mesh-lab", "cgroup: mesh-lab"),
                "must be an absolute path",
            ),
            (
                VALID.replace(
                    "addresses: [198.18.0.1, \"2001:2::1\"]",
                    "addresses: [198.18.0.1, 198.18.0.2]",
                ),
                "at most one IPv4",
            ),
            (
                VALID.replace("[198.19.0.10]", "[198.19.0.300]"),
                "invalid IP address syntax",
            ),
        ];
        for (text, reason) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(reason), "{e} should say {reason}");
        }
    }

    #[test]
    fn unreadable_file_says_so() {
        let e = Config::load(Path::new("/nonexistent/node.yaml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/node.yaml: cannot read"),
            "{e}"
        );
    }
}
