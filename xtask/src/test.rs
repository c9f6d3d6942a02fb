//! `cargo xtask test`: everything CI runs, from a fresh machine.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{
    compile, setup,
    shell::{self, Step},
};

pub fn run(root: &Path, extra: &[String]) -> Result<()> {
    if !shell::is_root() {
        bail!(
            "the end-to-end tests load eBPF programs and make network namespaces: \
             run as root (sudo -E cargo xtask test)"
        );
    }
    setup::run()?;
    compile::agent(root, false)?;
    lint(root)?;

    let step = Step::start("test: unit and end-to-end tests");
    shell::run(
        Command::new("cargo")
            .current_dir(root)
            .env("MESH_EBPF_OBJECT", compile::ebpf_object(root))
            .env("MESH_AGENT_BIN", compile::agent_binary(root, false))
            .args(["test", "--workspace", "--"])
            .args(extra),
    )?;
    step.done();
    Ok(())
}

/// `cargo fmt --check` on every crate and `cargo clippy -D warnings` on the host crates.
fn lint(root: &Path) -> Result<()> {
    let step = Step::start("lint: rustfmt and clippy");
    shell::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["fmt", "--all", "--check"]),
    )?;
    shell::run(
        Command::new("cargo")
            .current_dir(root.join("mesh-ebpf"))
            .args(["fmt", "--check"]),
    )?;
    shell::run(
        Command::new("cargo")
            .current_dir(root)
            .env("MESH_EBPF_OBJECT", compile::ebpf_object(root))
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
    )?;
    step.done();
    Ok(())
}
