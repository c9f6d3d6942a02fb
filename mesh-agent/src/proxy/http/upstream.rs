//! Pooled HTTP connections to endpoints: a local endpoint directly, a remote one inside a
//! CONNECT stream of the tunnel to its node's agent, presenting the caller's identity. Pools
//! are per caller identity (the far side authorizes by it) and per upstream protocol; within
//! a pool, per endpoint (hyper-util's pool, keyed by the endpoint's address).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{net::TcpStream, sync::watch, time::timeout};

use crate::{
    identity::SpiffeId,
    proxy::{
        dial::{CONNECT_TIMEOUT, LocalDialer},
        tunnel::{TunnelError, TunnelStream, Tunnels},
    },
    state::{
        http::Upstream,
        routes::{Hop, Routes},
    },
};

/// A body as the agent passes it on: a request's to an endpoint, a response's to the client.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an idle pooled connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint and pool.
const MAX_IDLE_PER_ENDPOINT: usize = 32;

/// The agent's upstream HTTP clients.
pub struct Upstreams {
    connector: Connector,
    clients: Mutex<HashMap<PoolKey, Client<Connector, Body>>>,
}

/// Whom a pool's connections present (the caller; none for a caller the mesh does not
/// know, who can reach only local endpoints) and what they speak.
type PoolKey = (Option<SpiffeId>, Upstream);

impl Upstreams {
    pub fn new(
        routes: watch::Receiver<Arc<Routes>>,
        tunnels: Arc<Tunnels>,
        local: LocalDialer,
    ) -> Self {
        Self {
            connector: Connector {
                routes,
                tunnels,
                local,
                source: None,
                upstream: None,
            },
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client that speaks `upstream` to endpoints as `source`.
    pub fn client(&self, source: Option<&SpiffeId>, upstream: Upstream) -> Client<Connector, Body> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients
            .entry((source.cloned(), upstream))
            .or_insert_with(|| {
                let connector = Connector {
                    source: source.cloned(),
                    upstream: Some(upstream),
                    ..self.connector.clone()
                };
                Client::builder(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(IDLE_TIMEOUT)
                    .pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT)
                    .http2_only(upstream == Upstream::Http2)
                    .build(connector)
            })
            .clone()
    }
}

/// Connects to the endpoint a request's URI names, the way the routes say.
#[derive(Clone)]
pub struct Connector {
    routes: watch::Receiver<Arc<Routes>>,
    tunnels: Arc<Tunnels>,
    local: LocalDialer,
    /// Whom the tunnel presents: the caller.
    source: Option<SpiffeId>,
    /// What the connections speak, told to the serving agent.
    upstream: Option<Upstream>,
}

/// Why a connection to an endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0} is not an endpoint of any service")]
    NotAnEndpoint(String),
    #[error("the caller has no identity to present to another node's agent")]
    NoIdentity,
    /// The serving agent's policies deny the caller: this one.
    #[error("the serving agent denied the caller: {0}")]
    Denied(Arc<str>),
    #[error("{0}")]
    Failed(String),
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let endpoint: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| ConnectError::NotAnEndpoint(uri.to_string()))?;
            let hop = this.routes.borrow().endpoint_hop(endpoint).cloned();
            match hop {
                None => Err(ConnectError::NotAnEndpoint(endpoint.to_string())),
                Some(Hop::Local) => {
                    let stream = this
                        .local
                        .endpoint(endpoint)
                        .await
                        .map_err(|e| ConnectError::Failed(e.to_string()))?;
                    Ok(Conn::Direct(TokioIo::new(stream)))
                }
                Some(Hop::Tunnel(peer)) => {
                    let source = this.source.as_ref().ok_or(ConnectError::NoIdentity)?;
                    let stream = timeout(
                        CONNECT_TIMEOUT,
                        this.tunnels.open(
                            source,
                            None,
                            &peer.node,
                            peer.agent,
                            endpoint,
                            this.upstream,
                        ),
                    )
                    .await
                    .map_err(|_| {
                        ConnectError::Failed(format!("no answer within {CONNECT_TIMEOUT:?}"))
                    })?
                    .map_err(|e| match e {
                        TunnelError::Denied { policy, .. } => ConnectError::Denied(policy),
                        e => ConnectError::Failed(e.to_string()),
                    })?;
                    Ok(Conn::Tunnel(TokioIo::new(stream)))
                }
            }
        })
    }
}

/// A connection to an endpoint.
pub enum Conn {
    Direct(TokioIo<TcpStream>),
    Tunnel(TokioIo<TunnelStream>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Direct(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tunnel(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Direct(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tunnel(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Direct(io) => Pin::new(io).poll_flush(cx),
            Conn::Tunnel(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Direct(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tunnel(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
