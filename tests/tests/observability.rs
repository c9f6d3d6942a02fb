//! End-to-end: a real Prometheus scrapes the agents of a two-node lab; what it stored must
//! agree exactly with the traffic the test sent. The admin API answers for each node.

use mesh_tests::{HttpReply, Lab, LabSpec, ProbeCert};

const VIP: &str = "198.19.0.10";
const CONNECTIONS: u64 = 7;
const BYTES: u64 = 300_000;
const CLIENT: &str = "spiffe://lab.mesh/ns/lab/sa/client";

/// Every query of the Grafana dashboard in `deploy/`.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/mesh-agents.json")).unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// A GET of the admin API of node `k` from node `from`.
fn admin(lab: &Lab, from: &str, k: u8, path: &str) -> HttpReply {
    lab.http(from, "GET", &format!("http://198.18.0.{k}:15020{path}"))
        .unwrap()
}

#[test]
fn prometheus_sees_exactly_the_traffic_sent() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let prometheus = lab.start_prometheus("n1").unwrap();

    let out = lab
        .run(
            "client",
            &[
                "echo",
                "--connect",
                &format!("{VIP}:80"),
                "--bytes",
                &BYTES.to_string(),
                "--connections",
                &CONNECTIONS.to_string(),
            ],
        )
        .unwrap();
    // Of all the connections' banners.
    let banners: u64 = out.field("banner_bytes").parse().unwrap();
    // Refused peers at n2's tunnel port: one from another CA, one without a certificate; a
    // good one asking for a pod of another node.
    let (backend, _) = lab.pod_addrs("backend").unwrap();
    let probe =
        |cert: Option<ProbeCert>, authority: &str| lab.probe_node2(cert, authority).unwrap();
    probe(Some(ProbeCert::OtherCa), &format!("{backend}:8080"));
    probe(None, &format!("{backend}:8080"));
    probe(Some(ProbeCert::Valid), "198.18.1.2:8080");

    // What n1's agent proxied out, and n2's agent delivered: the same bytes, exactly.
    let conn = |direction: &str| {
        format!("{{direction=\"{direction}\",source_identity=\"{CLIENT}\",hop=\"tunnel\"}}")
    };
    let sent = (CONNECTIONS * BYTES) as f64;
    let received = (CONNECTIONS * BYTES + banners) as f64;
    for direction in ["outbound", "inbound"] {
        let labels = conn(direction);
        for (metric, expected) in [
            ("mesh_connections_opened_total", CONNECTIONS as f64),
            ("mesh_connections_closed_total", CONNECTIONS as f64),
            ("mesh_bytes_sent_total", sent),
            ("mesh_bytes_received_total", received),
            ("mesh_connection_duration_seconds_count", CONNECTIONS as f64),
        ] {
            prometheus
                .wait_for_value(&format!("sum({metric}{labels})"), expected)
                .unwrap();
        }
    }
    let outbound = prometheus
        .query(&format!(
            "mesh_connections_opened_total{}",
            conn("outbound")
        ))
        .unwrap();
    assert_eq!(outbound.len(), 1);
    let l = &outbound[0].labels;
    assert_eq!(l["destination_service"], "lab/echo");
    assert_eq!(l["source_workload"], "client");
    assert_eq!(l["source_namespace"], "lab");
    assert_eq!(l["instance"], "198.18.0.1:15020");

    // Refusals, by reason, on n2.
    let n2 = "instance=\"198.18.0.2:15020\"";
    for (query, expected) in [
        (
            format!(
                "mesh_tls_handshake_failures_total{{{n2},side=\"inbound\",reason=\"untrusted\"}}"
            ),
            1.0,
        ),
        (
            format!(
                "mesh_tls_handshake_failures_total{{{n2},side=\"inbound\",reason=\"no_certificate\"}}"
            ),
            1.0,
        ),
        (
            format!("mesh_refusals_total{{{n2},reason=\"not_local_pod\"}}"),
            1.0,
        ),
        // The eBPF programs of n1 captured every client connect.
        (
            "mesh_ebpf_connects_captured_total{instance=\"198.18.0.1:15020\"}".to_owned(),
            CONNECTIONS as f64,
        ),
        (
            "mesh_tunnel_streams{instance=\"198.18.0.1:15020\"}".to_owned(),
            0.0,
        ),
    ] {
        prometheus.wait_for_value(&query, expected).unwrap();
    }
    // The concurrent connections' streams were spread over the first connections of each
    // worker thread's pool (each thread has its own).
    let per_pool = CONNECTIONS.min(mesh_agent::proxy::tunnel::SPREAD_CONNECTIONS as u64) as f64;
    // At most one per connection: a thread opens a new one only for a stream it serves.
    let most = (per_pool * mesh_agent::workers::per_core() as f64).min(CONNECTIONS as f64);
    let tunnels = prometheus
        .wait_for_data("mesh_tunnel_connections{instance=\"198.18.0.1:15020\"}")
        .unwrap();
    assert!(
        tunnels.len() == 1 && (per_pool..=most).contains(&tunnels[0].value),
        "{tunnels:?}: expected {per_pool} to {most} tunnel connections"
    );
    // Each agent's and the client's certificate expires in the future, within the TTL.
    let expiries = prometheus
        .query("mesh_certificate_expiry_timestamp_seconds - time()")
        .unwrap();
    assert_eq!(expiries.len(), 3, "{expiries:?}");
    assert!(
        expiries.iter().all(|s| s.value > 0.0 && s.value <= 3600.0),
        "{expiries:?}"
    );

    // Every dashboard query is valid PromQL over series the agents export; the main panels
    // show this traffic.
    for expr in dashboard_queries() {
        let expr = expr.replace("$__rate_interval", "1m");
        let main_panel = expr.contains("mesh_bytes_sent_total")
            || expr.contains("mesh_ebpf_connects_captured_total");
        if main_panel {
            prometheus.wait_for_data(&expr).unwrap();
        } else {
            prometheus.query(&expr).unwrap();
        }
    }
    // Prometheus parsed both agents' OpenMetrics text without a complaint.
    for (instance, health, error) in prometheus.targets().unwrap() {
        assert_eq!((health.as_str(), error.as_str()), ("up", ""), "{instance}");
    }
}

