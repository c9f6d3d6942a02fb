//! `cargo xtask setup`: installs what building and testing need, and nothing that is there.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::shell::{self, Step, human};

/// Debian packages: Debian's rustc with its source (builds the eBPF crate with
/// `-Z build-std=core`), LLVM 22 (bpf-linker links against it), iproute2 (the tests' and the
/// lab's network namespaces), tshark (the tests' wire captures between nodes), prometheus
/// (the tests run their own, inside a lab namespace), haproxy (the benchmark's peer), skopeo
/// (CI reads the agent's container image back with it), iperf3, ab, h2load and curl (stock
/// clients the tests drive the mesh and probe the agent with), dnsmasq (the DNS server of the
/// egress tests' third parties) and openssl (their TLS server).
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "iproute2",
    "tshark",
    "prometheus",
    "haproxy",
    "skopeo",
    "iperf3",
    "apache2-utils",
    "nghttp2-client",
    "curl",
    "dnsmasq-base",
    "openssl",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What booting other kernels needs (`cargo xtask test --kernel`): qemu (TCG), a static
/// busybox for the guest's init, xz for 6.12's compressed modules.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "xz-utils"];

/// Installs what builds and tests need.
pub fn run() -> Result<()> {
    ensure("setup: checking the toolchain", APT_PACKAGES, true)
}

/// Installs what `cargo xtask test --kernel` needs besides [`run`]'s.
pub fn vm() -> Result<()> {
    ensure("setup: checking qemu and busybox", VM_PACKAGES, false)
}

fn ensure(what: &str, packages: &[&str], with_linker: bool) -> Result<()> {
    let step = Step::start(what);
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| !deb_installed(pkg))
        .collect();
    let linker_missing = with_linker && !bpf_linker_installed();
    if missing.is_empty() && !linker_missing {
        eprintln!("    everything is present");
        step.done();
        return Ok(());
    }
    if !shell::is_root() {
        bail!(
            "setup must install {}: run it as root (sudo -E cargo xtask setup)",
            describe_missing(&missing, linker_missing)
        );
    }
    if !missing.is_empty() {
        let started = Instant::now();
        eprintln!("    installing Debian packages: {}", missing.join(" "));
        shell::run(Command::new("apt-get").args(["update", "-q"]))?;
        shell::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )?;
        eprintln!(
            "    Debian packages installed in {}",
            human(started.elapsed())
        );
    }
    if linker_missing {
        let started = Instant::now();
        eprintln!("    installing bpf-linker {BPF_LINKER_VERSION} (a minute or two on 2 cores)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        shell::run(
            Command::new("cargo")
                .env("PATH", path)
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
                .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
        )?;
        eprintln!("    bpf-linker installed in {}", human(started.elapsed()));
    }
    step.done();
    Ok(())
}

fn describe_missing(packages: &[&str], linker: bool) -> String {
    let mut what: Vec<String> = packages
        .iter()
        .map(|p| format!("the package {p}"))
        .collect();
    if linker {
        what.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    what.join(", ")
}

fn deb_installed(package: &str) -> bool {
    shell::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status == "install ok installed")
}

fn bpf_linker_installed() -> bool {
    shell::output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}
