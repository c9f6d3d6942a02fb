//! The outbound listener: accepts captured connections, recovers where each was going, picks
//! an endpoint and connects to it: directly on this node, through a tunnel to another node's
//! agent otherwise. A failed connect is retried on another endpoint.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info_span};

use crate::{
    datapath::OrigDstTable,
    observability::{
        access::{Connection, Metered},
        metrics::{ConnectionLabels, count_connect_failure, count_refusal, metrics},
    },
    proxy::{
        balance::Lease,
        copy,
        plan::{self, OutboundPlan, Refusal},
        tunnel::{TunnelStream, Tunnels},
    },
    state::routes::{Hop, LocalWorkload, Route, Routes},
    system, warn_sampled,
};

/// How long a connect may take, directly or through a tunnel, before the next endpoint is
/// tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Endpoints tried for one connection at most.
const MAX_ATTEMPTS: usize = 3;

/// What every outbound connection needs.
#[derive(Clone)]
pub struct Outbound {
    pub routes: watch::Receiver<Arc<Routes>>,
    pub tunnels: Arc<Tunnels>,
    pub tracker: TaskTracker,
    /// Cancelled to stop accepting.
    pub stop: CancellationToken,
    /// Cancelled to close open connections.
    pub abort: CancellationToken,
}

impl Outbound {
    /// Accepts captured connections until `stop` is cancelled.
    pub async fn serve(self, listener: TcpListener, mut orig_dst: OrigDstTable) {
        while let Some((client, peer)) = system::accept(&listener, &self.stop).await {
            let Some(captured) = orig_dst.take(peer) else {
                count_refusal("not_captured");
                warn_sampled!(%peer, "closing a connection that was not captured (no original destination)");
                continue;
            };
            let dst = captured.dst;
            let planned = plan::outbound(&self.routes.borrow(), peer.ip(), captured.cgroup, dst);
            let OutboundPlan { source, route } = match planned {
                Ok(plan) => plan,
                Err(refusal) => {
                    count_refusal(refusal.reason());
                    warn_sampled!(%peer, %dst, "closing a captured connection: {refusal}");
                    if matches!(refusal, Refusal::CallerMismatch(_)) {
                        system::reset_on_close(&client);
                    }
                    continue;
                }
            };
            let span = info_span!("conn", %peer, %dst);
            let caller = Caller {
                addr: peer,
                workload: source,
            };
            self.tracker
                .spawn(self.clone().forward(client, route, caller).instrument(span));
        }
    }

    async fn forward(self, client: TcpStream, route: Route, caller: Caller) {
        let Some(connected) = self.connect(&route, &caller).await else {
            return;
        };
        if let Err(e) = client.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        let (hop, destination_workload) = match &connected.upstream {
            Upstream::Direct(_) => {
                let routes = self.routes.borrow();
                ("local", routes.workload_at(connected.target.ip()).cloned())
            }
            Upstream::Tunnel(_) => ("tunnel", None),
        };
        let source = caller.workload.as_deref();
        let labels = ConnectionLabels {
            direction: "outbound",
            source_namespace: source.map(|w| w.namespace.clone()).unwrap_or_default(),
            source_workload: source.map(|w| w.name.clone()).unwrap_or_default(),
            source_identity: source.map(|w| w.id.to_string()).unwrap_or_default(),
            destination_service: match &route {
                Route::Service(port) => port.service.clone(),
                Route::Pod { .. } => String::new(),
            },
            destination_namespace: destination_workload
                .as_ref()
                .map(|w| w.namespace.clone())
                .unwrap_or_default(),
            destination_workload: destination_workload
                .map(|w| w.name.clone())
                .unwrap_or_default(),
            hop,
        };
        let record = Connection::open(labels, caller.addr, connected.target);
        let mut client = Metered::new(client);
        let outcome = match connected.upstream {
            Upstream::Direct(mut pod) => {
                if let Err(e) = pod.set_nodelay(true) {
                    debug!("cannot set TCP_NODELAY: {e}");
                }
                let outcome = copy::until_done(&mut client, &mut pod, &self.abort).await;
                if !outcome.is_complete() {
                    system::reset_on_close(&pod);
                }
                outcome
            }
            // A tunnel stream dropped before its end is reset (RST_STREAM) by HTTP/2 itself.
            Upstream::Tunnel(mut tunnel) => {
                copy::until_done(&mut client, &mut tunnel, &self.abort).await
            }
        };
        if !outcome.is_complete() {
            system::reset_on_close(client.get_ref());
        }
        record.close(&client, &outcome.to_string());
    }

