//! The cluster watch against a local API server speaking the list/watch protocol over TLS
//! with a bearer token, as in a cluster: the initial list (after a failed one), added,
//! modified and deleted objects, a 410 Gone that forces a relist, and a dropped watch
//! connection that resumes where it stopped.

// Test code may unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_agent::{
    config::{ClusterSettings, Config},
    kubernetes::watch::ClusterWatch,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The kinds the agent watches, by the path it lists and watches them at.
const KINDS: [(&str, &str); 5] = [
    ("namespaces", "/api/v1/namespaces"),
    ("nodes", "/api/v1/nodes"),
    ("pods", "/api/v1/pods"),
    ("services", "/api/v1/services"),
    ("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices"),
];

/// The service account token the API server wants.
const TOKEN: &str = "mesh-agent-test-token";

/// How long a test waits for the config it expects before it fails (not a speed target:
/// the watcher's backoff after an error is 0.8 s and more).
const PATIENCE: Duration = Duration::from_secs(30);

type Chunk = Result<Frame<Bytes>, std::io::Error>;

/// One kind's objects, the events that made them and the watches open on them.
#[derive(Default)]
struct Kind {
    objects: BTreeMap<String, Value>,
    events: Vec<(u64, Value)>,
    /// Watches from a resource version below this get 410 Gone.
    oldest: u64,
    watches: Vec<mpsc::UnboundedSender<Chunk>>,
    lists: usize,
    /// The resource version of each watch request, in order.
    watched_from: Vec<u64>,
    failing_lists: usize,
    /// The selectors each request carried.
    selectors: Vec<String>,
}

/// The API server's state.
#[derive(Default)]
struct State {
    version: u64,
    kinds: BTreeMap<&'static str, Kind>,
}

#[derive(Clone, Default)]
struct ApiServer(Arc<Mutex<State>>);

impl ApiServer {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn kind<R>(&self, kind: &str, f: impl FnOnce(&mut Kind, &mut u64) -> R) -> R {
        let mut state = self.state();
        let State { version, kinds } = &mut *state;
        f(kinds.get_mut(kind).unwrap(), version)
    }

    /// Adds or replaces an object, as an ADDED or MODIFIED event.
    fn apply(&self, kind: &str, mut object: Value) {
        self.kind(kind, |k, version| {
            *version += 1;
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            let key = key(&object);
            let event = if k.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            k.objects.insert(key, object.clone());
            k.publish(*version, json!({"type": event, "object": object}));
        });
    }

    /// Deletes an object, as a DELETED event.
    fn delete(&self, kind: &str, namespace: &str, name: &str) {
        self.kind(kind, |k, version| {
            *version += 1;
            let mut object = k.objects.remove(&format!("{namespace}/{name}")).unwrap();
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            k.publish(*version, json!({"type": "DELETED", "object": object}));
        });
    }

    /// Deletes an object with no event any watch can see: the history before it is compacted,
    /// and open watches get 410 Gone.
    fn delete_unseen(&self, kind: &str, namespace: &str, name: &str) {
        self.kind(kind, |k, version| {
            *version += 1;
            k.objects.remove(&format!("{namespace}/{name}")).unwrap();
            k.events.clear();
            k.oldest = *version + 1;
            let gone = event_line(&gone());
            for w in k.watches.drain(..) {
                let _ = w.send(Ok(Frame::data(gone.clone())));
            }
        });
    }

    /// Cuts every open watch of `kind` mid-stream, as a dropped connection does.
    fn drop_watches(&self, kind: &str) {
        self.kind(kind, |k, _| {
            for w in k.watches.drain(..) {
                let _ = w.send(Err(std::io::Error::other("connection dropped")));
            }
        });
    }

    async fn handle(self, request: Request<hyper::body::Incoming>) -> Response<Body> {
        let bearer = request.headers().get(hyper::header::AUTHORIZATION);
        if bearer.and_then(|b| b.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
            return status(401, "Unauthorized");
        }
        let path = request.uri().path().to_owned();
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let Some((kind, _)) = KINDS.iter().find(|(_, p)| *p == path) else {
            return status(404, "NotFound");
        };
        let mut state = self.state();
        let version = state.version;
        let k = state.kinds.get_mut(kind).unwrap();
        k.selectors.extend(
            ["labelSelector", "fieldSelector"]
                .iter()
                .filter_map(|s| query.get(*s).map(|v| format!("{s}={v}"))),
        );
        if query.get("watch").map(String::as_str) != Some("true") {
            k.lists += 1;
            if k.failing_lists > 0 {
                k.failing_lists -= 1;
                return status(500, "InternalError");
            }
            let list = json!({
                "apiVersion": "v1",
                "kind": "List",
                "metadata": {"resourceVersion": version.to_string()},
                "items": k.objects.values().collect::<Vec<_>>(),
            });
            return Response::new(full(list.to_string()));
        }
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        k.watched_from.push(from);
        let (tx, rx) = mpsc::unbounded_channel();
        if from < k.oldest {
            let _ = tx.send(Ok(Frame::data(event_line(&gone()))));
        } else {
            for (_, event) in k.events.iter().filter(|(v, _)| *v > from) {
                let _ = tx.send(Ok(Frame::data(event_line(event))));
            }
            k.watches.push(tx);
        }
        let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|chunk| (chunk, rx))
        }));
        Response::new(BodyExt::boxed(body))
    }
}

