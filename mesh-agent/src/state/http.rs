//! The HTTP side of a service port, compiled from its config: which route takes a request (a
//! pure function of the request's method, path, query and headers), which backend a route
//! sends it to (by weight), how long it may take and when it is tried again.

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, request::Parts};
use regex::Regex;

use crate::{
    config::{
        Protocol,
        http::{self as config, PathMatch},
    },
    proxy::http::retry::RetryPolicy,
    state::routes::ServicePort,
};

/// What the endpoints of an HTTP port speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    Http1,
    /// HTTP/2 without TLS (h2c), gRPC included.
    Http2,
}

impl Upstream {
    /// The tunnel's CONNECT header that says a stream carries HTTP requests of this protocol
    /// (the serving agent then serves them one by one).
    pub const HEADER: &'static str = "mesh-protocol";

    /// This protocol as [`Upstream::HEADER`] names it.
    pub fn token(self) -> &'static str {
        match self {
            Upstream::Http1 => "http/1.1",
            Upstream::Http2 => "h2",
        }
    }

    /// The protocol [`Upstream::HEADER`] names, if any.
    pub fn from_token(token: &[u8]) -> Option<Self> {
        match token {
            b"http/1.1" => Some(Upstream::Http1),
            b"h2" => Some(Upstream::Http2),
            _ => None,
        }
    }
}

/// An HTTP port's routes, tried in order.
#[derive(Debug)]
pub struct HttpPort {
    pub upstream: Upstream,
    routes: Vec<HttpRoute>,
}

/// One route, compiled.
#[derive(Debug)]
pub struct HttpRoute {
    /// Its label on request metrics.
    pub name: Arc<str>,
    matches: Vec<Matcher>,
    backends: Vec<(u32, Arc<ServicePort>)>,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
}

#[derive(Debug, Default)]
struct Matcher {
    path: Option<PathMatcher>,
    method: Option<http::Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(v) => v == value,
            ValueMatcher::Regex(re) => re.is_match(value),
        }
    }
}

