//! Watches the cluster — Namespaces, Nodes, this node's Pods, Services,
//! EndpointSlices, the Gateway API's HTTPRoutes and GRPCRoutes and the mesh's TrafficPolicies
//! and AuthorizationPolicies (if the cluster has their CRDs) — and sends the config they make whenever it changes.
//!
//! Each kind has a kube-rs watcher (with client-go's backoff) feeding a reflector store. A
//! watch that fails (the API server unreachable, a dropped connection, a 410 Gone that calls
//! for a relist) is logged and retried by the watcher; meanwhile the last config sent stays
//! in force. Nothing is sent until every kind has been listed once.

use std::{collections::HashSet, fmt::Debug, path::PathBuf, sync::Arc, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher::{self, Event, watcher},
    },
};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{
    authorization::AuthorizationPolicy,
    cgroups::pod_cgroup,
    egress::ExternalHost,
    gateway::{GRPCRoute, HTTPRoute},
    model::{Cluster, LastGoods},
    policy::TrafficPolicy,
};
use crate::{
    config::{Name, Settings},
    discovery::Snapshots,
    observability::metrics::Metrics,
    state::reload,
};

/// How long a change waits for more before the config is built again: a burst of events
/// (an initial list, a rollout) makes one build.
const SETTLE: Duration = Duration::from_millis(100);
/// How soon the config is built again while a pod's cgroup is not there yet: at first, and
/// at most (doubling in between).
const CGROUP_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// What the agent reads from the API, as RBAC names it: (API group, resource). It does
/// [`VERBS`] on each and nothing else (`deploy/rbac.yaml` grants exactly that).
pub const RESOURCES: [(&str, &str); 10] = [
    resource::<Namespace>(),
    resource::<Node>(),
    resource::<Pod>(),
    resource::<Service>(),
    resource::<EndpointSlice>(),
    resource::<HTTPRoute>(),
    resource::<GRPCRoute>(),
    resource::<TrafficPolicy>(),
    resource::<AuthorizationPolicy>(),
    resource::<ExternalHost>(),
];
/// The API verbs of a watch.
pub const VERBS: [&str; 2] = ["list", "watch"];

const fn resource<K: k8s_openapi::Resource>() -> (&'static str, &'static str) {
    (K::GROUP, K::URL_PATH_SEGMENT)
}

/// What the agent watches the cluster for.
pub struct ClusterWatch {
    pub client: Client,
    /// This node's name (from the downward API).
    pub node: Name,
    pub settings: Settings,
    /// The cgroup v2 mount.
    pub cgroup_mount: PathBuf,
    /// The kubelet's `--cgroup-root`, relative to the mount: its pods' cgroups are below.
    pub kubelet_cgroup_root: String,
    pub metrics: Arc<Metrics>,
}

/// One item of a kind's watch: listed in full (`true`) or changed, or how the watch failed.
type Seen = Result<(&'static str, bool), (&'static str, watcher::Error)>;

