//! End-to-end: who may call whom, driven by stock clients (curl, iperf3) in real pods of two
//! nodes: policies decided by the serving agent across nodes and by the calling agent on one
//! node, peers of another trust domain or named by no policy, default deny, strict mode in
//! the kernel (an unenrolled pod and another node shut out, the node's own probes let in), a
//! change cutting a long transfer it now denies, and a bad change refused with the last good
//! policies kept.

use mesh_tests::{Daemon, Lab, LabSpec, ProbeCert, ServiceSpec, sum};

/// `payments` (HTTP) at payments-2 on n2, `payments-here` (HTTP) at payments-1 on n1.
const PAYMENTS: &str = "198.19.0.30";
const PAYMENTS_HERE: &str = "198.19.0.31";
/// `ledger` (TCP, iperf3's port) at payments-2 on n2.
const LEDGER: &str = "198.19.0.32";
const IPERF_PORT: u16 = 5201;

/// Only orders may POST /charge to payments and use the ledger.
const ONLY_ORDERS: &str = "\
authorization:
  policies:
    - name: charge
      namespace: lab
      target: { service: payments }
      action: allow
      rules:
        - { from: [{ principals: [spiffe://lab.mesh/ns/lab/sa/orders] }], to: [{ methods: [POST], paths: [/charge] }] }
        - { from: [{ principals: ['*/sa/orders'] }], to: [{ ports: [5201] }] }
    - name: charge-here
      namespace: lab
      target: { service: payments-here }
      action: allow
      rules:
        - { from: [{ namespaces: [lab], principals: ['*/orders'] }], to: [{ methods: [POST], paths: [/charge] }] }";

fn spec(authorization: &str) -> LabSpec {
    LabSpec::default()
        .node("n1")
        .node("n2")
        .pod("n1", "orders", true)
        .pod("n1", "web", true)
        .pod("n1", "outsider", false)
        .pod("n1", "payments-1", true)
        .pod("n2", "payments-2", true)
        .service(ServiceSpec::echo("payments", &[PAYMENTS], &["payments-2"]).http("http", None))
        .service(
            ServiceSpec::echo("payments-here", &[PAYMENTS_HERE], &["payments-1"])
                .http("http", None),
        )
        .service(ServiceSpec {
            port: IPERF_PORT,
            target_port: IPERF_PORT,
            ..ServiceSpec::echo("ledger", &[LEDGER], &["payments-2"])
        })
        .setting(authorization)
}

/// The HTTP pods and the ledger's iperf3 server.
fn serve(lab: &Lab) -> (Vec<mesh_tests::Running>, Daemon) {
    let http = |pod: &str| lab.serve_http(pod, &[]).unwrap();
    let iperf = lab.start_iperf3_server("payments-2", IPERF_PORT).unwrap();
    (vec![http("payments-1"), http("payments-2")], iperf)
}

/// `curl` arguments for the status of `method url` ("000": no answer within 3 s).
fn curl_status<'a>(method: &'a str, url: &'a str) -> [&'a str; 12] {
    [
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--connect-timeout",
        "3",
        "-m",
        "10",
        "-X",
        method,
        url,
    ]
}

/// The status `curl` from `pod` gets for `method url` ("000": no answer within 3 s).
fn status(lab: &Lab, pod: &str, method: &str, url: &str) -> String {
    let args = curl_status(method, url);
    lab.run_program(pod, "curl", &args).unwrap().stdout
}

/// Whether a one-second iperf3 upload from `pod` to the ledger succeeds.
fn ledger_upload(lab: &Lab, pod: &str) -> bool {
    let port = IPERF_PORT.to_string();
    let args = [
        "-c",
        LEDGER,
        "-p",
        &port,
        "-t",
        "1",
        "--connect-timeout",
        "3000",
    ];
    lab.run_program(pod, "iperf3", &args)
        .unwrap()
        .status
        .success()
}

/// Rewrites both agents' configs as `spec` and waits until each has `reloads` reloads.
fn change(lab: &Lab, agents: &[&mesh_tests::Agent], spec: &LabSpec, reloads: usize) {
    for (node, agent) in ["n1", "n2"].iter().zip(agents) {
        let text = lab.agent_config_for(spec, node).unwrap();
        std::fs::write(lab.agent_config_path(node), text).unwrap();
        agent
            .wait_for_log_times("config reloaded", reloads)
            .unwrap();
    }
}

#[test]
fn callers_on_both_nodes_and_outside_the_mesh_get_what_the_policies_say() {
    let lab = Lab::new(spec(ONLY_ORDERS)).unwrap();
    let n1 = lab.start_agent("n1", &[]).unwrap();
    let n2 = lab.start_agent("n2", &[]).unwrap();
    let _servers = serve(&lab);
    let (payments_2, _) = lab.pod_addrs("payments-2").unwrap();
    let (payments_1, _) = lab.pod_addrs("payments-1").unwrap();
    let direct_2 = format!("http://{payments_2}:8080/charge");
    let direct_1 = format!("http://{payments_1}:8080/charge");

    // (caller, method, url, status): across nodes and on one node alike.
    let mut matrix = Vec::new();
    for vip in [PAYMENTS, PAYMENTS_HERE] {
        let charge = format!("http://{vip}/charge");
        matrix.extend([
            ("orders", "POST", charge.clone(), "200"),
            ("orders", "GET", charge.clone(), "403"),
            ("orders", "POST", format!("http://{vip}/refund"), "403"),
            ("web", "POST", charge.clone(), "403"),
        ]);
    }
    // Not in the mesh: policies do not see it, and nothing is strict yet.
    matrix.push(("outsider", "POST", direct_2.clone(), "200"));
    for (pod, method, url, expected) in &matrix {
        assert_eq!(
            status(&lab, pod, method, url),
            *expected,
            "{pod}: {method} {url}"
        );
    }
    assert!(
        ledger_upload(&lab, "orders"),
        "orders' upload to the ledger"
    );
    assert!(!ledger_upload(&lab, "web"), "web's upload to the ledger");
    // A peer with a certificate of another trust domain is refused at the handshake; one of
    // this trust domain whose identity no policy names, at the CONNECT.
    let target = format!("{payments_2}:8080");
    let foreign = lab
        .probe_node2(Some(ProbeCert::OtherTrustDomain), &target)
        .unwrap();
    assert_eq!(foreign.field("probe"), "refused", "{}", foreign.stdout);
    let stranger = lab.probe_node2(Some(ProbeCert::Valid), &target).unwrap();
    assert_eq!(stranger.field("status"), "403", "{}", stranger.stdout);
    n2.wait_for_log("denied by no-allow-match").unwrap();
    let denials = |m: &str| sum(m, "mesh_authorization_decisions_total{action=\"deny\"");
    // n2 denied web's and orders' wrong requests to payments and web's ledger connection; n1
    // the same requests to payments-here.
    lab.metrics_when("n2", |m| denials(m) >= 4.0);
    lab.metrics_when("n1", |m| denials(m) >= 3.0);

    // Strict mode: only the mesh and the node itself reach the pods of lab.
    let strict = format!("{ONLY_ORDERS}\n  strict: {{ namespaces: [lab] }}");
    change(&lab, &[&n1, &n2], &spec(&strict), 1);
    let strict_matrix = [
        ("orders", "POST", format!("http://{PAYMENTS}/charge"), "200"),
        (
            "orders",
            "POST",
            format!("http://{PAYMENTS_HERE}/charge"),
            "200",
        ),
        ("outsider", "POST", direct_2.clone(), "000"),
        ("outsider", "POST", direct_1.clone(), "000"),
    ];
    for (pod, method, url, expected) in &strict_matrix {
        assert_eq!(
            status(&lab, pod, method, url),
            *expected,
            "strict, {pod}: {method} {url}"
        );
    }
    let from_node = |node: &str, url: &str| {
        let args = curl_status("GET", url);
        lab.run_program_on_node(node, "curl", &args).unwrap().stdout
    };
    assert_eq!(from_node("n2", &direct_2), "200", "the node's own probe");
    assert_eq!(
        from_node("n1", &direct_2),
        "000",
        "another node, around the mesh"
    );
    assert!(ledger_upload(&lab, "orders"), "orders' upload, strict");
    lab.metrics_when("n2", |m| sum(m, "mesh_ebpf_strict_dropped_total") >= 2.0);

    // Default deny, no policies: nobody may call anyone, on either node.
    change(
        &lab,
        &[&n1, &n2],
        &spec("authorization: { default_deny: true }"),
        2,
    );
    for vip in [PAYMENTS, PAYMENTS_HERE] {
        let url = format!("http://{vip}/charge");
        assert_eq!(
            status(&lab, "orders", "POST", &url),
            "403",
            "default deny: {url}"
        );
    }
    assert!(
        !ledger_upload(&lab, "orders"),
        "orders' upload under default deny"
    );
    lab.metrics_when("n2", |m| {
        sum(
            m,
            "mesh_authorization_decisions_total{action=\"deny\",policy=\"default-deny\"}",
        ) >= 2.0
    });
}

#[test]
fn a_change_cuts_a_long_transfer_it_denies_and_a_bad_one_keeps_the_last_good() {
    let lab = Lab::new(spec(ONLY_ORDERS)).unwrap();
    let n1 = lab.start_agent("n1", &[]).unwrap();
    let n2 = lab.start_agent("n2", &[]).unwrap();
    let _servers = serve(&lab);

    // A bad policy: refused with where and why; orders keeps its rights, web stays out.
    let bad = ONLY_ORDERS.replace("methods: [POST]", "methods: [post]");
    std::fs::write(
        lab.agent_config_path("n2"),
        lab.agent_config_for(&spec(&bad), "n2").unwrap(),
    )
    .unwrap();
    n2.wait_for_log_times("config change rejected", 1).unwrap();
    let log = n2.log();
    assert!(
        log.contains("authorization.policies[0].rules[0].to[0].methods[0]")
            && log.contains("is not an uppercase HTTP method"),
        "{log}"
    );
    let charge = format!("http://{PAYMENTS}/charge");
    assert_eq!(status(&lab, "orders", "POST", &charge), "200");
    assert_eq!(status(&lab, "web", "POST", &charge), "403");

    // A long upload of orders to the ledger, then a policy that denies it.
    let port = IPERF_PORT.to_string();
    let upload = lab
        .start_in_pod(
            "orders",
            "iperf3-upload",
            "iperf3",
            &["-c", LEDGER, "-p", &port, "-t", "60", "--forceflush"],
        )
        .unwrap();
    // Under way once iperf3 reports its first second.
    lab.wait_for_lines(&lab.scratch_path("iperf3-upload.log"), |lines| {
        lines.iter().any(|l| l.contains("Bytes"))
    });
    let frozen = format!(
        "{ONLY_ORDERS}\n    - {{ name: freeze, namespace: lab, target: {{ service: ledger }}, action: deny, rules: [{{ from: [{{ principals: ['*/sa/orders'] }}] }}] }}"
    );
    change(&lab, &[&n1, &n2], &spec(&frozen), 1);
    let mut upload = upload;
    let ended = upload
        .wait_within(std::time::Duration::from_secs(20))
        .expect("iperf3 still uploading 20 s after the policy that denies it");
    assert!(!ended.success(), "iperf3 ended as if nothing happened");
    let metrics = lab.metrics_when("n2", |m| {
        sum(m, "mesh_authorization_cuts_total{policy=\"lab/freeze\"}") >= 1.0
    });
    assert!(
        sum(&metrics, "mesh_authorization_cuts_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        !ledger_upload(&lab, "orders"),
        "a new upload under the freeze"
    );
}