/// Headers set, added and removed.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdits {
    fn new(filter: &config::HeaderFilter) -> Self {
        // The config's checks have made sure of the names and values.
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect()
        };
        Self {
            set: pairs(&filter.set),
            add: pairs(&filter.add),
            remove: filter
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// Applies the edits to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A whole-string regex (the config's checks compiled it already).
fn anchored(re: &str) -> Option<Regex> {
    Regex::new(&format!("^(?:{re})$")).ok()
}

impl HttpPort {
    /// The HTTP side of the port `this` (its config `config`, its protocol `protocol`);
    /// `service` finds another service's base port by (`namespace/name`, port number), and
    /// `subset` makes a port of this one's endpoints whose labels include the given ones.
    pub fn new(
        protocol: Protocol,
        config: &crate::config::ServicePort,
        this: &Arc<ServicePort>,
        service: impl Fn(&str, u16) -> Option<Arc<ServicePort>>,
        subset: impl Fn(&std::collections::BTreeMap<String, String>) -> Arc<ServicePort>,
    ) -> Self {
        let upstream = match protocol {
            Protocol::Http2 | Protocol::Grpc => Upstream::Http2,
            _ => Upstream::Http1,
        };
        let mut routes: Vec<HttpRoute> = config
            .routes
            .iter()
            .map(|r| HttpRoute::new(r, config.port, this, &service, &subset))
            .collect();
        if routes.is_empty() {
            routes.push(HttpRoute {
                name: "default".into(),
                matches: Vec::new(),
                backends: vec![(1, this.clone())],
                timeout: None,
                retry: RetryPolicy::connect_failures_only(),
                request_headers: HeaderEdits::default(),
                response_headers: HeaderEdits::default(),
            });
        }
        Self { upstream, routes }
    }

    /// The first route that takes the request, if any.
    pub fn route(&self, request: &Parts) -> Option<&HttpRoute> {
        self.routes.iter().find(|r| r.takes(request))
    }
}

impl HttpRoute {
    fn new(
        route: &config::HttpRoute,
        port: u16,
        this: &Arc<ServicePort>,
        service: &impl Fn(&str, u16) -> Option<Arc<ServicePort>>,
        subset: &impl Fn(&std::collections::BTreeMap<String, String>) -> Arc<ServicePort>,
    ) -> Self {
        let value = |v: &config::ValueMatch| match (&v.value, &v.regex) {
            (_, Some(re)) => anchored(re).map(ValueMatcher::Regex),
            (Some(value), None) => Some(ValueMatcher::Exact(value.clone())),
            (None, None) => None,
        };
        let matches = route
            .matches
            .iter()
            .map(|m| Matcher {
                path: m.path.as_ref().and_then(|p| match p {
                    PathMatch::Exact(p) => Some(PathMatcher::Exact(p.clone())),
                    PathMatch::Prefix(p) => {
                        Some(PathMatcher::Prefix(p.trim_end_matches('/').to_owned()))
                    }
                    PathMatch::Regex(re) => anchored(re).map(PathMatcher::Regex),
                }),
                method: m
                    .method
                    .as_ref()
                    .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok()),
                headers: m
                    .headers
                    .iter()
                    .filter_map(|h| {
                        Some((HeaderName::from_bytes(h.name.as_bytes()).ok()?, value(h)?))
                    })
                    .collect(),
                query: m
                    .query
                    .iter()
                    .filter_map(|q| Some((q.name.clone(), value(q)?)))
                    .collect(),
            })
            .collect();
        let backends = if route.backends.is_empty() {
            vec![(1, this.clone())]
        } else {
            route
                .backends
                .iter()
                .filter_map(|b| {
                    let target = match &b.service {
                        Some(name) => service(name, b.port.unwrap_or(port))?,
                        None if b.subset.is_empty() => this.clone(),
                        None => subset(&b.subset),
                    };
                    Some((b.weight, target))
                })
                .collect()
        };
        Self {
            name: route.name.as_str().into(),
            matches,
            backends,
            timeout: route.timeout.map(|t| t.0),
            retry: route
                .retry
                .as_ref()
                .map_or_else(RetryPolicy::connect_failures_only, RetryPolicy::new),
            request_headers: HeaderEdits::new(&route.request_headers),
            response_headers: HeaderEdits::new(&route.response_headers),
        }
    }

    fn takes(&self, request: &Parts) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.takes(request))
    }

    /// A backend, chosen by weight; `None` if every weight is 0.
    pub fn backend(&self) -> Option<&Arc<ServicePort>> {
        let total: u32 = self.backends.iter().map(|(w, _)| w).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = fastrand::u32(..total);
        self.backends.iter().find_map(|(weight, port)| {
            if ticket < *weight {
                Some(port)
            } else {
                ticket -= weight;
                None
            }
        })
    }
}

