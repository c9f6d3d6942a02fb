//! A Kubernetes API server for the tests of the agent's cluster watch: the list/watch
//! protocol over TLS with a bearer token, as a cluster's API server speaks it to a pod.
//! The tests change its objects (each change an event to open watches) and make it fail: a
//! failed list, a 410 Gone, a dropped watch connection.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// The kinds the agent watches, by the path it lists and watches them at.
pub const KINDS: [(&str, &str); 10] = [
    ("namespaces", "/api/v1/namespaces"),
    ("nodes", "/api/v1/nodes"),
    ("pods", "/api/v1/pods"),
    ("services", "/api/v1/services"),
    ("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices"),
    (
        "httproutes",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
    ),
    (
        "grpcroutes",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    ),
    ("trafficpolicies", "/apis/mesh.dev/v1alpha1/trafficpolicies"),
    (
        "authorizationpolicies",
        "/apis/mesh.dev/v1alpha1/authorizationpolicies",
    ),
    ("externalhosts", "/apis/mesh.dev/v1alpha1/externalhosts"),
];
/// The kinds of a CRD: served (their CRD installed) only once an object of theirs is applied;
/// until then their paths answer 404, as a cluster without the Gateway API's CRDs (or the
/// mesh's) does.
const CRD_KINDS: [&str; 5] = [
    "httproutes",
    "grpcroutes",
    "trafficpolicies",
    "authorizationpolicies",
    "externalhosts",
];

/// The service account token the API server wants.
const TOKEN: &str = "mesh-agent-test-token";

type Chunk = Result<Frame<Bytes>, std::io::Error>;

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An open watch, and the field selector it asked with.
struct Watch {
    tx: mpsc::UnboundedSender<Chunk>,
    fields: String,
}

/// Whether `object` passes the field selector `fields` (`spec.nodeName=NODE` is told apart;
/// any other selects everything).
fn selected(fields: &str, object: &Value) -> bool {
    match fields.strip_prefix("spec.nodeName=") {
        Some(node) => object["spec"]["nodeName"].as_str() == Some(node),
        None => true,
    }
}

/// Where TokenReviews are created.
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Answers a TokenReview for the tokens minted.
fn token_review(state: &Mutex<State>, body: &[u8]) -> Response<Body> {
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest");
    };
    let token = review["spec"]["token"].as_str().unwrap_or("").to_owned();
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let mut state = lock(state);
    state.reviews += 1;
    review["status"] = match state.tokens.get(&token) {
        Some(known) => known.status(&audiences),
        None => json!({"authenticated": false, "error": "[invalid bearer token, unknown]"}),
    };
    Response::new(full(review.to_string()))
}

/// One kind's objects, the events that made them and the watches open on them.
#[derive(Default)]
struct Kind {
    objects: BTreeMap<String, Value>,
    events: Vec<(u64, Value)>,
    /// Watches from a resource version below this get 410 Gone.
    oldest: u64,
    watches: Vec<Watch>,
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
    /// Service-account tokens TokenReview knows, by their text.
    tokens: BTreeMap<String, Token>,
    /// TokenReviews and single pod lookups answered.
    reviews: usize,
    pod_gets: usize,
    /// Unreachable: new connections are closed at once, requests fail.
    gone: bool,
}

/// A service-account token, as TokenReview answers for it.
#[derive(Debug, Clone)]
pub struct Token {
    pub namespace: String,
    pub service_account: String,
    /// The pod it is bound to: name and UID.
    pub pod: Option<(String, String)>,
    /// The node it names (tokens of Kubernetes 1.32 and later do; older ones do not).
    pub node: Option<String>,
    pub audiences: Vec<String>,
    pub expired: bool,
}

impl Token {
    /// A token of `namespace/service_account` for `audience`, bound to the pod `pod` (whose UID
    /// is `pod-uid-<pod>`) on `node`.
    pub fn bound(
        namespace: &str,
        service_account: &str,
        pod: &str,
        node: &str,
        audience: &str,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod: Some((pod.into(), format!("pod-uid-{pod}"))),
            node: Some(node.into()),
            audiences: vec![audience.into()],
            expired: false,
        }
    }

    /// TokenReview's status for this token asked for `audiences`.
    fn status(&self, audiences: &[String]) -> Value {
        if self.expired {
            return json!({"authenticated": false, "error": "[invalid bearer token, service account token has expired]"});
        }
        if !audiences.iter().any(|a| self.audiences.contains(a)) {
            return json!({"authenticated": false, "error": format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {audiences:?}]",
                self.audiences
            )});
        }
        let mut extra = serde_json::Map::new();
        if let Some((pod, uid)) = &self.pod {
            extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
            extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
        }
        if let Some(node) = &self.node {
            extra.insert(
                "authentication.kubernetes.io/node-name".into(),
                json!([node]),
            );
        }
        json!({
            "authenticated": true,
            "audiences": audiences,
            "user": {
                "username": format!("system:serviceaccount:{}:{}", self.namespace, self.service_account),
                "uid": format!("uid-{}-{}", self.namespace, self.service_account),
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", self.namespace)],
                "extra": extra,
            },
        })
    }
}

