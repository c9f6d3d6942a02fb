//! End-to-end: the agent takes the mesh's state from a Kubernetes API server (the real
//! programs in the kernel, the agent's real client over TLS with a token): it enrolls the
//! pods the API puts on its node, finds their cgroups from their UIDs, and lets them go when
//! they leave.

use std::net::{IpAddr, SocketAddr};

use mesh_tests::{ENROLLED_NAMESPACE, Lab, LabSpec};

/// Who the backend saw connecting when `client` dialled it directly: the agent (from the
/// node's address on the pods' bridge) if the connect was captured, the client otherwise.
fn backend_peer(lab: &Lab, backend: SocketAddr) -> IpAddr {
    let out = lab
        .run(
            "client",
            &["echo", "--connect", &backend.to_string(), "--bytes", "4096"],
        )
        .unwrap();
    assert_eq!(out.field("echoed"), "4096");
    let peer: SocketAddr = out.field("banner_peer").parse().unwrap();
    peer.ip().to_canonical()
}

#[test]
fn pods_join_and_leave_the_mesh_as_the_api_says() {
    let lab = Lab::new(LabSpec::client_and_echo().kubelet_layout()).unwrap();
    let api = lab.start_api_server("n1").unwrap();
    let agent = lab.start_agent_kubernetes("n1", &api, &[]).unwrap();
    // Its state came from the API: every kind listed, the pods of its node only.
    assert!(agent.log().contains("cluster state changed"));
    assert_eq!(
        api.selectors("pods")[0],
        format!("fieldSelector=spec.nodeName={}", agent.node_name)
    );
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let gateway = IpAddr::from([198, 18, 1, 1]);
    let (client, _) = lab.pod_addrs("client").unwrap();
    let (backend, _) = lab.pod_addrs("backend").unwrap();
    let backend = SocketAddr::from((backend, 8080));

    // The service from the API, through its cluster IP, byte-exact through the agent.
    let out = lab
        .run(
            "client",
            &["echo", "--connect", "198.19.0.10:80", "--bytes", "1048576"],
        )
        .unwrap();
    assert_eq!(out.field("echoed"), "1048576");
    assert_eq!(backend_peer(&lab, backend), gateway, "client is meshed");

    // The pod goes: its connects are no longer captured.
    api.delete("pods", ENROLLED_NAMESPACE, "client");
    agent.wait_for_log("config reloaded").unwrap();
    assert_eq!(
        backend_peer(&lab, backend),
        IpAddr::from(client),
        "client left"
    );

    // It comes back (a new pod with the same cgroup): meshed again.
    api.apply("pods", lab.kubernetes_pod("client").unwrap());
    agent.wait_for_log_times("config reloaded", 2).unwrap();
    assert_eq!(backend_peer(&lab, backend), gateway, "client is back");
}

#[test]
fn the_agents_certificates_come_from_the_ca_service_which_may_be_down_a_while() {
    // Renewed every 2 s, so the CA being down shows at once.
    let lab = Lab::new(
        LabSpec::client_and_echo()
            .kubelet_layout()
            .certificate_ttl("4s"),
    )
    .unwrap();
    let api = lab.start_api_server("n1").unwrap();
    api.apply("pods", lab.kubernetes_agent_pod("n1"));
    let ca = lab.start_ca_service("n1", &api).unwrap();
    let token = lab.agent_token("n1", &api);
    let agent = lab
        .start_agent_kubernetes_via_ca("n1", &api, &token)
        .unwrap();
    // No CA key on the node: the CA service signed the agent's identity and the client's,
    // each an audit line naming the node.
    for id in ["ns/mesh-system/sa/mesh-agent", "ns/lab/sa/client"] {
        let signed = ca
            .log()
            .lines()
            .filter(|l| l.contains("certificate signed") && l.contains(id))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert!(
            signed
                .first()
                .is_some_and(|l| l.contains(&format!("node={}", agent.node_name))),
            "{id}: {signed:?}\n{}",
            ca.log()
        );
    }
    let echo = || {
        let out = lab
            .run(
                "client",
                &["echo", "--connect", "198.19.0.10:80", "--bytes", "65536"],
            )
            .unwrap();
        out.field("echoed").to_owned()
    };
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    assert_eq!(echo(), "65536");

    // The CA goes: renewals fail, the certificates in hand go on, traffic too.
    ca.kill().unwrap();
    agent
        .wait_for_log_times("certificate renewal failed, the current one stays", 2)
        .unwrap();
    assert_eq!(echo(), "65536");
    // It comes back: renewals succeed again.
    let renewed = agent.log().matches("certificate renewed").count();
    let ca = lab.start_ca_service("n1", &api).unwrap();
    agent
        .wait_for_log_times("certificate renewed", renewed + 2)
        .unwrap();
    assert!(ca.log().contains("certificate signed"));
    assert_eq!(echo(), "65536");
}
