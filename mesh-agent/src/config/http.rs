//! HTTP routes of a service port: which requests a route takes (matches), where it sends them
//! (weighted backends: subsets of the port's endpoints by label, or other services), how long
//! it waits and when it tries again.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

use super::{Name, Period, Seg};

/// An HTTP route of a service port. A port's routes are tried in order; the first whose
/// matches take a request carries it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    /// The route's label on request metrics.
    pub name: Name,
    /// Any of these takes a request; none takes every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Weighted; none sends every request to the port's endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// For the whole request, retries included; none waits as long as the client does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Period>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "HeaderFilter::is_empty")]
    pub request_headers: HeaderFilter,
    #[serde(default, skip_serializing_if = "HeaderFilter::is_empty")]
    pub response_headers: HeaderFilter,
}

/// What a request must have, all of it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// `{ exact: /path }`, `{ prefix: /path }` or `{ regex: ... }`.
    #[serde(
        default,
        with = "serde_yaml::with::singleton_map",
        skip_serializing_if = "Option::is_none"
    )]
    pub path: Option<PathMatch>,
    /// Upper case, like `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// How a request's path must look.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    Exact(String),
    /// Whole segments: `/api` takes `/api` and `/api/cart`, not `/apis`.
    Prefix(String),
    /// The whole path must match.
    Regex(String),
}

/// A header or query parameter `name` whose value is `value`, or matches `regex` (whole).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Where a share of a route's requests goes: the endpoints of this port whose labels include
/// `subset`, or the same port of another service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset: BTreeMap<String, String>,
    /// `namespace/name` of another service; its port `port` (this port's number if not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// When to try a request again.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Tries in all, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Each try's own limit; none leaves only the route's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Period>,
    /// What calls for another try.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Retry POST and PATCH too (they may have had an effect).
    #[serde(default)]
    pub non_idempotent: bool,
    /// The first wait before another try; each further one doubles it, with jitter.
    #[serde(default = "default_backoff")]
    pub backoff: Period,
    /// Retries allowed, as a percentage of the route's requests (over the last 10 s; at least
    /// 10 per second whatever the share), so that an outage does not multiply the load.
    #[serde(default = "default_budget")]
    pub budget_percent: u32,
}

fn default_attempts() -> u32 {
    2
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::GatewayError,
    ]
}

fn default_backoff() -> Period {
    Period(std::time::Duration::from_millis(25))
}

fn default_budget() -> u32 {
    20
}

/// A reason to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// The endpoint could not be reached: the request was never sent.
    ConnectFailure,
    /// The connection broke before a response came.
    Reset,
    /// Any 5xx response.
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// This status.
    Status(u16),
    /// A gRPC response with this status code (`grpc-status`).
    Grpc(u32),
}

/// gRPC status codes by their names in retry conditions.
const GRPC_CODES: [(&str, u32); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

impl std::str::FromStr for RetryOn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "connect-failure" => Self::ConnectFailure,
            "reset" => Self::Reset,
            "5xx" => Self::ServerError,
            "gateway-error" => Self::GatewayError,
            _ => {
                if let Some(name) = s.strip_prefix("grpc-") {
                    let code = GRPC_CODES.iter().find(|(n, _)| *n == name);
                    return code.map(|(_, c)| Self::Grpc(*c)).ok_or_else(|| {
                        format!(
                            "{s:?}: the gRPC conditions are {}",
                            GRPC_CODES.map(|(n, _)| format!("grpc-{n}")).join(", ")
                        )
                    });
                }
                match s.parse::<u16>() {
                    Ok(code) if (100..600).contains(&code) => Self::Status(code),
                    _ => {
                        return Err(format!(
                            "{s:?} is not connect-failure, reset, 5xx, gateway-error, a status \
                             code or grpc-<status>"
                        ));
                    }
                }
            }
        })
    }
}

