//! End-to-end: the agent follows its configuration file — new services and workloads are
//! meshed, removed workloads are not any more, and an invalid change changes nothing.

use mesh_tests::{Lab, LabSpec, ServiceSpec};

const ECHO: &str = "198.19.0.10:80";
const MORE: &str = "198.19.0.20:80";

/// `client` is enrolled from the start; `late` is a pod the agent does not know yet.
fn initial() -> LabSpec {
    LabSpec::client_and_echo().pod("n1", "late", false)
}

/// `late` enrolled, and a second service.
fn grown() -> LabSpec {
    let mut spec = initial().service(ServiceSpec::echo("more", &["198.19.0.20"], &["backend"]));
    for pod in &mut spec.pods {
        pod.enrolled |= pod.name == "late";
    }
    spec
}

/// Whether an echo through `target` from `pod` works (the service addresses exist only as
/// capture targets: a connect the mesh does not capture goes nowhere).
fn meshed(lab: &Lab, pod: &str, target: &str) -> bool {
    lab.run(pod, &["echo", "--connect", target, "--bytes", "1000"])
        .is_ok()
}

#[test]
fn reload_adds_and_removes_and_an_invalid_change_changes_nothing() {
    let lab = Lab::new(initial()).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let file = lab.agent_config_path("n1");
    assert!(meshed(&lab, "client", ECHO));
    assert!(!meshed(&lab, "client", MORE), "no such service yet");
    assert!(!meshed(&lab, "late", ECHO), "not enrolled yet");

    std::fs::write(&file, lab.agent_config_for(&grown(), "n1").unwrap()).unwrap();
    agent.wait_for_log_times("config reloaded", 1).unwrap();
    assert!(meshed(&lab, "client", MORE), "the new service is meshed");
    assert!(meshed(&lab, "late", ECHO), "the new workload is enrolled");

    let invalid = lab
        .agent_config("n1")
        .unwrap()
        .replace("port: 80,", "port: 80000,");
    std::fs::write(&file, invalid).unwrap();
    agent
        .wait_for_log_times("config change rejected", 1)
        .unwrap();
    assert!(
        agent.log().contains("services[0].ports[0].port"),
        "the rejection says where"
    );
    assert!(meshed(&lab, "client", MORE), "the running config stays");
    assert!(meshed(&lab, "late", ECHO), "the running config stays");

    std::fs::write(&file, lab.agent_config("n1").unwrap()).unwrap();
    agent.wait_for_log_times("config reloaded", 2).unwrap();
    assert!(!meshed(&lab, "late", ECHO), "un-enrolled again");
    assert!(!meshed(&lab, "client", MORE), "the service is gone");
    assert!(meshed(&lab, "client", ECHO));
}

/// The agent's peak resident memory so far (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn hostile_config_files_are_refused_cheaply_and_never_echoed() {
    let lab = Lab::new(LabSpec::client_and_echo()).unwrap();
    let agent = lab.start_agent("n1", &[]).unwrap();
    let _backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    let file = lab.agent_config_path("n1");
    assert!(meshed(&lab, "client", ECHO));
    let peak_before = peak_rss_kib(agent.pid());

    // 200 KB nested 100,000 deep (serde_yaml alone needs 30 s to refuse it).
    std::fs::write(&file, format!("node: {}", "[".repeat(200_000))).unwrap();
    agent
        .wait_for_log_times("config change rejected", 1)
        .unwrap();
    // 50 MB of one string, every byte of which an error would quote.
    let huge = format!("node: \"{}\"\n", "x".repeat(50 << 20));
    std::fs::write(&file, &huge).unwrap();
    agent
        .wait_for_log_times("config change rejected", 2)
        .unwrap();
    assert!(meshed(&lab, "client", ECHO), "the running config stays");

    let log = agent.log();
    let rejections: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("config change rejected"))
        .collect();
    // Refused where the nesting goes too deep, by the quick pass before deserializing.
    let deep = rejections[0];
    assert!(deep.contains(".yaml:1:"), "{deep}");
    assert!(
        ["nested more than 16 deep", "recursion limit exceeded"]
            .iter()
            .any(|why| deep.contains(why)),
        "{deep}"
    );
    assert!(
        rejections[1].contains("bytes, more than the 16777216 a config may have"),
        "{}",
        rejections[1]
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");
    // The 50 MB file was never read into memory.
    let grown = peak_rss_kib(agent.pid()) - peak_before;
    assert!(grown < 16 << 10, "peak memory grew by {grown} KiB");
    drop(huge);
}
