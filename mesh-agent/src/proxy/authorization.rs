//! Authorization decisions, made where the callee lives: the policies that govern a workload
//! are picked once per config ([`Policies::governing`]); each call is then decided by a pure
//! function of them and what is known of the call ([`Governing::decide`]). DENY wins over
//! ALLOW; a workload no ALLOW policy selects allows what no DENY policy denies, unless the
//! mesh denies by default.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{Arc, LazyLock},
};

use http::{HeaderMap, HeaderName, Method};

use crate::{
    config::{
        Name, Workload,
        authorization::{Action, Authorization, AuthorizationPolicy, Operation, Rule, Source},
    },
    identity::{AGENT_NAMESPACE, SpiffeId},
    observability::metrics::Metrics,
    state::routes::Routes,
};

/// The body of a 403 for a request a policy denies (Envoy's words).
pub const DENIED_BODY: &str = "RBAC: access denied";

/// The header in which the calling agent tells the serving one the caller pod's address: on
/// a tunnel's CONNECT, and on each request of a pooled HTTP connection (which carries many
/// pods' requests). The calling agent sets it over whatever the app sent; the serving agent
/// takes it off before the pod sees the request.
pub const SOURCE_ADDRESS: HeaderName = HeaderName::from_static("mesh-source-address");

/// The header of a serving agent's 403 to a CONNECT its policies deny: what denied it.
pub const DENIED_BY: HeaderName = HeaderName::from_static("mesh-denied-by");

/// The caller's address in `headers`, if the calling agent gave one.
pub fn source_address(headers: &HeaderMap) -> Option<IpAddr> {
    headers.get(SOURCE_ADDRESS)?.to_str().ok()?.parse().ok()
}

/// What is known of one call when it is decided.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The caller's identity; none for a caller the mesh does not know.
    pub source: Option<&'a SpiffeId>,
    /// The caller pod's address, where the deciding agent knows it.
    pub source_address: Option<IpAddr>,
    /// The destination pod's port.
    pub port: u16,
    /// The request, for a call served as HTTP; none for a connection.
    pub http: Option<HttpCall<'a>>,
}

/// An HTTP request being decided.
#[derive(Debug, Clone, Copy)]
pub struct HttpCall<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// The authority or `host` header, port and all.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

impl<'a> HttpCall<'a> {
    /// The request of `parts`, for `host` (its authority or `host` header).
    pub fn of(parts: &'a http::request::Parts, host: &'a str) -> Self {
        Self {
            method: &parts.method,
            path: parts.uri.path(),
            host,
            headers: &parts.headers,
        }
    }
}

/// A decision, and what made it: the `namespace/name` of the policy that matched, or
/// `no-allow-match` (ALLOW policies select the workload and none matched), `default-deny`
/// (the mesh denies by default and no ALLOW policy selects it), or empty (allowed: nothing
/// denies it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub policy: Arc<str>,
}

/// The words for decisions no policy matched.
static UNMATCHED: LazyLock<[Arc<str>; 3]> =
    LazyLock::new(|| ["".into(), "no-allow-match".into(), "default-deny".into()]);

impl Decision {
    fn allow(policy: &Arc<str>) -> Self {
        let policy = policy.clone();
        Self {
            allowed: true,
            policy,
        }
    }

    fn deny(policy: &Arc<str>) -> Self {
        let policy = policy.clone();
        Self {
            allowed: false,
            policy,
        }
    }

    /// The `action` label value: `allow` or `deny`.
    pub fn action(&self) -> &'static str {
        if self.allowed { "allow" } else { "deny" }
    }
}

/// The decision on `call` to the pod at `pod` (of this node) under `routes`' policies,
/// counted in `metrics`; none where nothing governs the pod (every call allowed, uncounted).
pub fn decide(
    routes: &Routes,
    pod: IpAddr,
    call: &Call<'_>,
    metrics: &Metrics,
) -> Option<Decision> {
    let governing = &routes.workload_at(pod)?.authorization;
    if governing.is_open() {
        return None;
    }
    let decision = governing.decide(call);
    metrics.authorized(&decision);
    Some(decision)
}

/// One policy as decisions use it.
#[derive(Debug)]
struct Policy {
    /// `namespace/name`.
    name: Arc<str>,
    rules: Vec<Rule>,
}

/// The mesh's policies, ready to be picked per workload.
pub struct Policies<'a> {
    all: Vec<(&'a AuthorizationPolicy, Arc<Policy>)>,
    default_deny: bool,
}

