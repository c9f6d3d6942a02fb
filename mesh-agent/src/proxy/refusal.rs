//! Why the agent refused a connection, a tunnel stream or a handshake: one enum, whose
//! [`Refusal::reason`] is the label of `mesh_refusals_total` and whose message says what
//! happened.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::Method;

use crate::{
    proxy::breaker::Tripped,
    state::routes::{CallerMismatch, NoRoute},
};

/// Why a connection, tunnel stream or handshake is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("it was not captured (no original destination)")]
    NotCaptured,
    #[error(transparent)]
    CallerMismatch(#[from] CallerMismatch),
    #[error(transparent)]
    NoRoute(#[from] NoRoute),
    #[error("no workload of this node has the address {0}, so it has no identity to present")]
    NoIdentity(IpAddr),
    #[error("the method is {0}, not CONNECT")]
    NotConnect(Method),
    #[error("the authority {0:?} is not ip:port")]
    BadAuthority(String),
    #[error("{0} is not a pod of this node")]
    NotLocalPod(SocketAddr),
    #[error("{0} is this node's own address")]
    NodeAddress(SocketAddr),
    #[error("{} are open or coming already", .0.what())]
    Over(Cap),
    #[error("{service} is at its cap on {}", .tripped.what())]
    CircuitOpen { service: String, tripped: Tripped },
    #[error("{service} is over its {by} rate limit")]
    RateLimited { service: String, by: &'static str },
    #[error("the agent serving {0} refused it: over its service's rate limit")]
    RateLimitedThere(SocketAddr),
    #[error("denied by {policy}")]
    Denied { policy: Arc<str> },
    #[error(
        "service {service} has no endpoint left in its allowed regions ({regions}); {left_out} outside them are never used"
    )]
    Pinned {
        service: String,
        regions: String,
        left_out: usize,
    },
    #[error(
        "{} at {dst} is no declared external host (outbound policy registry_only)",
        if asked.is_empty() { "a TLS client naming no server" } else { asked }
    )]
    UndeclaredHost { asked: String, dst: SocketAddr },
    #[error("no node has the labels of {host}'s egress nodes")]
    NoEgressNode { host: String },
    #[error("the agent serving {target} denied it: {policy}")]
    DeniedThere {
        target: SocketAddr,
        policy: Arc<str>,
    },
}

/// A cap on what one peer or pod may hold or start (see `proxy::limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    TunnelConnections,
    TunnelConnectionsPerPeer,
    HandshakeRate,
    Handshakes,
    HandshakesPerSource,
    StreamRate,
    AdminConnections,
    AdminConnectionsPerSource,
}

impl Cap {
    fn what(self) -> &'static str {
        match self {
            Cap::TunnelConnections => "too many tunnel connections",
            Cap::TunnelConnectionsPerPeer => "too many tunnel connections from the peer",
            Cap::HandshakeRate => "too many new handshakes per second from the peer",
            Cap::Handshakes => "too many TLS handshakes",
            Cap::HandshakesPerSource => "too many TLS handshakes from the peer",
            Cap::StreamRate => "too many new streams per second on the tunnel connection",
            Cap::AdminConnections => "too many admin connections",
            Cap::AdminConnectionsPerSource => "too many admin connections from the source",
        }
    }
}

impl Refusal {
    /// Its metric label (`mesh_refusals_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotCaptured => "not_captured",
            Refusal::CallerMismatch(_) => "caller_mismatch",
            Refusal::NoRoute(_) => "no_route",
            Refusal::NoIdentity(_) => "no_identity",
            Refusal::NotConnect(_) => "not_connect",
            Refusal::BadAuthority(_) => "bad_authority",
            Refusal::NotLocalPod(_) => "not_local_pod",
            Refusal::NodeAddress(_) => "node_address",
            Refusal::CircuitOpen { .. } => "circuit_open",
            Refusal::RateLimited { .. } | Refusal::RateLimitedThere(_) => "rate_limited",
            Refusal::Denied { .. } | Refusal::DeniedThere { .. } => "denied",
            Refusal::Pinned { .. } => "pinned",
            Refusal::UndeclaredHost { .. } => "undeclared_host",
            Refusal::NoEgressNode { .. } => "no_egress_node",
            Refusal::Over(cap) => match cap {
                Cap::TunnelConnections => "tunnel_connections",
                Cap::TunnelConnectionsPerPeer => "tunnel_connections_per_peer",
                Cap::HandshakeRate => "handshake_rate",
                Cap::Handshakes => "handshakes",
                Cap::HandshakesPerSource => "handshakes_per_source",
                Cap::StreamRate => "stream_rate",
                Cap::AdminConnections => "admin_connections",
                Cap::AdminConnectionsPerSource => "admin_connections_per_source",
            },
        }
    }
}
