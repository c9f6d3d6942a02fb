//! Follows the configuration file: every valid change is applied to the eBPF maps and the
//! routes without a restart; an invalid one is logged and the running configuration stays.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    balance::EndpointStates,
    certificates::Certificates,
    config::Config,
    datapath::StateMaps,
    metrics::{ResultLabels, metrics},
    routing::Routes,
    system,
};

/// How often the file is looked at. Polling (rather than inotify) also follows a Kubernetes
/// ConfigMap, whose files are swapped through symlinks.
const POLL: Duration = Duration::from_millis(500);

/// What the agent runs with and keeps in step with its configuration file.
pub struct Running {
    pub file: PathBuf,
    pub state: StateMaps,
    /// Where the workloads' cgroup paths start.
    pub cgroup_mount: PathBuf,
    /// The routes, and the config they were built from (the running one).
    pub routes: watch::Sender<Arc<Routes>>,
    /// Endpoint load and health, kept across reloads.
    pub states: Arc<EndpointStates>,
    pub certificates: Arc<Certificates>,
}

impl Running {
    /// Applies every change of the file until the task is dropped.
    pub async fn follow(mut self) {
        let mut seen = stamp(&self.file);
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let now = stamp(&self.file);
            if now != seen {
                seen = now;
                self.reload();
            }
        }
    }

    fn reload(&mut self) {
        let started = std::time::Instant::now();
        let new = match Config::load(&self.file) {
            Ok(new) => new,
            Err(e) => {
                counted("rejected");
                warn!("config change rejected, the running config stays: {e}");
                return;
            }
        };
        // The running config is the one the current routes were built from.
        let routes = self.routes.borrow().clone();
        let running = routes.config();
        if new == *running {
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
            counted("rejected");
            warn!(
                "config change rejected, the running config stays: {what} cannot change while \
                 the agent runs; restart the agent"
            );
            return;
        }
        let routes = Routes::new(&new, &self.states);
        if let Err(e) = self.certificates.hold(&routes.identities()) {
            counted("rejected");
            warn!("config change rejected, the running config stays: {e:#}");
            return;
        }
        if let Err(e) = self.state.sync(&new, &self.cgroup_mount) {
            warn!("config change only partly applied to the eBPF maps: {e:#}");
        }
        self.routes.send_replace(Arc::new(routes));
        counted("applied");
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
        drop(new);
        system::release_freed_memory();
    }
}

fn counted(result: &'static str) {
    metrics()
        .config_reloads
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// What changes when the file does: modification time, size, inode.
fn stamp(file: &Path) -> Option<(SystemTime, u64, u64)> {
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}
