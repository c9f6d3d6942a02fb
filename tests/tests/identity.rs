//! End-to-end: a caller's identity comes from the cgroup its connect came from, not from its
//! source address: a pod that takes another pod's address gets no identity of the other's.

use mesh_tests::{Lab, LabSpec};

#[test]
fn a_pod_that_takes_another_pods_address_does_not_get_its_identity() {
    let lab = Lab::new(
        LabSpec::default()
            .node("n1")
            .node("n2")
            .pod("n1", "web", true)
            .pod("n1", "cart", true)
            .pod("n2", "server", false),
    )
    .unwrap();
    let a1 = lab.start_agent("n1", &[]).unwrap();
    let a2 = lab.start_agent("n2", &[]).unwrap();
    let _server = lab
        .spawn("server", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let server = format!("{}:8080", lab.pod_addrs("server").unwrap().0);
    let echo = |pod: &str| lab.run(pod, &["echo", "--connect", &server, "--bytes", "1000"]);

    // Honest callers arrive as themselves.
    for pod in ["web", "cart"] {
        assert_eq!(echo(pod).unwrap().field("echoed"), "1000");
    }
    let arrived_as = |sa: &str| {
        a2.log()
            .matches(&format!(
                "source_identity=\"spiffe://lab.mesh/ns/lab/sa/{sa}\""
            ))
            .count()
    };
    assert_eq!(
        (arrived_as("web"), arrived_as("cart")),
        (1, 1),
        "{}",
        a2.log()
    );

    // cart takes web's address: its calls are refused, never carried as web's.
    lab.steal_address("cart", "web").unwrap();
    let spoofed = echo("cart");
    assert!(spoofed.is_err(), "a spoofed call went through");
    a1.wait_for_log("comes from the cgroup of lab/cart but its address is lab/web's")
        .unwrap();
    assert_eq!(
        (arrived_as("web"), arrived_as("cart")),
        (1, 1),
        "{}",
        a2.log()
    );
}
