//! The outbound listener: accepts captured connections, recovers where each was going, and
//! forwards it there.

use std::{
    io,
    net::{Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::copy_bidirectional_with_sizes,
    net::{TcpListener, TcpStream},
    sync::watch,
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    datapath::{OUTBOUND_PORT, OrigDstTable},
    routing::{Route, Routes},
};

/// How long a dial to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction; large enough that bulk transfers make few syscalls.
const COPY_BUFFER: usize = 64 * 1024;
const LISTEN_BACKLOG: i32 = 4096;

/// Binds the outbound port on every address of both families.
pub fn bind() -> io::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, OUTBOUND_PORT));
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on the outbound port {OUTBOUND_PORT}: {e}"),
        )
    })?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `stop` is cancelled, routing by the latest `routes`; each connection runs on
/// `tracker` and is aborted when `abort` is cancelled.
pub async fn serve(
    listener: TcpListener,
    mut orig_dst: OrigDstTable,
    routes: watch::Receiver<Arc<Routes>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors or memory: back off rather than spin.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(dst) = orig_dst.take(peer) else {
            warn!(%peer, "closing a connection that was not captured (no original destination)");
            continue;
        };
        let route = match routes.borrow().route(dst) {
            Ok(route) => route,
            Err(e) => {
                warn!(%peer, %dst, "closing a captured connection: {e}");
                continue;
            }
        };
        let span = info_span!("conn", %peer, %dst, target = %route.target);
        tracker.spawn(proxy(client, route, abort.clone()).instrument(span));
    }
}

async fn proxy(mut client: TcpStream, route: Route, abort: CancellationToken) {
    let mut upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(route.target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!("cannot reach the destination: {e}");
            return;
        }
        Err(_) => {
            warn!("cannot reach the destination: no answer within {CONNECT_TIMEOUT:?}");
            return;
        }
    };
    for s in [&client, &upstream] {
        if let Err(e) = s.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
    }
    let copied = tokio::select! {
        copied = copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER) => copied,
        () = abort.cancelled() => {
            debug!("closed by shutdown");
            return;
        }
    };
    match copied {
        Ok((sent, received)) => debug!(
            service = route.service.as_deref().unwrap_or("-"),
            sent, received, "connection finished"
        ),
        Err(e) => debug!("connection ended with an error: {e}"),
    }
}
