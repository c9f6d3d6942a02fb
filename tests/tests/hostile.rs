//! End-to-end: hostile pods and peers, played by stock clients (curl, ab, bash's `/dev/tcp`)
//! and by `mesh-testpod probe` with certificates of the lab's CA. Each test is a probe that
//! once broke or strained the agent; it checks that the agent now refuses it cheaply.

use mesh_tests::{Lab, LabSpec, ProbeCert, node_addrs, pod_addrs, sum};

const VIP: &str = "198.19.0.10";

/// The value of the series `name{labels}` on `node`'s agent (0 if it has none).
fn metric(lab: &Lab, node: &str, series: &str) -> f64 {
    value(&lab.scrape(node), series)
}

/// The value of `series` in `scrape` (0 if it has none).
fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_tunnel_never_reaches_the_node_itself() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let a2 = lab.start_agent("n2", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let (bridge4, bridge6) = pod_addrs(2, 1);

    // A meshed pod of n1 asks for n2's admin API at n2's bridge address, which lies in n2's
    // pod CIDR: its agent carries it through the tunnel, and n2's agent refuses it.
    for url in [
        format!("http://{bridge4}:15020/config"),
        format!("http://[{bridge6}]:15020/config"),
    ] {
        let out = lab
            .run_program("client", "curl", &["-sS", "-m", "10", &url])
            .unwrap();
        assert!(
            !out.status.success() && !out.stdout.contains("trust_domain"),
            "{url} answered: {} {}",
            out.stdout,
            out.stderr
        );
    }
    // A peer with a valid certificate asking for the node in any form.
    let (node4, node6) = node_addrs(2);
    let authorities = [
        format!("{bridge4}:15020"),
        format!("[::ffff:{bridge4}]:15020"),
        format!("[{bridge6}]:15020"),
        format!("{node4}:15020"),
        format!("[{node6}]:15020"),
        "127.0.0.1:15020".to_owned(),
        "[::1]:15020".to_owned(),
        "[::ffff:127.0.0.1]:15020".to_owned(),
        "0.0.0.0:15020".to_owned(),
        "[::]:15020".to_owned(),
    ];
    for authority in &authorities {
        let out = lab.probe_node2(Some(ProbeCert::Valid), authority).unwrap();
        assert_eq!(out.field("status"), "403", "{authority}: {}", out.stdout);
    }
    // While a pod of the node is still reached.
    let (backend, _) = lab.pod_addrs("backend").unwrap();
    let ok = lab
        .probe_node2(Some(ProbeCert::Valid), &format!("{backend}:8080"))
        .unwrap();
    assert_eq!(ok.field("status"), "200", "{}", ok.stdout);
    let refused = metric(&lab, "n2", "mesh_refusals_total{reason=\"not_local_pod\"}");
    assert!(
        refused >= (authorities.len() + 2) as f64,
        "{refused} refusals counted:\n{}",
        a2.log()
    );
}

#[test]
fn a_port_scan_makes_no_series() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let (backend, _) = lab.pod_addrs("backend").unwrap();
    let (stranger, _) = pod_addrs(2, 77);
    // A meshed pod of n1 scans 300 closed ports of a pod of n2, and 300 of an address of
    // n2's pod CIDR no pod has (bash's /dev/tcp: each connect is captured and carried).
    let scan = format!(
        "for host in {backend} {stranger}; do for port in $(seq 20001 20300); do \
         (exec 3<>/dev/tcp/$host/$port) 2>/dev/null; done; done; true"
    );
    let out = lab.run_program("client", "bash", &["-c", &scan]).unwrap();
    assert!(out.status.success(), "{}", out.stderr);

    let failures = "mesh_connect_failures_total";
    let scrape = lab.metrics_when("n1", |s| sum(s, failures) >= 600.0);
    let failures: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("mesh_connect_failures_total"))
        .collect();
    assert_eq!(
        failures,
        ["mesh_connect_failures_total{service=\"\",endpoint=\"\"} 600"],
        "{scrape}"
    );
    assert!(
        !scrape.contains(":2003"),
        "a scanned port is a label:\n{scrape}"
    );
}

