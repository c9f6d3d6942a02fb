//! Captured connections to declared external hosts, by what their port carries: plain HTTP
//! (`proxy::http::egress`, TLS originated where declared), TLS passed through (the
//! ClientHello's SNI names the host: `sni`), or opaque bytes (the host whose address was
//! dialled). The agent connects to the address the app dialled (its own DNS answer), never
//! elsewhere; a connection or request for a host nobody declared is refused under
//! `registry_only` and passed on under `allow_any`. A host whose traffic must leave from
//! egress nodes is sent to one of their agents through the tunnel (the CONNECT names the
//! external address), which carries it out as its own.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::timeout,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    config::egress::{ExternalProtocol, OutboundPolicy, TlsMode},
    observability::{
        access::{Direction, Metered, Record},
        metrics::{ConnectionLabels, Metrics},
    },
    proxy::{
        copy,
        dial::CONNECT_TIMEOUT,
        http::egress::EgressHttp,
        outbound::Caller,
        refusal::Refusal,
        shortcut::ShortcutStream,
        tunnel::{TunnelStream, Tunnels},
    },
    state::{
        egress::{Exit, External, ExternalPort},
        routes::{LocalWorkload, Routes},
    },
    system, warn_sampled,
};

pub mod sni;

/// The `hop` label of connections that leave the mesh from this node, and of those sent to
/// an egress node to leave from there.
const HOP: &str = "egress";
const HOP_VIA: &str = "tunnel";

/// What carrying a connection to an external host needs.
pub struct Egress {
    pub metrics: Arc<Metrics>,
    pub policy: OutboundPolicy,
    /// How long a passed-through TLS client may take to send its ClientHello.
    pub hello_wait: Duration,
    pub abort: CancellationToken,
}

/// How a pod's traffic reaches a host's egress nodes: through the tunnel, as the pod.
pub struct Via {
    pub tunnels: Arc<Tunnels>,
    pub workload: Arc<LocalWorkload>,
    /// The pod's address.
    pub client: SocketAddr,
}

impl Via {
    /// A tunnel stream to `dst` through the first of the egress `nodes` that takes it,
    /// starting at a random one.
    pub async fn open(
        &self,
        nodes: &[(Arc<str>, SocketAddr)],
        dst: SocketAddr,
    ) -> Option<TunnelStream> {
        let first = fastrand::usize(..nodes.len());
        let address = Some(self.client.ip().to_canonical());
        for (node, agent) in nodes.iter().cycle().skip(first).take(nodes.len()) {
            let opened = self
                .tunnels
                .open(&self.workload.id, address, node, *agent, dst, None);
            match timeout(CONNECT_TIMEOUT, opened).await {
                Ok(Ok(tunnel)) => return Some(tunnel),
                Ok(Err(e)) => {
                    warn_sampled!(%node, %dst, "an egress node did not take the connection: {e}");
                }
                Err(_) => warn_sampled!(%node, %dst, "an egress node did not answer in time"),
            }
        }
        None
    }
}

impl Egress {
    /// What the agent carries egress with under `routes` (its outbound policy and settings).
    pub fn new(routes: &Routes, metrics: Arc<Metrics>, abort: CancellationToken) -> Self {
        Self {
            metrics,
            policy: routes.external().policy,
            hello_wait: routes.config().settings.protocol_detection_timeout.0,
            abort,
        }
    }

