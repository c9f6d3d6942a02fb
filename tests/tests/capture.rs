//! End-to-end: the real eBPF programs capture pod connects, the real agent forwards them.

use std::net::{IpAddr, SocketAddr};

use mesh_common::Counter;
use mesh_tests::{Lab, LabSpec, ServiceSpec, kernel_count};

/// The `echo` service of [`LabSpec::client_and_echo`].
const VIP4: &str = "198.19.0.10";
const VIP6: &str = "2001:2:ff::10";

/// [`LabSpec::client_and_echo`], with the service on IPv6 too (`echo6`) and a pod
/// `outsider` that is not enrolled.
fn one_node() -> LabSpec {
    LabSpec::client_and_echo()
        .pod("n1", "outsider", false)
        .service(ServiceSpec::echo("echo6", &[VIP6], &["backend"]))
}

#[test]
fn service_traffic_is_byte_exact_through_the_agent() {
    let lab = Lab::new(one_node()).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let (gw4, gw6) = (
        IpAddr::from([198, 18, 1, 1]),
        "2001:2:0:1::1".parse::<IpAddr>().unwrap(),
    );

    let mut connections = 0;
    // The IPv4-mapped form: an IPv6 socket reaching an IPv4 service (connect6, dual stack).
    let mapped = format!("::ffff:{VIP4}");
    for (vip, agent_source) in [(VIP4, gw4), (VIP6, gw6), (mapped.as_str(), gw4)] {
        let vip: IpAddr = vip.parse().unwrap();
        for bytes in [1u64, 1000, 65_543, 1 << 20, 16 << 20] {
            let target = SocketAddr::new(vip, 80).to_string();
            // (An IPv4-mapped `vip` stays an IPv6 address here, and so does the socket.)
            let out = lab
                .run(
                    "client",
                    &["echo", "--connect", &target, "--bytes", &bytes.to_string()],
                )
                .unwrap();
            connections += 1;
            assert_eq!(out.field("echoed"), bytes.to_string());
            // The backend was reached on its own address, dialled by the agent.
            let local: SocketAddr = out.field("banner_local").parse().unwrap();
            assert_eq!(local.port(), 8080);
            let peer: SocketAddr = out.field("banner_peer").parse().unwrap();
            assert_eq!(
                peer.ip().to_canonical(),
                agent_source,
                "{vip}: {}",
                out.stdout
            );
        }
    }
    // Every client connect was captured once; the agent's own dials to the backend were not.
    assert_eq!(
        kernel_count(&agent.node_name, Counter::ConnectsCaptured),
        connections
    );
    assert_eq!(
        kernel_count(&agent.node_name, Counter::OrigDstRecorded),
        connections
    );
}

#[test]
fn connects_outside_the_mesh_are_not_touched() {
    let lab = Lab::new(one_node()).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let node_server = lab
        .spawn_on_node("n1", &["serve", "--listen", "198.18.0.1:9090"])
        .unwrap();
    let (backend4, _) = lab.pod_addrs("backend").unwrap();
    let (outsider4, _) = lab.pod_addrs("outsider").unwrap();
    let (client4, _) = lab.pod_addrs("client").unwrap();
    let captured = || kernel_count(&agent.node_name, Counter::ConnectsCaptured);
    let before = captured();

    // A pod that is not enrolled reaches a meshed pod address directly, as itself.
    let out = lab
        .run(
            "outsider",
            &[
                "echo",
                "--connect",
                &format!("{backend4}:8080"),
                "--bytes",
                "4096",
            ],
        )
        .unwrap();
    let peer: SocketAddr = out.field("banner_peer").parse().unwrap();
    assert_eq!(peer.ip().to_canonical(), IpAddr::from(outsider4));

    // An enrolled pod reaches a destination the mesh does not own directly, as itself.
    let out = lab
        .run(
            "client",
            &["echo", "--connect", "198.18.0.1:9090", "--bytes", "4096"],
        )
        .unwrap();
    let peer: SocketAddr = out.field("banner_peer").parse().unwrap();
    assert_eq!(peer.ip().to_canonical(), IpAddr::from(client4));

    assert_eq!(captured(), before, "nothing was captured");
    drop(node_server);
}

