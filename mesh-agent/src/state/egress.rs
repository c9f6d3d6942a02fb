//! Where a captured connection to an external host goes: the declared hosts by address and
//! port (their names resolved) and by port (wildcard names), with what crosses each port,
//! the TLS the agent originates to each host, and the node its traffic leaves from.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use rustls::{ClientConfig, RootCertStore};
use tracing::warn;

use crate::{
    config::{
        Config, Node,
        egress::{
            ExternalHost, ExternalProtocol, HostName, OutboundPolicy, TlsMode, pem_certificates,
        },
    },
    state::routes::TUNNEL_PORT,
};

/// The declared external hosts as the data path looks them up.
#[derive(Debug, Default)]
pub struct ExternalHosts {
    /// By a resolved address and port: the port, and the name that resolved there.
    by_address: HashMap<SocketAddr, (Arc<ExternalPort>, HostName)>,
    /// By port, for hosts with wildcard names: any address there may be one of them.
    by_port: HashMap<u16, (Arc<ExternalPort>, HostName)>,
    pub policy: OutboundPolicy,
}

/// One port number of the external hosts: one kind of traffic, and the hosts that have it.
#[derive(Debug)]
pub struct ExternalPort {
    pub port: u16,
    pub protocol: ExternalProtocol,
    pub tls: TlsMode,
    pub hosts: Vec<ExternalTarget>,
}

/// One declared host at one port.
#[derive(Debug)]
pub struct ExternalTarget {
    pub names: Vec<HostName>,
    /// Where its traffic leaves the mesh from.
    pub exit: Exit,
    /// Where the agent connects (the TLS port when it originates TLS).
    pub target_port: u16,
    /// The TLS the agent originates to it, if it does.
    pub tls: Option<Arc<ClientConfig>>,
}

/// Which node a host's traffic leaves from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// This one.
    Here,
    /// One of these egress nodes, through the agent at its tunnel address.
    Via(Vec<(Arc<str>, SocketAddr)>),
    /// None: no node has the labels its egress nodes must have.
    Nowhere,
}

impl Exit {
    /// The exit of a host whose egress nodes have `labels` (none: every node), from `this`
    /// node of `config`.
    fn of(labels: &BTreeMap<String, String>, config: &Config) -> Self {
        if labels.is_empty() {
            return Exit::Here;
        }
        let matches = |node: &Node| labels.iter().all(|(k, v)| node.labels.get(k) == Some(v));
        if matches(&config.node) {
            return Exit::Here;
        }
        let via: Vec<(Arc<str>, SocketAddr)> = config
            .peers
            .iter()
            .filter(|peer| matches(peer))
            .map(|peer| {
                let agent = SocketAddr::new(peer.addresses[0], TUNNEL_PORT);
                (peer.name.as_str().into(), agent)
            })
            .collect();
        match via.is_empty() {
            true => Exit::Nowhere,
            false => Exit::Via(via),
        }
    }
}

/// An external destination a connection was captured for.
#[derive(Debug, Clone)]
pub struct External {
    pub port: Arc<ExternalPort>,
    /// The declared name whose address (or wildcard's port) the app dialled.
    pub dialled: HostName,
}

impl ExternalHosts {
    /// The external hosts `config` declares, as its node reaches them.
    pub fn new(config: &Config) -> Self {
        let egress = &config.egress;
        let mut ports: HashMap<u16, ExternalPort> = HashMap::new();
        for host in &egress.hosts {
            let tls = originates(host).then(|| origination_config(host)).flatten();
            let exit = Exit::of(&host.egress_nodes, config);
            for p in &host.ports {
                let port = ports.entry(p.port).or_insert_with(|| ExternalPort {
                    port: p.port,
                    protocol: p.protocol,
                    tls: p.tls,
                    hosts: Vec::new(),
                });
                port.hosts.push(ExternalTarget {
                    names: host.names.clone(),
                    exit: exit.clone(),
                    target_port: p.target_port(),
                    tls: tls.clone().filter(|_| p.tls == TlsMode::Originate),
                });
            }
        }
        let ports: HashMap<u16, Arc<ExternalPort>> =
            ports.into_iter().map(|(n, p)| (n, Arc::new(p))).collect();
        let mut by_port = HashMap::new();
        for host in &egress.hosts {
            for wildcard in host.names.iter().filter(|n| n.wildcard_suffix().is_some()) {
                for p in &host.ports {
                    by_port
                        .entry(p.port)
                        .or_insert_with(|| (ports[&p.port].clone(), wildcard.clone()));
                }
            }
        }
        let by_address = egress
            .addresses()
            .map(|(addr, name)| (addr, (ports[&addr.port()].clone(), name.clone())))
            .collect();
        Self {
            by_address,
            by_port,
            policy: egress.outbound_policy,
        }
    }

    /// The external destination at `dst`, if one is declared there.
    pub fn at(&self, dst: SocketAddr) -> Option<External> {
        let (port, dialled) = self
            .by_address
            .get(&dst)
            .or_else(|| self.by_port.get(&dst.port()))?;
        Some(External {
            port: port.clone(),
            dialled: dialled.clone(),
        })
    }
}

impl ExternalPort {
    /// The host declared by the name (or wildcard) `declared` at this port.
    pub fn declaring(&self, declared: &HostName) -> Option<&ExternalTarget> {
        self.hosts.iter().find(|h| h.names.contains(declared))
    }

    /// The declared host named `name` (an SNI, or a Host without its port) at this port.
    pub fn host(&self, name: &str) -> Option<(&ExternalTarget, &HostName)> {
        self.hosts
            .iter()
            .find_map(|h| Some((h, h.names.iter().find(|n| n.matches(name))?)))
    }
}

fn originates(host: &ExternalHost) -> bool {
    host.ports.iter().any(|p| p.tls == TlsMode::Originate)
}

/// TLS 1.2 or 1.3 to `host`, verified against its CA certificates or the system's roots,
/// offering HTTP/1.1. A certificate that is no usable trust anchor is left out (and logged):
/// its host's handshakes then fail.
fn origination_config(host: &ExternalHost) -> Option<Arc<ClientConfig>> {
    let roots = match &host.ca_certificates {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in pem_certificates(pem).unwrap_or_default() {
                if let Err(e) = roots.add(cert) {
                    warn!(host = %host.names[0], "a CA certificate is not a usable trust anchor: {e}");
                }
            }
            Arc::new(roots)
        }
        None => system_roots(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let built = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    match built {
        Ok(mut config) => {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(config))
        }
        Err(e) => {
            warn!(host = %host.names[0], "cannot set up TLS to the host: {e}");
            None
        }
    }
}

/// The system's trust anchors (`/etc/ssl/certs` and the like), read once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                warn!("reading the system's CA certificates: {e}");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if ignored > 0 || added == 0 {
                warn!(added, ignored, "system CA certificates for originated TLS");
            }
            Arc::new(roots)
        })
        .clone()
}
