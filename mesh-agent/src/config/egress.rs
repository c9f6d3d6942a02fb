//! Where enrolled pods may go outside the mesh: the declared external hosts (Istio's
//! ServiceEntry, in this file's words) and the outbound policy for everything else.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::{Deserialize, Deserializer, Serialize};

use super::{ParsedStr, Seg, display_path};

/// The mesh's egress: declared external hosts and what happens to other destinations.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub outbound_policy: OutboundPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<ExternalHost>,
    /// The addresses the agent resolved for the hosts' exact names (never read from a file).
    #[serde(skip)]
    pub resolved: BTreeMap<HostName, Vec<IpAddr>>,
}

impl Egress {
    /// Every resolved address of a declared exact name at each of its host's ports, with the
    /// name.
    pub fn addresses(&self) -> impl Iterator<Item = (SocketAddr, &HostName)> {
        self.hosts.iter().flat_map(move |host| {
            host.names.iter().flat_map(move |name| {
                let addresses = self
                    .resolved
                    .get(name)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                addresses.iter().flat_map(move |a| {
                    host.ports
                        .iter()
                        .map(move |p| (SocketAddr::new(*a, p.port), name))
                })
            })
        })
    }

    /// The ports of hosts with a wildcard name: a connect to any address there is theirs.
    pub fn wildcard_ports(&self) -> impl Iterator<Item = u16> {
        self.hosts
            .iter()
            .filter(|h| h.names.iter().any(|n| n.wildcard_suffix().is_some()))
            .flat_map(|h| h.ports.iter().map(|p| p.port))
    }
}

/// What an enrolled pod's connect to a destination that is neither the mesh's nor declared
/// gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundPolicy {
    /// It goes out untouched.
    #[default]
    AllowAny,
    /// It fails in the kernel with EPERM (loopback excepted), counted and logged.
    RegistryOnly,
}

/// An external host (or a family of them, by a wildcard name) that pods may call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalHost {
    /// Exact names (resolved by the agent, their addresses captured) or `*.example.com`
    /// (any address at the host's ports is captured; SNI or Host tells the names apart).
    pub names: Vec<HostName>,
    pub ports: Vec<ExternalPort>,
    /// PEM CA certificates that TLS originated to the host is verified against; the
    /// system's roots if not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// The labels of the nodes its traffic leaves from (egress nodes, whose addresses a
    /// firewall can allow): other nodes' agents send it to theirs through the tunnel. None:
    /// from every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub egress_nodes: BTreeMap<String, String>,
}

/// A port of an external host and what crosses it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalPort {
    pub port: u16,
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub protocol: ExternalProtocol,
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub tls: TlsMode,
    /// With `tls: originate`, the host's TLS port (443 if not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

impl ExternalPort {
    /// Where the agent connects: the TLS port for originated TLS, else the port itself.
    pub fn target_port(&self) -> u16 {
        match self.tls {
            TlsMode::Originate => self.target_port.unwrap_or(443),
            _ => self.port,
        }
    }
}

/// What the app sends to an external port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExternalProtocol {
    /// Opaque bytes (TLS among them, with `tls: passthrough`).
    #[default]
    Tcp,
    /// HTTP/1.1: each request's Host names the host.
    Http,
}

/// Who speaks TLS to an external host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Nobody: plain bytes both ways.
    #[default]
    None,
    /// The agent: the app speaks plain HTTP, the agent opens TLS to the host with its name as
    /// SNI and verifies the host's certificate.
    Originate,
    /// The app: its ClientHello's SNI names the host, the agent passes the bytes on.
    Passthrough,
}

/// A lowercase DNS name, or a wildcard `*.` followed by one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct HostName(String);