impl ClusterWatch {
    /// Sends each new valid config until the task is dropped.
    pub async fn run(self, configs: Snapshots) {
        let client = &self.client;
        // All of them: enrolled ones, and mesh-system's labels, which speak for the mesh.
        let (namespaces, namespace_events) =
            watched::<Namespace>(Api::all(client.clone()), Default::default());
        let (nodes, node_events) = watched::<Node>(Api::all(client.clone()), Default::default());
        let (pods, pod_events) = watched::<Pod>(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node)),
        );
        let (services, service_events) =
            watched::<Service>(Api::all(client.clone()), Default::default());
        let (endpoint_slices, slice_events) =
            watched::<EndpointSlice>(Api::all(client.clone()), Default::default());
        let (http_routes, http_route_events) =
            watched::<HTTPRoute>(Api::all(client.clone()), Default::default());
        let (grpc_routes, grpc_route_events) =
            watched::<GRPCRoute>(Api::all(client.clone()), Default::default());
        let (traffic_policies, policy_events) =
            watched::<TrafficPolicy>(Api::all(client.clone()), Default::default());
        let (authorization_policies, authorization_events) =
            watched::<AuthorizationPolicy>(Api::all(client.clone()), Default::default());
        let (external_hosts, external_host_events) =
            watched::<ExternalHost>(Api::all(client.clone()), Default::default());
        let last_good = LastGoods::default();
        let mut events = futures::stream::select_all([
            namespace_events,
            node_events,
            pod_events,
            service_events,
            slice_events,
            http_route_events,
            grpc_route_events,
            policy_events,
            authorization_events,
            external_host_events,
        ]);

        let mut listed = HashSet::new();
        let mut build_at: Option<Instant> = None;
        let mut cgroup_retry = CGROUP_RETRY.0;
        loop {
            let ready = listed.len() == RESOURCES.len();
            tokio::select! {
                seen = events.next() => match seen {
                    Some(Ok((kind, complete))) => {
                        if complete && listed.insert(kind) {
                            debug!(kind, "listed");
                        }
                        let soon = Instant::now() + SETTLE;
                        build_at = Some(build_at.map_or(soon, |at| at.min(soon)));
                    }
                    Some(Err((kind, e))) => warn!(
                        kind,
                        "watch failed, retrying with backoff (the running config stays): {e}"
                    ),
                    None => return,
                },
                () = tokio::time::sleep_until(build_at.unwrap_or_else(Instant::now)),
                    if ready && build_at.is_some() =>
                {
                    let cluster = Cluster {
                        namespaces: namespaces.state(),
                        nodes: nodes.state(),
                        pods: pods.state(),
                        services: services.state(),
                        endpoint_slices: endpoint_slices.state(),
                        http_routes: http_routes.state(),
                        grpc_routes: grpc_routes.state(),
                        traffic_policies: traffic_policies.state(),
                        authorization_policies: authorization_policies.state(),
                        external_hosts: external_hosts.state(),
                        last_good: last_good.clone(),
                    };
                    if self.build(&cluster, &configs) {
                        build_at = Some(Instant::now() + cgroup_retry);
                        cgroup_retry = (cgroup_retry * 2).min(CGROUP_RETRY.1);
                    } else {
                        build_at = None;
                        cgroup_retry = CGROUP_RETRY.0;
                    }
                }
            }
        }
    }

    /// Builds the config and sends it if valid and new; says whether a pod waits for its
    /// cgroup (worth building again even without a change).
    fn build(&self, cluster: &Cluster, configs: &Snapshots) -> bool {
        let cgroup_of = |uid: &str| pod_cgroup(&self.cgroup_mount, &self.kubelet_cgroup_root, uid);
        let Some(discovered) = cluster.config(&self.node, &self.settings, cgroup_of) else {
            warn!(node = %self.node, "this node is not among the cluster's Nodes yet");
            return false;
        };
        for why in &discovered.skipped {
            debug!("left out: {why}");
        }
        for why in &discovered.refused {
            warn!("authorization policy refused: {why}");
        }
        let config = discovered.config;
        match config.check() {
            Ok(()) => {
                let (workloads, services) = (config.workloads.len(), config.services.len());
                let sent = configs.send_if_modified(|running| {
                    let new = running.as_deref() != Some(&config);
                    if new {
                        *running = Some(Arc::new(config));
                    }
                    new
                });
                if sent {
                    info!(
                        workloads,
                        services,
                        left_out = discovered.skipped.len(),
                        "cluster state changed"
                    );
                }
            }
            Err(e) => reload::rejected(
                &self.metrics,
                &format_args!("the cluster's state makes an invalid config: {e}"),
            ),
        }
        discovered.cgroups_pending
    }
}

/// A reflector store of `K`, and its watch's items. The stored objects lose their managed
/// fields and annotations, which the agent never reads and which can be most of their size.
fn watched<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxStream<'static, Seen>)
where
    K: Resource<DynamicType = ()> + k8s_openapi::Resource,
    K: Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = K::URL_PATH_SEGMENT;
    let (store, writer) = reflector::store();
    let items = watcher(api, config)
        .default_backoff()
        .modify(|object: &mut K| {
            object.managed_fields_mut().clear();
            object.annotations_mut().clear();
        })
        .reflect(writer)
        .map(move |item| match item {
            Ok(Event::InitDone) => Ok((kind, true)),
            Ok(_) => Ok((kind, false)),
            // A kind the cluster does not serve (the Gateway API's CRDs not installed) has no
            // objects: listed, and looked for again with the watcher's backoff.
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.is_not_found() =>
            {
                Ok((kind, true))
            }
            Err(e) => Err((kind, e)),
        })
        .boxed();
    (store, items)
}
