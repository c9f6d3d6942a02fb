//! The outbound listener: accepts captured connections, recovers where each was going, picks
//! an endpoint and connects to it: directly on this node, through a tunnel to another node's
//! agent otherwise. A failed connect is retried on another endpoint.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    balance::Lease,
    datapath::OrigDstTable,
    identity::SpiffeId,
    routing::{Hop, Route, Routes},
    system,
    tunnel::{TunnelStream, Tunnels},
};

/// How long a connect may take, directly or through a tunnel, before the next endpoint is
/// tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction; large enough that bulk transfers make few syscalls.
pub const COPY_BUFFER: usize = 64 * 1024;
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
            let Some(dst) = orig_dst.take(peer) else {
                warn!(%peer, "closing a connection that was not captured (no original destination)");
                continue;
            };
            let (route, source) = {
                let routes = self.routes.borrow();
                (routes.route(dst), routes.identity_of(peer.ip()).cloned())
            };
            let route = match route {
                Ok(route) => route,
                Err(e) => {
                    warn!(%peer, %dst, "closing a captured connection: {e}");
                    continue;
                }
            };
            let span = info_span!("conn", %peer, %dst);
            let caller = Caller {
                addr: peer.ip().to_canonical(),
                id: source,
            };
            self.tracker
                .spawn(self.clone().forward(client, route, caller).instrument(span));
        }
    }

    async fn forward(self, mut client: TcpStream, route: Route, caller: Caller) {
        let Some((upstream, _lease)) = self.connect(&route, &caller).await else {
            return;
        };
        if let Err(e) = client.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        let copied = match upstream {
            Upstream::Direct(mut pod) => {
                if let Err(e) = pod.set_nodelay(true) {
                    debug!("cannot set TCP_NODELAY: {e}");
                }
                copy(&mut client, &mut pod, &self.abort).await
            }
            Upstream::Tunnel(mut tunnel) => copy(&mut client, &mut tunnel, &self.abort).await,
        };
        match copied {
            Some(Ok((sent, received))) => debug!(sent, received, "connection finished"),
            Some(Err(e)) => debug!("connection ended with an error: {e}"),
            None => debug!("closed by shutdown"),
        }
    }

    /// Connects to the route's destination; for a service, tries up to [`MAX_ATTEMPTS`]
    /// endpoints. The lease keeps the endpoint's connection counted while it is open.
    async fn connect(&self, route: &Route, caller: &Caller) -> Option<(Upstream, Option<Lease>)> {
        let port = match route {
            Route::Pod { target, hop } => {
                return match self.dial(*target, hop, caller).await {
                    Ok(upstream) => Some((upstream, None)),
                    Err(e) => {
                        warn!(%target, "cannot reach the destination: {e}");
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
                    return Some((upstream, Some(lease)));
                }
                Err(DialError::NoIdentity(addr)) => {
                    warn!(service = %port.service, "cannot leave the node: {}", DialError::NoIdentity(addr));
                    return None;
                }
                Err(e) => {
                    lease.endpoint().failed();
                    warn!(service = %port.service, endpoint = %target, "connect failed, trying another endpoint: {e}");
                    tried.push(target);
                }
            }
        }
        warn!(service = %port.service, attempts = tried.len(), "no endpoint could be reached");
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
                    .map_err(|e| DialError::Failed(e.to_string()))?;
                debug!(%target, "connected on this node");
                Ok(Upstream::Direct(pod))
            }
            Hop::Tunnel { node, agent } => {
                let source = caller
                    .id
                    .as_ref()
                    .ok_or(DialError::NoIdentity(caller.addr))?;
                let tunnel = timeout(CONNECT_TIMEOUT, self.tunnels.open(source, *agent, target))
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
    addr: IpAddr,
    /// Its identity, if a workload of this node has the address.
    id: Option<SpiffeId>,
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
    #[error("{0}")]
    Failed(String),
}

/// Copies both ways until both sides are done, or `abort` (then `None`).
async fn copy<U: AsyncRead + AsyncWrite + Unpin>(
    client: &mut TcpStream,
    upstream: &mut U,
    abort: &CancellationToken,
) -> Option<std::io::Result<(u64, u64)>> {
    tokio::select! {
        copied = copy_bidirectional_with_sizes(client, upstream, COPY_BUFFER, COPY_BUFFER) => Some(copied),
        () = abort.cancelled() => None,
    }
}
