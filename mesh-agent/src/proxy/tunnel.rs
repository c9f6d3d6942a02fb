//! The client side of the tunnel to peer agents: TLS 1.3 with the source workload's
//! certificate, HTTP/2, one CONNECT stream per proxied connection. TLS connections are pooled
//! per (source identity, peer agent); another is opened when all of them carry their fill of
//! streams.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::{client::conn::http2, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tracing::debug;

use prometheus_client::metrics::gauge::Gauge;

use crate::{
    identity::{SpiffeId, certificates::Certificates, tls},
    observability::metrics::{Metrics, PeerLabels},
    proxy::{
        authorization::{DENIED_BY, SOURCE_ADDRESS},
        liveness::Liveness,
    },
    state::http::Upstream,
};

/// Streams one TLS connection carries at most; the inbound side advertises the same limit.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// TLS connections per (source identity, peer agent) over which streams are spread before
/// any connection carries two: one TCP connection is one queue, so a bulk transfer sharing
/// it delays every other stream's bytes (head-of-line blocking); apart, they do not.
pub const SPREAD_CONNECTIONS: usize = 4;
/// HTTP/2 flow-control windows: large enough that a bulk transfer over a fast link is not
/// stalled waiting for window updates, small enough that a stalled reader holds little memory.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame accepted: fewer frames for bulk data.
pub const MAX_FRAME: u32 = 256 << 10;
/// Data an HTTP/2 stream buffers for sending before its writer waits.
pub const SEND_BUFFER: usize = 1 << 20;

/// Why a tunnel stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no certificate is held for {0}")]
    NoCertificate(SpiffeId),
    #[error("cannot reach the peer agent at {agent}: {source}")]
    Connect {
        agent: SocketAddr,
        source: io::Error,
    },
    #[error("TLS with the peer agent at {agent} failed: {source}")]
    Tls {
        agent: SocketAddr,
        source: io::Error,
    },
    #[error("HTTP/2 with the peer agent at {agent} failed: {source}")]
    Http {
        agent: SocketAddr,
        source: hyper::Error,
    },
    #[error("cannot ask for {target}: {source}")]
    Request {
        target: SocketAddr,
        source: http::Error,
    },
    #[error("the peer agent at {agent} answered {status} for {target}")]
    Refused {
        agent: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("the peer agent at {agent} denied the stream to {target}: {policy}")]
    Denied {
        agent: SocketAddr,
        target: SocketAddr,
        /// What denied it there (see `proxy::authorization::Decision`).
        policy: Arc<str>,
    },
}

type Sender = http2::SendRequest<Empty<Bytes>>;

/// One pooled TLS connection and the streams it carries now.
struct Pooled {
    sender: Sender,
    streams: Arc<AtomicUsize>,
}

type Pool = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// Pooled tunnel connections to peer agents.
pub struct Tunnels {
    certificates: Arc<Certificates>,
    liveness: Liveness,
    metrics: Arc<Metrics>,
    pools: Mutex<HashMap<(SpiffeId, SocketAddr), Pool>>,
}

impl Tunnels {
    pub fn new(certificates: Arc<Certificates>, liveness: Liveness, metrics: Arc<Metrics>) -> Self {
        Self {
            certificates,
            liveness,
            metrics,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// A byte stream to `target` through the agent of `node` at `agent`, authenticated as
    /// `source`, from the pod at `source_address` if it is one pod's; one that `carries`
    /// HTTP requests if it says so.
    pub async fn open(
        &self,
        source: &SpiffeId,
        source_address: Option<IpAddr>,
        node: &str,
        agent: SocketAddr,
        target: SocketAddr,
        carries: Option<Upstream>,
    ) -> Result<TunnelStream, TunnelError> {
        let peer = PeerLabels {
            peer_node: node.to_owned(),
        };
        let request = || {
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string());
            if let Some(protocol) = carries {
                request = request.header(Upstream::HEADER, protocol.token());
            }
            if let Some(address) = source_address {
                request = request.header(SOURCE_ADDRESS, address.to_string());
            }
            request
                .body(Empty::new())
                .map_err(|source| TunnelError::Request { target, source })
        };
        let http = |source| TunnelError::Http { agent, source };
        let (mut sender, mut stream) = self.stream_slot(source, agent, &peer).await?;
        let response = match sender.send_request(request()?).await {
            Err(e) if never_taken(&e) => {
                // The connection was going away (the peer agent drains, for an upgrade say)
                // before the peer took this stream: it is safe to ask again, on another.
                debug!(%agent, "a tunnel connection went away before taking a stream: {e}");
                self.retire(source, agent, &stream).await;
                (sender, stream) = self.stream_slot(source, agent, &peer).await?;
                sender.send_request(request()?).await
            }
            sent => sent,
        }
        .map_err(http)?;
        if let Some(policy) = response.headers().get(DENIED_BY) {
            let policy = String::from_utf8_lossy(policy.as_bytes()).into();
            return Err(TunnelError::Denied {
                agent,
                target,
                policy,
            });
        }
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused {
                agent,
                target,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(http)?;
        Ok(TunnelStream {
            io: TokioIo::new(upgraded),
            _stream: stream,
        })
    }

    /// A connection of the pool with room for one more stream, and that stream's place.
    async fn stream_slot(
        &self,
        source: &SpiffeId,
        agent: SocketAddr,
        peer: &PeerLabels,
    ) -> Result<(Sender, StreamGuard), TunnelError> {
        let pool = self
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((source.clone(), agent))
            .or_default()
            .clone();
        let mut conns = pool.lock().await;
        conns.retain(|c| !c.sender.is_closed());
        // The connection with the fewest streams, unless all are busy and the pool may grow.
        // The one taken goes to the back, so that streams one after another take turns (the
        // peer caps each connection's new streams per second).
        let limit = MAX_STREAMS_PER_CONNECTION as usize;
        let room = if conns.len() < SPREAD_CONNECTIONS {
            1
        } else {
            limit
        };
        let free = conns
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.streams.load(Ordering::Relaxed))
            .filter(|(_, c)| c.streams.load(Ordering::Relaxed) < room)
            .map(|(i, _)| i);
        let conn = match free {
            Some(i) => {
                let taken = conns.remove(i);
                conns.push(taken);
                &conns[conns.len() - 1]
            }
            None => {
                let config = self
                    .certificates
                    .client_config(source)
                    .ok_or_else(|| TunnelError::NoCertificate(source.clone()))?;
                let sender = dial(config, agent, peer, self.liveness, &self.metrics).await?;
                debug!(%source, %agent, pooled = conns.len() + 1, "tunnel connection opened");
                conns.push(Pooled {
                    sender,
                    streams: Arc::new(AtomicUsize::new(0)),
                });
                &conns[conns.len() - 1]
            }
        };
        conn.streams.fetch_add(1, Ordering::Relaxed);
        let gauge = self.metrics.tunnel_streams.get_or_create_owned(peer);
        gauge.inc();
        Ok((
            conn.sender.clone(),
            StreamGuard {
                streams: conn.streams.clone(),
                gauge,
            },
        ))
    }

    /// Takes the connection that holds `stream` out of the pool: no stream is put on it again.
    async fn retire(&self, source: &SpiffeId, agent: SocketAddr, stream: &StreamGuard) {
        let pool = self
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(source.clone(), agent))
            .cloned();
        if let Some(pool) = pool {
            let mut conns = pool.lock().await;
            conns.retain(|c| !Arc::ptr_eq(&c.streams, &stream.streams));
        }
    }
}

