//! One record per HTTP request, made when the request comes: its metrics, its access line
//! (target `mesh_agent::access::request`, off by default) and its span, if sampled, are
//! written when it is dropped, once the response has been sent, cut, or replaced by the
//! agent's own answer.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use opentelemetry::{KeyValue, trace::SpanKind};
use tokio::time::Instant;
use tracing::info;

use crate::{
    observability::{
        access::workload,
        metrics::{Metrics, RequestLabels, RetryLabels, RouteLabels},
        traces::{FinishedSpan, Tracer},
    },
    proxy::http::trace_context::SpanContext,
    state::routes::LocalWorkload,
};

/// The longest path an access line quotes.
const MAX_LOGGED_PATH: usize = 256;

/// The target of the per-request access lines.
const REQUEST_LOG: &str = "mesh_agent::access::request";

/// One HTTP request's record.
pub struct RequestRecord {
    metrics: Arc<Metrics>,
    labels: RouteLabels,
    started: Instant,
    authority: String,
    path: String,
    /// Until the response's headers.
    headers_after: Option<std::time::Duration>,
    status: u16,
    grpc_status: Option<u32>,
    endpoint: Option<SocketAddr>,
    attempts: u32,
    /// Why the agent answered itself, if it did: `no_route`, `no_endpoint`, ...
    flag: Option<&'static str>,
    /// The authorization policy that denied it, if one did.
    denied_by: Option<Arc<str>>,
    /// Request body bytes, counted as the body is read.
    pub request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    /// The request's span, when tracing is on.
    span: Option<Span>,
    /// The meshed workload that serves the request, when this agent serves it.
    destination: Option<Arc<LocalWorkload>>,
}

/// A request's span: its context, and the tracer and start time if it is sampled.
struct Span {
    context: SpanContext,
    sampled: Option<(Arc<Tracer>, SystemTime)>,
}

impl RequestRecord {
    /// The record of a request to `authority` for `path`, and of its span if `traced` (by
    /// the tracer that exports it if sampled).
    pub fn new(
        metrics: Arc<Metrics>,
        labels: RouteLabels,
        authority: &str,
        path: &str,
        traced: Option<(&Arc<Tracer>, SpanContext)>,
    ) -> Self {
        let span = traced.map(|(tracer, context)| Span {
            context,
            sampled: context.sampled.then(|| (tracer.clone(), SystemTime::now())),
        });
        // Copied only for the access line, which is off unless asked for, and sampled spans.
        let logged = tracing::enabled!(target: REQUEST_LOG, tracing::Level::INFO)
            || span.as_ref().is_some_and(|s| s.sampled.is_some());
        let (authority, path) = if logged {
            let cut = path
                .char_indices()
                .nth(MAX_LOGGED_PATH)
                .map_or(path.len(), |(cut, _)| cut);
            (authority.to_owned(), path[..cut].to_owned())
        } else {
            Default::default()
        };
        Self {
            metrics,
            labels,
            started: Instant::now(),
            authority,
            path,
            headers_after: None,
            status: 0,
            grpc_status: None,
            endpoint: None,
            attempts: 0,
            flag: None,
            denied_by: None,
            request_bytes: Arc::default(),
            response_bytes: 0,
            span,
            destination: None,
        }
    }

    /// Denied by `policy` (see `proxy::authorization::Decision`).
    pub fn denied_by(&mut self, policy: Arc<str>) {
        self.denied_by = Some(policy);
    }

    /// The route the request took (set once a route took it).
    pub fn routed(&mut self, route: &Arc<str>) {
        self.labels.route = route.clone();
    }

    /// The request is served by `workload` of this node (a meshed one, if any).
    pub fn served_by(&mut self, workload: Option<Arc<LocalWorkload>>) {
        self.destination = workload;
    }

    /// A try was sent to `endpoint`.
    pub fn tried(&mut self, endpoint: SocketAddr) {
        self.attempts += 1;
        self.endpoint = Some(endpoint);
    }

    /// Counts a retry for `reason`.
    pub fn retried(&self, reason: &'static str) {
        let labels = RetryLabels {
            route: self.labels.clone(),
            reason,
        };
        self.metrics.request_retries.get_or_create(&labels).inc();
    }

    /// The response's headers: its status and `grpc-status`, and `flag` if the agent answered
    /// itself.
    pub fn answered(&mut self, status: u16, grpc_status: Option<u32>, flag: Option<&'static str>) {
        self.headers_after = Some(self.started.elapsed());
        self.status = status;
        self.grpc_status = grpc_status;
        self.flag = flag;
    }

    /// The request ran out of time.
    pub fn timed_out(&self) {
        self.metrics
            .request_timeouts
            .get_or_create(&self.labels)
            .inc();
    }

