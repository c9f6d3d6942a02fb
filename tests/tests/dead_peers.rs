//! End-to-end: a peer node that goes silent (no FIN, no reset) is found out within a bound,
//! and everything that depended on it is released: the tunnel, its streams, and the pods'
//! connections on both sides, which get a reset. A peer that authenticates and then never
//! speaks HTTP/2 is closed too.

use std::time::{Duration, Instant};

use mesh_tests::{Lab, LabSpec, ProbeCert, says_reset};

const SOURCE_PORT: u16 = 9000;
/// The agents ping every second; a dead peer is found within about two.
const KEEPALIVE: &str = "1";
/// How long the test waits for what should take about two seconds.
const DETECTION_LIMIT: Duration = Duration::from_secs(30);

fn lab() -> Lab {
    Lab::new(
        LabSpec::default()
            .node("n1")
            .node("n2")
            .pod("n1", "client", true)
            .pod("n2", "server", false),
    )
    .unwrap()
}

/// The value of the first sample of `metric` in n1's /metrics, 0 if there is none.
fn gauge(lab: &Lab, metric: &str) -> f64 {
    let reply = lab
        .http("n1", "GET", "http://198.18.0.1:15020/metrics")
        .unwrap();
    reply
        .body
        .lines()
        .find(|l| l.starts_with(metric) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_silent_peer_node_is_detected_and_everything_it_held_released() {
    let lab = lab();
    let _agents: Vec<_> = ["n1", "n2"]
        .iter()
        .map(|n| {
            lab.start_agent(n, &["--tunnel-keepalive", KEEPALIVE])
                .unwrap()
        })
        .collect();
    let _server = lab
        .spawn(
            "server",
            &[
                "serve",
                "--listen",
                "[::]:8080",
                "--source",
                &format!("[::]:{SOURCE_PORT}"),
            ],
        )
        .unwrap();
    let server = lab.pod_addrs("server").unwrap().0;
    let download = lab
        .spawn(
            "client",
            &[
                "download",
                "--connect",
                &format!("{server}:{SOURCE_PORT}"),
                "--bytes",
                &(64u64 << 30).to_string(),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gauge(&lab, "mesh_tunnel_streams"), 1.0);

    lab.set_node_link("n2", false).unwrap();
    let cut = Instant::now();
    // n1's agent: the pings go unanswered, the tunnel closes, the client gets a reset.
    let download_pid = download.pid();
    while mesh_tests::alive(download_pid) {
        assert!(
            cut.elapsed() < DETECTION_LIMIT,
            "the client still waits {DETECTION_LIMIT:?} after its peer went silent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = download.wait_output().unwrap();
    assert!(!out.status.success());
    let client_log = lab.pod_log("client");
    assert!(says_reset(&client_log), "{client_log}");
    eprintln!("the client was reset {:?} after the cut", cut.elapsed());
    assert_eq!(gauge(&lab, "mesh_tunnel_streams"), 0.0);
    assert_eq!(gauge(&lab, "mesh_tunnel_connections"), 0.0);

    // n2's agent: no pings from n1 either; it resets its connection to the server.
    let mut server_log = lab.pod_log("server");
    while !says_reset(&server_log) {
        assert!(
            cut.elapsed() < DETECTION_LIMIT,
            "the server was not reset: {server_log}"
        );
        std::thread::sleep(Duration::from_millis(100));
        server_log = lab.pod_log("server");
    }

    // Back on the network, the node is reached through a new tunnel.
    lab.set_node_link("n2", true).unwrap();
    let out = lab
        .run(
            "client",
            &[
                "echo",
                "--connect",
                &format!("{server}:8080"),
                "--bytes",
                "100000",
            ],
        )
        .unwrap();
    assert_eq!(out.field("echoed"), "100000");
}

#[test]
fn a_peer_that_never_speaks_http2_after_tls_is_closed() {
    let lab = Lab::new(LabSpec::default().node("n1")).unwrap();
    let _agent = lab.start_agent("n1", &[]).unwrap();
    let cert = lab.probe_cert(ProbeCert::Valid).unwrap();
    // openssl s_client authenticates with a workload certificate, then sends nothing (it
    // ignores the end of its input); it exits when the agent closes the connection.
    let started = Instant::now();
    let out = lab
        .run_program_on_node(
            "n1",
            "openssl",
            &[
                "s_client",
                "-connect",
                "198.18.0.1:15008",
                "-alpn",
                "h2",
                "-cert",
                cert.cert.to_str().unwrap(),
                "-certform",
                "DER",
                "-key",
                cert.key.to_str().unwrap(),
                "-keyform",
                "DER",
                "-ign_eof",
            ],
        )
        .unwrap();
    let waited = started.elapsed();
    assert!(
        out.stdout.contains("Verify return code") && out.stdout.contains("TLSv1.3"),
        "the handshake did not complete: {}\n{}",
        out.stdout,
        out.stderr
    );
    eprintln!("closed after {waited:?}");
    // Not before the preface deadline (10 s): it was the deadline that closed it.
    assert!(waited >= Duration::from_secs(9), "closed after {waited:?}");
}