#[test]
fn the_admin_api_answers_on_every_node() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let a1 = lab.start_agent("n1", &[]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    lab.run(
        "client",
        &["echo", "--connect", &format!("{VIP}:80"), "--bytes", "1000"],
    )
    .unwrap();

    for k in [1, 2] {
        let healthz = admin(&lab, "n1", k, "/healthz");
        assert_eq!(healthz.status, 200, "{}", healthz.body);
        assert_eq!(admin(&lab, "n1", k, "/ready").status, 200);
        let metrics = admin(&lab, "n1", k, "/metrics");
        assert!(
            metrics
                .content_type
                .starts_with("application/openmetrics-text")
        );
        assert!(
            metrics.body.trim_end().ends_with("# EOF"),
            "OpenMetrics text ends with # EOF"
        );
    }

    let config: serde_json::Value =
        serde_json::from_str(&admin(&lab, "n1", 1, "/config").body).unwrap();
    assert_eq!(config["ready"], true);
    assert_eq!(config["config"]["workloads"][0]["name"], "client");
    let (backend, _) = lab.pod_addrs("backend").unwrap();
    let endpoint = &config["endpoints"][0];
    assert_eq!(endpoint["address"], format!("{backend}:8080"));
    assert_eq!(endpoint["consecutive_failures"], 0);
    let ids: Vec<&str> = config["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["identity"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [CLIENT, "spiffe://lab.mesh/ns/mesh-system/sa/mesh-agent"]
    );

    // The log level changes at run time, from the node itself only (at any of its addresses).
    let logging = |host: &str, method: &str| {
        let url = format!("http://{host}:15020/logging?level=warn,mesh_agent::access=info");
        lab.http("n1", method, &url).unwrap()
    };
    let url = "http://198.18.0.1:15020/logging?level=trace";
    let from_pod = lab
        .run("client", &["get", "--method", "PUT", "--url", url])
        .unwrap();
    assert_eq!(from_pod.field("status"), "403", "{}", from_pod.stdout);
    assert_eq!(logging("198.18.0.1", "PUT").status, 200);
    assert_eq!(logging("127.0.0.1", "PUT").status, 200);
    let now = logging("127.0.0.1", "GET");
    assert!(
        now.body.contains("mesh_agent::access=info") && now.body.contains("warn"),
        "{}",
        now.body
    );
    let count = |text: &str| a1.log().matches(text).count();
    assert_eq!(
        count("mesh_agent::access"),
        1,
        "one access line per connection"
    );
    assert_eq!(count("connected over mTLS"), 1);
    // From now on: access lines, but no debug lines.
    lab.run(
        "client",
        &["echo", "--connect", &format!("{VIP}:80"), "--bytes", "1000"],
    )
    .unwrap();
    a1.wait_for_log_times("mesh_agent::access", 2).unwrap();
    assert_eq!(count("connected over mTLS"), 1, "{}", a1.log());
}

#[test]
fn access_log_lines_are_json_when_asked() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let a1 = lab.start_agent("n1", &["--log-format", "json"]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let out = lab
        .run(
            "client",
            &["echo", "--connect", &format!("{VIP}:80"), "--bytes", "4321"],
        )
        .unwrap();
    let banner: u64 = out.field("banner_bytes").parse().unwrap();
    a1.wait_for_log("mesh_agent::access").unwrap();
    let log = a1.log();
    let line = log
        .lines()
        .find(|l| l.contains("mesh_agent::access"))
        .unwrap();
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    let fields = &entry["fields"];
    assert_eq!(fields["message"], "connection closed");
    assert_eq!(fields["direction"], "outbound");
    assert_eq!(fields["source_identity"], CLIENT);
    assert_eq!(fields["source_workload"], "lab/client");
    assert_eq!(fields["destination_service"], "lab/echo");
    assert_eq!(fields["hop"], "tunnel");
    assert_eq!(fields["sent"], 4321);
    assert_eq!(fields["received"], 4321 + banner);
    assert_eq!(fields["outcome"], "ok");
    // Every line is JSON, and the connection's span names where it came from.
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    );
    assert_eq!(entry["span"]["name"], "conn");
}
