//! Bodies passed through: a request body whose bytes are counted as they go, and a response
//! body that carries the request's record (and its endpoint's lease) until it is done.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::{
    observability::request::RequestRecord,
    proxy::{
        balance::Lease,
        breaker::Slot,
        http::{
            upstream::BoxError,
            verdict::{self, Pending},
        },
    },
};

/// A body whose data bytes are added to a counter as they are read.
pub struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = poll_nonempty(Pin::new(&mut self.inner), cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The next frame of `body` that is not empty data. An HTTP/2 peer may end a body with an
/// empty DATA frame; passed on as a chunk, it would go out as an empty DATA frame that does
/// not end the stream, and h2 closes a connection after 100 of those (a flood defence).
fn poll_nonempty<B: Body<Data = Bytes>>(
    mut body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    loop {
        match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
            polled => return polled,
        }
    }
}

/// What a request holds while it is in flight: its endpoint's count of outstanding requests,
/// its place under the service port's cap, and a gRPC status still to report.
pub struct InFlight {
    pub lease: Lease,
    pub slot: Slot,
    pub pending: Option<Pending>,
}

/// A response body on its way to the client: counts its bytes and reads a `grpc-status` in
/// its trailers into the request's record, written when the body is done or dropped; keeps
/// the request counted as in flight until then.
pub struct Recorded<B> {
    inner: B,
    record: RequestRecord,
    in_flight: Option<InFlight>,
}

impl<B> Recorded<B> {
    pub fn new(inner: B, record: RequestRecord, in_flight: Option<InFlight>) -> Self {
        Self {
            inner,
            record,
            in_flight,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Recorded<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = poll_nonempty(Pin::new(&mut self.inner), cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            let bytes = frame.data_ref().map_or(0, |d| d.len() as u64);
            let grpc_status = frame.trailers_ref().and_then(verdict::grpc_status);
            self.record.sent(bytes, grpc_status);
            if let Some(status) = grpc_status
                && let Some(in_flight) = &mut self.in_flight
                && let Some(pending) = in_flight.pending.take()
            {
                pending.report(&in_flight.lease, status);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that can be sent again: each [`Replay`] of it sends what earlier tries read
/// (kept up to a limit) and then reads on from the client. Once more than the limit has been
/// read, it can no longer be replayed. Like linkerd2-proxy's `ReplayBody`: a try that ends
/// before it read the whole body leaves the rest for the next.
pub struct Replay<B = Counted<hyper::body::Incoming>> {
    shared: Arc<std::sync::Mutex<Recording<B>>>,
    /// The client's body, while this replay reads it.
    rest: Option<B>,
    /// How many of the recorded chunks this replay has sent.
    sent: usize,
    trailers_sent: bool,
}

struct Recording<B> {
    /// The client's body, between tries (a try takes it when it needs it and gives it back
    /// when dropped).
    rest: Option<B>,
    chunks: Vec<Bytes>,
    size: u64,
    limit: u64,
    /// More than `limit` was read: nothing is kept, and no replay can start.
    overflowed: bool,
    ended: bool,
    trailers: Option<http::HeaderMap>,
}

impl<B> Replay<B> {
    /// The first try's body, keeping up to `limit` bytes for the next.
    pub fn new(body: B, limit: u64) -> Self {
        Self {
            shared: Arc::new(std::sync::Mutex::new(Recording {
                rest: Some(body),
                chunks: Vec::new(),
                size: 0,
                limit,
                overflowed: false,
                ended: false,
                trailers: None,
            })),
            rest: None,
            sent: 0,
            trailers_sent: false,
        }
    }

    /// Whether another try can send the body: no more than the limit has been read.
    pub fn replayable(&self) -> bool {
        !self.lock().overflowed
    }

    /// The body for another try, unless more than the limit has been read already.
    pub fn again(&self) -> Option<Self> {
        self.replayable().then(|| Self {
            shared: self.shared.clone(),
            rest: None,
            sent: 0,
            trailers_sent: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording<B>> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<B> Body for Replay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut recording = this
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if this.sent < recording.chunks.len() {
            this.sent += 1;
            return Poll::Ready(Some(Ok(Frame::data(
                recording.chunks[this.sent - 1].clone(),
            ))));
        }
        if recording.ended {
            if !this.trailers_sent
                && let Some(trailers) = recording.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        if this.rest.is_none() {
            this.rest = recording.rest.take();
        }
        let Some(rest) = this.rest.as_mut() else {
            // An earlier try still holds the client's body: this one fails rather than send
            // a body cut short.
            return Poll::Ready(Some(Err(
                "the request body is still being sent on an earlier try".into(),
            )));
        };
        let polled = Pin::new(rest).poll_frame(cx).map_err(Into::into);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !recording.overflowed {
                        recording.size += data.len() as u64;
                        if recording.size > recording.limit {
                            recording.overflowed = true;
                            recording.chunks = Vec::new();
                        } else {
                            recording.chunks.push(data.clone());
                            this.sent = recording.chunks.len();
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    recording.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
            }
            Poll::Ready(None) => recording.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let recording = self.lock();
        recording.ended
            && self.sent >= recording.chunks.len()
            && (self.trailers_sent || recording.trailers.is_none())
    }
}

impl<B> Drop for Replay<B> {
    fn drop(&mut self) {
        if let Some(rest) = self.rest.take() {
            self.lock().rest = Some(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Frames =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    /// A client's body: these chunks, then trailers `x-sum: 1`.
    fn client(chunks: &[&'static str]) -> Frames {
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        frames.push(Ok(Frame::trailers(trailers)));
        StreamBody::new(futures::stream::iter(frames))
    }

    async fn read(body: Replay<Frames>) -> (Bytes, Option<http::HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_body_read_whole_is_sent_again_with_its_trailers() {
        let first = Replay::new(client(&["ab", "cd"]), 16);
        let again = first.again().unwrap();
        let (bytes, trailers) = read(first).await;
        assert_eq!(bytes, "abcd");
        assert_eq!(trailers.unwrap()["x-sum"], "1");
        let (bytes, trailers) = read(again).await;
        assert_eq!(bytes, "abcd");
        assert_eq!(trailers.unwrap()["x-sum"], "1");
    }

    #[tokio::test]
    async fn a_try_that_read_part_leaves_the_rest_for_the_next() {
        let keeper = Replay::new(client(&["ab", "cd", "ef"]), 16);
        let mut first = keeper.again().unwrap();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first);
        // The next try sends what was read, then reads on.
        let (bytes, _) = read(keeper.again().unwrap()).await;
        assert_eq!(bytes, "abcdef");
    }

    #[tokio::test]
    async fn a_body_longer_than_the_limit_is_not_sent_again() {
        let keeper = Replay::new(client(&["abcd", "efgh"]), 6);
        let (bytes, _) = read(keeper.again().unwrap()).await;
        assert_eq!(bytes, "abcdefgh", "the first try gets all of it");
        assert!(keeper.again().is_none());
    }

    #[tokio::test]
    async fn a_try_cannot_read_on_while_an_earlier_one_holds_the_body() {
        let keeper = Replay::new(client(&["ab", "cd"]), 16);
        let mut first = keeper.again().unwrap();
        first.frame().await.unwrap().unwrap();
        let mut second = keeper.again().unwrap();
        assert_eq!(
            second.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert!(second.frame().await.unwrap().is_err(), "no body cut short");
    }
}
