//! `mesh-lab`, run by `cargo xtask lab`: the demo. A node and a small shop of pods in network
//! namespaces, the real agent and eBPF programs, a burst of traffic, and what the mesh did.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use mesh_agent::datapath::Counters;
use mesh_common::Counter;
use mesh_tests::{Lab, LabSpec, ServiceSpec};

/// The shop's services, all behind one node: name, address and backend pod.
const SERVICES: [(&str, &str); 3] = [
    ("cart", "198.19.0.10"),
    ("orders", "198.19.0.11"),
    ("catalog", "198.19.0.12"),
];
const CONNECTIONS_PER_SERVICE: usize = 20;
const BYTES_PER_CONNECTION: u64 = 256 * 1024;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a step's start, and its end with how long it took.
fn step<T>(name: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let out = work()?;
    eprintln!(
        "==> {name}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn run() -> Result<()> {
    catch_interrupt();
    let (lab, agent, servers) = step(
        "lab: node n1 with pods web (meshed), cart, orders, catalog",
        || {
            let mut spec = LabSpec::default().node("n1").pod("n1", "web", true);
            for (name, vip) in SERVICES {
                spec =
                    spec.pod("n1", name, false)
                        .service(ServiceSpec::echo(name, &[vip], &[name]));
            }
            let lab = Lab::new(spec).context("cannot build the lab")?;
            let agent = lab.start_agent("n1", &[])?;
            eprintln!(
                "    agent of n1 is up (pid {}), its programs attached to {}",
                agent.pid(),
                lab.cgroup_root().join("n1").display()
            );
            let servers = SERVICES
                .iter()
                .map(|(name, _)| lab.spawn(name, &["serve", "--listen", "[::]:8080"]))
                .collect::<Result<Vec<_>>>()?;
            Ok((lab, agent, servers))
        },
    )?;

    let before = counters(&agent.node_name)?;
    let title = format!(
        "traffic: web calls each service {CONNECTIONS_PER_SERVICE} times, {} KiB each way",
        BYTES_PER_CONNECTION / 1024
    );
    let rows = step(&title, || {
        let mut rows = Vec::new();
        for (name, vip) in SERVICES {
            let target = format!("{vip}:80");
            let mut route = String::new();
            for _ in 0..CONNECTIONS_PER_SERVICE {
                let bytes = BYTES_PER_CONNECTION.to_string();
                let out = lab.run("web", &["echo", "--connect", &target, "--bytes", &bytes]);
                // Ctrl-C reaches the agent and the pods too: stop, whatever they answered.
                if INTERRUPTED.load(Ordering::Relaxed) {
                    bail!("interrupted; the lab is removed");
                }
                let out = out?;
                let backend: SocketAddr = out.field("banner_local").parse()?;
                let dialer: SocketAddr = out.field("banner_peer").parse()?;
                route = format!(
                    "{} (dialled by the agent from {})",
                    backend.ip().to_canonical(),
                    dialer.ip().to_canonical()
                );
            }
            rows.push((name, target, route));
        }
        Ok(rows)
    })?;
    let after = counters(&agent.node_name)?;

    println!();
    println!(
        "What went where (node n1; same-node hops are plain TCP, mTLS between nodes is next):"
    );
    let mib_per_service =
        (CONNECTIONS_PER_SERVICE as u64 * BYTES_PER_CONNECTION * 2) as f64 / f64::from(1 << 20);
    for (name, target, route) in &rows {
        println!(
            "  web -> {name:<8} {target:<16} -> {route}: {CONNECTIONS_PER_SERVICE} connections, \
             {mib_per_service:.1} MiB, all byte-exact"
        );
    }
    println!();
    println!("What the eBPF programs counted:");
    let delta = |c: Counter| after[c as usize] - before[c as usize];
    let redirected_mib = delta(Counter::BytesRedirected) as f64 / f64::from(1 << 20);
    let redirected = format!(
        "{redirected_mib:.1} MiB in {} messages",
        delta(Counter::MsgRedirected)
    );
    for (what, value) in [
        (
            "connects captured (cgroup/connect4)",
            delta(Counter::ConnectsCaptured).to_string(),
        ),
        (
            "original destinations handed to the agent",
            delta(Counter::OrigDstRecorded).to_string(),
        ),
        ("moved socket to socket by sk_msg", redirected),
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

    let status = step(
        "lab: stopping the agent, removing namespaces, cgroups and pins",
        || {
            drop(servers);
            agent.terminate()?;
            let status = agent.wait()?;
            drop(lab);
            Ok(status)
        },
    )?;
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