#[test]
fn the_admin_api_shows_pods_only_metrics_and_probes_and_drops_idle_connections() {
    let lab = Lab::new(LabSpec::client_and_echo()).unwrap();
    let _agent = lab.start_agent("n1", &[]).unwrap();
    let admin = "198.18.0.1:15020";
    let curl = |pod: &str, path: &str| {
        let out = lab
            .run_program(
                pod,
                "curl",
                &[
                    "-s",
                    "-m",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("http://{admin}{path}"),
                ],
            )
            .unwrap();
        out.stdout
    };
    // What a pod may see, and what not.
    assert_eq!(curl("client", "/metrics"), "200");
    assert_eq!(curl("client", "/ready"), "200");
    assert_eq!(curl("client", "/config"), "403");
    assert_eq!(curl("client", "/logging"), "403");
    assert_eq!(
        lab.http("n1", "GET", &format!("http://{admin}/config"))
            .unwrap()
            .status,
        200
    );

    // A pod holds idle connections (bash's /dev/tcp, sending nothing): 8 are taken, the
    // 9th is closed at once, and the 8 are closed when their headers do not come.
    let script = format!(
        "for fd in 3 4 5 6 7 8 9 10; do eval \"exec $fd<>/dev/tcp/{host}/15020\"; done; \
         exec 11<>/dev/tcp/{host}/15020; \
         read -t 5 -u 11; [ $? -gt 128 ] && echo ninth=open || echo ninth=closed; \
         echo holding; \
         for fd in 3 4 5 6 7 8 9 10; do \
           read -t 60 -u $fd; [ $? -gt 128 ] && echo held=open || echo held=closed; \
         done; echo closed_after_s=$SECONDS",
        host = "198.18.0.1"
    );
    let mut holder = lab
        .start_in_pod("client", "holder", "bash", &["-c", &script])
        .unwrap();
    let log = lab.scratch_path("holder.log");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("holding")
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the holder never held: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Meanwhile the node's probes and other pods are served.
    assert_eq!(
        lab.http("n1", "GET", &format!("http://{admin}/healthz"))
            .unwrap()
            .status,
        200
    );
    assert_eq!(curl("backend", "/metrics"), "200");
    let status = holder
        .wait_within(std::time::Duration::from_secs(120))
        .unwrap();
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("ninth=closed"), "{out}");
    assert_eq!(out.matches("held=closed").count(), 8, "{out}");
    assert!(
        metric(
            &lab,
            "n1",
            "mesh_refusals_total{reason=\"admin_connections_per_source\"}"
        ) >= 1.0
    );
}

#[test]
fn handshakes_are_capped_per_source_and_shed_at_once() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let a2 = lab.start_agent("n2", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let (node2, _) = node_addrs(2);
    // A pod opens 200 connections to n2's tunnel port and sends no ClientHello: 128 wait for
    // their handshake, the rest are reset at once. The pod looks once the agent has taken
    // them all (and before the 10 s the held ones have for their handshake).
    let go = lab.scratch_path("go");
    let script = format!(
        "fds=(); for i in $(seq 1 200); do exec {{fd}}<>/dev/tcp/{node2}/15008; fds+=($fd); done; \
         for i in $(seq 1 600); do [ -e {go} ] && break; sleep 0.1; done; \
         held=0; shed=0; \
         for fd in \"${{fds[@]}}\"; do read -t 0.01 -u $fd; \
           if [ $? -gt 128 ]; then held=$((held+1)); else shed=$((shed+1)); fi; done; \
         echo held=$held shed=$shed",
        go = go.display()
    );
    let mut prober = lab
        .start_in_pod("client", "prober", "bash", &["-c", &script])
        .unwrap();
    let shed = "mesh_refusals_total{reason=\"handshakes_per_source\"}";
    let scrape = lab.metrics_when("n2", |s| value(s, shed) >= 72.0);
    assert_eq!(value(&scrape, shed), 72.0);
    std::fs::write(&go, "").unwrap();
    let status = prober
        .wait_within(std::time::Duration::from_secs(120))
        .unwrap();
    let probed = std::fs::read_to_string(lab.scratch_path("prober.log")).unwrap();
    assert!(status.success(), "{probed}");
    assert!(probed.contains("held=128 shed=72"), "{probed}");
    // Meanwhile the mesh works, its own handshakes coming from another address.
    lab.run(
        "client",
        &[
            "echo",
            "--connect",
            &format!("{VIP}:80"),
            "--bytes",
            "10000",
        ],
    )
    .unwrap();
    let shed_lines = a2.log().matches("tunnel peer shed").count();
    assert!(shed_lines <= 5, "{shed_lines} lines for 72 sheds");
}