impl Matcher {
    fn takes(&self, request: &Parts) -> bool {
        let path = request.uri.path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatcher::Exact(p)) => path == p,
            Some(PathMatcher::Prefix(p)) => {
                p.is_empty()
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Some(PathMatcher::Regex(re)) => re.is_match(path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| request.method == m)
            && self.headers.iter().all(|(name, want)| {
                request
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
            })
            && self.query.iter().all(|(name, want)| {
                let query = request.uri.query().unwrap_or_default();
                form_urlencoded::parse(query.as_bytes())
                    .any(|(k, v)| k == *name && want.matches(&v))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        config::Config,
        state::routes::{Route, Routes},
        testing,
    };

    fn routes(yaml_routes: &str) -> Routes {
        let text = format!(
            "\
node: {{ name: n1, addresses: [198.18.0.1], pod_cidrs: [198.18.1.0/24] }}
identity: {{ ca_cert: ca.crt, ca_key: ca.key }}
services:
  - name: cart
    namespace: shop
    addresses: [198.19.0.10]
    ports:
      - port: 80
        target_port: 8080
        protocol: http
        routes:
{yaml_routes}
    endpoints:
      - {{ address: 198.18.1.2, node: n1, labels: {{ version: v1 }} }}
      - {{ address: 198.18.1.3, node: n1, labels: {{ version: v2 }} }}
  - name: cart-next
    namespace: shop
    addresses: [198.19.0.11]
    ports: [{{ port: 80, target_port: 9090 }}]
    endpoints: [{{ address: 198.18.1.4, node: n1 }}]
"
        );
        let config = Config::parse(std::path::Path::new("t.yaml"), &text).unwrap();
        testing::routes(Arc::new(config))
    }

    fn http_port(r: &Routes) -> Arc<ServicePort> {
        match r.route("198.19.0.10:80".parse().unwrap()) {
            Ok(Route::Service(port)) => port,
            _ => panic!("no service"),
        }
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_first_route_that_takes_a_request_carries_it() {
        let r = routes(
            "          - name: exact
            matches: [{ path: { exact: /health } }]
          - name: canary
            matches: [{ headers: [{ name: x-canary, value: \"1\" }] }, { query: [{ name: canary, regex: \"yes|1\" }] }]
          - name: api-post
            matches: [{ path: { prefix: /api/ }, method: POST }]
          - name: items
            matches: [{ path: { regex: \"/items/[0-9]+\" } }]
          - name: api
            matches: [{ path: { prefix: /api } }]
",
        );
        let port = http_port(&r);
        let http = port.http.as_ref().unwrap();
        type Row<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let rows: [Row; 12] = [
            // (method, uri, headers, route)
            ("GET", "/health", &[], Some("exact")),
            ("GET", "/health/deep", &[], None),
            ("GET", "/anything", &[("x-canary", "1")], Some("canary")),
            ("GET", "/anything", &[("x-canary", "2")], None),
            ("GET", "/anything?canary=yes&b=2", &[], Some("canary")),
            ("GET", "/anything?canary=yess", &[], None),
            ("POST", "/api/cart", &[], Some("api-post")),
            ("POST", "/api", &[], Some("api-post")),
            ("GET", "/api/cart", &[], Some("api")),
            ("GET", "/apis", &[], None),
            ("GET", "/items/42", &[], Some("items")),
            ("GET", "/items/42/x", &[], None),
        ];
        for (method, uri, headers, expected) in rows {
            let got = http.route(&request(method, uri, headers)).map(|r| &*r.name);
            assert_eq!(got, expected, "{method} {uri} {headers:?}");
        }
    }

    #[test]
    fn weights_split_between_subsets_and_services() {
        let r = routes(
            "          - name: split
            backends:
              - { subset: { version: v1 }, weight: 70 }
              - { subset: { version: v2 }, weight: 20 }
              - { service: shop/cart-next, weight: 10 }
",
        );
        let port = http_port(&r);
        let route = port
            .http
            .as_ref()
            .unwrap()
            .route(&request("GET", "/", &[]))
            .unwrap();
        fastrand::seed(11);
        let mut counts = std::collections::BTreeMap::<SocketAddr, u32>::new();
        for _ in 0..10_000 {
            let backend = route.backend().unwrap();
            let (lease, _) = backend.pick(&[]).unwrap();
            *counts.entry(lease.endpoint().addr).or_default() += 1;
        }
        let share = |a: &str| counts[&a.parse::<SocketAddr>().unwrap()];
        // Binomial: within 4 standard deviations of 7,000, 2,000 and 1,000; the other
        // service's endpoint at its own target port.
        assert!(
            (6820..=7180).contains(&share("198.18.1.2:8080")),
            "{counts:?}"
        );
        assert!(
            (1840..=2160).contains(&share("198.18.1.3:8080")),
            "{counts:?}"
        );
        assert!(
            (880..=1120).contains(&share("198.18.1.4:9090")),
            "{counts:?}"
        );
    }

    #[test]
    fn a_port_without_routes_sends_everything_to_its_endpoints() {
        let r = routes("          []\n");
        let port = http_port(&r);
        let route = port
            .http
            .as_ref()
            .unwrap()
            .route(&request("DELETE", "/x?y", &[]))
            .unwrap();
        assert_eq!(&*route.name, "default");
        assert_eq!(route.backend().unwrap().endpoint_count(), 2);
    }

    #[test]
    fn header_edits_set_add_and_remove() {
        let edits = HeaderEdits::new(&config::HeaderFilter {
            set: [("x-set".into(), "new".into())].into(),
            add: [("x-add".into(), "2".into())].into(),
            remove: vec!["x-gone".into()],
        });
        let mut headers = request(
            "GET",
            "/",
            &[
                ("x-set", "old"),
                ("x-add", "1"),
                ("x-gone", "a"),
                ("x-kept", "k"),
            ],
        )
        .headers;
        edits.apply(&mut headers);
        assert_eq!(headers["x-set"], "new");
        assert_eq!(headers.get_all("x-add").iter().count(), 2);
        assert!(headers.get("x-gone").is_none());
        assert_eq!(headers["x-kept"], "k");
    }
}
