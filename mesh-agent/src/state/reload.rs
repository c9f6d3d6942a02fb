//! Keeps the running state in step with the config's source: every valid change is applied
//! to the eBPF maps and the routes without a restart; an invalid one is logged and the
//! running config stays.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::Config, datapath::maps::workload_cgroups, discovery::Snapshot,
    identity::certificates::Certificates, observability::metrics::Metrics,
    proxy::balance::EndpointStates, state::routes::Routes, system,
};

/// How long a change waits for its new identities' certificates before it applies anyway.
const ISSUE_WAIT: Duration = Duration::from_secs(2);

/// Where the running state is mirrored for the kernel: the eBPF maps
/// (`datapath::maps::StateMaps`), or nowhere (the in-process tests).
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
                self.apply(new).await;
            }
        }
    }

    /// Makes `new` the running config, unless it changes what cannot change while the agent
    /// runs. New identities' certificates are waited for a moment; any still missing then
    /// come when the CA answers (their workloads' connections are refused until then).
    pub async fn apply(&mut self, new: Snapshot) {
        let started = std::time::Instant::now();
        // The running config is the one the current routes were built from.
        let current = self.routes.borrow().clone();
        let running = current.config();
        if *new == **running {
            return;
        }
        let fixed = [
            (
                new.node.name != running.node.name,
                "node.name (the pins are named after it)",
            ),
            (
                new.settings != running.settings,
                "trust_domain and identity (the settings)",
            ),
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
        let identities = routes.identities();
        self.certificates.hold(&identities);
        let issued = self.certificates.issued(&identities);
        if tokio::time::timeout(ISSUE_WAIT, issued).await.is_err() {
            let pending = self.certificates.pending();
            warn!(
                ?pending,
                "the CA has not issued every new certificate yet: applying the change, they follow when it answers"
            );
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        identity::{CertificateAuthority, SpiffeId, bundle::TrustBundle},
        testing::{self, FlakyCa, Loopback, Mesh, metrics, routes, sample, test_ca},
    };

    /// The kernel's side, as the agent last synced it: the workloads' names.
    #[derive(Default)]
    struct Synced(Arc<std::sync::Mutex<Vec<String>>>);

    impl Mirror for Synced {
        fn sync(&mut self, config: &Config, _: &[Option<u64>]) -> anyhow::Result<()> {
            *self.0.lock().unwrap() = config
                .workloads
                .iter()
                .map(|w| w.name.to_string())
                .collect();
            Ok(())
        }
    }

    struct Reload {
        running: Running<Synced>,
        synced: Arc<std::sync::Mutex<Vec<String>>>,
        routes: watch::Receiver<Arc<Routes>>,
        registry: Registry,
    }

    fn base(net: &Loopback) -> Mesh {
        Mesh::node("n1", net.node(1), &net.pod_cidr(1)).workload(
            "shop",
            "web-0",
            "web",
            net.pod(1, 9),
        )
    }

    fn reload(first: Snapshot) -> Reload {
        let ca = test_ca();
        let bundle = testing::bundle_of(&ca);
        reload_with(first, ca, bundle)
    }

    /// The agent's running state with certificates of `ca`.
    fn reload_with(
        first: Snapshot,
        ca: Arc<dyn CertificateAuthority>,
        bundle: Arc<TrustBundle>,
    ) -> Reload {
        let (registry, metrics) = metrics();
        let certificates = Arc::new(Certificates::new(
            ca,
            bundle,
            first.settings.trust_domain.as_str(),
            first.settings.identity.certificate_ttl.0,
            metrics.clone(),
        ));
        let (sender, routes_rx) = watch::channel(Arc::new(routes(first)));
        let synced = Synced::default();
        Reload {
            synced: synced.0.clone(),
            running: Running {
                state: synced,
                cgroup_mount: "/nonexistent".into(),
                routes: sender,
                states: Arc::default(),
                certificates,
                metrics,
            },
            routes: routes_rx,
            registry,
        }
    }

    const APPLIED: &str = "mesh_config_reloads_total{result=\"applied\"}";
    const REJECTED: &str = "mesh_config_reloads_total{result=\"rejected\"}";

    #[tokio::test]
    async fn a_valid_change_replaces_routes_maps_and_certificates() {
        let net = Loopback::reserve();
        let mut r = reload(base(&net).build());
        let changed = base(&net)
            .workload("shop", "cart-0", "cart", net.pod(1, 2))
            .build();
        r.running.apply(changed.clone()).await;
        assert!(Arc::ptr_eq(r.routes.borrow().config(), &changed));
        assert_eq!(*r.synced.lock().unwrap(), ["web-0", "cart-0"]);
        let cart = SpiffeId::workload("cluster.local", "shop", "cart");
        assert!(r.running.certificates.client_config(&cart).is_some());
        assert_eq!(sample(&r.registry, APPLIED), 1.0);

        // The same state again changes nothing and counts nothing.
        r.running.apply(Arc::new((*changed).clone())).await;
        assert_eq!(sample(&r.registry, APPLIED), 1.0);
        assert!(Arc::ptr_eq(r.routes.borrow().config(), &changed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_applies_while_the_ca_is_down_and_its_certificates_follow() {
        let net = Loopback::reserve();
        let ca = FlakyCa::new();
        let bundle = testing::bundle_of(&ca.current());
        let mut r = reload_with(base(&net).build(), ca.clone(), bundle);
        let web = BTreeSet::from([SpiffeId::workload("cluster.local", "shop", "web")]);
        r.running.certificates.hold(&web);
        testing::within(r.running.certificates.issued(&web)).await;
        ca.set_down(true);
        let changed = base(&net)
            .workload("shop", "cart-0", "cart", net.pod(1, 2))
            .build();
        r.running.apply(changed.clone()).await;
        assert!(Arc::ptr_eq(r.routes.borrow().config(), &changed));
        assert_eq!(sample(&r.registry, APPLIED), 1.0);
        let cart = SpiffeId::workload("cluster.local", "shop", "cart");
        assert!(r.running.certificates.client_config(&cart).is_none());
        assert_eq!(
            r.running.certificates.pending(),
            std::slice::from_ref(&cart)
        );
        ca.set_down(false);
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert!(r.running.certificates.client_config(&cart).is_some());
    }

    #[tokio::test]
    async fn a_change_of_what_is_fixed_at_start_is_rejected_and_the_running_state_stays() {
        let net = Loopback::reserve();
        let first = base(&net).build();
        let mut r = reload(first.clone());
        r.running
            .apply(
                base(&net)
                    .trust_domain("other.domain")
                    .workload("shop", "cart-0", "cart", net.pod(1, 2))
                    .build(),
            )
            .await;
        assert_eq!(sample(&r.registry, REJECTED), 1.0);
        assert_eq!(sample(&r.registry, APPLIED), 0.0);
        assert!(Arc::ptr_eq(r.routes.borrow().config(), &first));
        assert!(
            r.synced.lock().unwrap().is_empty(),
            "the maps were not touched"
        );
    }

    #[tokio::test]
    async fn the_latest_snapshot_sent_is_applied() {
        let net = Loopback::reserve();
        let r = reload(base(&net).build());
        let (snapshots, updates) = watch::channel(None);
        let mut routes = r.routes.clone();
        let following = tokio::spawn(r.running.follow(updates));
        let last = base(&net).unmeshed(net.pod(1, 30)).build();
        snapshots.send_replace(Some(base(&net).unmeshed(net.pod(1, 20)).build()));
        snapshots.send_replace(Some(last.clone()));
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            routes.wait_for(|r| Arc::ptr_eq(r.config(), &last)),
        )
        .await
        .expect("the last snapshot was not applied within 10 s")
        .unwrap();
        following.abort();
    }
}
