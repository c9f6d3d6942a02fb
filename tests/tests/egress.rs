//! End-to-end: egress from a real pod, with stock tools on both sides: curl in the pod, a
//! third party outside the mesh (`openssl s_server`, its own CA) and a DNS server
//! (dnsmasq) in namespaces of their own. The agent resolves the declared host through
//! dnsmasq and the kernel captures its address; plain HTTP leaves the node as TLS the agent
//! originates (the ClientHello's SNI read off the wire), TLS passes through by SNI; under
//! `registry_only` an undeclared destination fails in the kernel (counted and logged by
//! workload), under `allow_any` it is reached; a DNS change is followed.

use std::time::{Duration, Instant};

use mesh_tests::{Lab, LabSpec, frames, sum};

const HOST: &str = "api.courier.example";
/// Declared to leave only from egress nodes (n2).
const PIM: &str = "pim.example";

/// n1 with the orders pod, n2 (for captures between nodes), and outside the mesh two
/// couriers (198.18.0.201 and .202), a DNS server (.203) and a host nobody declares (.204).
fn lab_spec() -> LabSpec {
    LabSpec::default()
        .node("n1")
        .node("n2")
        .pod("n1", "orders", true)
        .outside("courier")
        .outside("courier-b")
        .outside("dns")
        .outside("elsewhere")
        .node_labels("n2", "{ mesh.dev/egress: 'true' }")
        .setting("dns_servers: [\"198.18.0.203:53\"]")
}

/// The lab with the courier declared (HTTP with TLS originated on 80, TLS passed through on
/// 443, its CA `ca_pem`), and the PIM at the same address leaving only from n2, under the
/// outbound `policy`.
fn with_egress(policy: &str, ca_pem: &str) -> LabSpec {
    let egress = format!(
        "egress: {{ outbound_policy: {policy}, hosts: [{{ names: [{HOST}], ports: [{{ port: 80, protocol: http, tls: originate }}, {{ port: 443, tls: passthrough }}], ca_certificates: {ca_pem:?} }}, {{ names: [{PIM}], ports: [{{ port: 80, protocol: http, tls: originate }}], ca_certificates: {ca_pem:?}, egress_nodes: {{ mesh.dev/egress: 'true' }} }}] }}"
    );
    lab_spec().setting(&egress)
}

