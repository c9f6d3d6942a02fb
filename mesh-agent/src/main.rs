use std::{io::IsTerminal, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::Parser;
use mesh_agent::{
    app::{self, Kubernetes, RunOptions},
    ca::server::{self, CaOptions},
    cli::{CaCommand, Cli, Command, LogFormat},
    datapath::{self, Datapath, pins::Capacities},
    identity::{CaFiles, FileCa},
    proxy::liveness::Liveness,
    system, workers,
};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

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
            kubelet_cgroup_root,
            cgroup,
            keep_pins,
            grace_period,
            tunnel_keepalive,
            no_sk_msg,
            handover_socket,
            map_capacity,
            worker_threads,
        } => control_plane_runtime()?.block_on(app::run(RunOptions {
            config,
            kubernetes: kubernetes_node.map(|node| Kubernetes {
                node,
                kubelet_cgroup_root,
            }),
            cgroup,
            keep_pins,
            grace_period: Duration::from_secs(grace_period),
            liveness: Liveness::every(Duration::from_secs(tunnel_keepalive)),
            ebpf_log_level,
            sk_msg: !no_sk_msg,
            log_filter,
            handover_socket,
            map_capacities: map_capacity.into_iter().collect(),
            worker_threads: worker_threads.map_or_else(workers::per_core, usize::from),
        })),
        Command::Load { node, cgroup } => {
            system::require_root()?;
            system::require_bpffs()?;
            let dir = system::cgroup_dir(&system::cgroup2_mount()?, &cgroup)?;
            let mut loaded = Datapath::load(&node, ebpf_log_level, true, &Capacities::new())?;
            loaded.datapath.attach(&dir)
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
        Command::Crds => {
            print!("{}", mesh_agent::cli::crds_yaml());
            Ok(())
        }
        Command::Ca {
            command:
                CaCommand::Serve {
                    ca_cert,
                    ca_key,
                    trust_domain,
                    listen,
                    admin,
                    audience,
                    max_ttl,
                },
        } => tokio::runtime::Runtime::new()?.block_on(server::run(CaOptions {
            files: CaFiles {
                cert: ca_cert,
                key: ca_key,
            },
            trust_domain,
            listen,
            admin,
            audience,
            max_ttl: Duration::from_secs(max_ttl),
        })),
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

/// The agent's main runtime: the control plane (config, certificates, admin API) on one
/// thread; the data path runs on worker threads of its own (`mesh_agent::workers`).
fn control_plane_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
