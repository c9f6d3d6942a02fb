//! The agent's command line (also read by the tests that check the DaemonSet's arguments).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Name;

/// The agent's log filter unless told otherwise: no line per HTTP request.
pub const DEFAULT_LOG_LEVEL: &str = "info,mesh_agent::access::request=off";

/// Node agent of the eBPF-accelerated service mesh.
#[derive(Parser)]
#[command(version)]
pub struct Cli {
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `info,mesh_agent::proxy=debug`. The eBPF programs log at the most verbose level named.
    /// A line per HTTP request (target `mesh_agent::access::request`) is off unless named:
    /// it costs about a third of the agent's HTTP throughput.
    #[arg(long, global = true, default_value = DEFAULT_LOG_LEVEL)]
    pub log_level: String,
    /// `text` (readable) or `json` (one object per line), for the log and the access log.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the agent is to do.
#[derive(Subcommand)]
pub enum Command {
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
        /// The kubelet's --cgroup-root (its pods' cgroups are below), relative to the cgroup
        /// v2 mount.
        #[arg(long, default_value = "/", requires = "kubernetes_node")]
        kubelet_cgroup_root: String,
        /// cgroup v2 subtree whose connects are captured, relative to the cgroup v2 mount.
        #[arg(long, default_value = "/")]
        cgroup: String,
        /// Leave the programs attached and the maps pinned on exit (for a restart or upgrade).
        #[arg(long)]
        keep_pins: bool,
        /// Seconds open connections may go on after SIGTERM before they are closed.
        #[arg(long, default_value_t = 10)]
        grace_period: u64,
        /// Seconds between HTTP/2 pings on every tunnel connection; a peer that answers none
        /// within as long again is taken for dead, and its connection and streams are closed.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        tunnel_keepalive: u64,
        /// Leave the sk_msg shortcut off: same-node traffic goes through TCP/IP (to measure
        /// what the shortcut saves).
        #[arg(long)]
        no_sk_msg: bool,
        /// The Unix socket where a new agent takes the listeners over from this one (an
        /// upgrade that refuses no connection); by default /run/mesh/<node>.sock.
        #[arg(long)]
        handover_socket: Option<PathBuf>,
        /// Make the map NAME with ENTRIES entries instead of the programs' own number (a
        /// larger node); repeatable. A changed size is a new map layout: an upgrade makes new
        /// maps beside the old ones, which serve the old connections until they are done.
        #[arg(long, value_name = "NAME=ENTRIES", value_parser = parse_capacity)]
        map_capacity: Vec<(String, u32)>,
        /// Data-path threads (each accepts and proxies its connections to their end); by
        /// default one per core the agent may use (its CPU limit, under Kubernetes).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        worker_threads: Option<u16>,
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
    /// Print the CustomResourceDefinitions of the mesh's own resources (deploy/crds.yaml).
    Crds,
    /// The cluster's CA service.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

/// What the CA service is to do.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Sign agents' certificate requests: only identities of pods on the asking agent's node
    /// (by the Kubernetes API: TokenReview, pods), and the agent's own.
    Serve {
        /// The CA certificate (PEM), followed: a rotation moves signing without a restart.
        #[arg(long)]
        ca_cert: PathBuf,
        /// The CA key (PEM), followed with the certificate.
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Where certificate requests come (HTTP/2 with TLS).
        #[arg(long, default_value = "[::]:15012")]
        listen: std::net::SocketAddr,
        /// Where /metrics, /ready and /healthz are served (plain HTTP).
        #[arg(long, default_value = "[::]:15014")]
        admin: std::net::SocketAddr,
        /// The audience agents' tokens must be minted for.
        #[arg(long, default_value = crate::ca::DEFAULT_AUDIENCE)]
        audience: String,
        /// The longest certificate lifetime signed, in seconds (at least 60, the shortest).
        #[arg(long, default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(60..))]
        max_ttl: u64,
    },
}

/// `NAME=ENTRIES`, with at least one entry.
fn parse_capacity(text: &str) -> Result<(String, u32), String> {
    let (name, entries) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=ENTRIES"))?;
    let entries: u32 = entries
        .parse()
        .map_err(|e| format!("{entries:?} is not a number of entries: {e}"))?;
    if entries == 0 {
        return Err("a map needs at least one entry".into());
    }
    Ok((name.to_owned(), entries))
}

/// The mesh's CustomResourceDefinitions, as YAML documents.
pub fn crds_yaml() -> String {
    use crate::discovery::kubernetes::{
        authorization::AuthorizationPolicy, egress::ExternalHost, policy::TrafficPolicy,
    };
    use kube::CustomResourceExt;
    // A CRD always serializes.
    let yaml = |crd| serde_yaml::to_string(&crd).unwrap_or_default();
    format!(
        "# Made by `mesh-agent crds` from the agent's types; do not edit.\n{}---\n{}---\n{}",
        yaml(TrafficPolicy::crd()),
        yaml(AuthorizationPolicy::crd()),
        yaml(ExternalHost::crd())
    )
}
