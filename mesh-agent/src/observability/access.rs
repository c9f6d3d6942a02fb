//! One record per proxied connection (a captured connection, or a tunnel stream to a pod).
//!
//! A connection's record is made when the connection is taken on; it writes the metrics and
//! one access log line (target `mesh_agent::access`) however the connection ends: refused, its
//! destination unreachable, copied to its end, cut, or dropped on any other path. Lines of refused
//! connections and of unreachable destinations are sampled like
//! [`warn_sampled!`](crate::warn_sampled) (a pod can repeat them at will); metrics count
//! every refusal.

use std::{
    fmt::Display,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use tracing::{info, warn};

use crate::{
    observability::{
        logs::Sample,
        metrics::{ConnectionLabels, Metrics},
    },
    proxy::{
        copy::Ended,
        open::{Authorized, OpenConnection, OpenConnections, Registration},
        refusal::Refusal,
    },
};

/// Which way a proxied connection goes through this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Captured from a pod of this node.
    Outbound,
    /// From a peer agent's tunnel to a pod of this node.
    Inbound,
}

impl Direction {
    /// Its metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a proxied connection ended.
#[derive(Debug)]
enum Outcome {
    /// Refused before any dial.
    Refused(Refusal),
    /// No destination could be reached.
    Unreachable(String),
    /// Connected, then copied until this.
    Copied(Ended),
    /// Dropped on a path that set no outcome (a task cancelled, say).
    Abandoned,
}

/// One proxied connection, from when it is taken on until it is dropped.
pub struct Record {
    metrics: Arc<Metrics>,
    open: Arc<OpenConnections>,
    /// Its place among the open connections, once connected.
    registration: Option<Registration>,
    /// For a connection into a pod of this node, what to decide on again when policies
    /// change; registered with it.
    authorized: Option<Authorized>,
    direction: Direction,
    source: SocketAddr,
    destination: SocketAddr,
    started: Instant,
    /// Set once connected: the connection is counted as opened under these.
    labels: Option<ConnectionLabels>,
    /// Bytes from the source, and back to it.
    sent: u64,
    received: u64,
    outcome: Outcome,
}

impl Record {
    /// A connection from `source` to `destination` (as the source asked for it).
    pub fn new(
        metrics: Arc<Metrics>,
        open: Arc<OpenConnections>,
        direction: Direction,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Self {
        Self {
            metrics,
            open,
            registration: None,
            authorized: None,
            direction,
            source,
            destination,
            started: Instant::now(),
            labels: None,
            sent: 0,
            received: 0,
            outcome: Outcome::Abandoned,
        }
    }

    /// Connects into a pod as `authorized` says: to be decided again when policies change.
    pub fn into_pod(&mut self, authorized: Authorized) {
        self.authorized = Some(authorized);
    }

    /// Ends it refused, counted by the refusal's reason.
    pub fn refuse(mut self, refusal: Refusal) {
        self.metrics.refused(refusal.reason());
        self.outcome = Outcome::Refused(refusal);
    }

    /// Ends it with nothing reached, for `why`.
    pub fn unreachable(mut self, why: impl Display) {
        self.outcome = Outcome::Unreachable(why.to_string());
    }

    /// Connected to `destination` (an endpoint, for a service): counted as opened, and
    /// listed among the open connections.
    pub fn connected(&mut self, labels: ConnectionLabels, destination: SocketAddr) {
        self.metrics.connection_opened(&labels);
        let open = OpenConnection::new(&labels, self.source, destination);
        self.registration = Some(self.open.register(open, self.authorized.take()));
        self.labels = Some(labels);
        self.destination = destination;
    }

    /// Ends a connected one after its copy ended so; `source_side` is what the source side's
    /// [`Metered`] counted.
    pub fn copied(mut self, source_side: &Traffic, ended: Ended) {
        // Read from the source side: what the source sent. Written to it: what came back.
        self.sent = source_side.read.load(Ordering::Relaxed);
        self.received = source_side.written.load(Ordering::Relaxed);
        self.outcome = Outcome::Copied(ended);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        let (sent, received) = (self.sent, self.received);
        let labels = self.labels.as_ref();
        if let Some(l) = labels {
            let m = &self.metrics;
            m.connections_closed.get_or_create(l).inc();
            m.bytes_sent.get_or_create(l).inc_by(sent);
            m.bytes_received.get_or_create(l).inc_by(received);
            m.connection_duration
                .get_or_create(l)
                .observe(duration.as_secs_f64());
        }
        let field = |f: fn(&ConnectionLabels) -> &str| labels.map_or("", f);
        let source_workload = workload(
            field(|l| &l.source_namespace),
            field(|l| &l.source_workload),
        );
        let destination_workload = workload(
            field(|l| &l.destination_namespace),
            field(|l| &l.destination_workload),
        );
        macro_rules! line {
            ($level:ident, $outcome:expr, $message:literal $(, $extra:ident)*) => {
                $level!(
                    target: "mesh_agent::access",
                    direction = self.direction.as_str(),
                    source = %self.source,
                    source_identity = field(|l| &l.source_identity),
                    source_workload = %source_workload,
                    destination = %self.destination,
                    destination_service = field(|l| &l.destination_service),
                    destination_workload = %destination_workload,
                    hop = field(|l| l.hop),
                    sent,
                    received,
                    duration_ms = duration.as_millis() as u64,
                    outcome = %$outcome,
                    $($extra,)*
                    $message
                )
            };
        }
        static REFUSED: Sample = Sample::new();
        static UNREACHABLE: Sample = Sample::new();
        match &self.outcome {
            Outcome::Refused(refusal) => {
                if let Some(held_back) = REFUSED.admit() {
                    let reason = refusal.reason();
                    line!(warn, refusal, "connection refused", reason, held_back);
                }
            }
            Outcome::Unreachable(why) => {
                if let Some(held_back) = UNREACHABLE.admit() {
                    line!(warn, why, "destination unreachable", held_back);
                }
            }
            Outcome::Copied(ended) => line!(info, ended, "connection closed"),
            Outcome::Abandoned => line!(info, "abandoned", "connection closed"),
        }
    }
}

/// `namespace/name`, or `-` for an address no workload of this node has.
pub(crate) fn workload(namespace: &str, name: &str) -> String {
    if name.is_empty() {
        "-".into()
    } else {
        format!("{namespace}/{name}")
    }
}

/// A stream that counts the bytes read from it and written to it.
pub struct Metered<S> {
    inner: S,
    traffic: Arc<Traffic>,
}

/// The bytes a [`Metered`] stream read and wrote so far; it outlives the stream.
#[derive(Debug, Default)]
pub struct Traffic {
    read: AtomicU64,
    written: AtomicU64,
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            traffic: Arc::default(),
        }
    }

    /// The metered stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Its counts, also once the stream is handed on.
    pub fn traffic(&self) -> Arc<Traffic> {
        self.traffic.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.traffic.read.fetch_add(read, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.traffic.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
