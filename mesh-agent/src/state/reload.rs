//! Keeps the running state in step with the config's source: every valid change is applied
//! to the eBPF maps and the routes without a restart; an invalid one is logged and the
//! running config stays.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::Config, datapath::workload_cgroups, discovery::Snapshot,
    identity::certificates::Certificates, observability::metrics::Metrics,
    proxy::balance::EndpointStates, state::routes::Routes, system,
};

/// Where the running state is mirrored for the kernel: the eBPF maps
/// (`datapath::StateMaps`), or nowhere (the in-process tests).
pub trait Mirror: Send + 'static {
    /// Makes the mirror hold `config`'s workloads (their cgroup ids `cgroups`, in order).
    fn sync(&mut self, config: &Config, cgroups: &[Option<u64>]) -> anyhow::Result<()>;
}

/// What the agent runs with and keeps in step with its config.
pub struct Running<M> {
    pub state: M,
    /// Where the workloads' cgroup paths start.
    pub cgroup_mount: PathBuf,
    /// The routes, and the config they were built from (the running one).
    pub routes: watch::Sender<Arc<Routes>>,
    /// Endpoint load and health, kept across reloads.
    pub states: Arc<EndpointStates>,
    pub certificates: Arc<Certificates>,
    pub metrics: Arc<Metrics>,
}

impl<M: Mirror> Running<M> {
    /// Applies every config `updates` brings until it closes or the task is dropped.
    pub async fn follow(mut self, mut updates: watch::Receiver<Option<Snapshot>>) {
        while updates.changed().await.is_ok() {
            let new = updates.borrow_and_update().clone();
            if let Some(new) = new {
                self.apply(new);
            }
        }
    }

    /// Makes `new` the running config, unless it changes what cannot change while the agent
    /// runs or its certificates cannot be issued.
    pub fn apply(&mut self, new: Snapshot) {
        let started = std::time::Instant::now();
        // The running config is the one the current routes were built from.
        let current = self.routes.borrow().clone();
        let running = current.config();
        if *new == *running {
            return;
        }
        let fixed = [
            (
                new.node.name != running.node.name,
                "node.name (the pins are named after it)",
            ),
            (new.trust_domain != running.trust_domain, "trust_domain"),
            (new.identity != running.identity, "identity"),
        ];
        if let Some((_, what)) = fixed.iter().find(|(changed, _)| *changed) {
            rejected(
                &self.metrics,
                &format!("{what} cannot change while the agent runs; restart the agent"),
            );
            return;
        }
        let cgroups = workload_cgroups(&new, &self.cgroup_mount);
        let routes = Routes::new(new.clone(), &self.states, &cgroups);
        if let Err(e) = self.certificates.hold(&routes.identities()) {
            rejected(&self.metrics, &format!("{e:#}"));
            return;
        }
        if let Err(e) = self.state.sync(&new, &cgroups) {
            warn!("config change only partly applied to the eBPF maps: {e:#}");
        }
        self.routes.send_replace(Arc::new(routes));
        self.metrics.forget_removed(running, &new);
        self.metrics.config_reload("applied");
        drop(current);
        info!(
            workloads = new.workloads.len(),
            services = new.services.len(),
            endpoints = new
                .services
                .iter()
                .map(|s| s.endpoints.len())
                .sum::<usize>(),
            applied_in_ms = started.elapsed().as_millis() as u64,
            "config reloaded"
        );
        system::release_freed_memory();
    }
}

/// Counts and logs a config change that is not applied.
pub fn rejected(metrics: &Metrics, why: &dyn std::fmt::Display) {
    metrics.config_reload("rejected");
    warn!("config change rejected, the running config stays: {why}");
}
