//! End-to-end: upgrades that refuse nothing. A new agent takes the listeners over from the
//! running one, which drains; a stock client (curl) opening connections all along and a long
//! transfer started before see no failure.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_agent::datapath::{pin_dir, pins};
use mesh_tests::{
    Agent, Lab, LabSpec, Running, ServiceSpec,
    curl::{CurlLoop, failures},
};

/// The HTTP service (the backend's `serve --http`, on 8080).
const WEB: &str = "198.19.0.10";
/// The echo service (the backend's `serve --listen`, on 9).
const BULK: &str = "198.19.0.11:80";
/// New connections curl opens, one per request, at `RATE` a second.
const REQUESTS: usize = 1200;
const RATE: u32 = 80;

fn lab() -> Lab {
    let mut bulk = ServiceSpec::echo("bulk", &["198.19.0.11"], &["backend"]);
    bulk.target_port = 9;
    Lab::new(LabSpec::client_and_echo_across_nodes().service(bulk)).unwrap()
}

/// A 4 MiB echo through the bulk service that sends half, then waits for the returned file.
fn paused_transfer(lab: &Lab) -> (Running, PathBuf, u64) {
    let bytes = 4u64 << 20;
    let release = lab.scratch_path("release");
    let client = lab
        .spawn(
            "client",
            &[
                "echo",
                "--connect",
                BULK,
                "--bytes",
                &bytes.to_string(),
                "--pause-until",
                release.to_str().unwrap(),
            ],
        )
        .unwrap();
    (client, release, bytes)
}

/// Starts a new agent on `node` beside `old` with `args`, waits until the old one has handed
/// over, and returns the new one.
fn upgrade(lab: &Lab, node: &str, old: &Agent, args: &[&str]) -> Agent {
    let new = lab.start_agent(node, args).unwrap();
    assert!(
        new.log()
            .contains("took the listeners over from the running agent"),
        "{}",
        new.log()
    );
    old.wait_for_log("handed over to the new agent").unwrap();
    new
}

/// Upgrades both nodes' agents to ones started with `new_args` while curl opens connections
/// through them and a transfer opened before waits; checks that no request failed and the
/// transfer finished byte-exact, and hands back the lab and the new agents.
fn upgrade_under_load(new_args: &[&str]) -> (Lab, [Agent; 2]) {
    let lab = lab();
    let backend = lab.serve_http("backend", &[]).unwrap();
    let grace = ["--grace-period", "60"];
    let old1 = lab.start_agent("n1", &grace).unwrap();
    let old2 = lab.start_agent("n2", &grace).unwrap();
    let (transfer, release, bytes) = paused_transfer(&lab);
    let requests =
        CurlLoop::start(&lab, "client", &format!("http://{WEB}"), REQUESTS, RATE).unwrap();

    // Both ends upgraded while curl connects: the calling node (its outbound listener) and
    // the called one (its tunnel listener; the calling agent's tunnels to the old one are
    // told to go away).
    let args: Vec<&str> = grace.iter().chain(new_args).copied().collect();
    std::thread::sleep(Duration::from_secs(2));
    let new1 = upgrade(&lab, "n1", &old1, &args);
    std::thread::sleep(Duration::from_secs(2));
    let new2 = upgrade(&lab, "n2", &old2, &args);

    // The transfer opened before goes on through the old agents, which drain, to the end.
    std::fs::write(&release, "").unwrap();
    let out = transfer.wait_output().unwrap();
    assert!(out.status.success(), "{}", out.stdout);
    assert_eq!(out.field("echoed"), bytes.to_string());
    for old in [old1, old2] {
        let log = old.log();
        assert!(old.wait().unwrap().success(), "{log}");
        assert!(!log.contains("grace period over"), "{log}");
    }

    let outcomes = requests.outcomes().unwrap();
    let failed = failures(&outcomes);
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());

    // The new agents serve on their own.
    let url = format!("http://{WEB}/");
    let args = ["-s", "-o", "/dev/null", "-w", "%{http_code}", &url];
    let out = lab.run_program("client", "curl", &args).unwrap();
    assert_eq!(out.stdout, "200");
    drop(backend);
    (lab, [new1, new2])
}

#[test]
fn an_upgrade_refuses_no_connection_and_finishes_open_transfers() {
    let (_lab, new) = upgrade_under_load(&[]);
    // Same layout: the new agents took the very maps over.
    for agent in &new {
        let pins = pin_dir(&agent.node_name);
        for map in ["ENROLLED", "SOCKETS", "AGENT_ENDS", "CAPTURED_BY_CLIENT"] {
            assert_eq!(pins::find(&pins, map).len(), 1, "{map}");
        }
    }
}

#[test]
fn an_upgrade_to_another_map_layout_refuses_nothing_and_retires_the_old_maps() {
    // Other sizes are other layouts: the new agents make new maps beside the old ones.
    let resized = [
        "--map-capacity",
        "ENROLLED=8192",
        "--map-capacity",
        "CAPTURED_BY_CLIENT=32768",
        "--map-capacity",
        "SOCKETS=65536",
        "--map-capacity",
        "AGENT_ENDS=65536",
    ];
    let (_lab, new) = upgrade_under_load(&resized);
    for agent in &new {
        let pins = pin_dir(&agent.node_name);
        assert!(
            agent.log().contains("unpinned a map of an earlier layout"),
            "{}",
            agent.log()
        );
        // The old state maps go at once; the old socket maps once their sockets have closed.
        let started = Instant::now();
        while ["SOCKETS", "AGENT_ENDS", "ENROLLED"]
            .iter()
            .any(|map| pins::find(&pins, map).len() > 1)
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "old maps still pinned: {:?}",
                std::fs::read_dir(&pins)
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_new_agent_that_fails_after_taking_over_leaves_the_old_one_serving() {
    let lab = lab();
    let _backend = lab.serve_http("backend", &[]).unwrap();
    let old = lab.start_agent("n1", &[]).unwrap();
    let _n2 = lab.start_agent("n2", &[]).unwrap();
    let requests = CurlLoop::start(&lab, "client", &format!("http://{WEB}"), 300, 100).unwrap();

    // A new version that cannot make its maps (a capacity no kernel grants) fails after it has
    // taken the listeners over, before it is ready.
    std::thread::sleep(Duration::from_secs(1));
    let out = lab
        .agent_command(
            "n1",
            &[
                "run",
                "--config",
                lab.agent_config_path("n1").to_str().unwrap(),
                "--cgroup",
                &lab.agent_cgroup("n1"),
                "--map-capacity",
                "SOCKETS=4294967295",
            ],
            |_| {},
        )
        .unwrap();
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("took the listeners over"), "{said}");
    assert!(
        said.contains("SOCKETS"),
        "it failed for another reason: {said}"
    );
    // The old agent serves on, ready again; curl saw nothing of it.
    old.wait_for_log("a handover to a new agent failed; serving on")
        .unwrap();
    let ready = lab
        .http("n1", "GET", "http://198.18.0.1:15020/ready")
        .unwrap();
    assert_eq!(ready.status, 200);
    let outcomes = requests.outcomes().unwrap();
    let failed = failures(&outcomes);
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(!old.log().contains("handed over to the new agent"));
}
