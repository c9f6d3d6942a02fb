//! `cargo xtask`: the project's tasks, each doing its own set-up.

mod compile;
mod fuzz;
mod hot_text;
mod image;
mod kernel;
mod setup;
mod shell;
mod test;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tasks of the mesh project", arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what builds and tests need (Debian packages, bpf-linker); nothing if present.
    Setup,
    /// Build the eBPF programs.
    BuildEbpf,
    /// Build the eBPF programs and the agent that embeds them.
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Attach the programs to a cgroup v2 subtree and pin them under /sys/fs/bpf/mesh/<node>.
    Load {
        /// Node name: the pins go under /sys/fs/bpf/mesh/<node>.
        #[arg(long)]
        node: String,
        /// cgroup v2 directory to attach to, relative to the cgroup v2 mount (or absolute).
        #[arg(long, default_value = "/")]
        cgroup: String,
    },
    /// Detach and unpin a node's programs and maps.
    Unload {
        /// Node name given to `load` or in the agent's config.
        #[arg(long)]
        node: String,
    },
    /// Build and run the agent: `cargo xtask run -- --config FILE [...]`.
    Run {
        /// Arguments of `mesh-agent run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The demo: builds everything, starts a two-node lab with an agent per node and a small
    /// shop of pods, sends traffic through the mesh (mTLS between the nodes) and prints what
    /// happened, then removes the lab. `lab up` leaves it running; `lab down` removes it.
    Lab {
        #[arg(value_enum)]
        action: Option<LabAction>,
    },
    /// The benchmark: each scenario through each path (direct TCP, the mesh on one node and
    /// across nodes) in one run, as ratios to the direct path; writes target/bench/report.json.
    Bench {
        /// A small, fast run (debug builds) that proves the benchmark works; CI runs it.
        #[arg(long)]
        quick: bool,
        /// Only the scenarios whose name contains this (`scale` for memory and config apply).
        #[arg(long)]
        only: Option<String>,
    },
    /// The agent's container image without a container engine: a static binary (the eBPF
    /// object embedded) in an OCI layout (target/image/oci) and archive
    /// (target/image/mesh-agent.oci.tar).
    Image {
        /// The image's name; its tag is the agent's version.
        #[arg(long, default_value = image::DEFAULT_NAME)]
        name: String,
    },
    /// Profile the lab demo's agents under callgrind and rewrite mesh-agent/symbol-order.txt,
    /// the functions they ran, which release links lay out together (fewer pages resident).
    HotText,
    /// The fuzzers (cargo-fuzz) of what the agent parses from outside: the YAML config,
    /// Kubernetes objects, tunnel CONNECT authorities, protocol detection, HTTP requests.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        target: Option<String>,
    },
    /// Everything CI runs: set-up, build, format and lint checks, unit and end-to-end tests.
    Test {
        /// Instead, boot this kernel (5.10, 6.1 or 6.12: Debian's, under qemu) and run the
        /// capture and data-path end-to-end tests there.
        #[arg(long)]
        kernel: Option<String>,
        /// Extra arguments for `cargo test` (a test name filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LabAction {
    /// Start the lab and leave it running for exploration.
    Up,
    /// Remove the lab `up` left running.
    Down,
}

fn main() -> Result<()> {
    let root = workspace_root()?;
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            setup::run()?;
            compile::ebpf(&root)
        }
        Task::Build { release } => {
            setup::run()?;
            compile::agent(&root, release)
        }
        Task::Load { node, cgroup } => agent(
            &root,
            ["load", "--node", &node, "--cgroup", &cgroup].map(String::from),
        ),
        Task::Unload { node } => agent(&root, ["unload", "--node", &node].map(String::from)),
        Task::Run { args } => agent(&root, std::iter::once("run".into()).chain(args)),
        Task::Lab { action } => {
            shell::require_root("lab")?;
            setup::run()?;
            let lab = compile::lab(&root, false)?.join("mesh-lab");
            let args = match action {
                None => None,
                Some(LabAction::Up) => Some("up"),
                Some(LabAction::Down) => Some("down"),
            };
            // Become the lab, so that Ctrl-C reaches it (it cleans up) and not us.
            Err(Command::new(lab).args(args).exec().into())
        }
        Task::Bench { quick, only } => {
            shell::require_root("bench")?;
            setup::run()?;
            let dir = compile::lab(&root, !quick)?;
            let report = root.join("target/bench/report.json");
            let mut bench = Command::new(dir.join("mesh-bench"));
            bench
                .env("MESH_AGENT_BIN", dir.join("mesh-agent"))
                .arg("--report")
                .arg(&report);
            if quick {
                bench.arg("--quick");
            }
            if let Some(only) = only {
                bench.arg("--only").arg(only);
            }
            // Become the benchmark, so that Ctrl-C reaches it (it cleans up) and not us.
            Err(bench.exec().into())
        }
        Task::Image { name } => {
            setup::run()?;
            image::run(&root, &name)
        }
        Task::HotText => {
            shell::require_root("hot-text")?;
            setup::run()?;
            hot_text::run(&root)
        }
        Task::Fuzz { seconds, target } => {
            setup::run()?;
            fuzz::run(&root, seconds, target.as_deref())
        }
        Task::Test { kernel: None, args } => test::run(&root, &args),
        Task::Test {
            kernel: Some(version),
            args,
        } => test::run_on_kernel(&root, &version, &args),
    }
}

/// Builds the agent and runs it with `args`.
fn agent(root: &Path, args: impl IntoIterator<Item = String>) -> Result<()> {
    setup::run()?;
    compile::agent(root, false)?;
    shell::run(Command::new(compile::agent_binary(root, false)).args(args))
}

fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")
        .context("run this through cargo: `cargo xtask <task>`")?;
    Path::new(&manifest_dir)
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