/// A Kubernetes API server for the watch: it lists and watches the kinds the agent reads,
/// over TLS with a bearer token, and can be made to fail in the ways a real one does.
/// Stops when dropped.
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    kubeconfig: PathBuf,
    _stop: oneshot::Sender<()>,
}

impl ApiServer {
    /// Serves `objects` (kind, object) on 127.0.0.1 in the network namespace `netns` (this
    /// process's if `None`), the first `failing_node_lists` lists of nodes failing with 500;
    /// writes the server's CA and a kubeconfig for it into `dir`.
    pub fn start(
        netns: Option<&str>,
        dir: &Path,
        objects: Vec<(&str, Value)>,
        failing_node_lists: usize,
    ) -> Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = oneshot::channel();
        let (bound, address) = std::sync::mpsc::channel();
        let netns = netns
            .map(|n| File::open(Path::new("/run/netns").join(n)))
            .transpose()
            .context("no such network namespace")?;
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let serving = state.clone();
        std::thread::spawn(move || {
            let run = || -> Result<()> {
                if let Some(netns) = netns {
                    // SAFETY: setns on a descriptor we own moves this thread only.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error().into());
                    }
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let _ = bound.send(listener.local_addr());
                    tokio::select! {
                        () = serve(listener, acceptor, serving) => {}
                        _ = stopped => {}
                    }
                    anyhow::Ok(())
                })
            };
            if let Err(e) = run() {
                eprintln!("API server: {e:#}");
            }
        });
        let address = address.recv().context("the API server did not start")??;
        let api = Self {
            state,
            kubeconfig: dir.join("kubeconfig"),
            _stop: stop,
        };
        {
            let mut state = api.state();
            for (kind, _) in KINDS.iter().filter(|(k, _)| !CRD_KINDS.contains(k)) {
                state.kinds.insert(kind, Kind::default());
            }
        }
        for (kind, object) in objects {
            api.apply(kind, object);
        }
        api.kind("nodes", |k, _| k.failing_lists = failing_node_lists);
        let ca = dir.join("apiserver-ca.crt");
        std::fs::write(&ca, cert.cert.pem())?;
        std::fs::write(
            &api.kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
                 clusters: [{{name: test, cluster: {{server: 'https://{address}', \
                 certificate-authority: '{}'}}}}]\n\
                 users: [{{name: agent, user: {{token: {TOKEN}}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: agent}}}}]\n",
                ca.display()
            ),
        )?;
        Ok(api)
    }

    /// A kubeconfig for this server (what `KUBECONFIG` may name).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The object of `kind` called `namespace/name` (`/name` if cluster-wide).
    pub fn object(&self, kind: &str, key: &str) -> Option<Value> {
        self.state().kinds.get(kind)?.objects.get(key).cloned()
    }

    /// A token TokenReview will answer for: its text.
    pub fn mint(&self, token: Token) -> String {
        let text = format!("token-{:016x}", fastrand::u64(..));
        self.state().tokens.insert(text.clone(), token);
        text
    }

    /// Makes a minted token expired.
    pub fn expire(&self, token: &str) {
        if let Some(t) = self.state().tokens.get_mut(token) {
            t.expired = true;
        }
    }

    /// How many TokenReviews and single pod lookups were answered.
    pub fn reviews(&self) -> (usize, usize) {
        let state = self.state();
        (state.reviews, state.pod_gets)
    }

    /// How many times `kind` was listed.
    pub fn lists(&self, kind: &str) -> usize {
        self.kind(kind, |k, _| k.lists)
    }

    /// The resource version each watch of `kind` started from, in order.
    pub fn watched_from(&self, kind: &str) -> Vec<u64> {
        self.kind(kind, |k, _| k.watched_from.clone())
    }

    /// The selectors (`labelSelector=...`, `fieldSelector=...`) of every request for `kind`.
    pub fn selectors(&self, kind: &str) -> Vec<String> {
        self.kind(kind, |k, _| k.selectors.clone())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn kind<R>(&self, kind: &str, f: impl FnOnce(&mut Kind, &mut u64) -> R) -> R {
        let mut state = self.state();
        let State { version, kinds, .. } = &mut *state;
        if CRD_KINDS.contains(&kind) {
            let kind = KINDS.iter().find(|(k, _)| *k == kind).map(|(k, _)| *k);
            kinds
                .entry(kind.expect("a kind the agent watches"))
                .or_default();
        }
        f(
            kinds.get_mut(kind).expect("a kind the agent watches"),
            version,
        )
    }

    /// Adds or replaces an object, as an ADDED or MODIFIED event.
    pub fn apply(&self, kind: &str, mut object: Value) {
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
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        self.kind(kind, |k, version| {
            *version += 1;
            let mut object = k
                .objects
                .remove(&format!("{namespace}/{name}"))
                .expect("an object the server has");
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            k.publish(*version, json!({"type": "DELETED", "object": object}));
        });
    }

    /// Deletes an object with no event any watch can see: the history before it is compacted,
    /// and open watches get 410 Gone.
    pub fn delete_unseen(&self, kind: &str, namespace: &str, name: &str) {
        self.kind(kind, |k, version| {
            *version += 1;
            k.objects
                .remove(&format!("{namespace}/{name}"))
                .expect("an object the server has");
            k.events.clear();
            k.oldest = *version + 1;
            let gone = event_line(&gone());
            for w in k.watches.drain(..) {
                let _ = w.tx.send(Ok(Frame::data(gone.clone())));
            }
        });
    }

    /// Takes the server off the network (every watch cut, new connections closed at once,
    /// requests on open ones failing), or brings it back with its objects as they were.
    pub fn set_reachable(&self, reachable: bool) {
        let mut state = self.state();
        state.gone = !reachable;
        if !reachable {
            for kind in state.kinds.values_mut() {
                for w in kind.watches.drain(..) {
                    let _ = w.tx.send(Err(std::io::Error::other("connection dropped")));
                }
            }
        }
    }

    /// Cuts every open watch of `kind` mid-stream, as a dropped connection does.
    pub fn drop_watches(&self, kind: &str) {
        self.kind(kind, |k, _| {
            for w in k.watches.drain(..) {
                let _ = w.tx.send(Err(std::io::Error::other("connection dropped")));
            }
        });
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    if lock(&state).gone {
        return status(503, "the API server is gone");
    }
    let bearer = request.headers().get(hyper::header::AUTHORIZATION);
    if bearer.and_then(|b| b.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return status(401, "Unauthorized");
    }
    let path = request.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if path == TOKEN_REVIEWS && request.method() == hyper::Method::POST {
        let Ok(body) = request.into_body().collect().await else {
            return status(400, "BadRequest");
        };
        return token_review(&state, &body.to_bytes());
    }
    if let Some(pod) = path.strip_prefix("/api/v1/namespaces/") {
        let Some((namespace, name)) = pod.split_once("/pods/") else {
            return status(404, "NotFound");
        };
        let mut state = lock(&state);
        state.pod_gets += 1;
        let pod = state
            .kinds
            .get("pods")
            .and_then(|k| k.objects.get(&format!("{namespace}/{name}")));
        return match pod {
            Some(pod) => Response::new(full(pod.to_string())),
            None => status(404, "NotFound"),
        };
    }
    let Some((kind, _)) = KINDS.iter().find(|(_, p)| *p == path) else {
        return status(404, "NotFound");
    };
    let fields = query.get("fieldSelector").cloned().unwrap_or_default();
    let mut state = lock(&state);
    let version = state.version;
    let Some(k) = state.kinds.get_mut(kind) else {
        return status(404, "NotFound");
    };
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
            "items": k.objects.values().filter(|o| selected(&fields, o)).collect::<Vec<_>>(),
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
            if selected(&fields, &event["object"]) {
                let _ = tx.send(Ok(Frame::data(event_line(event))));
            }
        }
        k.watches.push(Watch { tx, fields });
    }
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    Response::new(BodyExt::boxed(body))
}

impl Kind {
    fn publish(&mut self, version: u64, event: Value) {
        let line = event_line(&event);
        let object = event["object"].clone();
        self.events.push((version, event));
        self.watches.retain(|w| {
            !selected(&w.fields, &object) || w.tx.send(Ok(Frame::data(line.clone()))).is_ok()
        });
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
    *response.status_mut() =
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
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

/// Accepts TLS connections and answers their requests until dropped.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<Mutex<State>>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        if lock(&state).gone {
            continue;
        }
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let service = service_fn(move |r| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, r).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
