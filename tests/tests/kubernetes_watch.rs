//! The cluster watch against a local API server speaking the list/watch protocol over TLS
//! with a bearer token, as in a cluster: the initial list (after a failed one), added,
//! modified and deleted objects, a 410 Gone that forces a relist, and a dropped watch
//! connection that resumes where it stopped.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_agent::{
    config::{Config, Settings, egress::OutboundPolicy},
    discovery::{Snapshot, kubernetes::watch::ClusterWatch},
    observability::metrics::Metrics,
};
use mesh_tests::ApiServer;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long a test waits for the config it expects before it fails (not a speed target:
/// the watcher's backoff after an error is 0.8 s and more).
const PATIENCE: Duration = Duration::from_secs(30);

fn fixtures(name: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mesh-agent/tests/fixtures/kubernetes")
        .join(name);
    let list: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    list["items"].as_array().unwrap().clone()
}

/// A directory the test makes and removes: a cgroup tree with a directory per pod UID, and
/// the client's kubeconfig.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let root = std::env::temp_dir().join(format!(
            "mesh-watch-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&root).unwrap();
        Self(root)
    }

    fn add_pod(&self, uid: &str) {
        std::fs::create_dir_all(self.0.join(format!("kubepods/pod{uid}"))).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An API server holding the fixtures and a cluster watch for worker-1 following it.
struct Harness {
    api: ApiServer,
    configs: watch::Receiver<Option<Snapshot>>,
    cgroups: TempDir,
    watching: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.watching.abort();
    }
}

const CART_0: &str = "1f3a5c2e-7b4d-4e8f-9a01-2b3c4d5e6f70";
const ORDERS_0: &str = "5d7e9f1a-3b4c-4d6e-9f8a-0b1c2d3e4f5a";

async fn start(failing_node_lists: usize) -> Harness {
    let cgroups = TempDir::new();
    cgroups.add_pod(CART_0);
    cgroups.add_pod(ORDERS_0);
    let objects = ["namespaces", "nodes", "pods", "services", "endpointslices"]
        .into_iter()
        .flat_map(|kind| {
            fixtures(&format!("{kind}.yaml"))
                .into_iter()
                .map(move |o| (kind, o))
        })
        .collect();
    let api = ApiServer::start(None, &cgroups.0, objects, failing_node_lists).unwrap();
    // The client as `Client::try_default` makes it from a kubeconfig.
    let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let settings: Settings =
        serde_yaml::from_str("identity: {ca_cert: ca.crt, ca_key: ca.key, certificate_ttl: 1h}")
            .unwrap();
    let (tx, configs) = watch::channel(None);
    let watching = tokio::spawn(
        ClusterWatch {
            client,
            node: "worker-1".parse().unwrap(),
            settings,
            cgroup_mount: cgroups.0.clone(),
            kubelet_cgroup_root: "/".into(),
            metrics: Arc::new(Metrics::new(&mut Registry::default())),
        }
        .run(tx),
    );
    Harness {
        api,
        configs,
        cgroups,
        watching,
    }
}

impl Harness {
    /// Waits for a config for which `wanted` holds, and returns it.
    async fn config_where(&mut self, what: &str, wanted: impl Fn(&Config) -> bool) -> Snapshot {
        let found = tokio::time::timeout(
            PATIENCE,
            self.configs.wait_for(|c| c.as_deref().is_some_and(&wanted)),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|config| config.clone());
        if let Some(config) = found {
            return config;
        }
        panic!(
            "no config where {what} came; the last one: {:#?}",
            self.configs.borrow()
        )
    }
}

fn workloads(config: &Config) -> Vec<&str> {
    config.workloads.iter().map(|w| w.name.as_str()).collect()
}

fn services(config: &Config) -> Vec<&str> {
    config.services.iter().map(|s| s.name.as_str()).collect()
}

fn endpoints(config: &Config, service: &str) -> Vec<String> {
    config
        .services
        .iter()
        .find(|s| s.name.as_str() == service)
        .map(|s| s.endpoints.iter().map(|e| e.address.to_string()).collect())
        .unwrap_or_default()
}

