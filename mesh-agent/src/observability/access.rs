//! One proxied connection's record: its metrics while it is open, and one access log line
//! (target `mesh_agent::access`) when it closes.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use crate::observability::metrics::{ConnectionLabels, metrics};

/// An open connection, counted as opened; [`Connection::close`] counts the rest.
pub struct Connection {
    labels: ConnectionLabels,
    source: SocketAddr,
    destination: SocketAddr,
    started: Instant,
}

impl Connection {
    pub fn open(labels: ConnectionLabels, source: SocketAddr, destination: SocketAddr) -> Self {
        metrics().connection_opened(&labels);
        Self {
            labels,
            source,
            destination,
            started: Instant::now(),
        }
    }

    /// Counts the bytes and duration and writes the access log line; `outcome` says how the
    /// connection ended (`ok`, or the error a user can act on).
    pub fn close<S>(self, source_side: &Metered<S>, outcome: &str) {
        let m = metrics();
        let l = &self.labels;
        // Read from the source side: what the source sent. Written to it: what came back.
        let (sent, received) = (source_side.read, source_side.written);
        let duration = self.started.elapsed();
        m.connections_closed.get_or_create(l).inc();
        m.bytes_sent.get_or_create(l).inc_by(sent);
        m.bytes_received.get_or_create(l).inc_by(received);
        m.connection_duration
            .get_or_create(l)
            .observe(duration.as_secs_f64());
        info!(
            target: "mesh_agent::access",
            direction = l.direction,
            source = %self.source,
            source_identity = l.source_identity,
            source_workload = %workload(&l.source_namespace, &l.source_workload),
            destination = %self.destination,
            destination_service = l.destination_service,
            destination_workload = %workload(&l.destination_namespace, &l.destination_workload),
            hop = l.hop,
            sent,
            received,
            duration_ms = duration.as_millis() as u64,
            outcome,
            "connection closed"
        );
    }
}

/// `namespace/name`, or `-` for an address no workload of this node has.
fn workload(namespace: &str, name: &str) -> String {
    if name.is_empty() {
        "-".into()
    } else {
        format!("{namespace}/{name}")
    }
}

/// A stream that counts the bytes read from it and written to it.
pub struct Metered<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }

    /// The metered stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
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
        self.read += (buf.filled().len() - before) as u64;
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
            self.written += n as u64;
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