impl HostName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name below a leading `*.`, if it is a wildcard.
    pub fn wildcard_suffix(&self) -> Option<&str> {
        self.0.strip_prefix("*.")
    }

    /// Whether `host` (a request's Host without its port, or an SNI) is this name or, for a
    /// wildcard, one of its subdomains; in any case.
    pub fn matches(&self, host: &str) -> bool {
        match self.wildcard_suffix() {
            None => host.eq_ignore_ascii_case(&self.0),
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HostName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.strip_prefix("*.").unwrap_or(s);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) || !name.contains('.') {
            return Err(format!(
                "{s:?} is not a lowercase DNS name with a dot (or `*.` and one)"
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr::<HostName>(std::marker::PhantomData))
    }
}

/// The certificates of a PEM text: at least one, each parsed.
pub fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// The checks of [`validate`], for egress built another way: the first failure as
/// `path: reason`, the path below `egress`.
pub fn check(egress: &Egress) -> Result<(), String> {
    validate(egress).map_err(|(path, reason)| format!("{}: {reason}", display_path(&path)))
}

/// The checks beyond the shape; a failure names its path below `egress`.
pub(super) fn validate(egress: &Egress) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index as I, Key as K};
    let mut names = BTreeMap::new();
    let mut ports = BTreeMap::new();
    for (i, host) in egress.hosts.iter().enumerate() {
        let at = |rest: &[Seg]| [&[K("hosts"), I(i)], rest].concat();
        if host.names.is_empty() {
            return Err((at(&[K("names")]), "a host needs a name".into()));
        }
        for (j, name) in host.names.iter().enumerate() {
            if let Some(other) = names.insert(name, i) {
                return Err((
                    at(&[K("names"), I(j)]),
                    format!("{name} is declared by hosts[{other}] too"),
                ));
            }
        }
        if host.ports.is_empty() {
            return Err((at(&[K("ports")]), "a host needs a port".into()));
        }
        for (j, p) in host.ports.iter().enumerate() {
            let at = |key| at(&[K("ports"), I(j), K(key)]);
            if p.port == 0 || p.target_port == Some(0) {
                return Err((at("port"), "port 0 is not a port".into()));
            }
            let fault = match (p.tls, p.protocol) {
                (TlsMode::Originate, ExternalProtocol::Tcp) => {
                    Some("the agent originates TLS for HTTP only: give the port protocol http")
                }
                (TlsMode::Passthrough, ExternalProtocol::Http) => {
                    Some("passed-through TLS is opaque to the agent: give the port protocol tcp")
                }
                _ => None,
            };
            if let Some(fault) = fault {
                return Err((at("tls"), fault.into()));
            }
            if p.target_port.is_some() && p.tls != TlsMode::Originate {
                return Err((
                    at("target_port"),
                    "only originated TLS goes to another port".into(),
                ));
            }
            let kind = (p.protocol, p.tls);
            if let Some((other, other_kind)) = ports.insert(p.port, (i, kind))
                && other_kind != kind
            {
                return Err((
                    at("port"),
                    format!(
                        "port {} is declared with another protocol or tls by hosts[{other}]: a port carries one kind",
                        p.port
                    ),
                ));
            }
        }
        if let Some(pem) = &host.ca_certificates {
            pem_certificates(pem).map_err(|reason| (at(&[K("ca_certificates")]), reason))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_or_below_a_wildcard() {
        let exact: HostName = "api.courier.example".parse().unwrap();
        assert!(exact.matches("api.courier.example"));
        assert!(exact.matches("API.Courier.example"));
        assert!(!exact.matches("x.api.courier.example"));
        let wildcard: HostName = "*.sms.example".parse().unwrap();
        assert!(wildcard.matches("eu.sms.example"));
        assert!(wildcard.matches("a.b.sms.example"));
        assert!(!wildcard.matches("sms.example"));
        assert!(!wildcard.matches("evilsms.example"));
        for bad in [
            "localhost",
            "Upper.example",
            "*example.com",
            "a..b",
            "-a.b",
            "*.*.b.c",
        ] {
            assert!(bad.parse::<HostName>().is_err(), "{bad}");
        }
    }
}
