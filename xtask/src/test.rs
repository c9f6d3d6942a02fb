//! `cargo xtask test`: everything CI runs, from a fresh machine.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    compile, fuzz, image, kernel, setup,
    shell::{self, Step, Watchdog},
};

pub fn run(root: &Path, extra: &[String]) -> Result<()> {
    shell::require_root("test")?;
    setup::run()?;
    compile::agent(root, false)?;
    lint(root)?;

    let step = Step::start("test: unit and end-to-end tests");
    let mut cmd = compile::host_cargo(root, root);
    cmd.env("MESH_AGENT_BIN", compile::agent_binary(root, false))
        .args(["test", "--workspace", "--all-targets", "--"])
        .args(extra);
    let mut totals = run_counting(&mut cmd)?;
    step.done();
    if extra.is_empty() && totals.failed == 0 {
        fuzz::run(root, FUZZ_SECONDS, None)?;
        quick_bench(root)?;
        image::run(root, image::DEFAULT_NAME)?;
        image::verify(root)?;
        let (version, targets) = GUEST;
        totals.merge(kernel::test(root, version, targets, &[])?);
    }
    totals.close()
}

/// `cargo xtask test --kernel VERSION`: the capture and data-path tests in a guest booting
/// that kernel.
pub fn run_on_kernel(root: &Path, version: &str, extra: &[String]) -> Result<()> {
    shell::require_root("test")?;
    setup::run()?;
    kernel::test(root, version, kernel::TEST_TARGETS, extra)?.close()
}

/// The guest CI boots: the oldest kernel users run, with the tests whose outcome depends most
/// on the kernel (capture, the data path's backpressure, aborts, the lifecycle on pinned maps);
/// `--kernel` runs the cross-node ones there too. About 6 minutes under emulation.
const GUEST: (&str, &[&str]) = ("5.10", &["capture", "backpressure", "aborts", "lifecycle"]);

/// How long CI runs each fuzzer: a check that they build and run, not a hunt.
const FUZZ_SECONDS: u64 = 10;

/// `cargo xtask bench --quick` with the debug builds the tests used: the benchmark still
/// runs end to end (it asserts nothing about speed).
fn quick_bench(root: &Path) -> Result<()> {
    let step = Step::start("bench --quick: the benchmark runs");
    let dir = root.join("target/debug");
    shell::run(
        Command::new(dir.join("mesh-bench"))
            .env("MESH_AGENT_BIN", compile::agent_binary(root, false))
            .arg("--quick")
            .arg("--report")
            .arg(root.join("target/bench/quick.json")),
    )?;
    step.done();
    Ok(())
}

/// The tests' outcomes, added up from libtest's `test result:` lines.
#[derive(Default)]
pub struct Totals {
    passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
    /// Adds `line` in if it is a `test result:` line.
    pub fn add(&mut self, line: &str) {
        if let Some(result) = line.strip_prefix("test result: ") {
            let count = |what: &str| {
                result
                    .split([';', '.'])
                    .find_map(|part| part.trim().strip_suffix(what)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            self.passed += count(" passed");
            self.failed += count(" failed");
            self.ignored += count(" ignored");
        }
    }

    /// Adds another run's outcomes in.
    pub fn merge(&mut self, other: Totals) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }

    /// Prints the closing line, in the form CI reads, and fails if a test failed.
    fn close(&self) -> Result<()> {
        println!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        );
        if self.failed > 0 {
            bail!("{} tests failed", self.failed);
        }
        Ok(())
    }
}

/// How long the whole of `cargo test` may take before it is killed: a hung test must fail
/// the run, not hold CI until its own limit.
const TEST_LIMIT: Duration = Duration::from_secs(45 * 60);

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn run_counting(cmd: &mut Command) -> Result<Totals> {
    eprintln!("    $ {}", shell::describe(cmd));
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let watchdog = Watchdog::start("cargo test", TEST_LIMIT, child.id());
    let stdout = child.stdout.take().context("no stdout from cargo test")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    watchdog.stop();
    if !status.success() && totals.failed == 0 {
        bail!("cargo test failed ({status}) before any test failed: see its output above");
    }
    Ok(totals)
}

/// `cargo fmt --check` and `cargo clippy -D warnings` on every crate.
fn lint(root: &Path) -> Result<()> {
    let step = Step::start("lint: rustfmt and clippy");
    let ebpf = root.join("mesh-ebpf");
    let cargo = |dir: &Path, args: &[&str]| {
        let mut cmd = compile::host_cargo(root, dir);
        cmd.args(args);
        cmd
    };
    shell::run(&mut cargo(root, &["fmt", "--all", "--check"]))?;
    shell::run(&mut cargo(&ebpf, &["fmt", "--check"]))?;
    shell::run(&mut cargo(&root.join("fuzz"), &["fmt", "--check"]))?;
    let deny = ["--", "-D", "warnings"];
    shell::run(cargo(root, &["clippy", "--workspace", "--all-targets"]).args(deny))?;
    // The eBPF crate is linted for the host target: clippy cannot drive Debian's compiler,
    // and its lints do not depend on the target.
    shell::run(
        cargo(&ebpf, &["clippy", "--target-dir"])
            .arg(root.join("target/ebpf-clippy"))
            .args(deny),
    )?;
    step.done();
    Ok(())
}