/// Whether a stream failed before the peer took it, so that asking again cannot do twice
/// what the caller asked once: its connection closed before the stream was sent (hyper's
/// "canceled"), or the peer refused it unprocessed (REFUSED_STREAM, or a GOAWAY that left
/// it out).
fn never_taken(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote())
}

async fn dial(
    config: Arc<rustls::ClientConfig>,
    agent: SocketAddr,
    peer: &PeerLabels,
    liveness: Liveness,
    metrics: &Metrics,
) -> Result<Sender, TunnelError> {
    let tcp = TcpStream::connect(agent)
        .await
        .map_err(|source| TunnelError::Connect { agent, source })?;
    liveness.tune(&tcp);
    let tls = TlsConnector::from(config)
        .connect(ServerName::IpAddress(agent.ip().into()), tcp)
        .await
        .map_err(|source| {
            metrics.handshake_failed("outbound", tls::failure_reason(&source));
            TunnelError::Tls { agent, source }
        })?;
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(liveness.ping_interval)
        .keep_alive_timeout(liveness.ping_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buf_size(SEND_BUFFER)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|source| TunnelError::Http { agent, source })?;
    let pooled = metrics.tunnel_connections.get_or_create_owned(peer);
    pooled.inc();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%agent, "tunnel connection ended: {e}");
        }
        pooled.dec();
    });
    Ok(sender)
}

/// Holds a stream's place in its connection, and in the open streams gauge, until dropped.
struct StreamGuard {
    streams: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// One proxied connection's stream through a peer agent.
pub struct TunnelStream {
    io: TokioIo<Upgraded>,
    _stream: StreamGuard,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::testing::{self, within};

    /// A peer agent that answers the first stream of each connection and refuses every later
    /// one unprocessed, as a draining agent refuses what its GOAWAY left out; it counts the
    /// connections made to it.
    async fn refusing_peer(certificates: &Certificates) -> (SocketAddr, Arc<AtomicUsize>) {
        let acceptor = TlsAcceptor::from(certificates.server_config().await.unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let tls = acceptor.accept(tcp).await.unwrap();
                    let mut conn = h2::server::handshake(tls).await.unwrap();
                    let mut answered = Vec::new();
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        if answered.is_empty() {
                            let ok = http::Response::new(());
                            answered.push(respond.send_response(ok, false).unwrap());
                        } else {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        }
                    }
                });
            }
        });
        (addr, connections)
    }

    /// A stream the peer never took is asked for again on a new connection: its caller
    /// sees nothing of it.
    #[tokio::test]
    async fn a_stream_the_peer_never_took_is_asked_again_on_a_new_connection() {
        let (_registry, metrics) = testing::metrics();
        let ttl = Duration::from_secs(3600);
        let certificates = testing::certificates(testing::test_ca(), ttl, metrics.clone());
        let id = SpiffeId::workload("cluster.local", "shop", "web");
        let ids = BTreeSet::from([id.clone()]);
        certificates.hold(&ids);
        within(certificates.issued(&ids)).await;
        let (agent, connections) = refusing_peer(&certificates).await;
        let tunnels = Tunnels::new(certificates, Liveness::every(ttl), metrics);
        let target: SocketAddr = "10.0.2.7:8080".parse().unwrap();
        let open = || tunnels.open(&id, None, "n2", agent, target, None);

        // The first stream is answered; once it is done, its connection is the pool's only
        // one, so the next stream goes on it and is refused there.
        drop(within(open()).await.unwrap());
        assert_eq!(connections.load(Ordering::Relaxed), 1);
        within(open()).await.unwrap();
        assert_eq!(connections.load(Ordering::Relaxed), 2);
    }
}