    /// Response body bytes sent; a `grpc-status` found in the trailers.
    pub fn sent(&mut self, bytes: u64, grpc_status: Option<u32>) {
        self.response_bytes += bytes;
        if grpc_status.is_some() {
            self.grpc_status = grpc_status;
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let m = &self.metrics;
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let headers_after = self.headers_after.unwrap_or_else(|| self.started.elapsed());
        let grpc_status = match self.grpc_status {
            None => "",
            Some(code) => GRPC_STATUSES.get(code as usize).copied().unwrap_or("other"),
        };
        let labels = RequestLabels {
            route: self.labels.clone(),
            code: self.status,
            grpc_status,
        };
        m.request_answered(&labels, headers_after);
        m.request_bytes
            .get_or_create(&self.labels)
            .inc_by(request_bytes);
        m.response_bytes
            .get_or_create(&self.labels)
            .inc_by(self.response_bytes);
        let l = &self.labels;
        info!(
            target: REQUEST_LOG,
            source_identity = &*l.source_identity,
            source_workload = %workload(&l.source_namespace, &l.source_workload),
            destination_service = &*l.destination_service,
            route = &*l.route,
            method = l.method,
            authority = self.authority,
            path = self.path,
            status = self.status,
            grpc_status,
            endpoint = %self.endpoint.map_or("-".to_owned(), |e| e.to_string()),
            attempts = self.attempts,
            flag = self.flag.unwrap_or("-"),
            denied_by = self.denied_by.as_deref().unwrap_or("-"),
            request_bytes,
            response_bytes = self.response_bytes,
            duration_ms = self.started.elapsed().as_millis() as u64,
            trace_id = %self.span.as_ref().map_or("-".to_owned(), |s| s.context.trace_id.to_string()),
            "request"
        );
        if let Some(Span {
            context,
            sampled: Some((tracer, start)),
        }) = self.span.take()
        {
            tracer.finish(self.finished_span(context, start, request_bytes, grpc_status));
        }
    }
}

impl RequestRecord {
    /// The span as OpenTelemetry's HTTP conventions describe it, with the mesh's workloads
    /// and identities.
    fn finished_span(
        &self,
        context: SpanContext,
        start: SystemTime,
        request_bytes: u64,
        grpc_status: &'static str,
    ) -> FinishedSpan {
        let l = &self.labels;
        let client = l.direction == "outbound";
        let method = if l.method == "other" {
            "_OTHER"
        } else {
            l.method
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("server.address", self.authority.clone()),
            KeyValue::new("url.path", self.path.clone()),
            KeyValue::new("http.response.status_code", i64::from(self.status)),
            KeyValue::new("http.request.body.size", request_bytes as i64),
            KeyValue::new("http.response.body.size", self.response_bytes as i64),
            KeyValue::new("mesh.route", l.route.to_string()),
            KeyValue::new(
                "mesh.destination.service",
                l.destination_service.to_string(),
            ),
            KeyValue::new("mesh.source.identity", l.source_identity.to_string()),
            KeyValue::new(
                "mesh.source.workload",
                workload(&l.source_namespace, &l.source_workload),
            ),
            KeyValue::new("mesh.attempts", i64::from(self.attempts)),
        ];
        if let Some(endpoint) = self.endpoint {
            attributes.push(KeyValue::new(
                "network.peer.address",
                endpoint.ip().to_string(),
            ));
            attributes.push(KeyValue::new(
                "network.peer.port",
                i64::from(endpoint.port()),
            ));
        }
        if let Some(served) = &self.destination {
            let workload = workload(&served.namespace, &served.name);
            attributes.push(KeyValue::new("mesh.destination.workload", workload));
            attributes.push(KeyValue::new(
                "mesh.destination.identity",
                served.id.to_string(),
            ));
        }
        if let Some(code) = self.grpc_status {
            attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
        }
        if let Some(flag) = self.flag {
            attributes.push(KeyValue::new("mesh.flag", flag));
        }
        if let Some(policy) = &self.denied_by {
            attributes.push(KeyValue::new("mesh.denied_by", policy.to_string()));
        }
        // A client span fails on 4xx too; a server's only on 5xx (the caller's mistake is not
        // the server's failure).
        let failed = self.flag.is_some()
            || self.status >= if client { 400 } else { 500 }
            || !matches!(grpc_status, "" | "0");
        let error = failed.then(|| {
            let kind = self
                .flag
                .map_or_else(|| self.status.to_string(), str::to_owned);
            attributes.push(KeyValue::new("error.type", kind.clone()));
            kind.into()
        });
        FinishedSpan {
            context,
            kind: if client {
                SpanKind::Client
            } else {
                SpanKind::Server
            },
            name: format!("{method} {}", l.destination_service),
            start,
            attributes,
            error,
        }
    }
}

/// `grpc-status` label values by code.
const GRPC_STATUSES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];
