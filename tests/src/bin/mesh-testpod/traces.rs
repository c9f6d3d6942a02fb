//! Traces in the lab: `collect` is an OTLP/gRPC trace collector (OpenTelemetry's own service
//! definitions, served by tonic) that writes each span it receives as one JSON line; `serve
//! --http --trace-to URL` makes the HTTP server an instrumented app, which exports a server
//! span for each request that carries a `traceparent`, with OpenTelemetry's OTLP exporter.

use std::{
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use anyhow::Result;
use http::{HeaderMap, Request};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue as ProtoKeyValue, any_value::Value},
};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter, SpanLinks},
};
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc};
use tower_service::Service;

/// Serves the OTLP trace service on `listen`, printing `ready`, then appends to `out` a JSON
/// line per span:
/// `trace_id`, `span_id`, `parent_span_id` (hex, empty for a root), `name`, `kind`
/// (`client`, `server`, ...), `service` and `node` (the resource's), and `attributes`.
pub async fn collect(listen: SocketAddr, out: &Path) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)?;
    let server = TraceServiceServer::new(Writer(Mutex::new(file)));
    println!("ready");
    loop {
        let (conn, _) = listener.accept().await?;
        let server = server.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let mut server = server.clone();
            async move {
                match server.call(request).await {
                    Ok(response) => Ok::<_, Infallible>(response),
                    Err(never) => match never {},
                }
            }
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(conn), service),
        );
    }
}

struct Writer(Mutex<std::fs::File>);

#[tonic::async_trait]
impl TraceService for Writer {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut lines = String::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                let kind = [
                    "unspecified",
                    "internal",
                    "server",
                    "client",
                    "producer",
                    "consumer",
                ]
                .get(span.kind as usize)
                .copied()
                .unwrap_or("unknown");
                let attributes: serde_json::Map<String, serde_json::Value> = span
                    .attributes
                    .iter()
                    .map(|a| (a.key.clone(), json!(text(a.value.as_ref()))))
                    .collect();
                let line = json!({
                    "trace_id": hex(&span.trace_id),
                    "span_id": hex(&span.span_id),
                    "parent_span_id": hex(&span.parent_span_id),
                    "name": span.name,
                    "kind": kind,
                    "service": find(&resource, "service.name"),
                    "node": find(&resource, "k8s.node.name"),
                    "duration_us": span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano) / 1000,
                    "attributes": attributes,
                });
                lines.push_str(&format!("{line}\n"));
            }
        }
        let mut file = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(lines.as_bytes())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn find(attributes: &[ProtoKeyValue], key: &str) -> String {
    text(
        attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()),
    )
}

/// The app's spans, on their way to the collector.
static APP_SPANS: OnceLock<mpsc::Sender<SpanData>> = OnceLock::new();

/// Makes the HTTP server of pod `name` export its spans to the collector at `url`.
pub fn trace_to(url: &str, name: &str) -> Result<()> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(5))
        .build()?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(name.to_owned())
            .build(),
    );
    let (spans, mut queued) = mpsc::channel::<SpanData>(1024);
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while queued.recv_many(&mut batch, 64).await > 0 {
            if let Err(e) = exporter.export(std::mem::take(&mut batch)).await {
                eprintln!("mesh-testpod: could not export spans: {e}");
            }
        }
    });
    let _ = APP_SPANS.set(spans);
    Ok(())
}

/// Records the app's server span for a request with `headers` (only if they carry a sampled
/// `traceparent` and the app traces).
pub fn app_span(headers: &HeaderMap, method: &str, path: &str, status: u16, start: SystemTime) {
    let Some(spans) = APP_SPANS.get() else {
        return;
    };
    let Some(parent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return;
    };
    let fields: Vec<&str> = parent.split('-').collect();
    let (Some(trace), Some(span), Some(flags)) = (fields.get(1), fields.get(2), fields.get(3))
    else {
        return;
    };
    // Sampled by whoever decided: the app follows its parent.
    if !u8::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1) {
        return;
    }
    let (Ok(trace_id), Ok(parent_span_id)) = (TraceId::from_hex(trace), SpanId::from_hex(span))
    else {
        return;
    };
    let data = SpanData {
        span_context: SpanContext::new(
            trace_id,
            SpanId::from_bytes(fastrand::u64(1..).to_be_bytes()),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id,
        parent_span_is_remote: true,
        span_kind: SpanKind::Server,
        name: format!("{method} {path}").into(),
        start_time: start,
        end_time: SystemTime::now(),
        attributes: vec![
            KeyValue::new("http.request.method", method.to_owned()),
            KeyValue::new("url.path", path.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("mesh-testpod").build(),
    };
    let _ = spans.try_send(data);
}