#[test]
fn handshakes_beyond_a_sources_rate_are_shed_and_logged_sparingly() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let a2 = lab.start_agent("n2", &[]).unwrap();
    let (node2, _) = node_addrs(2);
    // ab over TLS without a client certificate, as fast as it can: every handshake fails.
    let started = std::time::Instant::now();
    let out = lab
        .run_program(
            "client",
            "ab",
            &[
                "-r",
                "-n",
                "3000",
                "-c",
                "8",
                &format!("https://{node2}:15008/"),
            ],
        )
        .unwrap();
    // ab may give up before its 3,000 (after ten failed connects, say): count what the agent
    // saw, once it has seen all of it.
    let elapsed =
        lab.assert_handshakes_within_rate("n2", started, &format!("{}{}", out.stdout, out.stderr));
    // Thousands of refusals, a few lines.
    let log = a2.log();
    let windows = (elapsed / 10.0).ceil() + 1.0;
    for line in ["tunnel peer refused", "tunnel peer shed"] {
        let count = log.matches(line).count() as f64;
        assert!(count <= 5.0 * windows, "{count} lines of {line:?}");
    }
}

#[test]
fn a_peers_new_streams_are_capped_per_connection() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let (backend, _) = lab.pod_addrs("backend").unwrap();
    // A peer with a valid certificate opens 10,000 streams on one connection as fast as it
    // can (50 at a time, each closed once answered).
    let started = std::time::Instant::now();
    let out = lab
        .probe_node2_with(
            ProbeCert::Valid,
            &format!("{backend}:8080"),
            &["--streams", "10000"],
        )
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let admitted: f64 = out.field("status_200").parse().unwrap();
    let refused: f64 = out.field("status_429").parse().unwrap();
    assert_eq!(admitted + refused, 10000.0, "{}", out.stdout);
    // A burst of 1,000, then 1,000 per second.
    assert!(
        admitted <= 1000.0 + 1000.0 * (elapsed + 1.0),
        "{admitted} streams in {elapsed:.1} s"
    );
    assert_eq!(
        metric(&lab, "n2", "mesh_refusals_total{reason=\"stream_rate\"}"),
        refused
    );
}

#[test]
fn a_peer_holds_at_most_256_tunnel_connections() {
    let lab = Lab::new(LabSpec::client_and_echo_across_nodes()).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let (backend, _) = lab.pod_addrs("backend").unwrap();
    // A peer with a valid certificate opens 300 tunnels, each with a stream held open.
    let out = lab
        .probe_node2_with(
            ProbeCert::Valid,
            &format!("{backend}:8080"),
            &["--tunnels", "300"],
        )
        .unwrap();
    assert!(
        out.stdout.contains("tunnels_ok=256 tunnels_failed=44"),
        "{}",
        out.stdout
    );
    let refused = "mesh_refusals_total{reason=\"tunnel_connections_per_peer\"}";
    let scrape = lab.metrics_when("n2", |s| value(s, refused) >= 44.0);
    assert_eq!(value(&scrape, refused), 44.0);
}
