//! The CA service against the test API server (TokenReview, pods by node, pod lookups), with
//! agents asking over HTTP/2 with TLS as they do in a cluster: what it signs and refuses, the
//! tokens it takes, and an agent's certificates while it is down and through a CA rotation.
//! No root: everything is on loopback in this process.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_agent::{
    ca::client::CaClient,
    identity::{
        CaFiles, FileCa, SpiffeId, bundle::TrustBundle, certificates::Certificates, issue,
        signer::Signer,
    },
    observability::metrics::Metrics,
};
use mesh_tests::{ApiServer, InProcessCa, Token};
use prometheus_client::registry::Registry;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde_json::{Value, json};

const DOMAIN: &str = "cluster.local";
const AUDIENCE: &str = "mesh-ca";
/// How long a test waits for what it expects before it fails (not a speed target).
const PATIENCE: Duration = Duration::from_secs(30);

fn pod(
    namespace: &str,
    name: &str,
    account: &str,
    node: &str,
    phase: &str,
) -> (&'static str, Value) {
    (
        "pods",
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "uid": format!("pod-uid-{name}")},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": []},
            "status": {"phase": phase},
        }),
    )
}

/// A directory the test makes and removes.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "mesh-ca-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cluster of two nodes with the pods the tests ask about, its CA's files, and the CA
/// service running.
struct Cluster {
    dir: TempDir,
    api: ApiServer,
    files: CaFiles,
    bundle: Arc<TrustBundle>,
    ca: InProcessCa,
}

impl Cluster {
    fn start() -> Self {
        let dir = TempDir::new();
        let objects = vec![
            pod(
                "mesh-system",
                "mesh-agent-a",
                "mesh-agent",
                "worker-1",
                "Running",
            ),
            pod(
                "mesh-system",
                "mesh-agent-b",
                "mesh-agent",
                "worker-2",
                "Running",
            ),
            pod("shop", "cart-0", "cart", "worker-1", "Running"),
            pod("shop", "web-0", "web", "worker-1", "Pending"),
            pod("shop", "report-0", "report", "worker-1", "Succeeded"),
            pod("shop", "payments-0", "payments", "worker-2", "Running"),
        ];
        let api = ApiServer::start(None, &dir.0, objects, 0).unwrap();
        let files = FileCa::create(&dir.0.join("ca"), DOMAIN).unwrap();
        let bundle = TrustBundle::load(files.cert.clone()).unwrap();
        let ca = InProcessCa::start(&api, &files, DOMAIN, 0).unwrap();
        Self {
            dir,
            api,
            files,
            bundle,
            ca,
        }
    }

    /// An agent's client of the CA, showing `token`.
    fn client(&self, token: &str) -> CaClient {
        let file = self.dir.0.join(format!("token-{:x}", fastrand::u64(..)));
        std::fs::write(&file, token).unwrap();
        CaClient::new(&self.ca.addr.to_string(), file, self.bundle.clone(), DOMAIN).unwrap()
    }

    /// The token of the agent on worker-1 (`node` false: one without the node's name).
    fn agent_token(&self, node: bool) -> String {
        let mut token = Token::bound(
            "mesh-system",
            "mesh-agent",
            "mesh-agent-a",
            "worker-1",
            AUDIENCE,
        );
        if !node {
            token.node = None;
        }
        self.api.mint(token)
    }
}

fn id(namespace: &str, account: &str) -> SpiffeId {
    SpiffeId::workload(DOMAIN, namespace, account)
}

/// What the CA answers `client` asking for `id`: `Ok` with the certificate's signer, or the
/// reason it gave.
async fn ask(client: &CaClient, id: &SpiffeId) -> Result<CertificateDer<'static>, String> {
    tokio::time::timeout(PATIENCE, issue(client, id, Duration::from_secs(3600)))
        .await
        .expect("the CA did not answer")
        .map(|issued| issued.signer)
        .map_err(|e| format!("{e:#}"))
}

