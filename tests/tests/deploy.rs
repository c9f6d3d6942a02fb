//! End-to-end: the agent captures and proxies with only the capabilities
//! `deploy/daemonset.yaml` grants its container, not all of root's.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use mesh_tests::{Lab, LabSpec};

/// The capabilities the DaemonSet adds (after dropping all).
fn daemonset_capabilities() -> Vec<String> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let ds: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let security = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["capabilities"]["drop"][0].as_str(), Some("ALL"));
    security["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

/// The capability numbers (linux/capability.h) of the names the DaemonSet may use.
fn capability_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "BPF" => 39,
        other => panic!("add {other}'s number here"),
    }
}

#[test]
fn the_agent_works_with_only_the_daemonsets_capabilities() {
    let capabilities = daemonset_capabilities();
    let names: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    let lab = Lab::new(LabSpec::client_and_echo().agent_capabilities(&names)).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();

    // The agent really runs with those and no others.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    let expected = names.iter().fold(0u64, |m, n| m | 1 << capability_bit(n));
    assert_eq!(effective, expected, "the agent's effective capabilities");

    // It loaded, attached and pinned the programs and proxies captured connects.
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let out = lab
        .run(
            "client",
            &["echo", "--connect", "198.19.0.10:80", "--bytes", "1048576"],
        )
        .unwrap();
    assert_eq!(out.field("echoed"), "1048576");
    // The backend was dialled by the agent (from the node's address on the pods' side).
    let peer: SocketAddr = out.field("banner_peer").parse().unwrap();
    assert_eq!(peer.ip().to_canonical(), IpAddr::from([198, 18, 1, 1]));
}