impl Kind {
    fn publish(&mut self, version: u64, event: Value) {
        let line = event_line(&event);
        self.events.push((version, event));
        self.watches
            .retain(|w| w.send(Ok(Frame::data(line.clone()))).is_ok());
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "code": code});
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
    response
}

/// The watch event the API server sends when a resource version is too old.
fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired",
        "code": 410}})
}

fn event_line(event: &Value) -> Bytes {
    Bytes::from(format!("{event}\n"))
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap()
    )
}

fn fixtures(name: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kubernetes")
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
    configs: watch::Receiver<Option<Config>>,
    cgroups: TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

const CART_0: &str = "1f3a5c2e-7b4d-4e8f-9a01-2b3c4d5e6f70";
const ORDERS_0: &str = "5d7e9f1a-3b4c-4d6e-9f8a-0b1c2d3e4f5a";

async fn start(failing_node_lists: usize) -> Harness {
    let api = ApiServer::default();
    for (kind, _) in KINDS {
        api.state().kinds.insert(kind, Kind::default());
        for object in fixtures(&format!("{kind}.yaml")) {
            api.apply(kind, object);
        }
    }
    api.kind("nodes", |k, _| k.failing_lists = failing_node_lists);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server_cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_cert.signing_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let serving = {
        let api = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (api, acceptor) = (api.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |r| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(r).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    };
    let cgroups = TempDir::new();
    cgroups.add_pod(CART_0);
    cgroups.add_pod(ORDERS_0);
    // The client as `Client::try_default` makes it from a kubeconfig: the API server's CA
    // and a token.
    let ca = cgroups.0.join("ca.crt");
    std::fs::write(&ca, server_cert.cert.pem()).unwrap();
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
         clusters: [{{name: test, cluster: {{server: 'https://{address}', \
         certificate-authority: '{}'}}}}]\n\
         users: [{{name: agent, user: {{token: {TOKEN}}}}}]\n\
         contexts: [{{name: test, context: {{cluster: test, user: agent}}}}]\n",
        ca.display()
    );
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let settings: ClusterSettings =
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
        }
        .run(tx),
    );
    Harness {
        api,
        configs,
        cgroups,
        tasks: vec![serving, watching],
    }
}

impl Harness {
    /// Waits for a config for which `wanted` holds, and returns it.
    async fn config_where(&mut self, what: &str, wanted: impl Fn(&Config) -> bool) -> Config {
        let found = tokio::time::timeout(
            PATIENCE,
            self.configs.wait_for(|c| c.as_ref().is_some_and(&wanted)),
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
    {
        let state = h.api.state();
        // The failed list of nodes was retried.
        assert_eq!(state.kinds["nodes"].lists, 2);
        // Only this node's pods, only enrolled namespaces: every request says so.
        for (kind, selector) in [
            ("pods", "fieldSelector=spec.nodeName=worker-1"),
            ("namespaces", "labelSelector=mesh.dev/enrolled=true"),
        ] {
            let selectors = &state.kinds[kind].selectors;
            assert!(
                !selectors.is_empty() && selectors.iter().all(|s| s == selector),
                "{kind}: {selectors:?}"
            );
        }
    }

    // Added: a pod starts on this node (its cgroup is made as it starts).
    let uid = "8a0b2c4d-6e7f-4a9b-8c1d-3e5f7a9b1c2d";
    h.cgroups.add_pod(uid);
    h.api.apply("pods", pod("cart-2", uid, "10.244.1.30"));
    let added = h
        .config_where("cart-2 is a workload", |c| workloads(c).contains(&"cart-2"))
        .await;
    assert_eq!(workloads(&added), ["cart-0", "cart-2", "orders-0"]);

    // Modified: an endpoint of cart stops being ready.
    let mut slice = h.api.state().kinds["endpointslices"].objects["shop/cart-x7k2p"].clone();
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
    assert_eq!(h.api.state().kinds["services"].lists, 1);

    // payments goes while its event is lost to compaction: the open watch gets 410 Gone.
    h.api.delete_unseen("services", "shop", "payments");
    let relisted = h
        .config_where("payments is gone", |c| !services(c).contains(&"payments"))
        .await;
    assert_eq!(services(&relisted), ["cart", "catalog", "orders"]);
    assert_eq!(h.api.state().kinds["services"].lists, 2);
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_last_version() {
    let mut h = start(0).await;
    h.config_where("the fixtures are listed", |c| !c.workloads.is_empty())
        .await;
    let watched_from = h.api.state().kinds["pods"].watched_from.clone();
    assert_eq!(watched_from.len(), 1);

    // The connection drops; a pod starts while no watch is open.
    h.api.drop_watches("pods");
    let uid = "9b1c3d5e-7f8a-4b0c-9d2e-4f6a8b0c2d3e";
    h.cgroups.add_pod(uid);
    h.api.apply("pods", pod("cart-3", uid, "10.244.1.31"));
    h.config_where("cart-3 is a workload", |c| workloads(c).contains(&"cart-3"))
        .await;
    let pods = &h.api.state().kinds["pods"];
    // Watched again from where it stopped, not listed again.
    assert_eq!(pods.lists, 1);
    assert_eq!(pods.watched_from[..2], [watched_from[0], watched_from[0]]);
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
