//! The agent's YAML configuration: what this node is, which local workloads are meshed, and
//! the services the mesh knows.
//!
//! An error names the file, the line, the column and the field
//! (`config.yaml:12:7: services[1].ports[0].port: ...`); nothing half-read is ever used.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    marker::PhantomData,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;
use saphyr_parser::{Event, Marker, Span};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, Visitor},
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
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: Node,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: Name,
    /// Address ranges the mesh owns at every port (pod CIDRs of all nodes).
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// Meshed workloads (pods) running on this node.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Services: addresses and ports the mesh owns, and their endpoints.
    #[serde(default)]
    pub services: Vec<Service>,
}

fn default_trust_domain() -> Name {
    Name("cluster.local".into())
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
        let invalid = |(line, column), reason| ConfigError::Invalid {
            file: file.to_owned(),
            line,
            column,
            reason,
        };
        let config: Config = serde_yaml::from_str(text).map_err(|e| {
            let at = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let message = e.to_string();
            // serde_yaml appends " at line L column C"; the location leads our message instead.
            let reason = match message.rsplit_once(" at line ") {
                Some((reason, _)) => reason.to_owned(),
                None => message,
            };
            invalid(at, reason)
        })?;
        config.validate().map_err(|(path, reason)| {
            let at = locate(text, &path).unwrap_or((1, 1));
            invalid(at, format!("{}: {reason}", display_path(&path)))
        })?;
        Ok(config)
    }

    /// The checks that span fields or items; each failure names the path of the culprit.
    fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index as I, Key as K};
        let node = &self.node;
        if node.addresses.is_empty() {
            return Err((
                vec![K("node"), K("addresses")],
                "the node needs an address".into(),
            ));
        }
        for (i, a) in node.addresses.iter().enumerate() {
            let here = || vec![K("node"), K("addresses"), I(i)];
            if a.is_unspecified() || a.is_multicast() {
                return Err((here(), format!("{a} cannot be a node address")));
            }
            if node.addresses[..i]
                .iter()
                .any(|b| b.is_ipv4() == a.is_ipv4())
            {
                return Err((here(), "at most one IPv4 and one IPv6 address".into()));
            }
        }
        for (i, cidr) in self.pod_cidrs.iter().enumerate() {
            if let Some(a) = node.addresses.iter().find(|a| cidr.contains(*a)) {
                return Err((
                    vec![K("pod_cidrs"), I(i)],
                    format!("{cidr} contains the node address {a}, which must never be captured"),
                ));
            }
        }

        let mut workloads = HashSet::new();
        let mut cgroups = HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if !workloads.insert((&w.namespace, &w.name)) {
                return Err((
                    vec![K("workloads"), I(i), K("name")],
                    format!("workload {}/{} is defined twice", w.namespace, w.name),
                ));
            }
            if !cgroups.insert(&w.cgroup) {
                return Err((
                    vec![K("workloads"), I(i), K("cgroup")],
                    format!("cgroup {} belongs to another workload too", w.cgroup),
                ));
            }
        }

        let mut services = HashSet::new();
        let mut service_addrs = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = |rest: &[Seg]| [&[K("services"), I(i)], rest].concat();
            if !services.insert((&s.namespace, &s.name)) {
                return Err((
                    at(&[K("name")]),
                    format!("service {}/{} is defined twice", s.namespace, s.name),
                ));
            }
            if s.addresses.is_empty() {
                return Err((at(&[K("addresses")]), "a service needs an address".into()));
            }
            if s.ports.is_empty() {
                return Err((at(&[K("ports")]), "a service needs a port".into()));
            }
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 || p.target_port == Some(0) {
                    return Err((at(&[K("ports"), I(j)]), "port 0 is not a port".into()));
                }
                if s.ports[..j].iter().any(|q| q.port == p.port) {
                    return Err((
                        at(&[K("ports"), I(j)]),
                        format!("port {} is listed twice", p.port),
                    ));
                }
            }
            for (k, a) in s.addresses.iter().enumerate() {
                for p in &s.ports {
                    if !service_addrs.insert(SocketAddr::new(*a, p.port)) {
                        return Err((
                            at(&[K("addresses"), I(k)]),
                            format!(
                                "{} belongs to another service too",
                                SocketAddr::new(*a, p.port)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// One step of a path into the YAML document.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

/// `services[1].ports[0]`, as serde_yaml writes paths.
fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The (1-based) line and column of the node at `path` in `text`; for a mapping key, of the
/// key. Only called to report an error, so it parses the text again rather than keep spans.
fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let mut events = saphyr_parser::Parser::new_from_str(text).filter_map(Result::ok);
    loop {
        let (event, span) = events.next()?;
        if matches!(
            event,
            Event::MappingStart(..) | Event::SequenceStart(..) | Event::Scalar(..)
        ) {
            let start = find(&mut events, (event, span), path)?;
            return Some((start.line(), start.col() + 1));
        }
    }
}

type Events<'a> = dyn Iterator<Item = (Event<'a>, Span)> + 'a;

/// Walks the node that starts with `first` down `path`.
fn find<'a>(events: &mut Events<'a>, first: (Event<'a>, Span), path: &[Seg]) -> Option<Marker> {
    let Some((seg, rest)) = path.split_first() else {
        return Some(first.1.start);
    };
    match (first.0, seg) {
        (Event::MappingStart(..), Seg::Key(want)) => loop {
            let key = events.next()?;
            let Event::Scalar(name, ..) = &key.0 else {
                return None;
            };
            let value = events.next()?;
            if name == want {
                return if rest.is_empty() {
                    Some(key.1.start)
                } else {
                    find(events, value, rest)
                };
            }
            skip(events, &value.0)?;
        },
        (Event::SequenceStart(..), Seg::Index(want)) => {
            for _ in 0..*want {
                let item = events.next()?;
                if matches!(item.0, Event::SequenceEnd) {
                    return None;
                }
                skip(events, &item.0)?;
            }
            let item = events.next()?;
            find(events, item, rest)
        }
        _ => None,
    }
}

/// Consumes the rest of the node that starts with `first`.
fn skip(events: &mut Events<'_>, first: &Event<'_>) -> Option<()> {
    let mut depth = usize::from(matches!(
        first,
        Event::MappingStart(..) | Event::SequenceStart(..)
    ));
    while depth > 0 {
        match events.next()?.0 {
            Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
            Event::MappingEnd | Event::SequenceEnd => depth -= 1,
            _ => {}
        }
    }
    Some(())
}

/// This node.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: Name,
    /// The node's addresses, at most one per family: where captured connects are sent.
    pub addresses: Vec<IpAddr>,
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
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: Name,
    pub namespace: Name,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port; the service port if not given.
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

impl ServicePort {
    /// The port the endpoints listen on.
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
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
        d.deserialize_str(ParsedStr(PhantomData))
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

impl FromStr for CgroupPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') || s.split('/').any(|c| c == ".." || c == ".") {
            return Err(format!(
                "cgroup {s:?} must be an absolute path under the cgroup v2 mount, without '.' or '..'"
            ));
        }
        Ok(CgroupPath(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for CgroupPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(PhantomData))
    }
}

/// Parses a string scalar with `FromStr` inside the visitor, so that serde_yaml reports an
/// error at the scalar itself.
struct ParsedStr<T>(PhantomData<T>);

impl<T: FromStr<Err = String>> Visitor<'_> for ParsedStr<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        s.parse().map_err(E::custom)
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
        assert_eq!((port.port, port.target_port()), (80, 8080));
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
        assert!(
            e.starts_with("node.yaml:7:16: workloads[0].namespace: "),
            "{e}"
        );
        assert!(e.contains("\"Shop\" is not a valid name"), "{e}");
    }

    #[test]
    fn duplicates_are_reported_at_the_duplicate() {
        let service_twice = format!(
            "{VALID}  - name: cart2\n    namespace: shop\n    addresses: [198.19.0.10]\n    ports: [{{ port: 80 }}]\n"
        );
        assert_eq!(
            parse(&service_twice).unwrap_err(),
            "node.yaml:19:17: services[1].addresses[0]: 198.19.0.10:80 belongs to another service too"
        );

        let cgroup_twice = VALID.replace(
            "services:",
            "  - name: cart-1\n    namespace: shop\n    service_account: cart\n    cgroup: /mesh-lab/node-1/cart-0\nservices:",
        );
        let e = parse(&cgroup_twice).unwrap_err();
        assert!(
            e.starts_with("node.yaml:14:5: workloads[1].cgroup: "),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_are_explained_where_they_are() {
        let cases = [
            (
                VALID.replace("[198.18.1.0/24,", "[198.18.0.0/16,"),
                "node.yaml:4:13: pod_cidrs[0]: 198.18.0.0/16 contains the node address",
            ),
            (
                VALID.replace("ports: [{ port: 80, target_port: 8080 }]", "ports: []"),
                "node.yaml:15:5: services[0].ports: a service needs a port",
            ),
            (
                VALID.replace("port: 80,", "port: 0,"),
                "node.yaml:15:13: services[0].ports[0]: port 0 is not a port",
            ),
            (
                VALID.replace("cgroup: /mesh-lab", "cgroup: mesh-lab"),
                "node.yaml:10:13: workloads[0].cgroup: cgroup \"mesh-lab/node-1/cart-0\" must be",
            ),
            (
                VALID.replace("\"2001:2::1\"]", "198.18.0.2]"),
                "node.yaml:3:27: node.addresses[1]: at most one IPv4",
            ),
            (
                VALID.replace("[198.19.0.10]", "[198.19.0.300]"),
                "node.yaml:14:17: services[0].addresses[0]: invalid IP address syntax",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(&text).unwrap_err();
            assert!(
                e.starts_with(expected),
                "{e}\nshould start with\n{expected}"
            );
        }
    }

    #[test]
    fn the_example_in_deploy_is_valid() {
        let example = include_str!("../../deploy/agent.example.yaml");
        let c = parse(example).unwrap();
        assert_eq!(c.services[0].ports[0].protocol, Protocol::Http);
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
