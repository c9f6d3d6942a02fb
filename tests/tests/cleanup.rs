//! End-to-end: a lab leaves nothing behind — no namespace, cgroup, pin or process — whether
//! its test passes or fails.

use std::panic::{AssertUnwindSafe, catch_unwind};

use mesh_tests::{Footprint, Lab, LabSpec, alive};

/// Builds a lab with a running agent, a server and traffic, then hands it to `end`.
fn busy_lab(end: impl FnOnce(Lab, &[u32])) -> (Footprint, Vec<u32>) {
    let lab = Lab::new(LabSpec::client_and_echo()).unwrap();
    // --keep-pins: the pins must go even when the agent would leave them.
    let agent = lab.start_agent("n1", &["--keep-pins"]).unwrap();
    let backend = lab
        .spawn("backend", &["serve", "--listen", "[::]:8080"])
        .unwrap();
    lab.run(
        "client",
        &["echo", "--connect", "198.19.0.10:80", "--bytes", "1000"],
    )
    .unwrap();
    let footprint = lab.footprint();
    assert!(
        footprint.remains().len() >= footprint.netns.len(),
        "the lab exists"
    );
    let pids = vec![agent.pid(), backend.pid()];
    // The handles go with the lab, as they would when a test ends.
    std::mem::forget(agent);
    std::mem::forget(backend);
    end(lab, &pids);
    (footprint, pids)
}

fn assert_gone(footprint: &Footprint, pids: &[u32]) {
    assert_eq!(footprint.remains(), Vec::<String>::new());
    for pid in pids {
        assert!(!alive(*pid), "process {pid} was stopped");
    }
}

#[test]
fn a_finished_lab_leaves_nothing() {
    let (footprint, pids) = busy_lab(|lab, _| drop(lab));
    assert_gone(&footprint, &pids);
}

#[test]
fn a_failed_test_leaves_nothing() {
    let mut seen = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        busy_lab(|lab, pids| {
            seen = Some((lab.footprint(), pids.to_vec()));
            panic!("a test failing with its lab up");
        })
    }));
    assert!(outcome.is_err());
    let (footprint, pids) = seen.unwrap();
    assert_gone(&footprint, &pids);
}
