//! End-to-end: a proxied connection cut by a failure looks cut to both apps — they get a
//! reset, never the clean end that makes a partial transfer look complete.

use std::time::Duration;

use mesh_tests::{Lab, LabSpec, says_reset};

const SOURCE_PORT: u16 = 9000;
const SINK_PORT: u16 = 9002;

/// An enrolled `client` on n1 and a `server` on n2 (echo, source and sink); both
/// agents, returned in node order.
fn start() -> (Lab, Vec<mesh_tests::Agent>, mesh_tests::Running) {
    let lab = Lab::new(
        LabSpec::default()
            .node("n1")
            .node("n2")
            .pod("n1", "client", true)
            .pod("n2", "server", false),
    )
    .unwrap();
    let agents = ["n1", "n2"]
        .iter()
        .map(|n| lab.start_agent(n, &[]).unwrap())
        .collect();
    let server = lab
        .spawn(
            "server",
            &[
                "serve",
                "--listen",
                "[::]:8080",
                "--source",
                &format!("[::]:{SOURCE_PORT}"),
                "--sink",
                &format!("[::]:{SINK_PORT}"),
            ],
        )
        .unwrap();
    (lab, agents, server)
}

fn server_addr(lab: &Lab, port: u16) -> String {
    format!("{}:{port}", lab.pod_addrs("server").unwrap().0)
}

#[test]
fn the_far_agent_killed_during_a_download_resets_the_client() {
    let (lab, mut agents, _server) = start();
    let download = lab
        .spawn(
            "client",
            &[
                "download",
                "--connect",
                &server_addr(&lab, SOURCE_PORT),
                "--bytes",
                &(64u64 << 30).to_string(),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agents.pop().unwrap().kill().unwrap();
    let out = download.wait_output().unwrap();
    let log = lab.pod_log("client");
    assert!(!out.status.success(), "the download completed?");
    assert!(says_reset(&log), "the client did not see a reset: {log}");
}

#[test]
fn the_far_agent_killed_during_an_upload_resets_the_client() {
    let (lab, mut agents, _server) = start();
    let upload = lab
        .spawn(
            "client",
            &[
                "echo",
                "--connect",
                &server_addr(&lab, 8080),
                "--bytes",
                &(64u64 << 30).to_string(),
                // Only to have it say `ready` once connected: it is killed long before.
                "--pause-until",
                lab.scratch_path("never").to_str().unwrap(),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agents.pop().unwrap().kill().unwrap();
    let out = upload.wait_output().unwrap();
    let log = lab.pod_log("client");
    assert!(!out.status.success(), "the upload completed?");
    assert!(says_reset(&log), "the client did not see a reset: {log}");
}

#[test]
fn the_calling_agent_killed_during_an_upload_resets_the_server() {
    let (lab, mut agents, _server) = start();
    let _upload = lab
        .spawn(
            "client",
            &[
                "flood",
                "--connect",
                &server_addr(&lab, SINK_PORT),
                "--limit",
                &(64u64 << 30).to_string(),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agents.remove(0).kill().unwrap();
    // The far agent sees the tunnel end mid-stream and resets its connection to the server,
    // which would otherwise take the cut upload for a complete one.
    let mut log = String::new();
    for _ in 0..100 {
        log = lab.pod_log("server");
        if says_reset(&log) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the server did not see a reset within 10 s: {log}");
}
