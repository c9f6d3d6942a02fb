//! `cargo xtask lab`: the demo. A node and a small shop of pods in network namespaces, the
//! real agent and eBPF programs, a burst of traffic, and what the mesh did with it.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, Result, bail};
use mesh_agent::datapath::Counters;
use mesh_common::Counter;
use mesh_tests::{Lab, LabSpec, ServiceSpec};

use crate::{
    compile, setup,
    shell::{self, Step},
};

/// The shop's services, all behind one node: name, address and backend pod.
const SERVICES: [(&str, &str); 3] = [
    ("cart", "198.19.0.10"),
    ("orders", "198.19.0.11"),
    ("catalog", "198.19.0.12"),
];
const CONNECTIONS_PER_SERVICE: usize = 20;
const BYTES_PER_CONNECTION: u64 = 256 * 1024;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(root: &Path) -> Result<()> {
    if !shell::is_root() {
        bail!(
            "the lab makes network namespaces and loads eBPF programs: run as root (sudo -E cargo xtask lab)"
        );
    }
    setup::run()?;
    compile::agent(root, false)?;
    let step = Step::start("build: mesh-testpod (the demo's pods)");
    shell::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--package",
        "mesh-tests",
        "--bins",
    ]))?;
    step.done();
    catch_interrupt();

    let step = Step::start("lab: node n1 with pods web (meshed), cart, orders, catalog");
    let mut spec = LabSpec::default().node("n1").pod("n1", "web", true);
    for (name, vip) in SERVICES {
        spec = spec.pod("n1", name, false).service(ServiceSpec {
            name: name.into(),
            addresses: vec![vip.parse()?],
            port: 80,
            target_port: 8080,
            endpoints: vec![name.into()],
        });
    }
    let lab = Lab::new(spec).context("cannot build the lab")?;
    let agent = lab.start_agent("n1", &[])?;
    eprintln!(
        "    agent of n1 is up (pid {}), its programs attached to {}",
        agent.pid(),
        lab.cgroup_root().join("n1").display()
    );
    let mut servers = Vec::new();
    for (name, _) in SERVICES {
        servers.push(lab.spawn(name, &["serve", "--listen", "[::]:8080"])?);
    }
    step.done();

    let step = Step::start(format!(
        "traffic: web calls each service {CONNECTIONS_PER_SERVICE} times, {} KiB each way",
        BYTES_PER_CONNECTION / 1024
    ));
    let before = counters(&agent.node_name)?;
    let mut rows = Vec::new();
    for (name, vip) in SERVICES {
        let target = format!("{vip}:80");
        let mut ok = 0;
        let mut route = String::new();
        for _ in 0..CONNECTIONS_PER_SERVICE {
            if INTERRUPTED.load(Ordering::Relaxed) {
                bail!("interrupted; the lab is being removed");
            }
            let out = lab.run(
                "web",
                &[
                    "echo",
                    "--connect",
                    &target,
                    "--bytes",
                    &BYTES_PER_CONNECTION.to_string(),
                ],
            )?;
            ok += 1;
            let backend: SocketAddr = out.field("banner_local").parse()?;
            let dialer: SocketAddr = out.field("banner_peer").parse()?;
            route = format!(
                "{} (dialled by the agent from {})",
                backend.ip().to_canonical(),
                dialer.ip().to_canonical()
            );
        }
        rows.push((name, target, route, ok));
    }
    step.done();
    let after = counters(&agent.node_name)?;

    println!();
    println!(
        "What went where (node n1, same-node hops are plain TCP; mTLS between nodes is next):"
    );
    for (name, target, route, ok) in &rows {
        let mib = (*ok as u64 * BYTES_PER_CONNECTION * 2) as f64 / f64::from(1 << 20);
        println!(
            "  web -> {name:<8} {target:<16} -> {route}: {ok} connections, {mib:.1} MiB, all byte-exact"
        );
    }
    println!();
    println!("What the eBPF programs counted:");
    let delta = |c: Counter| after[c as usize] - before[c as usize];
    let redirected_mib = delta(Counter::BytesRedirected) as f64 / f64::from(1 << 20);
    for (what, value) in [
        (
            "connects captured (cgroup/connect4)",
            delta(Counter::ConnectsCaptured).to_string(),
        ),
        (
            "original destinations handed to the agent",
            delta(Counter::OrigDstRecorded).to_string(),
        ),
        (
            "moved socket to socket by sk_msg",
            format!(
                "{redirected_mib:.1} MiB in {} messages",
                delta(Counter::MsgRedirected)
            ),
        ),
        (
            "sends that went through TCP/IP instead",
            delta(Counter::MsgPassed).to_string(),
        ),
        (
            "connects left alone (the agent's own dials)",
            delta(Counter::ConnectsPassed).to_string(),
        ),
    ] {
        println!("  {what:<44} {value}");
    }
    println!();

    let step = Step::start("lab: stopping the agent and removing namespaces, cgroups and pins");
    drop(servers);
    agent.terminate()?;
    let status = agent.wait()?;
    drop(lab);
    step.done();
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    Ok(())
}

fn counters(node_name: &str) -> Result<Vec<u64>> {
    let counters = Counters::open_pinned(node_name)?;
    Counter::ALL.iter().map(|c| counters.get(*c)).collect()
}

/// Ctrl-C ends the traffic early; the lab is still removed on the way out.
fn catch_interrupt() {
    extern "C" fn on_interrupt(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}
