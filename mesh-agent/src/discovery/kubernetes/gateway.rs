//! The Gateway API's HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`) with a Service
//! as parent, the GAMMA mesh profile, made into a service port's routes. Only the fields the
//! agent uses are read; the types are the agent's own (the `gateway-api` crate is built on an
//! older kube and k8s-openapi than the agent's).
//!
//! A route's rules become the port's routes in the Gateway API's order of precedence (exact
//! path, then longer prefix, then method, then more headers, then more query parameters;
//! among equals, the older route, then its namespace/name): each match of a rule one route,
//! named `<route>-r<rule>` (`-m<match>` when a rule has several). Only producer routes (in the
//! service's namespace) apply: consumer routes would apply to their namespace's callers only,
//! which a per-node route table does not tell apart.

use std::collections::BTreeMap;

use k8s_openapi::{
    Metadata, NamespaceResourceScope, Resource,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::Deserialize;

use crate::config::{
    Name, Period,
    http::{Backend, HeaderFilter, HttpRoute, PathMatch, Retry, RetryOn, RouteMatch, ValueMatch},
};

/// An HTTPRoute: its metadata and spec, as far as the agent reads them.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct HTTPRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RouteSpec,
}

/// A GRPCRoute, likewise.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct GRPCRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RouteSpec,
}

macro_rules! gateway_resource {
    ($type:ident, $kind:literal, $plural:literal) => {
        impl Resource for $type {
            const API_VERSION: &'static str = "gateway.networking.k8s.io/v1";
            const GROUP: &'static str = "gateway.networking.k8s.io";
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = NamespaceResourceScope;
        }

        impl Metadata for $type {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

gateway_resource!(HTTPRoute, "HTTPRoute", "httproutes");
gateway_resource!(GRPCRoute, "GRPCRoute", "grpcroutes");

/// The spec both kinds share the shape of (a GRPCRoute's matches name a service and method).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub matches: Vec<Match>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<RetrySpec>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    pub path: Option<StringMatch>,
    pub method: Option<serde_json::Value>,
    #[serde(default)]
    pub headers: Vec<NamedMatch>,
    #[serde(default)]
    pub query_params: Vec<NamedMatch>,
}

/// `{ type, value }`: an HTTPRoute path.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct StringMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct NamedMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<Header>,
    #[serde(default)]
    pub add: Vec<Header>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<u16>,
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct RetrySpec {
    #[serde(default)]
    pub codes: Vec<u16>,
    pub attempts: Option<u32>,
    pub backoff: Option<String>,
}

/// A route of either kind, as the mapping reads it.
pub struct AnyRoute<'a> {
    pub grpc: bool,
    pub metadata: &'a ObjectMeta,
    pub spec: &'a RouteSpec,
}

impl<'a> From<&'a HTTPRoute> for AnyRoute<'a> {
    fn from(r: &'a HTTPRoute) -> Self {
        Self {
            grpc: false,
            metadata: &r.metadata,
            spec: &r.spec,
        }
    }
}

impl<'a> From<&'a GRPCRoute> for AnyRoute<'a> {
    fn from(r: &'a GRPCRoute) -> Self {
        Self {
            grpc: true,
            metadata: &r.metadata,
            spec: &r.spec,
        }
    }
}

impl AnyRoute<'_> {
    /// Whether the route's parents include the service `namespace/name` at `port`.
    pub fn attaches_to(&self, namespace: &str, name: &str, port: u16) -> bool {
        self.metadata.namespace.as_deref() == Some(namespace)
            && self.spec.parent_refs.iter().any(|p| {
                p.kind.as_deref() == Some("Service")
                    && p.group.as_deref().is_none_or(str::is_empty)
                    && p.namespace.as_deref().is_none_or(|ns| ns == namespace)
                    && p.name == name
                    && p.port.is_none_or(|p| p == port)
            })
    }
}

/// What orders routes: path kind and length, method, headers, query parameters.
type Rank = (u8, usize, bool, usize, usize);

/// One route of the config with what orders it among the others.
struct Ranked {
    route: HttpRoute,
    rank: Rank,
    created: Option<Time>,
    key: String,
}

