//! `mesh-agent run`: the agent's life from start to a clean exit.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use aya_log::EbpfLogger;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use prometheus_client::registry::Registry;

use crate::{
    ca::client::CaClient,
    config::{Config, Name, Settings},
    datapath::{
        Datapath, Loaded,
        maps::{OrigDstTable, workload_cgroups},
        pins::Capacities,
    },
    discovery::{Snapshot, dns::Resolving, file, kubernetes::watch::ClusterWatch},
    handover::{self, Ending, Listeners},
    identity::{
        CaFiles, CertificateAuthority, FileCa, bundle::TrustBundle, certificates::Certificates,
    },
    observability::{
        admin::{Admin, LogFilter},
        metrics::{self, Metrics},
        traces::Tracer,
    },
    proxy::{
        balance::EndpointStates,
        dial::LocalDialer,
        http::{serve::HttpProxy, serving::HttpServing, upstream::Upstreams},
        inbound::Inbound,
        liveness::Liveness,
        open::{self, OpenConnections},
        outbound::Outbound,
        rate_limit::global::GlobalLimiter,
        tunnel::Tunnels,
    },
    state::{
        reload::{self, Mirror},
        routes::Routes,
    },
    system,
    workers::{self, Workers},
};

/// How many of the connections a shutdown cuts are named in its log, oldest first.
const MAX_NAMED_AT_SHUTDOWN: usize = 10;

/// What `mesh-agent run` was told.
pub struct RunOptions {
    /// The config file, followed for changes; with `kubernetes`, only the settings the
    /// cluster does not give (trust domain and identity).
    pub config: PathBuf,
    /// Take the mesh's state from the Kubernetes API.
    pub kubernetes: Option<Kubernetes>,
    /// cgroup v2 subtree to attach to, relative to the cgroup v2 mount.
    pub cgroup: String,
    /// Leave programs attached and maps pinned on exit.
    pub keep_pins: bool,
    /// How long connections may go on after SIGTERM before they are closed.
    pub grace_period: Duration,
    /// How tunnel connections find out that their peer is gone.
    pub liveness: Liveness,
    /// Most verbose level of the eBPF programs' own log.
    pub ebpf_log_level: aya_log::Level,
    /// Attach the sk_msg shortcut (off only to measure what it saves).
    pub sk_msg: bool,
    /// Changes the log filter (the admin API's `/logging`).
    pub log_filter: LogFilter,
    /// Where the listeners are taken over from and offered to the next agent (by default
    /// `/run/mesh/<node>.sock`).
    pub handover_socket: Option<PathBuf>,
    /// Maps made with another number of entries than the programs'.
    pub map_capacities: Capacities,
    /// Data-path threads.
    pub worker_threads: usize,
}