#[tokio::test]
async fn an_agent_gets_its_own_identity_and_its_nodes_pods_and_nothing_else() {
    let cluster = Cluster::start();
    let client = cluster.client(&cluster.agent_token(true));
    let root = CertificateDer::from_pem_file(&cluster.files.cert).unwrap();
    for allowed in [
        SpiffeId::agent(DOMAIN),
        id("shop", "cart"),
        id("shop", "web"),
    ] {
        assert_eq!(ask(&client, &allowed).await, Ok(root.clone()), "{allowed}");
    }
    let refused = [
        // A pod of another node.
        (
            id("shop", "payments"),
            "no pod of spiffe://cluster.local/ns/shop/sa/payments runs on node worker-1",
        ),
        // A pod that has finished.
        (id("shop", "report"), "runs on node worker-1"),
        // Nobody's.
        (id("kube-system", "default"), "runs on node worker-1"),
        (
            SpiffeId::workload("other.domain", "shop", "cart"),
            "another trust domain",
        ),
    ];
    for (id, reason) in refused {
        let answer = ask(&client, &id).await;
        assert!(
            answer
                .as_ref()
                .is_err_and(|e| e.contains("403") && e.contains(reason)),
            "{id}: {answer:?}"
        );
    }
    assert_eq!(cluster.ca.count("issued"), 3.0);
    assert_eq!(cluster.ca.count("not_on_node"), 3.0);
    assert_eq!(cluster.ca.count("other_trust_domain"), 1.0);
}

#[tokio::test]
async fn tokens_of_another_audience_expired_unknown_or_not_an_agents_are_refused() {
    let cluster = Cluster::start();
    let api = &cluster.api;
    let mut other_audience = Token::bound(
        "mesh-system",
        "mesh-agent",
        "mesh-agent-a",
        "worker-1",
        AUDIENCE,
    );
    other_audience.audiences = vec!["https://kubernetes.default.svc".into()];
    let expired = cluster.agent_token(true);
    api.expire(&expired);
    let cases = [
        (api.mint(other_audience), "401", "token audiences"),
        (expired, "401", "expired"),
        ("not-a-token".to_owned(), "401", "invalid bearer token"),
        (
            api.mint(Token::bound("shop", "cart", "cart-0", "worker-1", AUDIENCE)),
            "403",
            "system:serviceaccount:shop:cart is no node agent",
        ),
    ];
    for (token, status, reason) in cases {
        let answer = ask(&cluster.client(&token), &id("shop", "cart")).await;
        assert!(
            answer
                .as_ref()
                .is_err_and(|e| e.contains(status) && e.contains(reason)),
            "{answer:?}, not {status} {reason}"
        );
    }
    assert_eq!(cluster.ca.count("unauthenticated"), 3.0);
    assert_eq!(cluster.ca.count("not_an_agent"), 1.0);

    // A token without the node's name (Kubernetes before 1.32): the node comes from the
    // agent's pod, looked up by name and checked by UID.
    let client = cluster.client(&cluster.agent_token(false));
    assert!(ask(&client, &id("shop", "cart")).await.is_ok());
    assert!(ask(&client, &id("shop", "payments")).await.is_err());
    assert!(api.reviews().1 >= 1, "the agent's pod was not looked up");
    let mut stale = Token::bound(
        "mesh-system",
        "mesh-agent",
        "mesh-agent-a",
        "worker-1",
        AUDIENCE,
    );
    stale.node = None;
    stale.pod = Some(("mesh-agent-a".into(), "the-uid-of-a-deleted-pod".into()));
    let answer = ask(&cluster.client(&api.mint(stale)), &id("shop", "cart")).await;
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.contains("bound to no pod")),
        "{answer:?}"
    );
}

/// Worker-1's agent asking the CA service, holding certificates (living `ttl`) for itself
/// and for cart, both issued.
async fn agent_holding_cart(cluster: &Cluster, ttl: Duration) -> (Registry, Certificates) {
    let client = cluster.client(&cluster.agent_token(true));
    let mut registry = Registry::with_prefix("mesh");
    let metrics = Arc::new(Metrics::new(&mut registry));
    let certificates = Certificates::new(
        Arc::new(client),
        cluster.bundle.clone(),
        DOMAIN,
        ttl,
        metrics,
    );
    let cart = BTreeSet::from([id("shop", "cart")]);
    certificates.hold(&cart);
    tokio::time::timeout(PATIENCE, certificates.issued(&cart))
        .await
        .expect("no certificates from the CA service");
    (registry, certificates)
}

