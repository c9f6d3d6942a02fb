//! Who asks the CA service, and what they may hold. The asking agent's token is checked with
//! the TokenReview API (for the CA's audience); the token's pod binding names the agent's pod,
//! whose node comes with the token or from the API's pod lookup. An agent may hold its own
//! identity and those of pods the API says run on its node (not finished), nothing else.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use hyper::StatusCode;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};

use crate::identity::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, SpiffeId};

/// The user extra fields a bound service-account token carries.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// A node's pods, once listed, answer for this long before they are listed again (a pod
/// not among them is always looked for in a fresh list).
const PODS_FRESH_FOR: Duration = Duration::from_secs(2);

/// What the CA service asks of the Kubernetes API: (API group, resource, verb), for its RBAC.
pub const CALLS: [(&str, &str, &str); 3] = [
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("", "pods", "get"),
    ("", "pods", "list"),
];

/// Checks callers and what they ask for against the Kubernetes API.
pub struct Reviewer {
    client: kube::Client,
    audience: String,
    trust_domain: String,
    /// Each node's pods, and when they were listed.
    pods_by_node: Mutex<HashMap<String, (Instant, Arc<Accounts>)>>,
}

/// The (namespace, service account) of some pods.
type Accounts = BTreeSet<(String, String)>;

/// An agent whose token checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub node: String,
    /// `namespace/name` of the agent's pod.
    pub pod: String,
}

/// Why a request gets no certificate.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the token is not valid for the CA: {0}")]
    Unauthenticated(String),
    #[error("{0} is no node agent: only node agents may ask for certificates")]
    NotAnAgent(String),
    #[error("the token is bound to no pod, so the caller's node is unknown")]
    NoPod,
    #[error("{id} is of another trust domain than {trust_domain}")]
    OtherTrustDomain { id: SpiffeId, trust_domain: String },
    #[error("no pod of {id} runs on node {node}")]
    NotOnNode { id: SpiffeId, node: String },
    #[error("the request is unusable: {0}")]
    BadRequest(String),
    #[error("the Kubernetes API cannot be asked now: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The metric's result label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::NotAnAgent(_) => "not_an_agent",
            Self::NoPod => "no_pod",
            Self::OtherTrustDomain { .. } => "other_trust_domain",
            Self::NotOnNode { .. } => "not_on_node",
            Self::BadRequest(_) => "bad_request",
            Self::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

impl Reviewer {
    pub fn new(client: kube::Client, audience: &str, trust_domain: &str) -> Self {
        Self {
            client,
            audience: audience.to_owned(),
            trust_domain: trust_domain.to_owned(),
            pods_by_node: Mutex::default(),
        }
    }

    /// The agent `token` belongs to, by the TokenReview API.
    pub async fn caller(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::Unauthenticated(why));
        }
        if let Some(audiences) = &status.audiences
            && !audiences.contains(&self.audience)
        {
            return Err(Refusal::Unauthenticated(format!(
                "minted for {audiences:?}, not {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let agent = format!("system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}");
        if username != agent {
            return Err(Refusal::NotAnAgent(username));
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let pod = one(POD_NAME).ok_or(Refusal::NoPod)?;
        let node = match one(NODE_NAME) {
            Some(node) => node,
            None => self.node_of(&pod, one(POD_UID)).await?,
        };
        Ok(Caller {
            node,
            pod: format!("{AGENT_NAMESPACE}/{pod}"),
        })
    }

    /// The node of the agent pod `name` (whose UID the token names, if it does).
    async fn node_of(&self, name: &str, uid: Option<String>) -> Result<String, Refusal> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), AGENT_NAMESPACE)
            .get_opt(name)
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?
            .ok_or(Refusal::NoPod)?;
        if uid.is_some() && pod.metadata.uid != uid {
            return Err(Refusal::NoPod);
        }
        pod.spec.and_then(|s| s.node_name).ok_or(Refusal::NoPod)
    }

    /// Whether `caller` may hold `id`: its own identity, or one a pod on its node runs as.
    pub async fn may_hold(&self, caller: &Caller, id: &SpiffeId) -> Result<(), Refusal> {
        if id.trust_domain() != self.trust_domain {
            return Err(Refusal::OtherTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if *id == SpiffeId::agent(&self.trust_domain) {
            return Ok(());
        }
        let wanted = (id.namespace().to_owned(), id.service_account().to_owned());
        if let Some(pods) = self.listed(&caller.node)
            && pods.contains(&wanted)
        {
            return Ok(());
        }
        if self.list(&caller.node).await?.contains(&wanted) {
            return Ok(());
        }
        Err(Refusal::NotOnNode {
            id: id.clone(),
            node: caller.node.clone(),
        })
    }

    /// `node`'s pods as listed less than [`PODS_FRESH_FOR`] ago.
    fn listed(&self, node: &str) -> Option<Arc<Accounts>> {
        let by_node = self
            .pods_by_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (at, pods) = by_node.get(node)?;
        (at.elapsed() < PODS_FRESH_FOR).then(|| pods.clone())
    }

    /// Lists `node`'s pods that have not finished: their (namespace, service account).
    async fn list(&self, node: &str) -> Result<Arc<Accounts>, Refusal> {
        let listed = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        let pods: Accounts = listed
            .items
            .into_iter()
            .filter(|pod| {
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
            })
            .filter(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .map(|pod| {
                let account = pod
                    .spec
                    .and_then(|s| s.service_account_name)
                    .unwrap_or_else(|| "default".into());
                (pod.metadata.namespace.unwrap_or_default(), account)
            })
            .collect();
        let pods = Arc::new(pods);
        self.pods_by_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.to_owned(), (Instant::now(), pods.clone()));
        Ok(pods)
    }
}
