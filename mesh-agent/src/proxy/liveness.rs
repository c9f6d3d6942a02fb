//! How tunnel connections notice a peer that is gone without a word (a node powered off or cut
//! off sends no FIN or RST): HTTP/2 pings with a deadline, a TCP user timeout for data that is
//! never acknowledged, and a deadline for a peer that authenticates and then says nothing.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};
use tracing::debug;

/// Unsent bytes a tunnel socket holds before it stops taking more: a bulk stream cannot bury
/// another stream's frames under megabytes of queued data (head-of-line blocking).
const NOTSENT_LOWAT: libc::c_int = 128 << 10;

/// The deadlines of a tunnel connection.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// Between HTTP/2 pings, sent on idle connections too.
    pub ping_interval: Duration,
    /// For a ping's answer; none by then closes the connection and every stream on it.
    pub ping_timeout: Duration,
    /// TCP_USER_TIMEOUT: sent data unacknowledged this long closes the connection.
    pub user_timeout: Duration,
}

impl Liveness {
    /// Pings every `interval`, each answered within as long again: a dead peer is found
    /// within twice the interval.
    pub fn every(interval: Duration) -> Self {
        Self {
            ping_interval: interval,
            ping_timeout: interval,
            user_timeout: 2 * interval,
        }
    }

    /// Sets a tunnel socket's options: no Nagle delay, the user timeout and the unsent
    /// bytes low-water mark.
    pub fn tune(&self, tcp: &TcpStream) {
        let socket = socket2::SockRef::from(tcp);
        if let Err(e) = socket.set_tcp_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        if let Err(e) = socket.set_tcp_user_timeout(Some(self.user_timeout)) {
            debug!("cannot set TCP_USER_TIMEOUT: {e}");
        }
        if let Err(e) = set_notsent_lowat(tcp) {
            debug!("cannot set TCP_NOTSENT_LOWAT: {e}");
        }
    }
}

fn set_notsent_lowat(tcp: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket, and a pointer to an int of the size given.
    let done = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            std::ptr::from_ref(&NOTSENT_LOWAT).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A stream whose reads fail with `TimedOut` when the peer stays silent too long: before its
/// first byte only, or between any two reads.
pub struct SilenceLimit<S> {
    inner: S,
    limit: Duration,
    /// Whether each byte read starts the limit again (or the first one ends it).
    every_read: bool,
    /// Until which the peer must send; none once the first byte came (unless `every_read`).
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> SilenceLimit<S> {
    /// The peer must send its first byte within `limit`, and then may be silent at will.
    pub fn before_first_byte(inner: S, limit: Duration) -> Self {
        Self::new(inner, limit, false)
    }

    /// The peer may never be silent for `limit`: an idle connection is closed.
    pub fn between_reads(inner: S, limit: Duration) -> Self {
        Self::new(inner, limit, true)
    }

    fn new(inner: S, limit: Duration, every_read: bool) -> Self {
        Self {
            inner,
            limit,
            every_read,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SilenceLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let next = tokio::time::Instant::now() + self.limit;
            match (self.every_read, self.deadline.as_mut()) {
                (true, Some(deadline)) => deadline.as_mut().reset(next),
                _ => self.deadline = None,
            }
        } else if let (Poll::Pending, Some(deadline)) = (&polled, self.deadline.as_mut())
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer sent nothing in time",
            )));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SilenceLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (_peer, ours) = duplex(64);
        let mut stream = SilenceLimit::before_first_byte(ours, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn once_a_byte_came_silence_is_fine() {
        let (mut peer, ours) = duplex(64);
        let mut stream = SilenceLimit::before_first_byte(ours, Duration::from_secs(10));
        peer.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(stream.read(&mut buf).await.unwrap(), 1);
        let later = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await;
        assert!(
            later.is_err(),
            "a quiet peer after its first byte is not cut"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn between_reads_every_silence_counts() {
        let (mut peer, ours) = duplex(64);
        let mut stream = SilenceLimit::between_reads(ours, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(9)).await;
            peer.write_all(b"x").await.unwrap();
            assert_eq!(stream.read(&mut buf).await.unwrap(), 1);
        }
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
