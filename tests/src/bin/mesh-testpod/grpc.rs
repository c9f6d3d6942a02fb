//! Unary gRPC with tonic, over h2c: `serve --grpc` echoes each call's payload; `bench --mode
//! grpc` makes calls many at once over one HTTP/2 connection, as a gRPC channel does. The
//! message derives prost's `Message` and the service is written as tonic's generated code
//! would be (no protoc here).

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use http::{Request, Response, uri::PathAndQuery};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tonic::{Status, server::UnaryService};
use tonic_prost::ProstCodec;

/// The one method: answers with the payload it is sent.
const ECHO: &str = "/bench.Echo/Call";

#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(bytes = "bytes", tag = "1")]
    data: bytes::Bytes,
}

#[derive(Clone, Copy)]
struct Echo;

impl UnaryService<Payload> for Echo {
    type Response = Payload;
    type Future = std::future::Ready<Result<tonic::Response<Payload>, Status>>;

    fn call(&mut self, request: tonic::Request<Payload>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

/// Serves gRPC (h2c) on `stream` until the client closes it.
pub async fn serve(stream: TcpStream) -> Result<()> {
    // A response's headers, message and trailers go in separate writes: without this,
    // Nagle's algorithm holds the later ones until the client's delayed ACK.
    stream.set_nodelay(true)?;
    let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Payload, Payload>::default());
        let response = if request.uri().path() == ECHO {
            grpc.unary(Echo, request).await
        } else {
            Status::unimplemented("no such method").into_http()
        };
        Ok::<_, Infallible>(response)
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}

/// tonic's client over one HTTP/2 connection.
#[derive(Clone)]
struct Channel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<Request<tonic::body::Body>> for Channel {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// `concurrency` callers, `calls` unary calls each with `size` bytes each way, all over one
/// HTTP/2 connection to `addr`; the latency of each call.
pub async fn calls(
    addr: SocketAddr,
    size: usize,
    concurrency: usize,
    calls: usize,
) -> Result<Vec<Duration>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let origin: http::Uri = format!("http://{addr}").parse()?;
    let client = tonic::client::Grpc::with_origin(Channel(sender), origin);
    let payload = Payload {
        data: vec![0x5a; size].into(),
    };
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut client, payload) = (client.clone(), payload.clone());
        callers.spawn(async move {
            let mut latencies = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                client.ready().await?;
                let answer = client
                    .unary(
                        tonic::Request::new(payload.clone()),
                        PathAndQuery::from_static(ECHO),
                        ProstCodec::<Payload, Payload>::default(),
                    )
                    .await?;
                ensure!(
                    answer.get_ref().data.len() == size,
                    "{} of {size} bytes came back",
                    answer.get_ref().data.len()
                );
                latencies.push(t.elapsed());
            }
            Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = callers.join_next().await {
        latencies.extend(done??);
    }
    Ok(latencies)
}
