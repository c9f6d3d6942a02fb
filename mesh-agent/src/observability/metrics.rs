//! The agent's Prometheus metrics (prefix `mesh_`), served as OpenMetrics text on the admin
//! port. Label values come only from the mesh's own state (config, certificates) and the
//! identities of authenticated peers, never from an address or a port a pod or a peer chose;
//! the series of workloads, services, endpoints and peers that leave the state are dropped
//! ([`forget_removed`]), so their number stays bounded.

use std::{
    collections::HashSet,
    hash::Hash,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use mesh_common::Counter as EbpfCounter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{
    config::{Config, Name},
    datapath::counters::Counters,
    proxy::{authorization::Decision, breaker::Tripped, http::egress::EGRESS_ROUTE},
};

/// Who talked to whom over one proxied connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `outbound` (captured from a local pod) or `inbound` (from a peer agent's tunnel).
    pub direction: &'static str,
    pub source_namespace: String,
    pub source_workload: String,
    pub source_identity: String,
    /// `namespace/name` of the service dialled, empty for a connection straight to a pod.
    pub destination_service: String,
    pub destination_namespace: String,
    pub destination_workload: String,
    /// `local` (dialled directly on this node) or `tunnel` (over mTLS between nodes).
    pub hop: &'static str,
}

/// Who called which route of which service, with what method (HTTP requests).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: &'static str,
    pub source_namespace: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_identity: Arc<str>,
    /// `namespace/name` of the service called.
    pub destination_service: Arc<str>,
    /// The route's name (`default` on a port without routes).
    pub route: Arc<str>,
    /// One of the standard methods, or `other`.
    pub method: &'static str,
}

/// A route's requests by how they were answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub route: RouteLabels,
    pub code: u16,
    /// The response's `grpc-status` (0 to 16, `other`), empty if it has none.
    pub grpc_status: &'static str,
}

