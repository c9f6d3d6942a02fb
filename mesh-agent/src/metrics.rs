//! The agent's Prometheus metrics (prefix `mesh_`), served as OpenMetrics text on the admin
//! port. Label values come only from the mesh's own state (config, certificates), never from
//! what a peer sends, so their number stays bounded.

use std::{net::SocketAddr, sync::LazyLock};

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

use crate::datapath::Counters;

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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer_node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

type Durations = Family<ConnectionLabels, Histogram, fn() -> Histogram>;

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
    pub tunnel_connections: Family<PeerLabels, Gauge>,
    pub tunnel_streams: Family<PeerLabels, Gauge>,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 4.5 min.
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    connections_opened: Family::default(),
    connections_closed: Family::default(),
    bytes_sent: Family::default(),
    bytes_received: Family::default(),
    connection_duration: Family::new_with_constructor(duration_histogram),
    tls_handshake_failures: Family::default(),
    refusals: Family::default(),
    connect_failures: Family::default(),
    endpoint_ejections: Family::default(),
    tunnel_connections: Family::default(),
    tunnel_streams: Family::default(),
    certificate_expiry: Family::default(),
    config_reloads: Family::default(),
});

/// The agent's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Counts a connection or tunnel stream refused for identity or policy.
pub fn count_refusal(reason: &'static str) {
    metrics()
        .refusals
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// Counts a failed connect to `endpoint` of `service` (empty for a pod dialled directly);
/// the labels it was counted under.
pub fn count_connect_failure(service: &str, endpoint: SocketAddr) -> EndpointLabels {
    let labels = EndpointLabels {
        service: service.to_owned(),
        endpoint: endpoint.to_string(),
    };
    metrics().connect_failures.get_or_create(&labels).inc();
    labels
}

/// A registry with every metric, and the eBPF programs' counters read from `counters` at each
/// scrape.
pub fn registry(counters: Counters) -> Registry {
    let mut r = agent_registry();
    r.register_collector(Box::new(EbpfCounters(counters)));
    r
}

/// The agent's own metrics, without the eBPF counters.
fn agent_registry() -> Registry {
    let m = metrics();
    let mut r = Registry::with_prefix("mesh");
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
        "Connections or tunnel streams refused for identity or policy, by reason",
        m.refusals.clone(),
    );
    r.register(
        "connect_failures",
        "Connects to an endpoint that failed (each retried elsewhere)",
        m.connect_failures.clone(),
    );
    r.register(
        "endpoint_ejections",
        "Endpoints ejected after consecutive connect failures",
        m.endpoint_ejections.clone(),
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
    r
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

    /// Gives every family one series, so that the encoding shows them all.
    fn touch_all() {
        let m = metrics();
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
    }

    fn encoded() -> String {
        touch_all();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &agent_registry()).unwrap();
        text
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
            serde_json::from_str(include_str!("../../deploy/grafana/mesh-agents.json")).unwrap();
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
