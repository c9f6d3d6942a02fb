use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use mesh_agent::{
    agent::{self, RunOptions},
    config::Name,
    datapath::{self, Datapath},
    identity::FileCa,
    system,
};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// Node agent of the eBPF-accelerated service mesh.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `info,mesh_agent::outbound=debug`. The eBPF programs log at the most verbose level named.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// `text` (readable) or `json` (one object per line), for the log and the access log.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the programs, fill the maps from the config and proxy captured traffic.
    Run {
        /// The agent's YAML configuration; with --kubernetes-node, only `trust_domain` and
        /// `identity` (the cluster gives the rest).
        #[arg(long)]
        config: PathBuf,
        /// Take the mesh's state from the Kubernetes API as the node of this name (from the
        /// downward API's spec.nodeName).
        #[arg(long, value_name = "NODE")]
        kubernetes_node: Option<Name>,
        /// cgroup v2 subtree whose connects are captured, relative to the cgroup v2 mount.
        #[arg(long, default_value = "/")]
        cgroup: String,
        /// Leave the programs attached and the maps pinned on exit (for a restart or upgrade).
        #[arg(long)]
        keep_pins: bool,
        /// Seconds open connections may go on after SIGTERM before they are closed.
        #[arg(long, default_value_t = 10)]
        grace_period: u64,
        /// Leave the sk_msg shortcut off: same-node traffic goes through TCP/IP (to measure
        /// what the shortcut saves).
        #[arg(long)]
        no_sk_msg: bool,
    },
    /// Attach the programs to a cgroup and pin them under /sys/fs/bpf/mesh/<node>, then exit.
    Load {
        #[arg(long)]
        node: String,
        /// cgroup v2 subtree to attach to, relative to the cgroup v2 mount.
        #[arg(long, default_value = "/")]
        cgroup: String,
    },
    /// Detach and unpin everything pinned under /sys/fs/bpf/mesh/<node>.
    Unload {
        #[arg(long)]
        node: String,
    },
    /// Make a new CA for the file-based identity source: DIR/ca.crt and DIR/ca.key.
    CreateCa {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let filter = EnvFilter::try_new(&cli.log_level)
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", cli.log_level))?;
    let ebpf_log_level = ebpf_level(filter.max_level_hint());
    let (filter, log_filter) = reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let subscriber = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Text => subscriber
            .with(lines.with_ansi(std::io::stderr().is_terminal()))
            .init(),
        LogFormat::Json => subscriber.with(lines.json()).init(),
    }

    match cli.command {
        Command::Run {
            config,
            kubernetes_node,
            cgroup,
            keep_pins,
            grace_period,
            no_sk_msg,
        } => tokio::runtime::Runtime::new()?.block_on(agent::run(RunOptions {
            config,
            kubernetes: kubernetes_node,
            cgroup,
            keep_pins,
            grace_period: Duration::from_secs(grace_period),
            ebpf_log_level,
            sk_msg: !no_sk_msg,
            log_filter,
        })),
        Command::Load { node, cgroup } => {
            system::require_root()?;
            system::require_bpffs()?;
            let dir = system::cgroup_dir(&system::cgroup2_mount()?, &cgroup)?;
            Datapath::load(&node, &dir, ebpf_log_level, true)?;
            Ok(())
        }
        Command::Unload { node } => {
            system::require_root()?;
            datapath::unpin(&datapath::pin_dir(&node))
        }
        Command::CreateCa { dir, trust_domain } => {
            let files = FileCa::create(&dir, &trust_domain)?;
            println!("{}\n{}", files.cert.display(), files.key.display());
            Ok(())
        }
    }
}

fn ebpf_level(max: Option<LevelFilter>) -> aya_log::Level {
    use aya_log::Level;
    match max.unwrap_or(LevelFilter::TRACE) {
        LevelFilter::TRACE => Level::Trace,
        LevelFilter::DEBUG => Level::Debug,
        LevelFilter::INFO => Level::Info,
        LevelFilter::WARN => Level::Warn,
        _ => Level::Error,
    }
}