fn requests(registry: &Registry, result: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let series = format!("mesh_certificate_requests_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Waits until `done` holds, checking every 100 ms; fails after [`PATIENCE`] saying `what`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < PATIENCE,
            "{what} did not happen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn with_the_ca_down_for_a_while_the_agents_certificates_stay_and_renew_after() {
    let mut cluster = Cluster::start();
    // Renewed every ~2 s.
    let (registry, certificates) = agent_holding_cart(&cluster, Duration::from_secs(4)).await;
    let cart = id("shop", "cart");
    let expiry = certificates.expiries()[&cart];

    let port = cluster.ca.addr.port();
    cluster.ca.stop();
    let failed_before = requests(&registry, "failed");
    eventually("renewals failing", || {
        requests(&registry, "failed") >= failed_before + 4.0
    })
    .await;
    // Still held, still the same certificate, still valid.
    assert!(certificates.client_config(&cart).is_some());
    assert_eq!(certificates.expiries()[&cart], expiry);
    assert!(expiry > std::time::SystemTime::now());

    cluster.ca = InProcessCa::start(&cluster.api, &cluster.files, DOMAIN, port).unwrap();
    let issued_before = requests(&registry, "issued");
    eventually("renewals after the CA is back", || {
        requests(&registry, "issued") >= issued_before + 2.0
    })
    .await;
    assert!(cluster.ca.count("issued") >= 2.0);
}

#[tokio::test]
async fn when_the_ca_moves_to_a_new_key_the_agent_renews_everything_under_it() {
    let cluster = Cluster::start();
    let (registry, _certificates) = agent_holding_cart(&cluster, Duration::from_secs(3600)).await;
    let cart = id("shop", "cart");
    assert_eq!(requests(&registry, "issued"), 2.0);

    // Step 1: the bundle trusts both; step 2: the CA's files become the new CA's.
    let old = std::fs::read_to_string(&cluster.files.cert).unwrap();
    let (cert, key) = Signer::self_signed(DOMAIN).unwrap();
    let new_root = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    cluster
        .bundle
        .replace(vec![
            CertificateDer::from_pem_slice(old.as_bytes()).unwrap(),
            new_root.clone(),
        ])
        .unwrap();
    write_ca(&cluster.files, &cert, &key);
    // Both certificates (the agent's and cart's) renewed under the new key.
    eventually("both certificates renewed", || {
        requests(&registry, "issued") >= 4.0
    })
    .await;
    // Step 3: the old root goes; a new handshake with the new certificates passes: checked
    // by the CA's own answer, which chains to the new root alone now.
    cluster.bundle.replace(vec![new_root.clone()]).unwrap();
    let client = cluster.client(&cluster.agent_token(true));
    assert_eq!(ask(&client, &cart).await, Ok(new_root));
}

/// Replaces the CA's files (the certificate, then the key, as a Secret's update may land).
fn write_ca(files: &CaFiles, cert: &str, key: &str) {
    write_atomically(&files.cert, cert);
    write_atomically(&files.key, key);
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `curl` (TLS without checking, HTTP/2) at the CA service: its status and body.
fn curl(cluster: &Cluster, args: &[&str], path: &str) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-sSk",
            "--http2",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(format!("https://{}{path}", cluster.ca.addr))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let stderr = String::from_utf8_lossy(&out.stderr);
    (status.to_owned(), format!("{body}{stderr}"))
}

#[tokio::test]
async fn a_stock_client_gets_the_signer_and_clear_refusals() {
    let cluster = Cluster::start();
    let (status, body) = curl(&cluster, &[], "/v1/signer");
    assert_eq!(status, "200", "{body}");
    let root = std::fs::read_to_string(&cluster.files.cert).unwrap();
    let signer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(signer["signer"].as_str().unwrap().trim(), root.trim());

    let token = format!("authorization: Bearer {}", cluster.agent_token(true));
    let cases: [(&[&str], &str, &str); 4] = [
        (&["-d", "{}"], "401", "no bearer token"),
        (
            &["-H", &token, "-d", "not json"],
            "400",
            "not a certificate request",
        ),
        (
            &[
                "-H",
                &token,
                "-d",
                r#"{"csr": "nonsense", "ttl_seconds": 60}"#,
            ],
            "400",
            "csr",
        ),
        (&["-X", "DELETE"], "404", "no DELETE /v1/certificates"),
    ];
    for (args, status, reason) in cases {
        let (got, body) = curl(&cluster, args, "/v1/certificates");
        assert_eq!(got, status, "{args:?}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(error["error"].as_str().unwrap().contains(reason), "{body}");
    }
    // Still serving.
    assert!(
        ask(
            &cluster.client(&cluster.agent_token(true)),
            &id("shop", "cart")
        )
        .await
        .is_ok()
    );
}