/// `curl` from `pod` with `args`: the body, then the status on a line of its own ("000": no
/// answer within 3 s), and curl's exit code.
fn curl(lab: &Lab, pod: &str, args: &[&str]) -> (String, String, i32) {
    let mut all = vec![
        "-s",
        "-w",
        "\n%{http_code}",
        "--connect-timeout",
        "3",
        "-m",
        "10",
    ];
    all.extend(args);
    let out = lab.run_program(pod, "curl", &all).unwrap();
    let (body, status) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    (
        body.to_owned(),
        status.to_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// A URL of the courier at `address` (without DNS in the pod: curl's --resolve).
fn resolve(port: u16, address: &str) -> String {
    format!("{HOST}:{port}:{address}")
}

/// Rewrites n1's config as `spec` and waits for its `reloads`-th reload.
fn change(lab: &Lab, agent: &mesh_tests::Agent, spec: &LabSpec, reloads: usize) {
    let text = lab.agent_config_for(spec, "n1").unwrap();
    std::fs::write(lab.agent_config_path("n1"), text).unwrap();
    agent
        .wait_for_log_times("config reloaded", reloads)
        .unwrap();
}

#[test]
fn declared_hosts_go_out_through_the_agent_and_nothing_else_does() {
    let lab = Lab::new(lab_spec()).unwrap();
    let (pem, ca) = lab.third_party_pem("courier", &[HOST, PIM]).unwrap();
    let registry_only = with_egress("registry_only", &ca);
    let config = |node| lab.agent_config_for(&registry_only, node).unwrap();
    let names = |courier: &str| format!("{courier} {HOST}\n198.18.0.201 {PIM}\n");
    std::fs::write(lab.scratch_path("hosts"), names("198.18.0.201")).unwrap();
    let hosts = lab.scratch_path("hosts");
    let dns = lab.start_dns_server("dns", &hosts).unwrap();
    let _couriers = [
        lab.start_tls_server("courier", &pem).unwrap(),
        lab.start_tls_server("courier-b", &pem).unwrap(),
    ];
    let _elsewhere = lab.serve_http_outside("elsewhere").unwrap();
    let n1 = lab
        .start_agent_with_config("n1", &config("n1"), &[])
        .unwrap();
    let _n2 = lab
        .start_agent_with_config("n2", &config("n2"), &[])
        .unwrap();
    n1.wait_for_log("external host resolved").unwrap();

    // Plain HTTP from the pod leaves the node as TLS to the host, named by SNI.
    let capture = lab.capture("egress").unwrap();
    let (body, status, _) = curl(
        &lab,
        "orders",
        &[
            "--resolve",
            &resolve(80, "198.18.0.201"),
            &format!("http://{HOST}/"),
        ],
    );
    assert_eq!(status, "200", "{body}");
    assert!(body.contains("s_server"), "{body}");
    // TLS from the pod passes through, the host named by its own SNI.
    let ca_file = lab.write_file("courier-ca.pem", &ca).unwrap();
    let cacert = ca_file.to_str().unwrap();
    let (body, status, _) = curl(
        &lab,
        "orders",
        &[
            "--cacert",
            cacert,
            "--resolve",
            &resolve(443, "198.18.0.201"),
            &format!("https://{HOST}/"),
        ],
    );
    assert_eq!(status, "200", "{body}");
    // The PIM leaves from the egress node n2 only: n1's agent sends it there.
    let (body, status, _) = curl(
        &lab,
        "orders",
        &[
            "--resolve",
            &format!("{PIM}:80:198.18.0.201"),
            &format!("http://{PIM}/"),
        ],
    );
    assert_eq!(status, "200", "{body}");
    let file = lab.stop_capture(capture).unwrap();
    let hellos = frames(
        &file,
        "tls.handshake.type == 1 && tcp.dstport == 443",
        &[
            "ip.src",
            "ip.dst",
            "tcp.dstport",
            "tls.handshake.extensions_server_name",
        ],
    )
    .unwrap();
    assert_eq!(
        hellos,
        [
            format!("198.18.0.1\t198.18.0.201\t443\t{HOST}"),
            format!("198.18.0.1\t198.18.0.201\t443\t{HOST}"),
            format!("198.18.0.2\t198.18.0.201\t443\t{PIM}"),
        ],
        "the agent's ClientHello and the pod's curl's, from n1; the PIM's from n2, the egress node"
    );
    let plain = frames(
        &file,
        "ip.dst == 198.18.0.201 && tcp.dstport == 80",
        &["frame.number"],
    )
    .unwrap();
    assert!(plain.is_empty(), "plain HTTP left the node: {plain:?}");

    // A host the courier's address does not declare is answered 403 by the agent.
    let (body, status, _) = curl(
        &lab,
        "orders",
        &["-H", "host: other.example", "http://198.18.0.201/"],
    );
    assert_eq!(status, "403", "{body}");
    // Anywhere else: refused in the kernel, counted and logged by workload.
    let (_, status, code) = curl(&lab, "orders", &["http://198.18.0.204:8080/"]);
    assert_eq!(
        (status.as_str(), code),
        ("000", 7),
        "curl could not connect"
    );
    let refused = "mesh_egress_refused_total{source_namespace=\"lab\",source_workload=\"orders\",destination=\"198.18.0.204:8080\"}";
    let metrics = lab.metrics_when("n1", |m| sum(m, refused) >= 1.0);
    assert!(sum(&metrics, "mesh_ebpf_connects_refused_total") >= 1.0);
    n1.wait_for_log("198.18.0.204:8080").unwrap();
    assert!(n1.log().contains("workload=lab/orders"), "{}", n1.log());

    // The host moves: the agent follows its DNS record, the old address is refused.
    std::fs::write(&hosts, names("198.18.0.202")).unwrap();
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(dns.pid() as i32, libc::SIGHUP) };
    let started = Instant::now();
    while !n1.log().contains("198.18.0.202") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent did not follow the DNS change:\n{}",
            n1.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    n1.wait_for_log_times("config reloaded", 2).unwrap();
    let (body, status, _) = curl(
        &lab,
        "orders",
        &[
            "--resolve",
            &resolve(80, "198.18.0.202"),
            &format!("http://{HOST}/"),
        ],
    );
    assert_eq!(status, "200", "{body}");
    // At 443, which only the courier declares, its old address is no longer captured.
    let (_, status, _) = curl(
        &lab,
        "orders",
        &[
            "--cacert",
            cacert,
            "--resolve",
            &resolve(443, "198.18.0.201"),
            &format!("https://{HOST}/"),
        ],
    );
    assert_eq!(
        status, "000",
        "the host's old address is no longer declared"
    );

    // allow_any: what nobody declared goes out untouched.
    let allow_any = with_egress("allow_any", &ca);
    let reloads = n1.log().matches("config reloaded").count();
    change(&lab, &n1, &allow_any, reloads + 1);
    let (body, status, _) = curl(&lab, "orders", &["http://198.18.0.204:8080/"]);
    assert_eq!(status, "200", "{body}");
}