/// A running pod of the `shop` namespace on worker-1.
fn pod(name: &str, uid: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid},
        "spec": {"nodeName": "worker-1", "serviceAccountName": "cart",
            "containers": [{"name": "cart", "image": "registry.example/shop/cart:1.4.2"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

#[tokio::test]
async fn lists_after_a_failure_then_follows_added_modified_and_deleted_objects() {
    let mut h = start(1).await;
    let first = h
        .config_where("the fixtures are listed", |c| !c.services.is_empty())
        .await;
    assert_eq!(workloads(&first), ["cart-0", "orders-0"]);
    assert_eq!(services(&first), ["cart", "catalog", "orders", "payments"]);
    assert_eq!(
        endpoints(&first, "cart"),
        ["10.244.1.5", "10.244.2.7", "fd00:10:244:1::5"]
    );
    // The failed list of nodes was retried.
    assert_eq!(h.api.lists("nodes"), 2);
    // Only this node's pods: every request says so.
    let selectors = h.api.selectors("pods");
    assert!(
        !selectors.is_empty()
            && selectors
                .iter()
                .all(|s| s == "fieldSelector=spec.nodeName=worker-1"),
        "pods: {selectors:?}"
    );

    // Added: a pod starts on this node (its cgroup is made as it starts).
    let uid = "8a0b2c4d-6e7f-4a9b-8c1d-3e5f7a9b1c2d";
    h.cgroups.add_pod(uid);
    h.api.apply("pods", pod("cart-2", uid, "10.244.1.30"));
    let added = h
        .config_where("cart-2 is a workload", |c| workloads(c).contains(&"cart-2"))
        .await;
    assert_eq!(workloads(&added), ["cart-0", "cart-2", "orders-0"]);

    // Modified: an endpoint of cart stops being ready.
    let mut slice = h.api.object("endpointslices", "shop/cart-x7k2p").unwrap();
    slice["endpoints"][1]["conditions"]["ready"] = json!(false);
    h.api.apply("endpointslices", slice);
    h.config_where("cart lost 10.244.2.7", |c| {
        endpoints(c, "cart") == ["10.244.1.5", "fd00:10:244:1::5"]
    })
    .await;

    // Deleted: the orders service goes.
    h.api.delete("services", "shop", "orders");
    let deleted = h
        .config_where("orders is gone", |c| !services(c).contains(&"orders"))
        .await;
    assert_eq!(services(&deleted), ["cart", "catalog", "payments"]);
    // Nothing else changed on the way.
    assert_eq!(workloads(&deleted), ["cart-0", "cart-2", "orders-0"]);
}

#[tokio::test]
async fn a_410_gone_makes_the_watch_list_again() {
    let mut h = start(0).await;
    h.config_where("the fixtures are listed", |c| {
        services(c).contains(&"payments")
    })
    .await;
    assert_eq!(h.api.lists("services"), 1);

    // payments goes while its event is lost to compaction: the open watch gets 410 Gone.
    h.api.delete_unseen("services", "shop", "payments");
    let relisted = h
        .config_where("payments is gone", |c| !services(c).contains(&"payments"))
        .await;
    assert_eq!(services(&relisted), ["cart", "catalog", "orders"]);
    assert_eq!(h.api.lists("services"), 2);
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_last_version() {
    let mut h = start(0).await;
    h.config_where("the fixtures are listed", |c| !c.workloads.is_empty())
        .await;
    let watched_from = h.api.watched_from("pods");
    assert_eq!(watched_from.len(), 1);

    // The connection drops; a pod starts while no watch is open.
    h.api.drop_watches("pods");
    let uid = "9b1c3d5e-7f8a-4b0c-9d2e-4f6a8b0c2d3e";
    h.cgroups.add_pod(uid);
    h.api.apply("pods", pod("cart-3", uid, "10.244.1.31"));
    h.config_where("cart-3 is a workload", |c| workloads(c).contains(&"cart-3"))
        .await;
    // Watched again from where it stopped, not listed again.
    assert_eq!(h.api.lists("pods"), 1);
    assert_eq!(
        h.api.watched_from("pods")[..2],
        [watched_from[0], watched_from[0]]
    );
}

#[tokio::test]
async fn a_pod_whose_cgroup_comes_late_is_enrolled_when_it_does() {
    let mut h = start(0).await;
    h.config_where("the fixtures are listed", |c| !c.workloads.is_empty())
        .await;
    let uid = "0c2d4e6f-8a9b-4c1d-8e3f-5a7b9c1d3e4f";
    h.api.apply("pods", pod("cart-4", uid, "10.244.1.32"));
    // No event follows the cgroup: the watch looks again by itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.cgroups.add_pod(uid);
    h.config_where("cart-4 is a workload", |c| workloads(c).contains(&"cart-4"))
        .await;
}

#[tokio::test]
async fn gateway_api_routes_are_followed_once_their_crds_are_served() {
    let mut h = start(0).await;
    // No Gateway API CRDs yet (their paths answer 404): the config comes all the same.
    let first = h
        .config_where("the fixtures are listed", |c| services(c).contains(&"cart"))
        .await;
    assert!(
        first
            .services
            .iter()
            .all(|s| s.ports.iter().all(|p| p.routes.is_empty()))
    );

    h.api.apply(
        "httproutes",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "cart-split", "namespace": "shop", "uid": "r1"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "cart", "port": 80}],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                    "backendRefs": [
                        {"name": "cart", "port": 80, "weight": 90},
                        {"name": "orders", "port": 80, "weight": 10}
                    ],
                    "timeouts": {"request": "2s"}
                }]
            }
        }),
    );
    let routed = h
        .config_where("cart's port has the route", |c| {
            c.services
                .iter()
                .any(|s| s.name.as_str() == "cart" && s.ports.iter().any(|p| !p.routes.is_empty()))
        })
        .await;
    let cart = routed
        .services
        .iter()
        .find(|s| s.name.as_str() == "cart")
        .unwrap();
    let port = cart.ports.iter().find(|p| p.port == 80).unwrap();
    assert_eq!(port.routes[0].name.as_str(), "cart-split-r0");
    assert_eq!(port.routes[0].backends.len(), 2);
    routed.check().unwrap();
}