/// The routes that `routes` make for port `port` of the service `namespace/name`, in the
/// Gateway API's order of precedence; `has_port` says whether a backend service exists with
/// a port. What cannot be mapped is said in `skipped`.
pub fn routes_of(
    routes: &[AnyRoute<'_>],
    (namespace, name, port): (&str, &str, u16),
    has_port: impl Fn(&str, u16) -> bool,
    skipped: &mut Vec<String>,
) -> Vec<HttpRoute> {
    let mut ranked = Vec::new();
    for route in routes
        .iter()
        .filter(|r| r.attaches_to(namespace, name, port))
    {
        let route_name = route.metadata.name.clone().unwrap_or_default();
        let what = format!(
            "{} {namespace}/{route_name}",
            if route.grpc { "GRPCRoute" } else { "HTTPRoute" }
        );
        for (r, rule) in route.spec.rules.iter().enumerate() {
            let Some(backends) = backends(rule, namespace, name, port, &has_port) else {
                skipped.push(format!(
                    "{what} rule {r}: no backend is a known service port"
                ));
                continue;
            };
            let (request_headers, response_headers) = header_filters(rule);
            let timeout = rule
                .timeouts
                .as_ref()
                .and_then(|t| period(t.request.as_deref()));
            let retry = rule.retry.as_ref().map(|retry| Retry {
                attempts: retry.attempts.unwrap_or(1).saturating_add(1).min(10),
                per_try_timeout: rule
                    .timeouts
                    .as_ref()
                    .and_then(|t| period(t.backend_request.as_deref())),
                on: [RetryOn::ConnectFailure, RetryOn::Reset]
                    .into_iter()
                    .chain(retry.codes.iter().map(|c| RetryOn::Status(*c)))
                    .collect(),
                non_idempotent: false,
                backoff: period(retry.backoff.as_deref())
                    .unwrap_or(Period(std::time::Duration::from_millis(25))),
                budget_percent: 20,
            });
            let matches: Vec<RouteMatch> = if rule.matches.is_empty() {
                vec![RouteMatch::default()]
            } else {
                rule.matches
                    .iter()
                    .map(|m| route_match(m, route.grpc))
                    .collect()
            };
            for (m, matched) in matches.iter().enumerate() {
                let suffix = if matches.len() > 1 {
                    format!("-r{r}-m{m}")
                } else {
                    format!("-r{r}")
                };
                let Ok(route_name) = format!("{route_name}{suffix}").parse::<Name>() else {
                    skipped.push(format!(
                        "{what}: {route_name}{suffix} is no valid route name"
                    ));
                    continue;
                };
                ranked.push(Ranked {
                    rank: rank(matched),
                    created: route.metadata.creation_timestamp.clone(),
                    key: format!(
                        "{namespace}/{}",
                        route.metadata.name.as_deref().unwrap_or("")
                    ),
                    route: HttpRoute {
                        name: route_name,
                        matches: vec![matched.clone()],
                        backends: backends.clone(),
                        timeout,
                        retry: retry.clone(),
                        request_headers: request_headers.clone(),
                        response_headers: response_headers.clone(),
                    },
                });
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.rank
            .cmp(&a.rank)
            .then_with(|| {
                a.created
                    .as_ref()
                    .map(|t| t.0)
                    .cmp(&b.created.as_ref().map(|t| t.0))
            })
            .then_with(|| a.key.cmp(&b.key))
    });
    ranked.into_iter().map(|r| r.route).collect()
}

/// Higher goes first: an exact path, then a longer prefix (or regex), then a method, then more
/// headers, then more query parameters.
fn rank(m: &RouteMatch) -> Rank {
    let (kind, length) = match &m.path {
        Some(PathMatch::Exact(p)) => (2, p.len()),
        Some(PathMatch::Prefix(p) | PathMatch::Regex(p)) => (1, p.len()),
        None => (0, 0),
    };
    (
        kind,
        length,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

fn route_match(m: &Match, grpc: bool) -> RouteMatch {
    let path = if grpc {
        // A GRPCRoute's method: { service, method } names /service/method.
        m.method.as_ref().and_then(|method| {
            let service = method.get("service")?.as_str()?;
            Some(match method.get("method").and_then(|m| m.as_str()) {
                Some(name) => PathMatch::Exact(format!("/{service}/{name}")),
                None => PathMatch::Prefix(format!("/{service}")),
            })
        })
    } else {
        m.path.as_ref().map(|p| {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            match p.kind.as_deref() {
                Some("Exact") => PathMatch::Exact(value),
                Some("RegularExpression") => PathMatch::Regex(value),
                _ => PathMatch::Prefix(value),
            }
        })
    };
    let named = |list: &[NamedMatch], lowercase: bool| {
        list.iter()
            .map(|h| {
                let regex = h.kind.as_deref() == Some("RegularExpression");
                ValueMatch {
                    name: if lowercase {
                        h.name.to_ascii_lowercase()
                    } else {
                        h.name.clone()
                    },
                    value: (!regex).then(|| h.value.clone()),
                    regex: regex.then(|| h.value.clone()),
                }
            })
            .collect()
    };
    RouteMatch {
        path,
        method: if grpc {
            None
        } else {
            m.method.as_ref().and_then(|m| m.as_str()).map(String::from)
        },
        headers: named(&m.headers, true),
        query: named(&m.query_params, false),
    }
}

/// The rule's backends: the parent itself (all of its port's endpoints) or other services;
/// `None` if none is a known service port.
fn backends(
    rule: &Rule,
    namespace: &str,
    name: &str,
    port: u16,
    has_port: &impl Fn(&str, u16) -> bool,
) -> Option<Vec<Backend>> {
    if rule.backend_refs.is_empty() {
        return None;
    }
    let backends: Vec<Backend> = rule
        .backend_refs
        .iter()
        .filter(|b| b.kind.as_deref().is_none_or(|k| k == "Service"))
        .filter_map(|b| {
            let ns = b.namespace.as_deref().unwrap_or(namespace);
            let backend_port = b.port.unwrap_or(port);
            let this = ns == namespace && b.name == name && backend_port == port;
            let service = format!("{ns}/{}", b.name);
            (this || has_port(&service, backend_port)).then(|| Backend {
                subset: BTreeMap::new(),
                service: (!this).then_some(service),
                port: (!this).then_some(backend_port),
                weight: b.weight.unwrap_or(1),
            })
        })
        .collect();
    (!backends.is_empty() && backends.iter().any(|b| b.weight > 0)).then_some(backends)
}

fn header_filters(rule: &Rule) -> (HeaderFilter, HeaderFilter) {
    let filter = |modifier: Option<&HeaderModifier>| {
        modifier.map_or_else(HeaderFilter::default, |m| HeaderFilter {
            set: m
                .set
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
            add: m
                .add
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
            remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        })
    };
    let find = |kind: &str| rule.filters.iter().find(|f| f.kind == kind);
    (
        filter(find("RequestHeaderModifier").and_then(|f| f.request_header_modifier.as_ref())),
        filter(find("ResponseHeaderModifier").and_then(|f| f.response_header_modifier.as_ref())),
    )
}

/// A Gateway API duration the agent's periods can say (`500ms`, `10s`, `1m`, `1h`).
fn period(text: Option<&str>) -> Option<Period> {
    text?.parse().ok().filter(|p: &Period| !p.0.is_zero())
}
