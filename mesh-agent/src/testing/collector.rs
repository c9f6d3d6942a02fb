//! An OTLP collector for tests: OpenTelemetry's own trace service definitions (tonic) served
//! over HTTP/2 on loopback, keeping every span it is sent with its resource's attributes.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::Request;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::Span,
};
use tokio::{net::TcpListener, sync::Notify};
use tower_service::Service;

/// A span as received, with the attributes of the resource that sent it.
#[derive(Debug, Clone)]
pub struct Received {
    pub span: Span,
    pub resource: Vec<KeyValue>,
}

impl Received {
    /// The span's attribute `key` as text (numbers written out).
    pub fn attribute(&self, key: &str) -> Option<String> {
        text(&self.span.attributes, key)
    }

    /// The sending resource's attribute `key`.
    pub fn resource(&self, key: &str) -> Option<String> {
        text(&self.resource, key)
    }
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|a| a.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[derive(Clone, Default)]
struct Store {
    spans: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Received {
                    span,
                    resource: resource.clone(),
                }));
            }
        }
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The collector: listening until dropped.
pub struct Collector {
    pub addr: SocketAddr,
    store: Store,
    serving: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Listens on `addr`.
    pub async fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let store = Store::default();
        let server = TraceServiceServer::new(store.clone());
        let serving = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let server = server.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let mut server = server.clone();
                    async move { Ok::<_, Infallible>(server.call(request).await.unwrap()) }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(conn), service),
                );
            }
        });
        Self {
            addr,
            store,
            serving,
        }
    }

    /// The spans received once there are at least `n`; fails the test after 10 s saying what
    /// came.
    pub async fn spans(&self, n: usize) -> Vec<Received> {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let mut arrived = std::pin::pin!(self.store.arrived.notified());
                // Registered before the count is read: an export in between still wakes it.
                arrived.as_mut().enable();
                {
                    let spans = self.store.spans.lock().unwrap();
                    if spans.len() >= n {
                        return spans.clone();
                    }
                }
                arrived.await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            let spans = self.store.spans.lock().unwrap();
            panic!("{} spans came, not {n}: {spans:#?}", spans.len())
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.serving.abort();
    }
}
