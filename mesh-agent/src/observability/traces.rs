//! Request spans out of the agent: a finished span waits in a bounded queue (a full queue
//! drops it, counted) for a task that sends them in batches over OTLP/gRPC with
//! OpenTelemetry's exporter. The spans are built whole when a request ends; no tracer runs on
//! the request path.

use std::{borrow::Cow, sync::Arc, time::Duration, time::SystemTime};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext as OtelContext, SpanKind, Status, TraceFlags, TraceState},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter, SpanLinks},
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{config, observability::metrics::Metrics, proxy::http::trace_context::SpanContext};

/// Spans sent in one export at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill before the batch goes anyway.
const BATCH_WAIT: Duration = Duration::from_secs(1);
/// How long one export may take, then its spans count as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Takes finished spans to the exporting task.
pub struct Tracer {
    sampling: f64,
    queue: mpsc::Sender<SpanData>,
    metrics: Arc<Metrics>,
    scope: InstrumentationScope,
}

/// A request's span, finished.
pub struct FinishedSpan {
    pub context: SpanContext,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Why the request failed, if it did.
    pub error: Option<Cow<'static, str>>,
}

impl Tracer {
    /// Starts exporting to `settings`' collector as the agent of `node`.
    pub fn start(
        settings: &config::Tracing,
        node: &str,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&settings.otlp_endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name("mesh-agent")
                .with_attributes([
                    KeyValue::new("k8s.node.name", node.to_owned()),
                    KeyValue::new("service.instance.id", node.to_owned()),
                ])
                .build(),
        );
        let (queue, queued) = mpsc::channel(settings.max_queued_spans);
        tokio::spawn(export(exporter, queued, metrics.clone()));
        Ok(Arc::new(Self {
            sampling: settings.sampling,
            queue,
            metrics,
            scope: InstrumentationScope::builder("mesh-agent")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }))
    }

    /// The share of requests without a caller's decision that are sampled.
    pub fn sampling(&self) -> f64 {
        self.sampling
    }

    /// Queues `span` for export, or drops it (counted) if the queue is full.
    pub fn finish(&self, span: FinishedSpan) {
        let context = span.context;
        let data = SpanData {
            span_context: OtelContext::new(
                context.trace_id,
                context.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: context.parent_span_id,
            parent_span_is_remote: true,
            span_kind: span.kind,
            name: span.name.into(),
            start_time: span.start,
            end_time: SystemTime::now(),
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: span.error.map_or(Status::Unset, Status::error),
            instrumentation_scope: self.scope.clone(),
        };
        if self.queue.try_send(data).is_err() {
            self.metrics.spans("dropped", 1);
        }
    }
}

/// Sends the queued spans in batches until every [`Tracer`] is gone.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queued: mpsc::Receiver<SpanData>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while queued.recv_many(&mut batch, BATCH).await > 0 {
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            match tokio::time::timeout_at(deadline, queued.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let count = batch.len() as u64;
        match exporter.export(std::mem::take(&mut batch)).await {
            Ok(()) => metrics.spans("exported", count),
            Err(e) => {
                metrics.spans("failed", count);
                warn!(spans = count, error = %e, "could not export spans");
            }
        }
    }
}