/// Where the agent is in the cluster.
pub struct Kubernetes {
    /// This node's name (from the downward API).
    pub node: Name,
    /// The kubelet's `--cgroup-root`, relative to the cgroup v2 mount.
    pub kubelet_cgroup_root: String,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> Result<()> {
    system::require_root()?;
    system::raise_fd_limit();
    // Handled from here on: a SIGTERM during start-up still ends in a clean exit.
    let mut signals = Signals::new()?;
    system::require_bpffs()?;
    let cgroup_mount = system::cgroup2_mount()?;
    let cgroup = system::cgroup_dir(&cgroup_mount, &opts.cgroup)?;
    let mut registry = Registry::with_prefix("mesh");
    let metrics = Arc::new(Metrics::new(&mut registry));
    // The first config, and the task that sends its changes.
    let (config, (source, updates)) = match &opts.kubernetes {
        None => {
            let config = Arc::new(Config::load(&opts.config)?);
            let (configs, updates) = watch::channel(None);
            let following = tokio::spawn(file::follow_file(
                opts.config.clone(),
                configs,
                metrics.clone(),
            ));
            (config, (following, updates))
        }
        Some(kubernetes) => {
            let (watching, mut updates) =
                watch_cluster(&opts.config, kubernetes, &cgroup_mount, &metrics).await?;
            let Some(config) = first_config(&mut updates, &mut signals).await else {
                return Ok(());
            };
            (config, (watching, updates))
        }
    };
    let node = config.node.name.as_str();
    let handover_socket = opts
        .handover_socket
        .clone()
        .unwrap_or_else(|| handover::default_socket(node));
    let (listeners, takeover) = Listeners::take_over_or_listen(&handover_socket)?;
    let offer = listeners.offer()?;
    let (ca, bundle) = identity_source(&config, &opts.config)?;
    tokio::spawn(bundle.clone().follow(metrics.clone()));
    let certificates = Arc::new(Certificates::new(
        ca,
        bundle,
        config.settings.trust_domain.as_str(),
        config.settings.identity.certificate_ttl.0,
        metrics.clone(),
    ));
    let states = Arc::new(EndpointStates::default());
    let open = Arc::new(OpenConnections::default());
    let cgroups = workload_cgroups(&config, &cgroup_mount);
    let routes = Routes::new(config.clone(), &states, &cgroups);
    // Nothing is captured before the first certificates are here.
    let identities = routes.identities();
    certificates.hold(&identities);
    info!("waiting for the first certificates");
    tokio::select! {
        () = certificates.issued(&identities) => {}
        () = signals.wait() => return Ok(()),
    }
    let server_tls = certificates.server_config().await?;

    let Loaded {
        mut datapath,
        logger,
        mut state,
        orig_dst,
        refused,
        counters,
    } = Datapath::load(node, opts.ebpf_log_level, opts.sk_msg, &opts.map_capacities)?;
    tokio::spawn(drain_ebpf_log(logger));
    // The maps hold the state before any program reads them: new maps (a changed layout)
    // start full, so no connect passes uncaptured meanwhile.
    state.sync(&config, &cgroups)?;
    datapath.attach(&cgroup)?;
    tokio::spawn(datapath.retire_replaced_maps());
    metrics::register_ebpf_counters(&mut registry, counters);
    let registry = Arc::new(registry);
    let ready = Arc::new(AtomicBool::new(false));

    let served = async {
        let (routes, routes_rx) = watch::channel(Arc::new(routes));
        let running = reload::Running {
            state,
            cgroup_mount,
            routes,
            states: states.clone(),
            certificates: certificates.clone(),
            metrics: metrics.clone(),
        };
        // External hosts' addresses join each snapshot on its way to being applied.
        let (resolved, updates_resolved) = watch::channel(None);
        let resolving = Resolving::new(&config.settings.dns_servers);
        tokio::spawn(resolving.follow(config.clone(), updates, resolved));
        let applying = tokio::spawn(running.follow(updates_resolved));
        let admin_stop = CancellationToken::new();
        let admin = tokio::spawn(
            Admin {
                registry,
                metrics: metrics.clone(),
                open: open.clone(),
                ready: ready.clone(),
                routes: routes_rx.clone(),
                states,
                certificates: certificates.clone(),
                log_filter: opts.log_filter.clone(),
            }
            .serve(listeners.admin, admin_stop.clone()),
        );
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let rate_limit_service = match &config.settings.rate_limit_service {
            Some(service) => Some(Arc::new(GlobalLimiter::new(service, metrics.clone())?)),
            None => None,
        };
        let tracer = match &config.settings.tracing {
            Some(tracing) => Some(Tracer::start(tracing, node, metrics.clone())?),
            None => None,
        };
        // Each worker thread's: tunnel and upstream pools of its own.
        let outbound = || {
            let tunnels = Arc::new(Tunnels::new(
                certificates.clone(),
                opts.liveness,
                metrics.clone(),
            ));
            Outbound {
                routes: routes_rx.clone(),
                tunnels: tunnels.clone(),
                http: Arc::new(HttpProxy {
                    routes: routes_rx.clone(),
                    upstreams: Arc::new(Upstreams::new(
                        routes_rx.clone(),
                        tunnels,
                        LocalDialer::default(),
                    )),
                    metrics: metrics.clone(),
                    tracer: tracer.clone(),
                    rate_limit_service: rate_limit_service.clone(),
                }),
                local: LocalDialer::default(),
                metrics: metrics.clone(),
                open: open.clone(),
                tracker: tracker.clone(),
                stop: stop.clone(),
                abort: abort.clone(),
            }
        };
        let inbound = Inbound {
            tls: server_tls,
            http: Arc::new(HttpServing {
                metrics: metrics.clone(),
                routes: routes_rx.clone(),
                tracer: tracer.clone(),
                rate_limit_service: rate_limit_service.clone(),
            }),
            routes: routes_rx.clone(),
            tracker: tracker.clone(),
            stop: stop.clone(),
            abort: abort.clone(),
            refused: Arc::default(),
            liveness: opts.liveness,
            admission: Arc::default(),
            local: LocalDialer::default(),
            metrics: metrics.clone(),
            open: open.clone(),
        };
        tokio::spawn(open::cut_denied_on_change(
            open.clone(),
            inbound.routes.clone(),
            inbound.metrics.clone(),
        ));
        tokio::spawn(refused.follow(
            inbound.routes.clone(),
            inbound.metrics.clone(),
            stop.clone(),
        ));
        let mut workers = proxies(
            [listeners.outbound, listeners.tunnel],
            outbound,
            &inbound,
            &Arc::new(Mutex::new(orig_dst)),
            opts.worker_threads,
        )?;
        system::release_freed_memory();
        ready.store(true, Ordering::Relaxed);
        if let Some(takeover) = takeover {
            takeover.ready();
        }
        info!(node, config = %opts.config.display(), "mesh agent ready");

        let ending = tokio::select! {
            () = signals.wait() => Ending::Signal,
            () = offer.serve(&handover_socket, &ready) => Ending::HandedOver,
        };
        ready.store(false, Ordering::Relaxed);
        source.abort();
        applying.abort();
        stop.cancel();
        if ending == Ending::HandedOver {
            // The listeners are the new agent's: so are the scrapes and probes.
            admin_stop.cancel();
            info!("handed over to the new agent: no longer accepting, draining");
        } else {
            handover::withdraw(&handover_socket);
        }
        workers.stopped_accepting().await;
        tracker.close();
        if !tracker.is_empty() {
            info!(
                connections = tracker.len(),
                grace_period = ?opts.grace_period,
                "no longer accepting; waiting for open connections"
            );
        }
        if tokio::time::timeout(opts.grace_period, tracker.wait())
            .await
            .is_err()
        {
            let remaining = open.list();
            warn!(
                connections = remaining.len(),
                "grace period over: closing the remaining connections"
            );
            for c in remaining.iter().take(MAX_NAMED_AT_SHUTDOWN) {
                warn!(
                    direction = c.direction,
                    source = %c.source,
                    source_identity = c.source_identity,
                    destination = %c.destination,
                    destination_service = c.destination_service,
                    opened_unix = c.opened_unix,
                    "closing a connection still open"
                );
            }
            abort.cancel();
            tracker.wait().await;
        }
        admin_stop.cancel();
        workers.end();
        admin.await.context("the admin listener failed")?;
        anyhow::Ok(ending)
    }
    .await;

    if served.as_ref().is_ok_and(|e| *e == Ending::HandedOver) {
        info!(pins = %datapath.pin_dir().display(), "the programs and maps are the new agent's");
    } else if opts.keep_pins {
        info!(pins = %datapath.pin_dir().display(), "keeping the programs attached and pinned");
    } else {
        datapath.unpin()?;
    }
    served.map(|_| ())
}

/// What each worker thread is given: its copies of the outbound and tunnel listening
/// sockets, what serves them, and the captured-connect table.
type PerThread = (
    (OwnedFd, OwnedFd),
    Outbound,
    Inbound,
    Arc<Mutex<OrigDstTable>>,
);

/// Starts `threads` worker threads that accept on the outbound and tunnel listeners and
/// proxy what they accept, each with an `outbound()` of its own (its tunnel
/// and upstream pools), so that a connection's tasks all run on its thread.
fn proxies(
    [outbound_listener, tunnel_listener]: [tokio::net::TcpListener; 2],
    outbound: impl Fn() -> Outbound,
    inbound: &Inbound,
    captures: &Arc<Mutex<OrigDstTable>>,
    threads: usize,
) -> Result<Workers> {
    // Out of this runtime: only the workers wake when a connection comes.
    let (outbound_listener, tunnel_listener) =
        (outbound_listener.into_std()?, tunnel_listener.into_std()?);
    let mut per_thread = Vec::new();
    for _ in 0..threads {
        let sockets = (
            outbound_listener.as_fd().try_clone_to_owned()?,
            tunnel_listener.as_fd().try_clone_to_owned()?,
        );
        per_thread.push((sockets, outbound(), inbound.clone(), captures.clone()));
    }
    let serve: workers::Serve<PerThread> =
        Arc::new(|((outbound_fd, tunnel_fd), outbound, inbound, captures)| {
            Box::pin(async move {
                let listen = |fd: OwnedFd| {
                    let listener = std::net::TcpListener::from(fd);
                    tokio::net::TcpListener::from_std(listener)
                };
                match (listen(outbound_fd), listen(tunnel_fd)) {
                    (Ok(outbound_listener), Ok(tunnel_listener)) => {
                        tokio::join!(
                            outbound.serve(outbound_listener, captures),
                            inbound.serve(tunnel_listener)
                        );
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        error!("a worker thread cannot accept: {e}");
                    }
                }
            })
        });
    Workers::start(per_thread, serve).context("cannot start the worker threads")
}

/// Starts watching the cluster with the settings in `file`: the watch task, and the configs
/// it sends.
async fn watch_cluster(
    file: &Path,
    kubernetes: &Kubernetes,
    cgroup_mount: &Path,
    metrics: &Arc<Metrics>,
) -> Result<(JoinHandle<()>, watch::Receiver<Option<Snapshot>>)> {
    let settings = Settings::load(file)?;
    let client = kube::Client::try_default().await.context(
        "cannot set up the Kubernetes API client: run in a pod with a service account, or \
         point KUBECONFIG at a kubeconfig",
    )?;
    let (configs, updates) = watch::channel(None);
    let watching = tokio::spawn(
        ClusterWatch {
            client,
            node: kubernetes.node.clone(),
            settings,
            cgroup_mount: cgroup_mount.to_owned(),
            kubelet_cgroup_root: kubernetes.kubelet_cgroup_root.clone(),
            metrics: metrics.clone(),
        }
        .run(configs),
    );
    Ok((watching, updates))
}

/// The first config the cluster makes (marked seen in `updates`), or `None` if a signal
/// comes first.
async fn first_config(
    updates: &mut watch::Receiver<Option<Snapshot>>,
    signals: &mut Signals,
) -> Option<Snapshot> {
    info!("waiting for the cluster's state");
    tokio::select! {
        first = updates.wait_for(Option::is_some) => first.ok().and_then(|c| c.clone()),
        () = signals.wait() => None,
    }
}

/// The CA and the trust bundle `config` names (the bundle is the CA certificate if it names
/// none); relative paths start at the config file's directory.
fn identity_source(
    config: &Config,
    config_file: &Path,
) -> Result<(Arc<dyn CertificateAuthority>, Arc<TrustBundle>)> {
    let base = config_file.parent().unwrap_or(Path::new("."));
    let identity = &config.settings.identity;
    let bundle = identity
        .trust_bundle
        .as_ref()
        .or(identity.ca_cert.as_ref())
        .context("the config names no trust bundle")?;
    let bundle = TrustBundle::load(base.join(bundle)).context("cannot load the trust bundle")?;
    let ca: Arc<dyn CertificateAuthority> =
        match (&identity.ca_service, &identity.ca_cert, &identity.ca_key) {
            (Some(service), _, _) => Arc::new(CaClient::new(
                &service.address,
                base.join(&service.token),
                bundle.clone(),
                config.settings.trust_domain.as_str(),
            )?),
            (None, Some(cert), Some(key)) => Arc::new(
                FileCa::load(CaFiles {
                    cert: base.join(cert),
                    key: base.join(key),
                })
                .context("cannot load the CA named under identity in the config")?,
            ),
            _ => anyhow::bail!("the config names neither the CA's files nor a CA service"),
        };
    Ok((ca, bundle))
}

/// SIGTERM and SIGINT, caught.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    /// Waits for either.
    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM: shutting down"),
            _ = self.int.recv() => info!("SIGINT: shutting down"),
        }
    }
}

/// Forwards the eBPF programs' aya-log records to `tracing` as they come.
async fn drain_ebpf_log(logger: EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same until the
    // logger (owned by the AsyncFd) is dropped.
    let mut fd = match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot watch the eBPF log: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                warn!("cannot read the eBPF log: {e}");
                return;
            }
        }
    }
}