    /// Connects to the route's destination; for a service, tries up to [`MAX_ATTEMPTS`]
    /// endpoints. The lease keeps the endpoint's connection counted while it is open.
    async fn connect(&self, route: &Route, caller: &Caller) -> Option<Connected> {
        let port = match route {
            Route::Pod { target, hop } => {
                return match self.dial(*target, hop, caller).await {
                    Ok(Upstream::Direct(pod)) if system::within_this_host(&pod) => {
                        count_refusal("node_address");
                        warn_sampled!(%target, "closing a captured connection: the address is this node's own");
                        system::reset_on_close(&pod);
                        None
                    }
                    Ok(upstream) => Some(Connected {
                        upstream,
                        target: *target,
                        _lease: None,
                    }),
                    Err(e) => {
                        count_connect_failure("", None);
                        warn_sampled!(%target, "cannot reach the destination: {e}");
                        None
                    }
                };
            }
            Route::Service(port) => port,
        };
        let mut tried = Vec::new();
        while tried.len() < MAX_ATTEMPTS {
            let (lease, hop) = port.pick(&tried)?;
            let target = lease.endpoint().addr;
            match self.dial(target, &hop, caller).await {
                Ok(upstream) => {
                    lease.endpoint().succeeded();
                    return Some(Connected {
                        upstream,
                        target,
                        _lease: Some(lease),
                    });
                }
                Err(DialError::OutOfResources(e)) => {
                    // This node's fault, not the endpoint's: no ejection, no other endpoint.
                    warn_sampled!(service = %port.service, "cannot connect: {e}");
                    return None;
                }
                Err(DialError::NoIdentity(addr)) => {
                    count_refusal("no_identity");
                    warn_sampled!(service = %port.service, "cannot leave the node: {}", DialError::NoIdentity(addr));
                    return None;
                }
                Err(e) => {
                    let labels = count_connect_failure(&port.service, Some(target));
                    if lease.endpoint().failed() {
                        metrics().endpoint_ejections.get_or_create(&labels).inc();
                    }
                    warn_sampled!(service = %port.service, endpoint = %target, "connect failed, trying another endpoint: {e}");
                    tried.push(target);
                }
            }
        }
        warn_sampled!(service = %port.service, attempts = tried.len(), "no endpoint could be reached");
        None
    }

    async fn dial(
        &self,
        target: SocketAddr,
        hop: &Hop,
        caller: &Caller,
    ) -> Result<Upstream, DialError> {
        match hop {
            Hop::Local => {
                let pod = timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
                    .await
                    .map_err(|_| DialError::Timeout)?
                    .map_err(DialError::from_io)?;
                debug!(%target, "connected on this node");
                Ok(Upstream::Direct(pod))
            }
            Hop::Tunnel { node, agent } => {
                let source = &caller
                    .workload
                    .as_ref()
                    .ok_or(DialError::NoIdentity(caller.addr.ip().to_canonical()))?
                    .id;
                let tunnel = timeout(
                    CONNECT_TIMEOUT,
                    self.tunnels.open(source, node, *agent, target),
                )
                .await
                .map_err(|_| DialError::Timeout)?
                .map_err(|e| DialError::Failed(e.to_string()))?;
                debug!(%target, %node, %source, "connected over mTLS through the peer agent");
                Ok(Upstream::Tunnel(tunnel))
            }
        }
    }
}

/// The local workload behind a captured connection.
struct Caller {
    addr: SocketAddr,
    /// The workload of this node with the address, if any.
    workload: Option<Arc<LocalWorkload>>,
}

/// A connection made: to what, and how.
struct Connected {
    upstream: Upstream,
    target: SocketAddr,
    /// Keeps the endpoint's connection counted as outstanding while it is open.
    _lease: Option<Lease>,
}

enum Upstream {
    Direct(TcpStream),
    Tunnel(TunnelStream),
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("no workload of this node has the address {0}, so it has no identity to present")]
    NoIdentity(IpAddr),
    #[error("no answer within {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("the agent is out of file descriptors or memory: {0}")]
    OutOfResources(std::io::Error),
    #[error("{0}")]
    Failed(String),
}

impl DialError {
    /// A failed connect: this node's shortage (out of descriptors or memory), or the
    /// endpoint's failure.
    fn from_io(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                Self::OutOfResources(e)
            }
            _ => Self::Failed(e.to_string()),
        }
    }
}