#[tokio::test]
async fn a_traffic_policy_gives_its_services_ports_outlier_detection_and_circuit_breakers() {
    let mut h = start(0).await;
    h.config_where("the fixtures are listed", |c| services(c).contains(&"cart"))
        .await;
    h.api.apply(
        "trafficpolicies",
        json!({
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "cart-guard", "namespace": "shop", "uid": "p1"},
            "spec": {
                "targetRef": {"kind": "Service", "name": "cart"},
                "circuitBreakers": {"maxConnections": 50, "maxPerEndpoint": 10}
            }
        }),
    );
    let guarded = h
        .config_where("cart's ports have the breakers", |c| {
            c.services.iter().any(|s| {
                s.name.as_str() == "cart" && s.ports.iter().all(|p| p.circuit_breakers.is_some())
            })
        })
        .await;
    let cart = guarded
        .services
        .iter()
        .find(|s| s.name.as_str() == "cart")
        .unwrap();
    let limits = cart.ports[0].circuit_breakers.unwrap();
    assert_eq!(
        (limits.max_connections, limits.max_per_endpoint),
        (Some(50), Some(10))
    );
    guarded.check().unwrap();
}

#[tokio::test]
async fn authorization_policies_are_followed_and_a_bad_edit_keeps_the_last_good_version() {
    let mut h = start(0).await;
    h.config_where("the fixtures are listed", |c| services(c).contains(&"cart"))
        .await;
    let policy = |principal: &str| {
        json!({
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "cart-callers", "namespace": "shop", "uid": "a1"},
            "spec": {
                "targetRef": {"kind": "Service", "name": "cart"},
                "action": "ALLOW",
                "rules": [{"from": [{"principals": [principal]}], "to": [{"methods": ["GET"]}]}]
            }
        })
    };
    h.api.apply(
        "authorizationpolicies",
        policy("spiffe://cluster.local/ns/shop/sa/web"),
    );
    let principal = |c: &Config| {
        c.authorization
            .policies
            .iter()
            .find(|p| p.name.as_str() == "cart-callers")
            .map(|p| p.rules[0].from[0].principals[0].to_string())
    };
    let allowed = h
        .config_where("the policy is in force", |c| principal(c).is_some())
        .await;
    assert_eq!(
        principal(&allowed).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    // A bad edit: refused by object and field, the last good version stays; a good one then
    // replaces it.
    h.api.apply(
        "authorizationpolicies",
        policy("spiffe://cluster.local/web"),
    );
    // A second policy after it: once that is in force, the bad edit has been seen.
    h.api.apply(
        "authorizationpolicies",
        json!({
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-legacy", "namespace": "mesh-system", "uid": "a2"},
            "spec": {"action": "DENY", "rules": [{"from": [{"namespaces": ["legacy"]}]}]}
        }),
    );
    let after_bad = h
        .config_where("the second policy is in force", |c| {
            c.authorization.policies.len() == 2
        })
        .await;
    let cart_callers = after_bad
        .authorization
        .policies
        .iter()
        .find(|p| p.name.as_str() == "cart-callers")
        .expect("the last good version of cart-callers");
    assert_eq!(
        cart_callers.rules[0].from[0].principals[0].to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    h.api.apply(
        "authorizationpolicies",
        policy("spiffe://cluster.local/ns/shop/sa/orders"),
    );
    let edited = h
        .config_where("the good edit is in force", |c| {
            principal(c).as_deref() == Some("spiffe://cluster.local/ns/shop/sa/orders")
        })
        .await;
    edited.check().unwrap();
    h.api
        .delete("authorizationpolicies", "shop", "cart-callers");
    h.config_where("the deleted policy is gone", |c| principal(c).is_none())
        .await;
}

#[tokio::test]
async fn external_hosts_and_the_outbound_policy_are_followed() {
    let mut h = start(0).await;
    h.config_where("the fixtures are listed", |c| services(c).contains(&"cart"))
        .await;
    h.api.apply(
        "externalhosts",
        json!({
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "ExternalHost",
            "metadata": {"name": "courier", "namespace": "shop", "uid": "e1"},
            "spec": {
                "names": ["api.courier.example"],
                "ports": [{"port": 80, "protocol": "HTTP", "tls": "Originate"}]
            }
        }),
    );
    h.api.apply(
        "namespaces",
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "mesh-system",
                "uid": "ns-mesh",
                "labels": {"mesh.dev/outbound-policy": "registry-only"}
            }
        }),
    );
    let declared = h
        .config_where("the host and the policy are in force", |c| {
            !c.egress.hosts.is_empty() && c.egress.outbound_policy == OutboundPolicy::RegistryOnly
        })
        .await;
    let host = &declared.egress.hosts[0];
    assert_eq!(host.names[0].as_str(), "api.courier.example");
    assert_eq!(host.ports[0].target_port(), 443);
    declared.check().unwrap();
    h.api.delete("externalhosts", "shop", "courier");
    h.config_where("the deleted host is gone", |c| c.egress.hosts.is_empty())
        .await;
}
