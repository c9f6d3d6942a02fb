//! Builds: the eBPF object (Debian's rustc, `-Z build-std=core`) and the host crates.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::shell::{self, Step};

/// Where the eBPF object lands; the agent's build script embeds it from here.
pub fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
}

/// Builds the eBPF programs into [`ebpf_object`].
pub fn ebpf(root: &Path) -> Result<()> {
    let step = Step::start("build-ebpf: mesh-ebpf for bpfel-unknown-none");
    shell::run(
        Command::new("cargo")
            .current_dir(root.join("mesh-ebpf"))
            // Debian's rustc ships the core source that build-std needs (see TOOLCHAIN).
            .env("RUSTC", "/usr/bin/rustc")
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["build", "--release", "-Z", "build-std=core"])
            .args(["--target", "bpfel-unknown-none", "--target-dir"])
            .arg(root.join("target/ebpf")),
    )?;
    eprintln!("    object: {}", ebpf_object(root).display());
    step.done();
    Ok(())
}

/// `cargo` for the host crates, run in `dir`, pointed at the eBPF object the agent embeds.
pub fn host_cargo(root: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir)
        .env("MESH_EBPF_OBJECT", ebpf_object(root));
    cmd
}

/// Builds the eBPF object, then the agent (which embeds it).
pub fn agent(root: &Path, release: bool) -> Result<()> {
    ebpf(root)?;
    let step = Step::start(format!(
        "build: mesh-agent ({})",
        if release { "release" } else { "debug" }
    ));
    let mut cmd = host_cargo(root, root);
    cmd.args(["build", "--package", "mesh-agent"]);
    if release {
        cmd.arg("--release");
    }
    shell::run(&mut cmd)?;
    step.done();
    Ok(())
}

/// The agent binary that [`agent`] builds.
pub fn agent_binary(root: &Path, release: bool) -> PathBuf {
    root.join("target")
        .join(if release { "release" } else { "debug" })
        .join("mesh-agent")
}

/// Builds the agent and the lab programs (`mesh-lab`, `mesh-bench`, `mesh-testpod`); returns
/// the directory they are in.
pub fn lab(root: &Path, release: bool) -> Result<PathBuf> {
    agent(root, release)?;
    let profile = if release { "release" } else { "debug" };
    let step = Step::start(format!(
        "build: the lab (mesh-lab, mesh-bench, mesh-testpod; {profile})"
    ));
    let mut cmd = host_cargo(root, root);
    cmd.args(["build", "--package", "mesh-tests", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    shell::run(&mut cmd)?;
    step.done();
    Ok(root.join("target").join(profile))
}
