//! The agent's YAML configuration: its settings (trust domain, where certificates come from),
//! fixed while it runs, and the mesh as this node sees it (the node, its peers, the meshed
//! local workloads, the services), which the file or the cluster may change at any time.
//!
//! An error names the file, the line, the column and the field
//! (`config.yaml:12:7: services[1].ports[0].port: ...`); nothing half-read is ever used.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    io::Read,
    marker::PhantomData,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use saphyr_parser::{Event, Marker, Span};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, Visitor},
};

use crate::proxy::{
    balance::{OutlierDetection, Strategy},
    breaker::Limits,
    locality::TrafficDistribution,
    rate_limit::{RateLimits, global::RateLimitService},
};

pub mod authorization;
pub mod egress;
pub mod http;

use authorization::Authorization;
use egress::Egress;
use http::HttpRoute;

/// A configuration that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {size} bytes, more than the {MAX_BYTES} a config may have")]
    TooLarge { file: PathBuf, size: u64 },
    #[error("{file}:{line}:{column}: {reason}")]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
}

/// The whole configuration of one node's agent: its [`Settings`], fixed while it runs, and the
/// mesh as this node sees it, which a reload may change. The YAML has them side by side.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(from = "ConfigFile", into = "ConfigFile")]
pub struct Config {
    pub settings: Settings,
    pub node: Node,
    /// The other nodes of the mesh: where their agents listen and which pods they run.
    pub peers: Vec<Node>,
    /// Meshed workloads (pods) running on this node.
    pub workloads: Vec<Workload>,
    /// Addresses of this node's pods that are not meshed: meshed pods of other nodes reach
    /// them through the tunnel, which reaches no address the state does not know (workloads'
    /// and endpoints' addresses count already).
    pub unmeshed_pods: Vec<IpAddr>,
    /// Services: addresses and ports the mesh owns, and their endpoints.
    pub services: Vec<Service>,
    /// Who may call whom.
    pub authorization: Authorization,
    /// Where pods may go outside the mesh.
    pub egress: Egress,
}

/// What the agent is told rather than discovers, fixed while it runs (a change is rejected
/// until a restart): the trust domain and where certificates come from. With `run
/// --kubernetes`, the whole of its file; the cluster gives the rest.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: Name,
    pub identity: Identity,
    /// How long an `auto` port waits for a client's first bytes before it treats the
    /// connection as opaque TCP (a server-first protocol, say).
    #[serde(default = "default_detection_timeout")]
    pub protocol_detection_timeout: Period,
    /// Ports an `auto` service port treats as opaque TCP without waiting: server-first
    /// protocols (SMTP, MySQL, ...).
    #[serde(default = "default_opaque_ports")]
    pub opaque_ports: Vec<u16>,
    /// Where request spans go, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// The Envoy rate limit service that ports with `rate_limits.global` ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_service: Option<RateLimitService>,
    /// The DNS servers that resolve external hosts' names; those of `/etc/resolv.conf` if
    /// none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<SocketAddr>,
}

fn default_detection_timeout() -> Period {
    Period(Duration::from_secs(1))
}

/// SMTP, submission, MySQL, the Galera SST port, PostgreSQL, Redis, Elasticsearch transport
/// and memcached: the server speaks first, or the client may wait long before it does.
fn default_opaque_ports() -> Vec<u16> {
    vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211]
}

/// A config file's shape: settings and mesh in one mapping.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    node: Node,
    #[serde(default)]
    peers: Vec<Node>,
    #[serde(default = "default_trust_domain")]
    trust_domain: Name,
    identity: Identity,
    #[serde(default = "default_detection_timeout")]
    protocol_detection_timeout: Period,
    #[serde(default = "default_opaque_ports")]
    opaque_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tracing: Option<Tracing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limit_service: Option<RateLimitService>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    dns_servers: Vec<SocketAddr>,
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unmeshed_pods: Vec<IpAddr>,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    authorization: Authorization,
    #[serde(default)]
    egress: Egress,
}

impl From<ConfigFile> for Config {
    fn from(f: ConfigFile) -> Self {
        let mut config = Self {
            settings: Settings {
                trust_domain: f.trust_domain,
                identity: f.identity,
                protocol_detection_timeout: f.protocol_detection_timeout,
                opaque_ports: f.opaque_ports,
                tracing: f.tracing,
                rate_limit_service: f.rate_limit_service,
                dns_servers: f.dns_servers,
            },
            node: f.node,
            peers: f.peers,
            workloads: f.workloads,
            unmeshed_pods: f.unmeshed_pods,
            services: f.services,
            authorization: f.authorization,
            egress: f.egress,
        };
        config.shrink_to_fit();
        config
    }
}

impl From<Config> for ConfigFile {
    fn from(c: Config) -> Self {
        Self {
            node: c.node,
            peers: c.peers,
            trust_domain: c.settings.trust_domain,
            identity: c.settings.identity,
            protocol_detection_timeout: c.settings.protocol_detection_timeout,
            opaque_ports: c.settings.opaque_ports,
            tracing: c.settings.tracing,
            rate_limit_service: c.settings.rate_limit_service,
            dns_servers: c.settings.dns_servers,
            workloads: c.workloads,
            unmeshed_pods: c.unmeshed_pods,
            services: c.services,
            authorization: c.authorization,
            egress: c.egress,
        }
    }
}

fn default_trust_domain() -> Name {
    Name("cluster.local".into())
}

/// The largest config file read: twice the 10,000 services and 100,000 endpoints of the
/// benchmark's largest (7.4 MB). A larger one is refused before it is read (parsing costs
/// about 25 times the text's size in memory).
pub const MAX_BYTES: u64 = 16 << 20;
/// How deep mappings and sequences may nest (the config itself needs 11): checked before the
/// text is deserialized, whose cost grows much faster than the depth.
const MAX_DEPTH: usize = 16;
/// The longest reason an error gives: a reason may quote the input, which is never echoed
/// whole.
const MAX_REASON: usize = 200;

