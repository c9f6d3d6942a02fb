//! Copying both ways between two streams with a buffer borrowed only while bytes are in
//! flight: an idle connection holds no buffer, however long it stays open. Buffers come from
//! a small per-thread cache, so a busy connection does not allocate per read either.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    ops::{Deref, DerefMut},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Bytes read at most per read; large enough that bulk transfers make few syscalls.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// Free buffers kept per thread.
const CACHED_PER_THREAD: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of [`BUFFER_SIZE`] bytes, back to its thread's cache when dropped.
struct Buffer(Box<[u8]>);

impl Buffer {
    fn take() -> Self {
        let cached = FREE.with(|free| free.borrow_mut().pop());
        Self(cached.unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice()))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        FREE.with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < CACHED_PER_THREAD {
                free.push(buffer);
            }
        });
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// One direction: read, write all of it, and on end of input shut the writer down.
#[derive(Default)]
struct OneWay {
    /// Bytes read and not yet all written: the buffer, what is written, what was read.
    pending: Option<(Buffer, usize, usize)>,
    copied: u64,
    read_done: bool,
    needs_flush: bool,
    done: bool,
}

impl OneWay {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            if let Some((buffer, written, read)) = &mut self.pending {
                while written < read {
                    let n = ready!(writer.as_mut().poll_write(cx, &buffer[*written..*read]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *written += n;
                    self.copied += n as u64;
                    self.needs_flush = true;
                }
                // Written: keep the buffer for the next read, which usually follows at once
                // while data is flowing.
            }
            if self.read_done {
                self.pending = None;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.copied));
            }
            let mut buffer = match self.pending.take() {
                Some((buffer, ..)) => buffer,
                None => Buffer::take(),
            };
            let mut read_buf = ReadBuf::new(&mut buffer);
            match reader.as_mut().poll_read(cx, &mut read_buf) {
                Poll::Ready(Ok(())) => {
                    let read = read_buf.filled().len();
                    if read == 0 {
                        self.read_done = true;
                    } else {
                        self.pending = Some((buffer, 0, read));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing in flight: the buffer goes back (dropped here) until there is.
                    if self.needs_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both have ended (each end of input shuts the
/// other side's writing down); returns the bytes copied each way, or the first error.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = OneWay::default();
    let mut b_to_a = OneWay::default();
    poll_fn(|cx| {
        let there = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (there, back) {
            (Poll::Ready(there), Poll::Ready(back)) => Poll::Ready(Ok((there, back))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// How a two-way copy ended.
#[derive(Debug)]
pub enum Ended {
    /// Both ways reached their end of input.
    Done,
    /// A side failed (reset, or its tunnel broke): the other side must see a reset too, not a
    /// clean end that makes a cut transfer look complete.
    Failed(io::Error),
    /// The agent's shutdown cut it.
    Aborted,
}

impl Ended {
    /// Whether every byte reached its end: otherwise the sides are reset.
    pub fn is_complete(&self) -> bool {
        matches!(self, Self::Done)
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done => f.write_str("ok"),
            Self::Failed(e) => write!(f, "ended with an error: {e}"),
            Self::Aborted => f.write_str("closed by the agent's shutdown"),
        }
    }
}

/// Copies both ways like [`bidirectional`] until both sides are done or `abort` is
/// cancelled; says how it ended.
pub async fn until_done<A, B>(a: &mut A, b: &mut B, abort: &CancellationToken) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        copied = bidirectional(a, b) => match copied {
            Ok(_) => Ended::Done,
            Err(e) => Ended::Failed(e),
        },
        () = abort.cancelled() => Ended::Aborted,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn copies_both_ways_exactly() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let proxy = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });

        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await?;
            client.shutdown().await?;
            let mut back = Vec::new();
            client.read_to_end(&mut back).await?;
            io::Result::Ok(back)
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, expected);
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();

        assert_eq!(writer.await.unwrap().unwrap(), b"reply");
        assert_eq!(proxy.await.unwrap().unwrap(), (300_000, 5));
    }

    #[tokio::test]
    async fn an_idle_copy_holds_no_buffer() {
        let (_client, mut a) = duplex(1024);
        let (mut b, _server) = duplex(1024);
        let mut there = OneWay::default();
        let idle =
            poll_fn(|cx| Poll::Ready(there.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b))))
                .await;
        assert!(idle.is_pending());
        assert!(there.pending.is_none());
    }
}