/// A route's retries by what called for them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RetryLabels {
    #[prometheus(flatten)]
    pub route: RouteLabels,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` (a peer agent's client certificate) or `outbound` (a peer agent's server
    /// certificate).
    pub side: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

/// A service's circuit breaker and the cap that turned something away.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BreakerLabels {
    pub service: String,
    pub limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer_node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub service: String,
    /// `local` or `global`.
    pub by: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub action: &'static str,
    /// What decided (see `proxy::authorization::Decision`).
    pub policy: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Connects of a workload to a destination nobody declared, refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EgressRefusedLabels {
    pub source_namespace: String,
    pub source_workload: String,
    /// The address and port dialled: one of the first [`MAX_REFUSED_DESTINATIONS`] seen,
    /// else `other`.
    pub destination: String,
}

/// The most destinations refused connects are told apart by: they are the pods' choice.
pub const MAX_REFUSED_DESTINATIONS: usize = 256;

type Durations = Family<ConnectionLabels, Histogram, fn() -> Histogram>;
type RequestDurations = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// Every metric the agent keeps.
pub struct Metrics {
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    /// From the source to the destination.
    pub bytes_sent: Family<ConnectionLabels, Counter>,
    /// From the destination back to the source.
    pub bytes_received: Family<ConnectionLabels, Counter>,
    pub connection_duration: Durations,
    pub tls_handshake_failures: Family<HandshakeLabels, Counter>,
    pub refusals: Family<ReasonLabels, Counter>,
    pub connect_failures: Family<EndpointLabels, Counter>,
    pub endpoint_ejections: Family<EndpointLabels, Counter>,
    pub circuit_breaker_rejections: Family<BreakerLabels, Counter>,
    pub tunnel_connections: Family<PeerLabels, Gauge>,
    pub tunnel_streams: Family<PeerLabels, Gauge>,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
    /// Certificates asked of the CA: `issued` or `failed`.
    pub certificate_requests: Family<ResultLabels, Counter>,
    pub certificate_request_duration: Histogram,
    pub trust_bundle_certificates: Gauge,
    pub trust_bundle_reloads: Family<ResultLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: RequestDurations,
    /// Request bodies, from the source; response bodies, back to it.
    pub request_bytes: Family<RouteLabels, Counter>,
    pub response_bytes: Family<RouteLabels, Counter>,
    pub request_retries: Family<RetryLabels, Counter>,
    pub request_timeouts: Family<RouteLabels, Counter>,
    pub trace_spans: Family<OutcomeLabels, Counter>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
    pub rate_limit_service_failures: Family<OutcomeLabels, Counter>,
    pub authorization_decisions: Family<DecisionLabels, Counter>,
    pub authorization_cuts: Family<PolicyLabels, Counter>,
    pub egress_refused: Family<EgressRefusedLabels, Counter>,
    /// The label sets of the connection families, of the request families, and of the
    /// endpoint families.
    connection_series: Series<ConnectionLabels>,
    request_series: Series<RequestLabels>,
    endpoint_series: Series<EndpointLabels>,
    egress_series: Series<EgressRefusedLabels>,
}

/// The label sets some families have series for (a [`Family`] cannot list its own).
struct Series<S>(Mutex<HashSet<S>>);

impl<S: Clone + Eq + Hash> Series<S> {
    fn new() -> Self {
        Self(Mutex::new(HashSet::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<S>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes `labels` unless `known` (a cheap check the caller can make first).
    fn note(&self, labels: &S, known: bool) {
        if !known {
            self.lock().insert(labels.clone());
        }
    }

    /// Drops from the index, and hands to `remove`, every label set `keep` refuses.
    fn retain(&self, keep: impl Fn(&S) -> bool, remove: impl Fn(&S)) {
        self.lock().retain(|labels| {
            let kept = keep(labels);
            if !kept {
                remove(labels);
            }
            kept
        });
    }
}

impl Metrics {
    /// Every metric, each registered in `registry` (whose prefix should be `mesh`).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            connection_duration: Family::new_with_constructor(duration_histogram),
            tls_handshake_failures: Family::default(),
            refusals: Family::default(),
            connect_failures: Family::default(),
            endpoint_ejections: Family::default(),
            circuit_breaker_rejections: Family::default(),
            tunnel_connections: Family::default(),
            tunnel_streams: Family::default(),
            certificate_expiry: Family::default(),
            config_reloads: Family::default(),
            certificate_requests: Family::default(),
            certificate_request_duration: duration_histogram(),
            trust_bundle_certificates: Gauge::default(),
            trust_bundle_reloads: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            request_retries: Family::default(),
            request_timeouts: Family::default(),
            trace_spans: Family::default(),
            rate_limited: Family::default(),
            rate_limit_service_failures: Family::default(),
            authorization_decisions: Family::default(),
            authorization_cuts: Family::default(),
            connection_series: Series::new(),
            request_series: Series::new(),
            endpoint_series: Series::new(),
            egress_refused: Family::default(),
            egress_series: Series::new(),
        };
        let r = registry;
        r.register(
            "connections_opened",
            "Proxied connections opened",
            m.connections_opened.clone(),
        );
        r.register(
            "connections_closed",
            "Proxied connections closed",
            m.connections_closed.clone(),
        );
        r.register(
            "bytes_sent",
            "Bytes from the source to the destination of proxied connections",
            m.bytes_sent.clone(),
        );
        r.register(
            "bytes_received",
            "Bytes from the destination back to the source of proxied connections",
            m.bytes_received.clone(),
        );
        r.register_with_unit(
            "connection_duration",
            "How long proxied connections lasted",
            Unit::Seconds,
            m.connection_duration.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Tunnel TLS handshakes that failed, by side and reason",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "refusals",
            "Connections, tunnel streams and handshakes refused (identity, routing or limits), by reason",
            m.refusals.clone(),
        );
        r.register(
            "connect_failures",
            "Connects to an endpoint that failed (each retried elsewhere)",
            m.connect_failures.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected after connect failures in a row, or as outliers (errors in a row)",
            m.endpoint_ejections.clone(),
        );
        r.register(
            "circuit_breaker_rejections",
            "Connections and requests turned away by a service's circuit breaker, by the cap",
            m.circuit_breaker_rejections.clone(),
        );
        r.register(
            "tunnel_connections",
            "Pooled TLS connections to peer agents",
            m.tunnel_connections.clone(),
        );
        r.register(
            "tunnel_streams",
            "Open HTTP/2 CONNECT streams to peer agents",
            m.tunnel_streams.clone(),
        );
        r.register_with_unit(
            "certificate_expiry_timestamp",
            "When each held certificate expires (Unix time)",
            Unit::Seconds,
            m.certificate_expiry.clone(),
        );
        r.register(
            "config_reloads",
            "Config changes applied or rejected",
            m.config_reloads.clone(),
        );
        r.register(
            "certificate_requests",
            "Certificates asked of the CA, by result (issued, failed)",
            m.certificate_requests.clone(),
        );
        r.register_with_unit(
            "certificate_request_duration",
            "How long the CA took to answer a certificate request",
            Unit::Seconds,
            m.certificate_request_duration.clone(),
        );
        r.register(
            "trust_bundle_certificates",
            "CA certificates in the trust bundle peers are checked against",
            m.trust_bundle_certificates.clone(),
        );
        r.register(
            "trust_bundle_reloads",
            "Changes of the trust bundle's file applied or rejected",
            m.trust_bundle_reloads.clone(),
        );
        r.register(
            "requests",
            "HTTP requests answered, by route, method, status and gRPC status",
            m.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "How long HTTP requests took, from the request to the response's headers",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register(
            "request_bytes",
            "Bytes of HTTP request bodies",
            m.request_bytes.clone(),
        );
        r.register(
            "response_bytes",
            "Bytes of HTTP response bodies",
            m.response_bytes.clone(),
        );
        r.register(
            "request_retries",
            "HTTP requests tried again, by what called for it",
            m.request_retries.clone(),
        );
        r.register(
            "request_timeouts",
            "HTTP requests that ran out of time (answered 504)",
            m.request_timeouts.clone(),
        );
        r.register(
            "trace_spans",
            "Finished request spans: exported, failed at the collector, or dropped from a full queue",
            m.trace_spans.clone(),
        );
        r.register(
            "rate_limited",
            "Requests (connections on TCP ports) a service's rate limit turned away, by the limit",
            m.rate_limited.clone(),
        );
        r.register(
            "rate_limit_service_failures",
            "Requests the rate limit service did not answer in time: allowed or denied as configured",
            m.rate_limit_service_failures.clone(),
        );
        r.register(
            "authorization_decisions",
            "Calls (connections, or HTTP requests where rules look into them) decided by authorization policies, by action and the policy that decided",
            m.authorization_decisions.clone(),
        );
        r.register(
            "egress_refused",
            "Connects (in the kernel) and requests (in the agent) of workloads to destinations that are neither the mesh's nor declared, refused under registry_only, by workload and destination",
            m.egress_refused.clone(),
        );
        r.register(
            "authorization_cuts",
            "Open connections closed because a policy change denies them, by the policy",
            m.authorization_cuts.clone(),
        );
        m
    }

    /// Counts a request answered with `labels`, and its duration.
    pub fn request_answered(&self, labels: &RequestLabels, duration: std::time::Duration) {
        let known = self.requests.get(labels).is_some();
        self.request_series.note(labels, known);
        self.requests.get_or_create(labels).inc();
        self.request_duration
            .get_or_create(labels)
            .observe(duration.as_secs_f64());
    }

    /// Counts a proxied connection opened.
    pub fn connection_opened(&self, labels: &ConnectionLabels) {
        let known = self.connections_opened.get(labels).is_some();
        self.connection_series.note(labels, known);
        self.connections_opened.get_or_create(labels).inc();
    }

    /// Counts `count` connects or requests to `destination` refused by the outbound policy,
    /// of `source` (its namespace, workload and identity as label values).
    pub fn egress_refused(&self, source: &[String; 3], destination: SocketAddr, count: u64) {
        let [source_namespace, source_workload, _] = source.clone();
        let mut labels = EgressRefusedLabels {
            source_namespace,
            source_workload,
            destination: destination.to_string(),
        };
        {
            let mut series = self.egress_series.lock();
            if !series.contains(&labels) {
                let destinations: HashSet<&str> =
                    series.iter().map(|l| l.destination.as_str()).collect();
                if destinations.len() >= MAX_REFUSED_DESTINATIONS
                    && !destinations.contains(labels.destination.as_str())
                {
                    labels.destination = "other".into();
                }
                series.insert(labels.clone());
            }
        }
        self.egress_refused.get_or_create(&labels).inc_by(count);
    }

    /// Counts a connection, tunnel stream or handshake refused, by `reason` (its metric label).
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a TLS handshake with a peer agent that failed, on `side`, for `reason`.
    pub fn handshake_failed(&self, side: &'static str, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&HandshakeLabels { side, reason })
            .inc();
    }

    /// Counts a config change `applied` or `rejected`.
    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts a failed connect to `endpoint` of `service`: the labels it was counted under. A
    /// pod dialled directly (no service) is counted under empty labels: its address and port
    /// are the caller's choice, and a port scan must not make a series per port.
    pub fn connect_failed(&self, service: &str, endpoint: Option<SocketAddr>) -> EndpointLabels {
        let labels = EndpointLabels {
            service: service.to_owned(),
            endpoint: endpoint.map(|e| e.to_string()).unwrap_or_default(),
        };
        let known = self.connect_failures.get(&labels).is_some();
        self.endpoint_series.note(&labels, known);
        self.connect_failures.get_or_create(&labels).inc();
        labels
    }

    /// Counts a connect to `endpoint` of `service` that failed, and its ejection if that
    /// failure `ejected` it.
    pub fn endpoint_unreachable(&self, service: &str, endpoint: SocketAddr, ejected: bool) {
        let labels = self.connect_failed(service, Some(endpoint));
        if ejected {
            self.endpoint_ejections.get_or_create(&labels).inc();
        }
    }

    /// Counts `count` finished spans: `exported`, `failed` (the collector did not take them)
    /// or `dropped` (the export queue was full).
    pub fn spans(&self, outcome: &'static str, count: u64) {
        self.trace_spans
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(count);
    }

    /// Counts a request or connection to `service` turned away by its `local` or `global`
    /// rate limit.
    pub fn rate_limited(&self, service: &str, by: &'static str) {
        self.rate_limited
            .get_or_create(&RateLimitLabels {
                service: service.to_owned(),
                by,
            })
            .inc();
    }

    /// Counts an authorization decision.
    pub fn authorized(&self, decision: &Decision) {
        let labels = DecisionLabels {
            action: decision.action(),
            policy: decision.policy.clone(),
        };
        self.authorization_decisions.get_or_create(&labels).inc();
    }

    /// Counts an open connection closed because `policy` now denies it.
    pub fn authorization_cut(&self, policy: &Arc<str>) {
        let labels = PolicyLabels {
            policy: policy.clone(),
        };
        self.authorization_cuts.get_or_create(&labels).inc();
    }

    /// Counts a request the rate limit service did not answer, `allowed` through or not.
    pub fn rate_limit_service_failed(&self, allowed: bool) {
        let outcome = if allowed { "allowed" } else { "denied" };
        self.rate_limit_service_failures
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts a connection or request to `service` turned away by its breaker's cap.
    pub fn circuit_open(&self, service: &str, tripped: Tripped) {
        self.circuit_breaker_rejections
            .get_or_create(&BreakerLabels {
                service: service.to_owned(),
                limit: tripped.label(),
            })
            .inc();
    }

    /// Counts `endpoint` of `service` ejected as an outlier (for its answers, not its
    /// connects).
    pub fn outlier_ejected(&self, service: &str, endpoint: SocketAddr) {
        let labels = EndpointLabels {
            service: service.to_owned(),
            endpoint: endpoint.to_string(),
        };
        let known = self.endpoint_ejections.get(&labels).is_some();
        self.endpoint_series.note(&labels, known);
        self.endpoint_ejections.get_or_create(&labels).inc();
    }

    /// Drops the series of workloads, services, endpoints and peer nodes that `config` no
    /// longer has (`running` is the config it replaces).
    pub fn forget_removed(&self, running: &Config, config: &Config) {
        let m = self;
        let workloads: HashSet<(&str, &str)> = config
            .workloads
            .iter()
            .map(|w| (w.namespace.as_str(), w.name.as_str()))
            .collect();
        // External hosts are services too, by their declared names.
        let hosts = config.egress.hosts.iter().flat_map(|h| &h.names);
        let services: HashSet<String> = config
            .services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .chain(hosts.clone().map(|n| n.to_string()))
            .collect();
        let endpoints: HashSet<(String, String)> = config
            .services
            .iter()
            .flat_map(|s| {
                s.ports.iter().flat_map(move |port| {
                    s.endpoints.iter().map(move |e| {
                        (
                            format!("{}/{}", s.namespace, s.name),
                            SocketAddr::new(e.address, e.target_port(port)).to_string(),
                        )
                    })
                })
            })
            .collect();
        let local =
            |namespace: &str, name: &str| name.is_empty() || workloads.contains(&(namespace, name));
        m.connection_series.retain(
            |l| {
                local(&l.source_namespace, &l.source_workload)
                    && local(&l.destination_namespace, &l.destination_workload)
                    && (l.destination_service.is_empty()
                        || services.contains(&l.destination_service))
            },
            |l| {
                m.connections_opened.remove(l);
                m.connections_closed.remove(l);
                m.bytes_sent.remove(l);
                m.bytes_received.remove(l);
                m.connection_duration.remove(l);
            },
        );
        // Requests take a configured route, the default one (a port without routes) or none
        // (answered 404): the series of a route that left its port go too.
        let routes: HashSet<(String, &str)> = config
            .services
            .iter()
            .flat_map(|s| {
                let service = format!("{}/{}", s.namespace, s.name);
                s.ports
                    .iter()
                    .flat_map(|p| p.routes.iter().map(|r| r.name.as_str()))
                    .chain(["default", ""])
                    .map(move |route| (service.clone(), route))
            })
            .chain(hosts.map(|n| (n.to_string(), EGRESS_ROUTE)))
            // Requests for hosts nobody declared (passed on under allow_any).
            .chain([(String::new(), EGRESS_ROUTE)])
            .collect();
        m.request_series.retain(
            |l| {
                let r = &l.route;
                local(&r.source_namespace, &r.source_workload)
                    && routes.contains(&(r.destination_service.to_string(), &*r.route))
            },
            |l| {
                m.requests.remove(l);
                m.request_duration.remove(l);
                m.request_bytes.remove(&l.route);
                m.response_bytes.remove(&l.route);
                m.request_timeouts.remove(&l.route);
                for reason in RETRY_REASONS {
                    m.request_retries.remove(&RetryLabels {
                        route: l.route.clone(),
                        reason,
                    });
                }
            },
        );
        m.egress_series.retain(
            |l| local(&l.source_namespace, &l.source_workload),
            |l| {
                m.egress_refused.remove(l);
            },
        );
        m.endpoint_series.retain(
            |l| {
                l.service.is_empty() || endpoints.contains(&(l.service.clone(), l.endpoint.clone()))
            },
            |l| {
                m.connect_failures.remove(l);
                m.endpoint_ejections.remove(l);
            },
        );
        let gone = running
            .services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .filter(|service| !services.contains(service));
        for service in gone {
            for tripped in Tripped::ALL {
                m.circuit_breaker_rejections.remove(&BreakerLabels {
                    service: service.clone(),
                    limit: tripped.label(),
                });
            }
        }
        let policies: HashSet<(&Name, &Name)> = config
            .authorization
            .policies
            .iter()
            .map(|p| (&p.namespace, &p.name))
            .collect();
        let gone = running
            .authorization
            .policies
            .iter()
            .filter(|p| !policies.contains(&(&p.namespace, &p.name)));
        for policy in gone {
            let policy: Arc<str> = format!("{}/{}", policy.namespace, policy.name).into();
            for action in ["allow", "deny"] {
                m.authorization_decisions.remove(&DecisionLabels {
                    action,
                    policy: policy.clone(),
                });
            }
            m.authorization_cuts.remove(&PolicyLabels { policy });
        }
        for gone in running
            .peers
            .iter()
            .filter(|p| config.node_named(&p.name).is_none())
        {
            let labels = PeerLabels {
                peer_node: gone.name.to_string(),
            };
            m.tunnel_connections.remove(&labels);
            m.tunnel_streams.remove(&labels);
        }
    }
}

/// Every reason label of `mesh_request_retries_total`.
const RETRY_REASONS: [&str; 4] = ["connect_failure", "reset", "status", "grpc_status"];

fn duration_histogram() -> Histogram {
    // 1 ms to about 4.5 min.
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

/// Adds the eBPF programs' counters to `registry`, read from `counters` at each scrape.
pub fn register_ebpf_counters(registry: &mut Registry, counters: Counters) {
    registry.register_collector(Box::new(EbpfCounters(counters)));
}

/// The eBPF programs' per-CPU counters, summed at each scrape.
struct EbpfCounters(Counters);

impl std::fmt::Debug for EbpfCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EbpfCounters")
    }
}

impl Collector for EbpfCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for counter in EbpfCounter::ALL {
            // A failed read leaves the series out of this scrape rather than failing it.
            let Ok(value) = self.0.get(counter) else {
                continue;
            };
            let metric = ConstCounter::new(value);
            let name = format!("ebpf_{}", counter.name());
            let help = format!("eBPF programs: {}", counter.name().replace('_', " "));
            metric.encode(encoder.encode_descriptor(
                &name,
                &help,
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (Registry, Metrics) {
        let mut registry = Registry::with_prefix("mesh");
        let metrics = Metrics::new(&mut registry);
        (registry, metrics)
    }

    /// Gives every family one series, so that the encoding shows them all.
    fn touch_all(m: &Metrics) {
        let conn = ConnectionLabels {
            direction: "outbound",
            source_namespace: "shop".into(),
            source_workload: "web-0".into(),
            source_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            destination_service: "shop/cart".into(),
            destination_namespace: String::new(),
            destination_workload: String::new(),
            hop: "tunnel",
        };
        m.connections_opened.get_or_create(&conn).inc();
        m.connections_closed.get_or_create(&conn).inc();
        m.bytes_sent.get_or_create(&conn).inc_by(10);
        m.bytes_received.get_or_create(&conn).inc_by(20);
        m.connection_duration.get_or_create(&conn).observe(0.5);
        let handshake = HandshakeLabels {
            side: "inbound",
            reason: "untrusted",
        };
        m.tls_handshake_failures.get_or_create(&handshake).inc();
        m.refusals
            .get_or_create(&ReasonLabels {
                reason: "not_local_pod",
            })
            .inc();
        let endpoint = EndpointLabels {
            service: "shop/cart".into(),
            endpoint: "198.18.2.2:8080".into(),
        };
        m.connect_failures.get_or_create(&endpoint).inc();
        m.endpoint_ejections.get_or_create(&endpoint).inc();
        let peer = PeerLabels {
            peer_node: "node-2".into(),
        };
        m.tunnel_connections.get_or_create(&peer).set(1);
        m.tunnel_streams.get_or_create(&peer).set(3);
        m.certificate_expiry
            .get_or_create(&IdentityLabels {
                identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            })
            .set(1_800_000_000);
        m.config_reloads
            .get_or_create(&ResultLabels { result: "applied" })
            .inc();
        m.certificate_requests
            .get_or_create(&ResultLabels { result: "issued" })
            .inc();
        m.certificate_request_duration.observe(0.002);
        m.trust_bundle_certificates.set(2);
        m.trust_bundle_reloads
            .get_or_create(&ResultLabels { result: "applied" })
            .inc();
    }

    /// Every family with one series, encoded.
    fn encoded() -> String {
        let (registry, m) = fresh();
        touch_all(&m);
        encode(&registry)
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    fn config(workload: &str, endpoint: &str, peer: &str) -> Config {
        Config::parse(
            std::path::Path::new("t.yaml"),
            &format!(
                "\
node: {{ name: n1, addresses: [198.18.0.1], pod_cidrs: [198.18.1.0/24] }}
peers: [{{ name: {peer}, addresses: [198.18.0.2], pod_cidrs: [198.18.2.0/24] }}]
identity: {{ ca_cert: ca.crt, ca_key: ca.key }}
workloads:
  - {{ name: {workload}, namespace: prune, service_account: a, addresses: [198.18.1.9], cgroup: /w }}
services:
  - name: svc
    namespace: prune
    addresses: [198.19.0.10]
    ports: [{{ port: 80, target_port: 8080 }}]
    endpoints: [{{ address: {endpoint}, node: n1 }}]
"
            ),
        )
        .unwrap()
    }

    #[test]
    fn series_of_what_left_the_state_are_dropped() {
        let (registry, m) = fresh();
        let conn = |workload: &str| ConnectionLabels {
            direction: "outbound",
            source_namespace: "prune".into(),
            source_workload: workload.into(),
            source_identity: "spiffe://cluster.local/ns/prune/sa/a".into(),
            destination_service: "prune/svc".into(),
            destination_namespace: String::new(),
            destination_workload: String::new(),
            hop: "local",
        };
        m.connection_opened(&conn("old-0"));
        m.connection_opened(&conn("new-0"));
        m.connect_failed("prune/svc", Some("198.18.1.2:8080".parse().unwrap()));
        m.connect_failed("prune/svc", Some("198.18.1.3:8080".parse().unwrap()));
        // A port scan of pods counts into one series.
        for _ in 0..1000 {
            m.connect_failed("", None);
        }
        let peer = |name: &str| PeerLabels {
            peer_node: name.into(),
        };
        m.tunnel_connections
            .get_or_create(&peer("prune-old"))
            .set(0);
        m.tunnel_connections
            .get_or_create(&peer("prune-new"))
            .set(1);

        m.forget_removed(
            &config("old-0", "198.18.1.2", "prune-old"),
            &config("new-0", "198.18.1.3", "prune-new"),
        );
        let text = encode(&registry);
        for gone in ["old-0", "198.18.1.2:8080", "prune-old"] {
            assert!(!text.contains(gone), "{gone} is still in:\n{text}");
        }
        for kept in ["new-0", "198.18.1.3:8080", "prune-new"] {
            assert!(text.contains(kept), "{kept} is gone from:\n{text}");
        }
        let pods = text
            .lines()
            .filter(|l| l.starts_with("mesh_connect_failures_total{service=\"\",endpoint=\"\"}"))
            .count();
        assert_eq!(pods, 1);
    }

    #[test]
    fn request_series_of_a_route_that_left_its_port_are_dropped() {
        use crate::{config::Protocol, testing::Mesh};
        let (registry, m) = fresh();
        let state = |routes: &str| {
            let pod = "127.1.101.2".parse().unwrap();
            Mesh::node("n1", "127.1.1.1".parse().unwrap(), "127.1.101.0/24")
                .workload("shop", "web-0", "web", "127.1.101.9".parse().unwrap())
                .service(
                    "shop",
                    "cart",
                    "198.19.0.10".parse().unwrap(),
                    (80, 8080),
                    &[(pod, "n1")],
                )
                .http(Protocol::Http, routes)
                .build()
        };
        let request = |route: &str| RequestLabels {
            route: RouteLabels {
                direction: "outbound",
                source_namespace: "shop".into(),
                source_workload: "web-0".into(),
                source_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                destination_service: "shop/cart".into(),
                route: route.into(),
                method: "GET",
            },
            code: 200,
            grpc_status: "",
        };
        for route in ["kept", "dropped", ""] {
            m.request_answered(&request(route), std::time::Duration::from_millis(1));
        }
        m.forget_removed(
            &state("[{ name: kept }, { name: dropped }]"),
            &state("[{ name: kept }]"),
        );
        let text = encode(&registry);
        assert!(text.contains("route=\"kept\""), "{text}");
        assert!(text.contains("route=\"\""), "{text}");
        assert!(!text.contains("route=\"dropped\""), "{text}");
    }

    #[test]
    fn decision_series_of_a_removed_policy_are_dropped() {
        use crate::testing::Mesh;
        let (registry, m) = fresh();
        let state = |policies: &str| {
            Mesh::node("n1", "127.1.1.1".parse().unwrap(), "127.1.101.0/24")
                .authorization(&format!("policies: {policies}"))
                .build()
        };
        let decided = |allowed, policy: &str| Decision {
            allowed,
            policy: policy.into(),
        };
        m.authorized(&decided(true, "shop/kept"));
        m.authorized(&decided(false, "shop/dropped"));
        m.authorized(&decided(false, "no-allow-match"));
        m.authorization_cut(&"shop/dropped".into());
        m.forget_removed(
            &state("[{ name: kept, namespace: shop, action: allow }, { name: dropped, namespace: shop, action: deny }]"),
            &state("[{ name: kept, namespace: shop, action: allow }]"),
        );
        let text = encode(&registry);
        assert!(text.contains("policy=\"shop/kept\""), "{text}");
        assert!(text.contains("policy=\"no-allow-match\""), "{text}");
        assert!(!text.contains("shop/dropped"), "{text}");
    }

    #[test]
    fn metrics_are_openmetrics_with_the_mesh_prefix() {
        let text = encoded();
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE mesh_connections_opened counter\n"));
        assert!(text.contains("# TYPE mesh_connection_duration_seconds histogram\n"));
        assert!(text.contains("# UNIT mesh_connection_duration_seconds seconds\n"));
        assert!(text.contains("mesh_bytes_sent_total{direction=\"outbound\""));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("mesh_"), "{line}");
        }
    }

    #[test]
    fn the_dashboard_draws_only_exported_metrics() {
        let text = encoded();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/mesh-agents.json")).unwrap();
        let exprs = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["targets"].as_array().unwrap())
            .map(|t| t["expr"].as_str().unwrap());
        for expr in exprs {
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("mesh_"))
            {
                let family = ["_total", "_bucket"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                let ebpf = EbpfCounter::ALL
                    .iter()
                    .any(|c| family == format!("mesh_ebpf_{}", c.name()));
                assert!(
                    ebpf || text.contains(&format!("# TYPE {family} ")),
                    "the dashboard draws {name}, which the agent does not export"
                );
            }
        }
    }
}