    /// Carries `client`'s connection, captured from `caller` for `external`: out of this
    /// node, or through `tunnels` to the host's egress node (for HTTP, request by request).
    pub async fn carry(
        self,
        tunnels: Arc<Tunnels>,
        client: ShortcutStream,
        external: External,
        caller: Caller,
        mut record: Record,
    ) {
        let Caller {
            addr: client_addr,
            workload: source,
            dst,
        } = caller;
        let port = external.port.clone();
        let source_labels = LocalWorkload::label_values(source.as_deref());
        let via = source.map(|workload| Via {
            tunnels,
            workload,
            client: client_addr,
        });
        if port.protocol == ExternalProtocol::Http {
            // Each request's Host names its host (hosts may share the address).
            let labels = labels(source_labels, "", HOP);
            return self.leave(client, port, dst, labels, record, via).await;
        }
        // The host: the one its SNI names for passed-through TLS, else the one whose address
        // was dialled.
        let declared = match port.tls {
            TlsMode::Passthrough => match sni::server_name(&client, self.hello_wait).await {
                sni::Hello::Sni(name) => port.host(&name).map(|(t, n)| (t, n.clone())).ok_or(name),
                _ => Err(String::new()),
            },
            _ => port
                .declaring(&external.dialled)
                .map(|t| (t, external.dialled.clone()))
                .ok_or_else(|| external.dialled.to_string()),
        };
        let (exit, host) = match declared {
            Ok((target, name)) => (target.exit.clone(), name.to_string()),
            Err(asked) if self.policy == OutboundPolicy::RegistryOnly => {
                self.metrics.egress_refused(&source_labels, dst, 1);
                return record.refuse(Refusal::UndeclaredHost { asked, dst });
            }
            // Passed on as dialled, as any undeclared destination is.
            Err(_) => (Exit::Here, String::new()),
        };
        match exit {
            Exit::Here => {
                let labels = labels(source_labels, &host, HOP);
                self.leave(client, port, dst, labels, record, None).await;
            }
            Exit::Via(nodes) => {
                let Some(via) = via else {
                    return record.refuse(Refusal::NoIdentity(client_addr.ip().to_canonical()));
                };
                let Some(mut tunnel) = via.open(&nodes, dst).await else {
                    let names: Vec<&str> = nodes.iter().map(|(n, _)| &**n).collect();
                    return record.unreachable(format!(
                        "{host}: no egress node answered ({})",
                        names.join(", ")
                    ));
                };
                record.connected(labels(source_labels, &host, HOP_VIA), dst);
                let mut client = Metered::new(client);
                let ended = copy::until_done(&mut client, &mut tunnel, &self.abort).await;
                if !ended.is_complete() {
                    system::reset_on_close(client.get_ref());
                }
                record.copied(&client.traffic(), ended);
            }
            Exit::Nowhere => record.refuse(Refusal::NoEgressNode { host }),
        }
    }

    /// Carries `stream` (a pod's connection, or a tunnel stream from another node's agent)
    /// to `dst`: HTTP request by request (each request of a host with egress nodes elsewhere
    /// through `via`), anything else byte for byte out of this node.
    pub async fn leave<S>(
        &self,
        stream: S,
        port: Arc<ExternalPort>,
        dst: SocketAddr,
        labels: ConnectionLabels,
        mut record: Record,
        via: Option<Via>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if port.protocol == ExternalProtocol::Http {
            let source = [
                labels.source_namespace.clone(),
                labels.source_workload.clone(),
                labels.source_identity.clone(),
            ];
            record.connected(labels, dst);
            let client = Metered::new(stream);
            let traffic = client.traffic();
            let http = EgressHttp::new(self.metrics.clone(), port, self.policy, dst, source, via);
            let ended = http.serve(client, &self.abort).await;
            return record.copied(&traffic, ended);
        }
        let upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(e)) => return record.unreachable(format!("{dst}: {e}")),
            Err(_) => return record.unreachable(format!("{dst}: no answer in time")),
        };
        if let Err(e) = upstream.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        record.connected(labels, dst);
        let mut client = Metered::new(stream);
        let mut upstream = upstream;
        let ended = copy::until_done(&mut client, &mut upstream, &self.abort).await;
        if !ended.is_complete() {
            system::reset_on_close(&upstream);
        }
        record.copied(&client.traffic(), ended);
    }
}

/// A connection of `source` (namespace, workload, identity) to the external host declared
/// as `host` (empty: undeclared), over `hop`.
pub fn labels(source: [String; 3], host: &str, hop: &'static str) -> ConnectionLabels {
    let [source_namespace, source_workload, source_identity] = source;
    ConnectionLabels {
        direction: Direction::Outbound.as_str(),
        source_namespace,
        source_workload,
        source_identity,
        destination_service: host.to_owned(),
        destination_namespace: String::new(),
        destination_workload: String::new(),
        hop,
    }
}

#[cfg(test)]
mod carried;
