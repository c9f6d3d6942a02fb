//! End-to-end: upgrades that refuse nothing. A new agent takes the listeners over from the
//! running one, which drains; a stock client (curl) opening connections all along and a long
//! transfer started before see no failure.

use std::{path::PathBuf, time::Duration};

use mesh_agent::datapath::pin_dir;
use mesh_tests::{Agent, Daemon, Lab, LabSpec, Running, ServiceSpec};

/// The HTTP service (the backend's `serve --http`, on 8080).
const WEB: &str = "198.19.0.10";
/// The echo service (the backend's `serve --listen`, on 9).
const BULK: &str = "198.19.0.11:80";
/// New connections curl opens, one per request, at `RATE` a second.
const REQUESTS: usize = 1200;
const RATE: &str = "80/s";

fn lab() -> Lab {
    let mut bulk = ServiceSpec::echo("bulk", &["198.19.0.11"], &["backend"]);
    bulk.target_port = 9;
    Lab::new(LabSpec::client_and_echo_across_nodes().service(bulk)).unwrap()
}

/// curl from `client`: `REQUESTS` GETs of the web service at `RATE`, each on a connection of
/// its own; its log (`curl-loop.log`) has a line `code=<status> exit=<curl's exit code>` per
/// request.
fn curl_loop(lab: &Lab) -> Daemon {
    let urls = format!("http://{WEB}/[1-{REQUESTS}]");
    lab.start_in_pod(
        "client",
        "curl-loop",
        "curl",
        &[
            "-s",
            "-H",
            "Connection: close",
            "--rate",
            RATE,
            "--connect-timeout",
            "3",
            "-m",
            "10",
            "-w",
            "\ncode=%{http_code} exit=%{exitcode}\n",
            &urls,
        ],
    )
    .unwrap()
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

/// Starts a new agent on `node` beside `old`, waits until the old one has handed over, and
/// returns the new one.
fn upgrade(lab: &Lab, node: &str, old: &Agent) -> Agent {
    let new = lab.start_agent(node, &["--grace-period", "60"]).unwrap();
    assert!(
        new.log()
            .contains("took the listeners over from the running agent"),
        "{}",
        new.log()
    );
    old.wait_for_log("handed over to the new agent").unwrap();
    new
}

#[test]
fn an_upgrade_refuses_no_connection_and_finishes_open_transfers() {
    let lab = lab();
    let _backend = lab.serve_http("backend", &[]).unwrap();
    let grace = ["--grace-period", "60"];
    let old1 = lab.start_agent("n1", &grace).unwrap();
    let old2 = lab.start_agent("n2", &grace).unwrap();
    let (transfer, release, bytes) = paused_transfer(&lab);
    let requests = curl_loop(&lab);

    // Both ends upgraded while curl connects: the calling node (its outbound listener) and
    // the called one (its tunnel listener; the calling agent's tunnels to the old one are
    // told to go away).
    std::thread::sleep(Duration::from_secs(2));
    let new1 = upgrade(&lab, "n1", &old1);
    std::thread::sleep(Duration::from_secs(2));
    let new2 = upgrade(&lab, "n2", &old2);

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

    let mut requests = requests;
    let status = requests.wait_within(Duration::from_secs(60)).unwrap();
    let log = std::fs::read_to_string(lab.scratch_path("curl-loop.log")).unwrap();
    let results: Vec<&str> = log.lines().filter(|l| l.starts_with("code=")).collect();
    let failed: Vec<&&str> = results
        .iter()
        .filter(|r| **r != "code=200 exit=0")
        .collect();
    assert_eq!(results.len(), REQUESTS, "{status}: {log}");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());

    // The new agents own the programs and maps, and serve.
    for (node, new) in [("n1", &new1), ("n2", &new2)] {
        assert!(pin_dir(&new.node_name).join("ENROLLED").exists(), "{node}");
    }
    let out = lab
        .run_program(
            "client",
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{WEB}/"),
            ],
        )
        .unwrap();
    assert_eq!(out.stdout, "200");
}