/// The text of `file`, unless it is larger than [`MAX_BYTES`].
fn read_limited(file: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        file: file.to_owned(),
        source,
    };
    let f = std::fs::File::open(file).map_err(read_error)?;
    let mut text = String::new();
    // One byte over the limit tells a file that grew since it was opened.
    f.take(MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    let size = text.len() as u64;
    if size > MAX_BYTES {
        let size = std::fs::metadata(file).map_or(size, |m| m.len().max(size));
        return Err(ConfigError::TooLarge {
            file: file.to_owned(),
            size,
        });
    }
    Ok(text)
}

impl Config {
    /// Reads and validates the configuration in `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        Self::parse(file, &read_limited(file)?)
    }

    /// Frees what the services' lists hold beyond their length (a list read from YAML, or
    /// built by pushing, has up to four times the room it needs): they live as long as the
    /// snapshot, and at 10,000 services the room was 10 MiB.
    pub fn shrink_to_fit(&mut self) {
        self.services.shrink_to_fit();
        for s in &mut self.services {
            s.addresses.shrink_to_fit();
            s.ports.shrink_to_fit();
            s.endpoints.shrink_to_fit();
        }
    }

    /// Every pod CIDR of the mesh: this node's and its peers'.
    pub fn pod_cidrs(&self) -> impl Iterator<Item = &IpNet> {
        std::iter::once(&self.node)
            .chain(&self.peers)
            .flat_map(|n| &n.pod_cidrs)
    }

    /// The node called `name`: this one or a peer.
    pub fn node_named(&self, name: &Name) -> Option<&Node> {
        std::iter::once(&self.node)
            .chain(&self.peers)
            .find(|n| n.name == *name)
    }

    /// Validates `text`, naming `file` in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = from_yaml(file, text)?;
        config
            .validate()
            .map_err(|failure| located(file, text, failure))?;
        Ok(config)
    }

    /// The checks [`Config::parse`] makes beyond the shape, for a config built another way:
    /// the first failure as `path: reason`.
    pub fn check(&self) -> Result<(), String> {
        self.validate()
            .map_err(|(path, reason)| format!("{}: {reason}", display_path(&path)))
    }

    /// The checks that span fields or items; each failure names the path of the culprit.
    fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index as I, Key as K};
        let nodes = std::iter::once((K("node"), None, &self.node)).chain(
            self.peers
                .iter()
                .enumerate()
                .map(|(i, p)| (K("peers"), Some(I(i)), p)),
        );
        let mut names = HashSet::new();
        for (key, index, node) in nodes {
            let at = |rest: &[Seg]| [&[key][..], index.as_slice(), rest].concat();
            if !names.insert(&node.name) {
                return Err((
                    at(&[K("name")]),
                    format!("node {} is listed twice", node.name),
                ));
            }
            if node.addresses.is_empty() {
                return Err((at(&[K("addresses")]), "a node needs an address".into()));
            }
            for (i, a) in node.addresses.iter().enumerate() {
                if a.is_unspecified() || a.is_multicast() {
                    return Err((
                        at(&[K("addresses"), I(i)]),
                        format!("{a} cannot be a node address"),
                    ));
                }
                if node.addresses[..i]
                    .iter()
                    .any(|b| b.is_ipv4() == a.is_ipv4())
                {
                    return Err((
                        at(&[K("addresses"), I(i)]),
                        "at most one IPv4 and one IPv6 address".into(),
                    ));
                }
            }
            for (i, cidr) in node.pod_cidrs.iter().enumerate() {
                let node_addr = std::iter::once(&self.node)
                    .chain(&self.peers)
                    .flat_map(|n| &n.addresses)
                    .find(|a| cidr.contains(*a));
                if let Some(a) = node_addr {
                    return Err((
                        at(&[K("pod_cidrs"), I(i)]),
                        format!(
                            "{cidr} contains the node address {a}, which must never be captured"
                        ),
                    ));
                }
            }
        }
        self.settings.identity.validate()?;
        if let Some(tracing) = &self.settings.tracing {
            tracing.validate()?;
        }
        if let Some(service) = &self.settings.rate_limit_service
            && !is_http_url(&service.address)
        {
            return Err((
                vec![K("rate_limit_service"), K("address")],
                format!(
                    "{} is not an http:// URL of the rate limit service",
                    service.address
                ),
            ));
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
        for (i, a) in self.unmeshed_pods.iter().enumerate() {
            if !self.node.pod_cidrs.iter().any(|net| net.contains(a)) {
                return Err((
                    vec![K("unmeshed_pods"), I(i)],
                    format!("{a} is not in this node's pod CIDRs"),
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
                if p.protocol == Protocol::Tcp && !p.routes.is_empty() {
                    return Err((
                        at(&[K("ports"), I(j), K("routes")]),
                        "routes are for HTTP: give the port a protocol (http, http2, grpc or auto)"
                            .into(),
                    ));
                }
                p.validate_policies().map_err(|(path, reason)| {
                    (at(&[&[K("ports"), I(j)], &path[..]].concat()), reason)
                })?;
                let asks_service = p.rate_limits.as_ref().is_some_and(|r| r.global.is_some());
                if asks_service && self.settings.rate_limit_service.is_none() {
                    return Err((
                        at(&[K("ports"), I(j), K("rate_limits"), K("global")]),
                        "global limits need the settings' rate_limit_service".into(),
                    ));
                }
                let has_service_port = |name: &str, port: u16| {
                    self.services.iter().any(|other| {
                        format!("{}/{}", other.namespace, other.name) == name
                            && other.ports.iter().any(|q| q.port == port)
                    })
                };
                http::validate(&p.routes, has_service_port, p.port).map_err(|(path, reason)| {
                    (at(&[&[K("ports"), I(j)], &path[..]].concat()), reason)
                })?;
            }
            for (k, region) in s.allowed_regions.iter().enumerate() {
                if region.trim().is_empty() || region.contains(',') {
                    return Err((
                        at(&[K("allowed_regions"), I(k)]),
                        format!("{region:?} is not a region name"),
                    ));
                }
            }
            for (k, e) in s.endpoints.iter().enumerate() {
                if self.node_named(&e.node).is_none() {
                    return Err((
                        at(&[K("endpoints"), I(k), K("node")]),
                        format!("node {} is neither this node nor one of its peers", e.node),
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
        authorization::validate(&self.authorization)
            .map_err(|(path, reason)| ([&[K("authorization")][..], &path].concat(), reason))?;
        egress::validate(&self.egress)
            .map_err(|(path, reason)| ([&[K("egress")][..], &path].concat(), reason))?;
        for (i, namespace) in self.authorization.strict.namespaces.iter().enumerate() {
            if self.authorization.strict.namespaces[..i].contains(namespace) {
                return Err((
                    vec![K("authorization"), K("strict"), K("namespaces"), I(i)],
                    format!("namespace {namespace} is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

impl Settings {
    /// Reads `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = read_limited(file)?;
        let settings: Self = from_yaml(file, &text)?;
        settings
            .identity
            .validate()
            .map_err(|failure| located(file, &text, failure))?;
        Ok(settings)
    }
}

/// `text` deserialized, or where and why not.
fn from_yaml<T: de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    if let Some(e) = prescan(file, text) {
        return Err(e);
    }
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
            reason: shortened(reason),
        }
    })
}

/// Where `text` nests deeper than [`MAX_DEPTH`] or stops being YAML, if it does: a quick
/// streaming pass before the deserializer, which needs seconds for what this refuses at once.
fn prescan(file: &Path, text: &str) -> Option<ConfigError> {
    let invalid = |at: &Marker, reason: String| ConfigError::Invalid {
        file: file.to_owned(),
        line: at.line(),
        column: at.col() + 1,
        reason: shortened(reason),
    };
    let mut depth = 0usize;
    for event in saphyr_parser::Parser::new_from_str(text) {
        let (event, span) = match event {
            Ok(event) => event,
            Err(e) => return Some(invalid(e.marker(), e.info().to_owned())),
        };
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            _ => continue,
        }
        if depth > MAX_DEPTH {
            return Some(invalid(
                &span.start,
                format!("nested more than {MAX_DEPTH} deep"),
            ));
        }
    }
    None
}

/// `reason`, cut to [`MAX_REASON`] characters.
fn shortened(mut reason: String) -> String {
    if let Some((cut, _)) = reason.char_indices().nth(MAX_REASON) {
        reason.truncate(cut);
        reason.push_str("...");
    }
    reason
}

/// A failed check as an error at the culprit's line and column.
fn located(file: &Path, text: &str, (path, reason): (Vec<Seg>, String)) -> ConfigError {
    let (line, column) = locate(text, &path).unwrap_or((1, 1));
    ConfigError::Invalid {
        file: file.to_owned(),
        line,
        column,
        reason: shortened(format!("{}: {reason}", display_path(&path))),
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

/// A node of the mesh: this one or a peer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: Name,
    /// The node's addresses, at most one per family: where captured connects are sent on this
    /// node, where tunnels go on a peer (the first address).
    pub addresses: Vec<IpAddr>,
    /// Addresses of the node's pods; the mesh owns them at every port.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// The node's labels: its `topology.kubernetes.io/region` and `/zone` are the locality of
    /// its endpoints that name none of their own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
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

/// Where this node's certificates come from: the CA's own files (the agent signs; lab and
/// YAML mode), or the cluster's CA service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The CA certificate and key (PEM); a relative path starts at the config file's directory.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// The CA service to ask instead (no CA key on the node).
    #[serde(default)]
    pub ca_service: Option<CaService>,
    /// The CA certificates peers may chain to (PEM), followed: roots rotate without a
    /// restart. The CA certificate if not given (the file CA only).
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// How long a workload certificate lives, like `24h`, `30m` or `90s`; renewed at half-life.
    #[serde(default = "default_certificate_ttl")]
    pub certificate_ttl: Period,
}

/// The CA service and how the agent shows who it is.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaService {
    /// `host:port`, like `mesh-ca.mesh-system.svc:15012`.
    pub address: String,
    /// The projected service-account token (of the CA's audience), read at each request.
    pub token: PathBuf,
}

impl Identity {
    fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
        let at = |key| vec![Seg::Key("identity"), Seg::Key(key)];
        if self.certificate_ttl.0 < MIN_CERTIFICATE_TTL {
            return Err((
                at("certificate_ttl"),
                format!("certificates must live at least {MIN_CERTIFICATE_TTL:?}"),
            ));
        }
        match (&self.ca_cert, &self.ca_key, &self.ca_service) {
            (Some(_), Some(_), None) => Ok(()),
            (None, None, Some(_)) if self.trust_bundle.is_none() => Err((
                at("ca_service"),
                "name the trust_bundle the CA service's certificates are checked against".into(),
            )),
            (None, None, Some(_)) => Ok(()),
            (_, _, Some(_)) => Err((
                at("ca_service"),
                "either the CA's files (ca_cert, ca_key) or a ca_service, not both".into(),
            )),
            (None, _, None) => Err((
                vec![Seg::Key("identity")],
                "name the CA's files (ca_cert and ca_key) or a ca_service".into(),
            )),
            (Some(_), None, None) => Err((
                vec![Seg::Key("identity")],
                "name the CA's key file (ca_key) beside its certificate".into(),
            )),
        }
    }
}

/// Request spans, exported over OTLP/gRPC.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The OTLP/gRPC collector, like `http://otel-collector.observability:4317`.
    pub otlp_endpoint: String,
    /// The share of requests sampled when the caller has not decided (0 to 1); a caller's
    /// decision in its trace context is always followed.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// Finished spans waiting for export at most; more are dropped, and counted.
    #[serde(default = "default_max_queued_spans")]
    pub max_queued_spans: usize,
}

impl Tracing {
    fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
        let at = |key| vec![Seg::Key("tracing"), Seg::Key(key)];
        if !is_http_url(&self.otlp_endpoint) {
            return Err((
                at("otlp_endpoint"),
                format!(
                    "{} is not an http:// URL of a collector",
                    self.otlp_endpoint
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling) {
            return Err((at("sampling"), "the sampling ratio is from 0 to 1".into()));
        }
        if self.max_queued_spans == 0 {
            return Err((at("max_queued_spans"), "at least one span must fit".into()));
        }
        Ok(())
    }
}

/// Whether `url` is `http://host[:port]...` (services the agent speaks gRPC to without TLS).
fn is_http_url(url: &str) -> bool {
    url.parse::<::http::Uri>()
        .is_ok_and(|uri| uri.scheme_str() == Some("http") && uri.host().is_some())
}

/// Istio's default: one request in a hundred.
fn default_sampling() -> f64 {
    0.01
}

fn default_max_queued_spans() -> usize {
    2048
}

/// The shortest certificate lifetime accepted: renewal must not turn into a busy loop.
const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(2);

fn default_certificate_ttl() -> Period {
    Period(Duration::from_secs(24 * 3600))
}

/// A length of time written as a number and a unit: `250ms`, `90s`, `30m`, `24h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(pub Duration);

impl FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (number, millis) = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
            .iter()
            .find_map(|(unit, millis)| Some((s.strip_suffix(unit)?, *millis)))
            .unwrap_or((s, 0));
        number
            .parse::<u64>()
            .ok()
            .filter(|_| millis > 0)
            .and_then(|n| n.checked_mul(millis))
            .map(|ms| Period(Duration::from_millis(ms)))
            .ok_or_else(|| format!("{s:?} is not a duration like 250ms, 90s, 30m or 24h"))
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(PhantomData))
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
    /// What authorization policies select it by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
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
    /// Which endpoints callers prefer: the closest healthy ones by default.
    #[serde(default, skip_serializing_if = "is_default")]
    pub traffic_distribution: TrafficDistribution,
    /// The regions whose endpoints may serve it (data residency); none: any. Calls are never
    /// sent outside them, even when no endpoint inside is left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_regions: Vec<String>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port; the service port if not given.
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub load_balancing: Strategy,
    /// Ejects endpoints that keep answering with errors (not on a `tcp` port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Caps on what this agent sends to the port at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<Limits>,
    /// How fast the port's endpoints take requests (connections on a `tcp` port), enforced
    /// by the agents serving them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimits>,
    /// HTTP routes (not on a `tcp` port); none sends every request to the port's endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<HttpRoute>,
}

impl ServicePort {
    /// The port the endpoints listen on.
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }

    /// Whether its outlier detection and circuit breakers fit it (a Kubernetes policy that
    /// does not is left out for the port).
    pub fn check_policies(&self) -> Result<(), String> {
        self.validate_policies()
            .map_err(|(path, reason)| format!("{}: {reason}", display_path(&path)))
    }

    fn validate_policies(&self) -> Result<(), (Vec<Seg>, String)> {
        use Seg::Key as K;
        let p = self;
        if let Some(limits) = &p.circuit_breakers {
            let at = |key| vec![K("circuit_breakers"), K(key)];
            let caps = [
                ("max_connections", limits.max_connections),
                ("max_requests", limits.max_requests),
                ("max_retries", limits.max_retries),
                ("max_per_endpoint", limits.max_per_endpoint),
            ];
            if let Some((key, _)) = caps.iter().find(|(_, cap)| *cap == Some(0)) {
                return Err((at(key), "a cap of 0 lets nothing through".into()));
            }
            let http_only = [
                ("max_requests", limits.max_requests.is_some()),
                ("max_pending_requests", limits.max_pending_requests > 0),
                ("max_retries", limits.max_retries.is_some()),
            ];
            if p.protocol == Protocol::Tcp
                && let Some((key, _)) = http_only.iter().find(|(_, set)| *set)
            {
                return Err((
                    at(key),
                    "requests are HTTP: give the port a protocol (http, http2, grpc or auto)"
                        .into(),
                ));
            }
            if limits.max_pending_requests > 0 && limits.max_requests.is_none() {
                return Err((
                    at("max_pending_requests"),
                    "requests wait only for a cap: set max_requests".into(),
                ));
            }
        }
        if let Some(limits) = &p.rate_limits {
            let routes: Vec<&str> = p.routes.iter().map(|r| r.name.as_str()).collect();
            for (i, limit) in limits.local.iter().enumerate() {
                let fault = match limit.fault(&routes) {
                    Some(fault) => Some(fault),
                    None if p.protocol == Protocol::Tcp && limit.route.is_some() => Some((
                        "route",
                        "routes are for HTTP: give the port a protocol (http, http2, grpc or auto)"
                            .into(),
                    )),
                    None => None,
                };
                if let Some((key, reason)) = fault {
                    return Err((
                        vec![K("rate_limits"), K("local"), Seg::Index(i), K(key)],
                        reason,
                    ));
                }
            }
        }
        if let Some(outliers) = &p.outlier_detection {
            let at = |rest: &[Seg]| [&[K("outlier_detection")][..], rest].concat();
            if p.protocol == Protocol::Tcp {
                return Err((
                    at(&[]),
                    "outlier detection counts HTTP answers: give the port a protocol (http, http2, grpc or auto)"
                        .into(),
                ));
            }
            if outliers.max_ejected_percent > 100 {
                return Err((
                    at(&[K("max_ejected_percent")]),
                    format!(
                        "{}% is more than all endpoints",
                        outliers.max_ejected_percent
                    ),
                ));
            }
            if outliers.base_ejection.0.is_zero() {
                return Err((
                    at(&[K("base_ejection")]),
                    "an ejection needs a length".into(),
                ));
            }
        }
        Ok(())
    }
}

/// What a service port speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque bytes.
    #[default]
    Tcp,
    /// HTTP/1.1 to the endpoints (clients may speak HTTP/1.1 or HTTP/2).
    Http,
    /// HTTP/2 without TLS (h2c) to the endpoints.
    Http2,
    /// gRPC: HTTP/2 to the endpoints.
    Grpc,
    /// HTTP/1.1 or HTTP/2 if the client's first bytes say so, else opaque bytes.
    Auto,
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
    /// This endpoint's own port for a service port, where it is not the port's `target_port`
    /// (a Kubernetes named target port resolves per pod).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub target_ports: BTreeMap<u16, u16>,
}

impl Endpoint {
    /// Where this endpoint listens for `port`.
    pub fn target_port(&self, port: &ServicePort) -> u16 {
        self.target_ports
            .get(&port.port)
            .copied()
            .unwrap_or_else(|| port.target_port())
    }
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
peers: [{ name: node-2, addresses: [198.18.0.2], pod_cidrs: [198.18.2.0/24] }]
identity: { ca_cert: ca.crt, ca_key: ca.key, certificate_ttl: 1h }
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
        assert_eq!(c.settings.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.node.ipv4(), Some("198.18.0.1".parse().unwrap()));
        assert_eq!(c.node.ipv6(), Some("2001:2::1".parse().unwrap()));
        assert_eq!(c.pod_cidrs().count(), 3);
        assert_eq!(
            c.settings.identity.certificate_ttl,
            Period(Duration::from_secs(3600))
        );
        assert_eq!(c.workloads[0].cgroup.to_string(), "/mesh-lab/node-1/cart-0");
        let port = &c.services[0].ports[0];
        assert_eq!((port.port, port.target_port()), (80, 8080));
        assert_eq!(port.protocol, Protocol::Tcp);
        assert_eq!(port.load_balancing, Strategy::LeastOutstanding);
        assert_eq!(c.services[0].endpoints[0].labels["version"], "v1");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let bad_port = VALID.replace("port: 80,", "port: 80000,");
        let e = parse(&bad_port).unwrap_err();
        assert!(e.starts_with("node.yaml:17:"), "{e}");
        assert!(e.contains("services[0].ports[0].port"), "{e}");

        let unknown = VALID.replace("service_account: cart", "service_acount: cart");
        let e = parse(&unknown).unwrap_err();
        assert!(e.starts_with("node.yaml:10:"), "{e}");
        assert!(e.contains("unknown field `service_acount`"), "{e}");

        let bad_name = VALID.replace(
            "namespace: shop\n    service",
            "namespace: Shop\n    service",
        );
        let e = parse(&bad_name).unwrap_err();
        assert!(
            e.starts_with("node.yaml:9:16: workloads[0].namespace: "),
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
            "node.yaml:21:17: services[1].addresses[0]: 198.19.0.10:80 belongs to another service too"
        );

        let cgroup_twice = VALID.replace(
            "services:",
            "  - name: cart-1\n    namespace: shop\n    service_account: cart\n    cgroup: /mesh-lab/node-1/cart-0\nservices:",
        );
        let e = parse(&cgroup_twice).unwrap_err();
        assert!(
            e.starts_with("node.yaml:16:5: workloads[1].cgroup: "),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_are_explained_where_they_are() {
        let cases = [
            (
                VALID.replace("[198.18.1.0/24,", "[198.18.0.0/16,"),
                "node.yaml:4:15: node.pod_cidrs[0]: 198.18.0.0/16 contains the node address",
            ),
            (
                VALID.replace("ports: [{ port: 80, target_port: 8080 }]", "ports: []"),
                "node.yaml:17:5: services[0].ports: a service needs a port",
            ),
            (
                VALID.replace("port: 80,", "port: 0,"),
                "node.yaml:17:13: services[0].ports[0]: port 0 is not a port",
            ),
            (
                VALID.replace("cgroup: /mesh-lab", "cgroup: mesh-lab"),
                "node.yaml:12:13: workloads[0].cgroup: cgroup \"mesh-lab/node-1/cart-0\" must be",
            ),
            (
                VALID.replace("\"2001:2::1\"]", "198.18.0.2]"),
                "node.yaml:3:27: node.addresses[1]: at most one IPv4",
            ),
            (
                VALID.replace("node: node-1, labels", "node: node-3, labels"),
                "node.yaml:18:40: services[0].endpoints[0].node: node node-3 is neither this node nor one of its peers",
            ),
            (
                VALID.replace("name: node-2", "name: node-1"),
                "node.yaml:5:11: peers[0].name: node node-1 is listed twice",
            ),
            (
                format!("{VALID}unmeshed_pods: [198.18.1.3, 198.18.2.3]\n"),
                "node.yaml:19:29: unmeshed_pods[1]: 198.18.2.3 is not in this node's pod CIDRs",
            ),
            (
                VALID.replace("pod_cidrs: [198.18.2.0/24]", "pod_cidrs: [198.18.0.0/24]"),
                "node.yaml:5:62: peers[0].pod_cidrs[0]: 198.18.0.0/24 contains the node address 198.18.0.1",
            ),
            (
                VALID.replace("certificate_ttl: 1h", "certificate_ttl: 1s"),
                "node.yaml:6:46: identity.certificate_ttl: certificates must live at least 2s",
            ),
            (
                VALID.replace("certificate_ttl: 1h", "certificate_ttl: 1d"),
                "node.yaml:6:63: identity.certificate_ttl: \"1d\" is not a duration like 250ms, 90s, 30m or 24h",
            ),
            (
                VALID.replace(
                    "ca_key: ca.key,",
                    "ca_key: ca.key, ca_service: { address: \"ca:15012\", token: t },",
                ),
                "node.yaml:6:46: identity.ca_service: either the CA's files (ca_cert, ca_key) or a ca_service, not both",
            ),
            (
                VALID.replace(
                    "ca_cert: ca.crt, ca_key: ca.key,",
                    "ca_service: { address: \"ca:15012\", token: t },",
                ),
                "node.yaml:6:13: identity.ca_service: name the trust_bundle",
            ),
            (
                VALID.replace("ca_cert: ca.crt, ca_key: ca.key,", ""),
                "node.yaml:6:1: identity: name the CA's files (ca_cert and ca_key) or a ca_service",
            ),
            (
                VALID.replace("[198.19.0.10]", "[198.19.0.300]"),
                "node.yaml:16:17: services[0].addresses[0]: invalid IP address syntax",
            ),
            (
                format!(
                    "{VALID}egress: {{ hosts: [{{ names: [api.courier.example], ports: [{{ port: 443, tls: originate }}] }}] }}\n"
                ),
                "node.yaml:19:72: egress.hosts[0].ports[0].tls: the agent originates TLS for HTTP only",
            ),
            (
                format!(
                    "{VALID}egress: {{ hosts: [{{ names: [Api.example], ports: [{{ port: 443 }}] }}] }}\n"
                ),
                "node.yaml:19:29: egress.hosts[0].names[0]: \"Api.example\" is not a lowercase DNS name",
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

    /// VALID with one HTTP port and `routes` (YAML, indented for a port) on it.
    fn with_routes(routes: &str) -> String {
        VALID.replace(
            "ports: [{ port: 80, target_port: 8080 }]",
            &format!("ports:\n      - port: 80\n        protocol: http\n        routes:\n{routes}"),
        )
    }

    #[test]
    fn http_routes_are_read_and_checked() {
        let c = parse(&with_routes(
            "          - name: canary
            matches: [{ path: { prefix: /api }, method: GET, headers: [{ name: x-canary, value: \"1\" }] }]
            backends: [{ subset: { version: v1 }, weight: 90 }, { subset: { version: v2 }, weight: 10 }]
            timeout: 2s
            retry: { attempts: 3, per_try_timeout: 500ms, on: [5xx, \"409\", grpc-unavailable] }
            request_headers: { set: { x-mesh: \"yes\" }, remove: [x-debug] }
          - name: rest
",
        ))
        .unwrap();
        let routes = &c.services[0].ports[0].routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].backends[1].weight, 10);
        let retry = routes[0].retry.as_ref().unwrap();
        assert_eq!(
            retry.on,
            [
                http::RetryOn::ServerError,
                http::RetryOn::Status(409),
                http::RetryOn::Grpc(14)
            ]
        );
        assert_eq!(
            retry.per_try_timeout,
            Some(Period(Duration::from_millis(500)))
        );
        assert_eq!(retry.budget_percent, 20);

        let route = |yaml: &str| format!("          - name: r\n            {yaml}\n");
        let cases = [
            (
                route("matches: [{ path: { regex: \"(\" } }]"),
                "services[0].ports[0].routes[0].matches[0].path: not a regex",
            ),
            (
                route("matches: [{ path: { prefix: api } }]"),
                "services[0].ports[0].routes[0].matches[0].path: \"api\" does not start with /",
            ),
            (
                route("matches: [{ method: get }]"),
                "services[0].ports[0].routes[0].matches[0].method: \"get\" is not an upper-case",
            ),
            (
                route("matches: [{ headers: [{ name: x, value: a, regex: b }] }]"),
                "services[0].ports[0].routes[0].matches[0].headers[0]: give either value or regex",
            ),
            (
                route("backends: [{ service: shop/nowhere }]"),
                "services[0].ports[0].routes[0].backends[0].service: no service shop/nowhere with port 80",
            ),
            (
                route("backends: [{ weight: 0 }]"),
                "services[0].ports[0].routes[0].backends: every weight is 0",
            ),
            (
                route("retry: { attempts: 0 }"),
                "services[0].ports[0].routes[0].retry.attempts: attempts are 1 to 10",
            ),
            (
                route("retry: { on: [sometimes] }"),
                "\"sometimes\" is not connect-failure, reset, 5xx",
            ),
            (
                route("timeout: 0s"),
                "services[0].ports[0].routes[0].timeout: a timeout of 0",
            ),
            (
                format!("{}{}", route("timeout: 1s"), route("timeout: 2s")),
                "services[0].ports[0].routes[1].name: route r is listed twice",
            ),
        ];
        for (routes, expected) in cases {
            let e = parse(&with_routes(&routes)).unwrap_err();
            assert!(e.contains(expected), "{e}\nshould contain\n{expected}");
        }
        let tcp = with_routes(&route("timeout: 1s")).replace("protocol: http", "protocol: tcp");
        assert!(
            parse(&tcp)
                .unwrap_err()
                .contains("services[0].ports[0].routes: routes are for HTTP")
        );
    }

    #[test]
    fn outlier_detection_is_read_with_defaults_and_checked() {
        let port = |protocol: &str, outliers: &str| {
            VALID.replace(
                "ports: [{ port: 80, target_port: 8080 }]",
                &format!(
                    "ports: [{{ port: 80, protocol: {protocol}, outlier_detection: {outliers} }}]"
                ),
            )
        };
        let c = parse(&port("http", "{ consecutive_5xx: 3, base_ejection: 10s }")).unwrap();
        assert_eq!(
            c.services[0].ports[0].outlier_detection,
            Some(OutlierDetection {
                consecutive_5xx: 3,
                base_ejection: Period(Duration::from_secs(10)),
                ..OutlierDetection::default()
            })
        );
        for (yaml, expected) in [
            (
                port("tcp", "{}"),
                "services[0].ports[0].outlier_detection: outlier detection counts HTTP answers",
            ),
            (
                port("grpc", "{ max_ejected_percent: 101 }"),
                "services[0].ports[0].outlier_detection.max_ejected_percent: 101% is more than all endpoints",
            ),
            (
                port("auto", "{ base_ejection: 0s }"),
                "services[0].ports[0].outlier_detection.base_ejection: an ejection needs a length",
            ),
            (port("http", "{ consecutive_errors: 3 }"), "unknown field"),
        ] {
            let e = parse(&yaml).unwrap_err();
            assert!(e.contains(expected), "{e}\nshould contain\n{expected}");
        }
    }

    #[test]
    fn circuit_breakers_are_read_and_checked() {
        let port = |protocol: &str, limits: &str| {
            VALID.replace(
                "ports: [{ port: 80, target_port: 8080 }]",
                &format!(
                    "ports: [{{ port: 80, protocol: {protocol}, circuit_breakers: {limits} }}]"
                ),
            )
        };
        let c = parse(&port(
            "tcp",
            "{ max_connections: 100, max_per_endpoint: 10 }",
        ))
        .unwrap();
        assert_eq!(
            c.services[0].ports[0].circuit_breakers,
            Some(Limits {
                max_connections: Some(100),
                max_per_endpoint: Some(10),
                ..Limits::default()
            })
        );
        let at = "services[0].ports[0].circuit_breakers";
        for (yaml, expected) in [
            (
                port("http", "{ max_retries: 0 }"),
                format!("{at}.max_retries: a cap of 0 lets nothing through"),
            ),
            (
                port("tcp", "{ max_requests: 10 }"),
                format!("{at}.max_requests: requests are HTTP"),
            ),
            (
                port("http", "{ max_pending_requests: 10 }"),
                format!("{at}.max_pending_requests: requests wait only for a cap"),
            ),
            (port("http", "{ max_streams: 3 }"), "unknown field".into()),
        ] {
            let e = parse(&yaml).unwrap_err();
            assert!(e.contains(&expected), "{e}\nshould contain\n{expected}");
        }
    }

    #[test]
    fn rate_limits_and_tracing_are_read_and_checked() {
        let with = |settings: &str, protocol: &str, limits: &str| {
            VALID
                .replace(
                    "identity:",
                    &format!("{settings}\nidentity:"),
                )
                .replace(
                    "ports: [{ port: 80, target_port: 8080 }]",
                    &format!(
                        "ports: [{{ port: 80, protocol: {protocol}, routes: [{{ name: checkout }}], rate_limits: {limits} }}]"
                    ),
                )
        };
        let service = "rate_limit_service: { address: 'http://ratelimit:8081', failure_mode: deny }\ntracing: { otlp_endpoint: 'http://collector:4317', sampling: 0.5 }";
        let c = parse(&with(
            service,
            "http",
            "{ local: [{ requests: 10, per: 1m, route: checkout }], global: { domain: shop } }",
        ))
        .unwrap();
        let limits = c.services[0].ports[0].rate_limits.as_ref().unwrap();
        assert_eq!(limits.local[0].per, Period(Duration::from_secs(60)));
        assert_eq!(limits.global.as_ref().unwrap().domain, "shop");
        let rls = c.settings.rate_limit_service.as_ref().unwrap();
        assert_eq!(rls.timeout, Period(Duration::from_millis(100)));
        assert_eq!(
            rls.failure_mode,
            crate::proxy::rate_limit::global::FailureMode::Deny
        );
        let tracing = c.settings.tracing.as_ref().unwrap();
        assert_eq!((tracing.sampling, tracing.max_queued_spans), (0.5, 2048));
        let at = "services[0].ports[0].rate_limits";
        for (yaml, expected) in [
            (
                with("", "http", "{ global: { domain: shop } }"),
                format!("{at}.global: global limits need the settings' rate_limit_service"),
            ),
            (
                with("", "http", "{ local: [{ requests: 1, route: cart }] }"),
                format!("{at}.local[0].route: the port has no route cart"),
            ),
            (
                with("", "http", "{ local: [{ requests: 0 }] }"),
                format!("{at}.local[0].requests: a rate of 0 lets nothing through"),
            ),
            (
                with("tracing: { otlp_endpoint: 'collector:4317' }", "http", "{}"),
                "tracing.otlp_endpoint: collector:4317 is not an http:// URL of a collector".into(),
            ),
            (
                with(
                    "tracing: { otlp_endpoint: 'http://c:4317', sampling: 2 }",
                    "http",
                    "{}",
                ),
                "tracing.sampling: the sampling ratio is from 0 to 1".into(),
            ),
            (
                with(
                    "rate_limit_service: { address: 'grpc://rls' }",
                    "http",
                    "{}",
                ),
                "rate_limit_service.address: grpc://rls is not an http:// URL".into(),
            ),
        ] {
            let e = parse(&yaml).unwrap_err();
            assert!(e.contains(&expected), "{e}\nshould contain\n{expected}");
        }
        let tcp_route = with("", "tcp", "{ local: [{ requests: 1, route: checkout }] }");
        assert!(
            parse(&tcp_route)
                .unwrap_err()
                .contains("routes are for HTTP")
        );
    }

    #[test]
    fn authorization_is_read_and_checked_by_path() {
        let with = |policies: &str| {
            format!(
                "{VALID}authorization:\n  default_deny: true\n  strict: {{ namespaces: [shop] }}\n  policies:\n    {policies}"
            )
        };
        let good = "\
    - name: charge
      namespace: shop
      target: { service: payments }
      action: allow
      rules:
        - from: [{ principals: ['spiffe://cluster.local/ns/shop/sa/orders', '*/sa/admin'], ip_blocks: [198.18.1.0/24] }]
          to: [{ ports: [8080], methods: [POST], paths: [/charge, /refunds/*], hosts: ['*.shop'], headers: { x-tenant: acme } }]
";
        let c = parse(&with(good)).unwrap();
        assert!(c.authorization.default_deny);
        assert!(c.authorization.strict.covers(&"shop".parse().unwrap()));
        let rule = &c.authorization.policies[0].rules[0];
        assert_eq!(rule.to[0].paths[1].to_string(), "/refunds/*");
        let cases = [
            (
                good.replace("action: allow", "action: permit"),
                "node.yaml:26:15: authorization.policies[0].action: unknown variant `permit`",
            ),
            (
                good.replace("'*/sa/admin'", "'spiffe://a*b'"),
                "node.yaml:28:77: authorization.policies[0].rules[0].from[0].principals[1]: \"spiffe://a*b\": `*` may only start or end a pattern",
            ),
            (
                good.replace("'*/sa/admin'", "'cluster.local/*'"),
                "node.yaml:28:77: authorization.policies[0].rules[0].from[0].principals[1]: cluster.local/*: a principal's prefix starts with spiffe://",
            ),
            (
                good.replace("'spiffe://cluster.local/ns/shop/sa/orders'", "'spiffe://cluster.local/orders'"),
                "node.yaml:28:33: authorization.policies[0].rules[0].from[0].principals[0]: \"spiffe://cluster.local/orders\" is not of the form",
            ),
            (
                good.replace("methods: [POST]", "methods: [post]"),
                "node.yaml:29:43: authorization.policies[0].rules[0].to[0].methods[0]: \"post\" is not an uppercase HTTP method",
            ),
            (
                good.replace("/refunds/*", "refunds/*"),
                "node.yaml:29:67: authorization.policies[0].rules[0].to[0].paths[1]: refunds/*: a path starts with /",
            ),
            (
                good.replace("ip_blocks: [198.18.1.0/24]", "ip_blocks: [198.18.1.0/33]"),
                "node.yaml:28:104: authorization.policies[0].rules[0].from[0].ip_blocks[0]: invalid IP address syntax",
            ),
            (
                good.replace("{ service: payments }", "{ workloads: {} }"),
                "node.yaml:25:17: authorization.policies[0].target.workloads: no labels select every workload",
            ),
            (
                good.replace(
                    "principals: ['spiffe://cluster.local/ns/shop/sa/orders', '*/sa/admin'], ip_blocks: [198.18.1.0/24]",
                    "",
                ),
                "node.yaml:28:18: authorization.policies[0].rules[0].from[0]: an empty source matches every caller",
            ),
            (
                format!("{good}    {good}"),
                "node.yaml:30:7: authorization.policies[1].name: policy shop/charge is defined twice",
            ),
        ];
        for (policies, expected) in cases {
            let e = parse(&with(&policies)).unwrap_err();
            assert!(
                e.starts_with(expected),
                "{e}\nshould start with\n{expected}"
            );
        }
    }

    #[test]
    fn periods_take_milliseconds_to_hours() {
        for (text, ms) in [
            ("250ms", 250),
            ("90s", 90_000),
            ("30m", 1_800_000),
            ("2h", 7_200_000),
        ] {
            let period: Period = text.parse().unwrap();
            assert_eq!(period.0, Duration::from_millis(ms));
            assert_eq!(period.to_string().parse::<Period>().unwrap(), period);
        }
        for bad in ["", "ms", "5", "1d", "-1s", "1.5s"] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_example_in_deploy_is_valid() {
        let example = include_str!("../../deploy/agent.example.yaml");
        let c = parse(example).unwrap();
        assert_eq!(c.services[0].ports[0].protocol, Protocol::Http);
    }

    #[test]
    fn deep_nesting_is_refused_before_it_is_deserialized() {
        // 100,000 levels took serde_yaml 30 s to refuse.
        for deep in [
            format!("node: {}", "[".repeat(100_000)),
            format!("node: {}", "{a: ".repeat(50_000)),
            format!("services:\n{}", "  - ".repeat(17)),
        ] {
            let e = parse(&deep).unwrap_err();
            assert!(
                e.contains("nested more than 16 deep") || e.contains("recursion limit exceeded"),
                "{e}"
            );
            assert!(
                e.starts_with("node.yaml:1:") || e.starts_with("node.yaml:2:"),
                "{e}"
            );
        }
        // The config's own depth is far from the limit.
        assert!(parse(VALID).is_ok());
    }

    #[test]
    fn errors_never_echo_the_input_whole() {
        let long = format!("node: \"{}\"\n", "x".repeat(1_000_000));
        let e = parse(&long).unwrap_err();
        assert!(
            e.starts_with("node.yaml:1:7: node: invalid type: string \"xxx"),
            "{e}"
        );
        assert!(e.len() < 300, "{} bytes of error", e.len());
    }

    #[test]
    fn large_files_are_refused_unread() {
        let dir = std::env::temp_dir().join(format!("mesh-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("big.yaml");
        let big = std::fs::File::create(&file).unwrap();
        big.set_len(50 << 20).unwrap();
        let e = Config::load(&file).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            e,
            format!(
                "{}: 52428800 bytes, more than the 16777216 a config may have",
                file.display()
            )
        );
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