#[test]
fn a_captured_socket_reports_the_address_its_app_dialled() {
    let lab = Lab::new(one_node()).unwrap();
    let _agent = lab.start_agent("n1", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let (backend4, _) = lab.pod_addrs("backend").unwrap();
    let mapped = format!("[::ffff:{VIP4}]:80");
    let pod = format!("{backend4}:8080");
    for dialled in [format!("{VIP4}:80"), format!("[{VIP6}]:80"), mapped, pod] {
        let out = lab.run("client", &["connect", "--addr", &dialled]).unwrap();
        assert_eq!(out.field("connect"), "ok");
        let peer: SocketAddr = out.field("peer").parse().unwrap();
        assert_eq!(
            peer,
            dialled.parse().unwrap(),
            "getpeername after {dialled}"
        );
    }
}

#[test]
fn sk_msg_shortcut_carries_the_app_agent_bytes() {
    let lab = Lab::new(one_node()).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let read = |c| kernel_count(&agent.node_name, c);
    let (bytes_before, passed_before) =
        (read(Counter::BytesRedirected), read(Counter::BytesPassed));

    let payload: u64 = 4 << 20;
    let out = lab
        .run(
            "client",
            &[
                "echo",
                "--connect",
                "198.19.0.10:80",
                "--bytes",
                &payload.to_string(),
            ],
        )
        .unwrap();
    assert_eq!(out.field("echoed"), payload.to_string());
    let banner: u64 = out.field("banner_bytes").parse().unwrap();
    if !mesh_agent::datapath::shortcut_possible() {
        // This kernel cannot bound what the shortcut queues: the agent leaves it off, says
        // so, and every byte goes through TCP/IP.
        let redirected = read(Counter::BytesRedirected) - bytes_before;
        assert_eq!(redirected + read(Counter::BytesPassed) - passed_before, 0);
        assert!(
            agent.log().contains("the shortcut is off"),
            "{}",
            agent.log()
        );
        return;
    }

    // Client to agent: the payload, every byte socket to socket or, while the agent's queue
    // was full, through TCP/IP. Agent to client (the banner and the echo): TCP/IP, uncounted.
    let redirected = read(Counter::BytesRedirected) - bytes_before;
    let passed = read(Counter::BytesPassed) - passed_before;
    eprintln!(
        "redirected {redirected} B, passed {passed} B, full {} times, resumed {} times",
        read(Counter::ShortcutFull),
        read(Counter::ShortcutResumed)
    );
    assert_eq!(redirected + passed, payload, "banner {banner} B");
    assert!(redirected > passed, "the shortcut carried most bytes");
}

#[test]
fn thousand_concurrent_connections_each_get_their_own_destination() {
    let lab = Lab::new(one_node()).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();
    let (backend4, _) = lab.pod_addrs("backend").unwrap();
    let _backend = lab
        .spawn(
            "backend",
            &["serve", "--listen", &format!("{backend4}:20000-20999")],
        )
        .unwrap();
    let before = kernel_count(&agent.node_name, Counter::ConnectsCaptured);

    let out = lab
        .run(
            "client",
            &[
                "fanout",
                "--ip",
                &backend4.to_string(),
                "--ports",
                "20000-20999",
            ],
        )
        .unwrap();
    assert_eq!(out.field("ok"), "1000", "{}", out.stdout);
    assert_eq!(
        kernel_count(&agent.node_name, Counter::ConnectsCaptured) - before,
        1000
    );
}

#[test]
fn processes_in_cgroups_below_an_enrolled_one_are_meshed() {
    let lab = Lab::new(one_node()).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let before = kernel_count(&agent.node_name, Counter::ConnectsCaptured);
    // Kubernetes puts a pod's containers in cgroups below the pod's; only the pod is enrolled.
    for container in ["app", "app/nested/deeper"] {
        let out = lab
            .run_in_container(
                "client",
                container,
                &["echo", "--connect", "198.19.0.10:80", "--bytes", "5000"],
            )
            .unwrap();
        assert_eq!(out.field("echoed"), "5000");
    }
    assert_eq!(
        kernel_count(&agent.node_name, Counter::ConnectsCaptured) - before,
        2
    );
}