impl std::fmt::Display for RetryOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::Reset => f.write_str("reset"),
            Self::ServerError => f.write_str("5xx"),
            Self::GatewayError => f.write_str("gateway-error"),
            Self::Status(code) => write!(f, "{code}"),
            Self::Grpc(code) => {
                let name = GRPC_CODES.iter().find(|(_, c)| c == code).map(|(n, _)| n);
                write!(f, "grpc-{}", name.unwrap_or(&"unknown"))
            }
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Headers a route sets (replacing), adds (beside any present) and removes.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderFilter {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderFilter {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// The most tries a route may make for one request.
pub const MAX_ATTEMPTS: u32 = 10;
/// The longest regex accepted (compiled size grows with it).
const MAX_REGEX: usize = 1024;

/// Checks a port's routes; `services` says whether `namespace/name` is a service with the port.
/// A failure names the path below the port.
pub(super) fn validate(
    routes: &[HttpRoute],
    has_service_port: impl Fn(&str, u16) -> bool,
    port: u16,
) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index as I, Key as K};
    for (r, route) in routes.iter().enumerate() {
        let at = |rest: &[Seg]| [&[K("routes"), I(r)], rest].concat();
        if routes[..r].iter().any(|other| other.name == route.name) {
            return Err((
                at(&[K("name")]),
                format!("route {} is listed twice", route.name),
            ));
        }
        for (m, matched) in route.matches.iter().enumerate() {
            let at = |rest: &[Seg]| at(&[&[K("matches"), I(m)], rest].concat());
            match &matched.path {
                Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if !p.starts_with('/') => {
                    return Err((at(&[K("path")]), format!("{p:?} does not start with /")));
                }
                Some(PathMatch::Regex(re)) => {
                    check_regex(re).map_err(|e| (at(&[K("path")]), e))?;
                }
                _ => {}
            }
            if let Some(method) = &matched.method
                && (Method::from_bytes(method.as_bytes()).is_err()
                    || method.to_ascii_uppercase() != *method)
            {
                return Err((
                    at(&[K("method")]),
                    format!("{method:?} is not an upper-case HTTP method"),
                ));
            }
            for (key, list) in [("headers", &matched.headers), ("query", &matched.query)] {
                for (v, value) in list.iter().enumerate() {
                    let at = |rest: &[Seg]| at(&[&[K(key), I(v)], rest].concat());
                    if key == "headers" && HeaderName::from_bytes(value.name.as_bytes()).is_err() {
                        let name = &value.name;
                        return Err((at(&[K("name")]), format!("{name:?} is not a header name")));
                    }
                    match (&value.value, &value.regex) {
                        (Some(_), None) => {}
                        (None, Some(re)) => check_regex(re).map_err(|e| (at(&[K("regex")]), e))?,
                        _ => {
                            return Err((at(&[]), "give either value or regex".into()));
                        }
                    }
                }
            }
        }
        for (b, backend) in route.backends.iter().enumerate() {
            let at = |rest: &[Seg]| at(&[&[K("backends"), I(b)], rest].concat());
            if let Some(service) = &backend.service {
                let port = backend.port.unwrap_or(port);
                if !has_service_port(service, port) {
                    return Err((
                        at(&[K("service")]),
                        format!("no service {service} with port {port} (namespace/name)"),
                    ));
                }
                if !backend.subset.is_empty() {
                    return Err((
                        at(&[K("subset")]),
                        "a subset is of this port's endpoints, not another service's".into(),
                    ));
                }
            } else if backend.port.is_some() {
                return Err((at(&[K("port")]), "a port is for another service".into()));
            }
        }
        if !route.backends.is_empty() && route.backends.iter().all(|b| b.weight == 0) {
            return Err((at(&[K("backends")]), "every weight is 0".into()));
        }
        let zero = |p: &Option<Period>| p.is_some_and(|p| p.0.is_zero());
        if zero(&route.timeout) {
            return Err((
                at(&[K("timeout")]),
                "a timeout of 0 lets nothing through".into(),
            ));
        }
        if let Some(retry) = &route.retry {
            let at = |rest: &[Seg]| at(&[&[K("retry")], rest].concat());
            if !(1..=MAX_ATTEMPTS).contains(&retry.attempts) {
                return Err((
                    at(&[K("attempts")]),
                    format!("attempts are 1 to {MAX_ATTEMPTS}, the first try included"),
                ));
            }
            if zero(&retry.per_try_timeout) {
                return Err((
                    at(&[K("per_try_timeout")]),
                    "a timeout of 0 lets nothing through".into(),
                ));
            }
            if retry.budget_percent > 100 {
                return Err((
                    at(&[K("budget_percent")]),
                    "a share of requests: 0 to 100".into(),
                ));
            }
        }
        for (key, filter) in [
            ("request_headers", &route.request_headers),
            ("response_headers", &route.response_headers),
        ] {
            let names = filter
                .set
                .keys()
                .chain(filter.add.keys())
                .chain(&filter.remove);
            for name in names {
                if HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err((at(&[K(key)]), format!("{name:?} is not a header name")));
                }
            }
            for value in filter.set.values().chain(filter.add.values()) {
                if HeaderValue::from_str(value).is_err() {
                    return Err((at(&[K(key)]), format!("{value:?} is not a header value")));
                }
            }
        }
    }
    Ok(())
}

fn check_regex(re: &str) -> Result<(), String> {
    if re.len() > MAX_REGEX {
        return Err(format!("a regex of at most {MAX_REGEX} characters"));
    }
    regex::Regex::new(re)
        .map(drop)
        .map_err(|e| format!("not a regex: {e}"))
}