impl<'a> Policies<'a> {
    pub fn new(authorization: &'a Authorization) -> Self {
        let all = authorization
            .policies
            .iter()
            .map(|p| {
                let name = format!("{}/{}", p.namespace, p.name).into();
                let rules = p.rules.clone();
                (p, Arc::new(Policy { name, rules }))
            })
            .collect();
        Self {
            all,
            default_deny: authorization.default_deny,
        }
    }

    /// The policies that govern `workload`, an endpoint of `services` (namespace, name).
    pub fn governing(&self, workload: &Workload, services: &HashSet<(&Name, &Name)>) -> Governing {
        let mut governing = Governing {
            default_deny: self.default_deny,
            ..Governing::default()
        };
        for (config, policy) in &self.all {
            if !selects(config, workload, services) {
                continue;
            }
            governing.needs_http |= policy
                .rules
                .iter()
                .flat_map(|r| &r.to)
                .any(Operation::is_http);
            match config.action {
                Action::Allow => governing.allow.push(policy.clone()),
                Action::Deny => governing.deny.push(policy.clone()),
            }
        }
        governing
    }
}

/// Whether `policy` governs `workload`.
fn selects(
    policy: &AuthorizationPolicy,
    workload: &Workload,
    services: &HashSet<(&Name, &Name)>,
) -> bool {
    use crate::config::authorization::Target;
    let mesh_wide = policy.namespace.as_str() == AGENT_NAMESPACE;
    if !mesh_wide && policy.namespace != workload.namespace {
        return false;
    }
    match &policy.target {
        None => true,
        Some(Target::Workloads(labels)) => has_labels(&workload.labels, labels),
        Some(Target::Service(name)) => services.contains(&(&policy.namespace, name)),
    }
}

fn has_labels(labels: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The policies that govern one workload.
#[derive(Debug, Default)]
pub struct Governing {
    deny: Vec<Arc<Policy>>,
    allow: Vec<Arc<Policy>>,
    default_deny: bool,
    /// Whether a rule looks into HTTP requests: then HTTP is decided request by request.
    needs_http: bool,
}

impl Governing {
    /// Whether calls are decided at all: else every one is allowed, uncounted.
    pub fn is_open(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && !self.default_deny
    }

    /// Whether its rules look into HTTP requests.
    pub fn needs_http(&self) -> bool {
        self.needs_http
    }

    /// The decision on `call`.
    pub fn decide(&self, call: &Call<'_>) -> Decision {
        // A connection matches a DENY rule whatever its HTTP fields say, and never an ALLOW
        // rule that has some: either way a connection is denied sooner, not later.
        if let Some(policy) = self.deny.iter().find(|p| p.matches(call, true)) {
            return Decision::deny(&policy.name);
        }
        if let Some(policy) = self.allow.iter().find(|p| p.matches(call, false)) {
            return Decision::allow(&policy.name);
        }
        let [nothing, no_allow_match, default_deny] = &*UNMATCHED;
        match (self.allow.is_empty(), self.default_deny) {
            (false, _) => Decision::deny(no_allow_match),
            (true, true) => Decision::deny(default_deny),
            (true, false) => Decision::allow(nothing),
        }
    }
}

impl Policy {
    /// Whether a rule matches `call`; `without_http`: whether an operation's HTTP fields
    /// match a call that is no HTTP request.
    fn matches(&self, call: &Call<'_>, without_http: bool) -> bool {
        self.rules.iter().any(|rule| {
            (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, call)))
                && (rule.to.is_empty()
                    || rule
                        .to
                        .iter()
                        .any(|o| operation_matches(o, call, without_http)))
        })
    }
}

fn source_matches(source: &Source, call: &Call<'_>) -> bool {
    let principal = || {
        call.source
            .is_some_and(|id| source.principals.iter().any(|p| p.matches(id.as_str())))
    };
    let namespace = || {
        call.source
            .is_some_and(|id| source.namespaces.iter().any(|p| p.matches(id.namespace())))
    };
    let address = || {
        call.source_address.is_some_and(|a| {
            let a = a.to_canonical();
            source.ip_blocks.iter().any(|net| net.contains(&a))
        })
    };
    (source.principals.is_empty() || principal())
        && (source.namespaces.is_empty() || namespace())
        && (source.ip_blocks.is_empty() || address())
}

