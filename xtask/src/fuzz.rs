//! `cargo xtask fuzz`: the fuzzers of `fuzz/` (cargo-fuzz, libFuzzer), each for a bounded
//! time over its checked-in corpus. New inputs go to `target/fuzz/corpus/<target>`, a
//! failing input to `target/fuzz/artifacts/<target>/`; the checked-in corpus is only read.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::{
    compile,
    shell::{self, Step, human},
};

/// The fuzz targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 5] = [
    "config",
    "kubernetes_objects",
    "connect_authority",
    "protocol_detection",
    "http_request",
];

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs each target (or only `only`) for `seconds`.
pub fn run(root: &Path, seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match only {
        None => TARGETS.to_vec(),
        Some(name) if TARGETS.contains(&name) => vec![name],
        Some(name) => bail!(
            "no fuzz target {name}; the targets are {}",
            TARGETS.join(", ")
        ),
    };
    install_cargo_fuzz()?;
    compile::ebpf(root)?;
    let step = Step::start("fuzz: building the fuzzers (debug assertions and overflow checks on)");
    shell::run(&mut cargo_fuzz(root, &["build"]))?;
    step.done();
    for target in targets {
        let step = Step::start(format!("fuzz: {target} for {seconds} s"));
        let corpus = root.join("target/fuzz/corpus").join(target);
        let artifacts = root.join("target/fuzz/artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let mut cmd = cargo_fuzz(root, &["run", target]);
        cmd.arg(&corpus)
            .arg(root.join("fuzz/corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1");
        if let Err(e) = shell::run(&mut cmd) {
            bail!(
                "{e:#}\nthe fuzzer {target} found an input that fails: it is in {} \
                 (replay it with `cargo fuzz run --dev -s none {target} FILE` in the repository)",
                artifacts.display()
            );
        }
        step.done();
    }
    Ok(())
}

/// `cargo fuzz <args>` with the build settings every run uses: a debug build (overflow checks
/// and debug assertions catch more than speed finds) without a sanitizer (the agent's code is
/// safe Rust but for a few system calls), on the stable toolchain.
fn cargo_fuzz(root: &Path, args: &[&str]) -> Command {
    let mut cmd = compile::host_cargo(root, root);
    // cargo-fuzz passes -Z flags; the stable compiler takes them with RUSTC_BOOTSTRAP.
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz")
        .arg(args[0])
        .args(["--dev", "--sanitizer", "none", "--target-dir"])
        .arg(root.join("target/fuzz/build"))
        .args(&args[1..]);
    cmd
}

fn install_cargo_fuzz() -> Result<()> {
    let installed = shell::output(Command::new("cargo").args(["fuzz", "--version"]))
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION));
    if installed {
        return Ok(());
    }
    let step = Step::start(format!(
        "fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute or two on 2 cores)"
    ));
    let started = Instant::now();
    shell::run(Command::new("cargo").args([
        "install",
        "--locked",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
    ]))?;
    eprintln!("    cargo-fuzz installed in {}", human(started.elapsed()));
    step.done();
    Ok(())
}
