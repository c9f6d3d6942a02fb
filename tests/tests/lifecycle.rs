//! End-to-end: the agent's life — restart on pinned maps, graceful shutdown, clean exit.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use mesh_agent::datapath::{pin_dir, pins, shortcut_possible};
use mesh_common::Counter;
use mesh_tests::{Lab, LabSpec, Running, kernel_count};

const VIP: &str = "198.19.0.10:80";

fn captured(node_name: &str) -> u64 {
    kernel_count(node_name, Counter::ConnectsCaptured)
}

/// The client-and-echo lab, with its backend serving (dropped before the lab: the pattern's
/// bindings go in reverse order).
fn echo_lab() -> (Lab, Running) {
    let lab = Lab::new(LabSpec::client_and_echo()).unwrap();
    let backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    (lab, backend)
}

/// Starts a client in `client` that sends half of `bytes` through the echo service, then
/// waits for the returned file to appear before it sends the rest.
fn paused_client(lab: &Lab, bytes: u64) -> (Running, PathBuf) {
    let release = lab.scratch_path("release-the-client");
    let client = lab
        .spawn(
            "client",
            &[
                "echo",
                "--connect",
                VIP,
                "--bytes",
                &bytes.to_string(),
                "--pause-until",
                release.to_str().unwrap(),
            ],
        )
        .unwrap();
    (client, release)
}

#[test]
fn restarted_agent_reuses_pins_and_connects_fail_closed_meanwhile() {
    let (lab, _backend) = echo_lab();
    let echo = ["echo", "--connect", VIP, "--bytes", "10000"];

    let agent = lab.start_agent("n1", &["--keep-pins"]).unwrap();
    let node_name = agent.node_name.clone();
    lab.run("client", &echo).unwrap();
    assert_eq!(captured(&node_name), 1);
    agent.terminate().unwrap();
    assert!(agent.wait().unwrap().success());

    // The agent is gone, its programs are not: a meshed connect is still captured and,
    // with nobody listening, refused at once rather than sent anywhere in the clear.
    let pins = pin_dir(&node_name);
    for pin in [
        "link_mesh_connect4",
        "link_mesh_connect6",
        "link_mesh_sockops",
    ] {
        assert!(pins.join(pin).exists(), "{pin} is pinned");
    }
    assert_eq!(pins::find(&pins, "ENROLLED").len(), 1, "ENROLLED is pinned");
    let out = lab.run("client", &["connect", "--addr", VIP]).unwrap();
    assert_eq!(out.field("connect"), "ConnectionRefused");
    assert_eq!(captured(&node_name), 2);

    // A new agent picks up the pinned maps: the counters go on from where they were.
    let agent = lab.start_agent("n1", &[]).unwrap();
    lab.run("client", &echo).unwrap();
    assert_eq!(captured(&node_name), 3);
    agent.terminate().unwrap();
    assert!(agent.wait().unwrap().success());

    // Without --keep-pins it leaves nothing: no pins, and no capture any more.
    assert!(!pins.exists(), "{} was removed", pins.display());
    let (backend4, _) = lab.pod_addrs("backend").unwrap();
    let (client4, _) = lab.pod_addrs("client").unwrap();
    let out = lab
        .run(
            "client",
            &[
                "echo",
                "--connect",
                &format!("{backend4}:8080"),
                "--bytes",
                "10",
            ],
        )
        .unwrap();
    let peer: SocketAddr = out.field("banner_peer").parse().unwrap();
    assert_eq!(
        peer.ip().to_canonical(),
        IpAddr::from(client4),
        "not proxied"
    );
}

#[test]
fn sigterm_stops_accepting_and_lets_open_connections_finish() {
    let (lab, _backend) = echo_lab();
    let agent = lab.start_agent("n1", &["--grace-period", "120"]).unwrap();
    let bytes = 2u64 << 20;
    let (open, go) = paused_client(&lab, bytes);

    agent.terminate().unwrap();
    agent.wait_for_log("no longer accepting").unwrap();
    let out = lab.run("client", &["connect", "--addr", VIP]).unwrap();
    assert_eq!(
        out.field("connect"),
        "ConnectionRefused",
        "new connections are refused"
    );
    // Alive, but no longer ready: a load balancer in front would stop sending.
    let admin = |path: &str| {
        let url = format!("http://198.18.0.1:15020{path}");
        lab.http("n1", "GET", &url).unwrap().status
    };
    assert_eq!(admin("/healthz"), 200);
    assert_eq!(admin("/ready"), 503);

    // The connection that was open goes on to the end, byte-exact.
    std::fs::write(&go, "").unwrap();
    let out = open.wait_output().unwrap();
    assert!(out.status.success(), "{}", out.stdout);
    assert_eq!(out.field("echoed"), bytes.to_string());
    let node_name = agent.node_name.clone();
    assert!(agent.wait().unwrap().success());
    assert!(!pin_dir(&node_name).exists());
}

#[test]
fn connections_still_open_after_the_grace_period_are_closed() {
    let (lab, _backend) = echo_lab();
    let agent = lab.start_agent("n1", &["--grace-period", "1"]).unwrap();
    let (open, _never_released) = paused_client(&lab, 1000);

    agent.terminate().unwrap();
    agent.wait_for_log("grace period over").unwrap();
    let log = agent.log();
    assert!(agent.wait().unwrap().success(), "{log}");
    // The client's connection was closed under it: it never saw its bytes back.
    let out = open.wait_output().unwrap();
    assert!(!out.status.success(), "{}", out.stdout);
}

#[test]
fn load_and_unload_attach_and_detach() {
    let lab = Lab::new(LabSpec::client_and_echo()).unwrap();
    let node_name = lab.agent_node_name("n1");
    let cgroup = format!(
        "/{}",
        lab.cgroup_root().file_name().unwrap().to_string_lossy()
    );
    let out = lab
        .agent_command(
            "n1",
            &["load", "--node", &node_name, "--cgroup", &cgroup],
            |_| {},
        )
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let pins = pin_dir(&node_name);
    for pin in ["prog_mesh_connect4", "link_mesh_sockops"] {
        assert!(pins.join(pin).exists(), "{pin} is pinned");
    }
    // The shortcut is attached where the kernel lets its queue be bounded, and only there.
    assert_eq!(
        pins.join("prog_mesh_redirect").exists(),
        shortcut_possible()
    );
    assert_eq!(pins::find(&pins, "SOCKETS").len(), 1, "SOCKETS is pinned");
    let out = lab
        .agent_command("n1", &["unload", "--node", &node_name], |_| {})
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(!pins.exists());
    let out = lab
        .agent_command("n1", &["unload", "--node", &node_name], |_| {})
        .unwrap();
    // Unloading a clean node leaves it clean (an uninstall may run on any node).
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("nothing is pinned"), "{}", out.stderr);
    assert!(Path::new(&lab.cgroup_root()).exists());
}

#[test]
fn the_data_path_runs_on_as_many_worker_threads_as_told() {
    let (lab, _backend) = echo_lab();
    let agent = lab.start_agent("n1", &["--worker-threads", "3"]).unwrap();
    let workers: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .filter(|name| name.starts_with("mesh-worker-"))
        .collect();
    assert_eq!(workers.len(), 3, "{workers:?}");
    lab.run("client", &["echo", "--connect", VIP, "--bytes", "10000"])
        .unwrap();
    assert_eq!(captured(&agent.node_name), 1);
}