fn operation_matches(operation: &Operation, call: &Call<'_>, without_http: bool) -> bool {
    if !operation.ports.is_empty() && !operation.ports.contains(&call.port) {
        return false;
    }
    let Some(http) = call.http else {
        return without_http || !operation.is_http();
    };
    let host = host_without_port(http.host);
    (operation.methods.is_empty() || operation.methods.iter().any(|m| m == http.method.as_str()))
        && (operation.paths.is_empty() || operation.paths.iter().any(|p| p.matches(http.path)))
        && (operation.hosts.is_empty()
            || operation
                .hosts
                .iter()
                .any(|p| p.matches_ignoring_case(host)))
        && operation.headers.iter().all(|(name, pattern)| {
            http.headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| pattern.matches(v)))
        })
}

/// `shop.example:8080` → `shop.example`; `[::1]:80` → `[::1]`.
fn host_without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

#[cfg(test)]
mod enforced;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const OTHER_DOMAIN: &str = "spiffe://evil.example/ns/shop/sa/orders";
    const AUDIT: &str = "spiffe://cluster.local/ns/audit/sa/reader";

    /// The policies governing `payments-0` (labels app=payments, an endpoint of shop/payments)
    /// under `authorization` (YAML).
    fn governing(authorization: &str) -> Governing {
        let config = Config::parse(
            Path::new("t.yaml"),
            &format!(
                "\
node: {{ name: n1, addresses: [198.18.0.1], pod_cidrs: [198.18.1.0/24] }}
identity: {{ ca_cert: ca.crt, ca_key: ca.key }}
workloads:
  - {{ name: payments-0, namespace: shop, service_account: payments, addresses: [198.18.1.5],
      labels: {{ app: payments }}, cgroup: /p }}
services:
  - {{ name: payments, namespace: shop, addresses: [198.19.0.5], ports: [{{ port: 80, target_port: 8080 }}],
      endpoints: [{{ address: 198.18.1.5, node: n1 }}] }}
authorization:
  {authorization}"
            ),
        )
        .unwrap();
        let (shop, payments) = (&config.services[0].namespace, &config.services[0].name);
        let services = HashSet::from([(shop, payments)]);
        Policies::new(&config.authorization).governing(&config.workloads[0], &services)
    }

    struct Case {
        source: Option<&'static str>,
        address: &'static str,
        port: u16,
        /// Method and path, for an HTTP request.
        http: Option<(&'static str, &'static str)>,
    }

    const fn tcp(source: &'static str, port: u16) -> Case {
        Case {
            source: Some(source),
            address: "198.18.1.9",
            port,
            http: None,
        }
    }

    const fn request(source: &'static str, method: &'static str, path: &'static str) -> Case {
        Case {
            source: Some(source),
            address: "198.18.1.9",
            port: 8080,
            http: Some((method, path)),
        }
    }

    /// The decision on `case` in a word: `allow`, `allow by shop/x`, `deny by shop/y`.
    fn decide(governing: &Governing, case: &Case) -> String {
        let id = case.source.map(|s| SpiffeId::parse(s).unwrap());
        let method = case
            .http
            .map(|(m, _)| Method::from_bytes(m.as_bytes()).unwrap());
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "acme".parse().unwrap());
        let call = Call {
            source: id.as_ref(),
            source_address: Some(case.address.parse().unwrap()),
            port: case.port,
            http: case.http.map(|(_, path)| HttpCall {
                method: method.as_ref().unwrap(),
                path,
                host: "Payments.shop:80",
                headers: &headers,
            }),
        };
        match governing.decide(&call) {
            Decision {
                allowed: true,
                policy,
            } if policy.is_empty() => "allow".into(),
            decision => format!("{} by {}", decision.action(), decision.policy),
        }
    }

    #[test]
    fn decisions() {
        let only_orders_may_charge = "\
  policies:
    - name: charge
      namespace: shop
      target: { service: payments }
      action: allow
      rules:
        - from: [{ principals: [spiffe://cluster.local/ns/shop/sa/orders] }]
          to: [{ methods: [POST], paths: [/charge, /refunds/*] }]
        - from: [{ namespaces: [audit] }]
          to: [{ methods: [GET], hosts: [payments.shop] }]
";
        let deny_web_anything = "\
  policies:
    - name: no-web
      namespace: shop
      target: { workloads: { app: payments } }
      action: deny
      rules: [{ from: [{ principals: ['*/sa/web'] }] }]
";
        let deny_and_allow = "\
  policies:
    - name: no-deletes
      namespace: shop
      action: deny
      rules: [{ to: [{ methods: [DELETE] }] }]
    - name: shop-callers
      namespace: shop
      action: allow
      rules: [{ from: [{ principals: ['spiffe://cluster.local/ns/shop/*'] }] }]
";
        let ports_and_blocks = "\
  policies:
    - name: metrics-from-node
      namespace: mesh-system
      action: allow
      rules:
        - from: [{ ip_blocks: [198.18.1.0/28] }]
          to: [{ ports: [9090] }]
        - to: [{ ports: [8080], headers: { x-tenant: 'ac*' } }]
";
        let elsewhere = "\
  policies:
    - { name: cart-only, namespace: shop, target: { service: cart }, action: allow }
    - { name: other-ns, namespace: audit, action: deny, rules: [{}] }
";
        let table: &[(&str, &str, Case, &str)] = &[
            // (what, authorization, call, decision)
            ("nothing governs", "  {}", tcp(WEB, 8080), "allow"),
            (
                "default deny",
                "  default_deny: true",
                tcp(ORDERS, 8080),
                "deny by default-deny",
            ),
            (
                "allowed request",
                only_orders_may_charge,
                request(ORDERS, "POST", "/charge"),
                "allow by shop/charge",
            ),
            (
                "prefix path",
                only_orders_may_charge,
                request(ORDERS, "POST", "/refunds/7"),
                "allow by shop/charge",
            ),
            (
                "wrong method",
                only_orders_may_charge,
                request(ORDERS, "GET", "/charge"),
                "deny by no-allow-match",
            ),
            (
                "wrong caller",
                only_orders_may_charge,
                request(WEB, "POST", "/charge"),
                "deny by no-allow-match",
            ),
            (
                "other trust domain",
                only_orders_may_charge,
                request(OTHER_DOMAIN, "POST", "/charge"),
                "deny by no-allow-match",
            ),
            (
                "no identity",
                only_orders_may_charge,
                Case {
                    source: None,
                    ..request(ORDERS, "POST", "/charge")
                },
                "deny by no-allow-match",
            ),
            (
                "namespace and host in any case",
                only_orders_may_charge,
                request(AUDIT, "GET", "/charges"),
                "allow by shop/charge",
            ),
            (
                "a connection never matches HTTP fields of an ALLOW rule",
                only_orders_may_charge,
                tcp(ORDERS, 8080),
                "deny by no-allow-match",
            ),
            (
                "deny by suffix",
                deny_web_anything,
                tcp(WEB, 8080),
                "deny by shop/no-web",
            ),
            (
                "deny leaves the rest open",
                deny_web_anything,
                tcp(ORDERS, 8080),
                "allow",
            ),
            (
                "deny wins over allow",
                deny_and_allow,
                request(ORDERS, "DELETE", "/x"),
                "deny by shop/no-deletes",
            ),
            (
                "a DENY rule's HTTP fields match any connection",
                deny_and_allow,
                tcp(ORDERS, 8080),
                "deny by shop/no-deletes",
            ),
            (
                "allow by prefix",
                deny_and_allow,
                request(ORDERS, "GET", "/x"),
                "allow by shop/shop-callers",
            ),
            (
                "prefix of another namespace",
                deny_and_allow,
                request(AUDIT, "GET", "/x"),
                "deny by no-allow-match",
            ),
            (
                "mesh-wide, ip block and port",
                ports_and_blocks,
                Case {
                    port: 9090,
                    ..tcp(AUDIT, 0)
                },
                "allow by mesh-system/metrics-from-node",
            ),
            (
                "outside the block",
                ports_and_blocks,
                Case {
                    port: 9090,
                    address: "198.18.1.99",
                    ..tcp(AUDIT, 0)
                },
                "deny by no-allow-match",
            ),
            (
                "header pattern",
                ports_and_blocks,
                request(WEB, "GET", "/"),
                "allow by mesh-system/metrics-from-node",
            ),
            (
                "policies of other targets and namespaces",
                elsewhere,
                tcp(WEB, 8080),
                "allow",
            ),
        ];
        for (what, authorization, case, expected) in table {
            let governing = governing(authorization);
            assert_eq!(decide(&governing, case), *expected, "{what}");
        }
    }

    #[test]
    fn what_a_workload_needs_decided() {
        assert!(governing("  {}").is_open());
        assert!(!governing("  default_deny: true").is_open());
        let http = "  policies: [{ name: a, namespace: shop, action: allow, rules: [{ to: [{ paths: [/a] }] }] }]";
        assert!(governing(http).needs_http());
        let tcp = "  policies: [{ name: a, namespace: shop, action: allow, rules: [{ to: [{ ports: [1] }] }] }]";
        assert!(!governing(tcp).needs_http());
    }

    #[test]
    fn hosts_lose_their_port() {
        for (host, expected) in [
            ("shop:80", "shop"),
            ("shop", "shop"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
        ] {
            assert_eq!(host_without_port(host), expected);
        }
    }
}
