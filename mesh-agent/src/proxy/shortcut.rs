//! The agent's end of a captured connection, read so that no byte is left waiting.
//!
//! Bytes reach such a socket two ways: `mesh_redirect` puts a pod's sends straight into its
//! sk_msg queue, and once that queue is at its bound the pod's sends go through TCP/IP into
//! its receive queue. The kernel's read (`tcp_bpf_recvmsg`) takes from one queue per call,
//! so a read can come back short while the other still holds bytes. Tokio takes a short
//! read for an empty socket and waits for the next wake-up, which never comes if the pod has
//! sent everything and now waits for an answer: the bytes wait until the pod gives up.
//! [`ShortcutStream`] reads through `try_read`, which forgets readiness only when the
//! socket says it has nothing more (`EAGAIN`).

use std::{
    io,
    ops::Deref,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A captured connection's socket: reads like a [`TcpStream`] except that a short read does
/// not make it wait for the next wake-up; writes are the stream's own.
#[derive(Debug)]
pub struct ShortcutStream(TcpStream);

impl ShortcutStream {
    /// The agent's end of a captured connection, as `accept` gave it.
    pub fn new(stream: TcpStream) -> Self {
        Self(stream)
    }
}

impl Deref for ShortcutStream {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for ShortcutStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let socket = socket2::SockRef::from(&self.0);
            // SAFETY: `recv` only writes into the buffer's unfilled part, and `assume_init`
            // and `advance` cover exactly the bytes it wrote.
            let unfilled = unsafe { buf.unfilled_mut() };
            match self
                .0
                .try_io(tokio::io::Interest::READABLE, || socket.recv(unfilled))
            {
                Ok(n) => {
                    // SAFETY: the kernel wrote `n` bytes at the start of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness is cleared: the next round waits for a wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ShortcutStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    #[tokio::test]
    async fn reads_everything_sent_and_then_the_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut stream = ShortcutStream::new(accepted);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                sender.write_all(&sent).await?;
                sender.shutdown().await
            })
        };
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(received, sent);
    }
}
