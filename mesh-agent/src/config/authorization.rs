//! Who may call whom: authorization policies (Istio's AuthorizationPolicy, in this file's
//! words), the mesh-wide default and strict mode. `proxy::authorization` decides with them.

use std::{collections::BTreeMap, fmt, marker::PhantomData, str::FromStr};

use http::{HeaderName, Method};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use super::{Name, ParsedStr, Seg, display_path};
use crate::identity::SpiffeId;

/// The mesh's authorization: its policies, what a workload no ALLOW policy selects gets, and
/// which workloads accept TCP only through the mesh.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// Deny every call that no ALLOW policy allows, on every workload.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_deny: bool,
    #[serde(default, skip_serializing_if = "Strict::is_off")]
    pub strict: Strict,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<AuthorizationPolicy>,
}

/// Which enrolled pods accept TCP only from their node (its agent, its kubelet): the kernel
/// drops other callers' connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Strict {
    /// Every enrolled pod.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// The enrolled pods of these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Name>,
}

impl Strict {
    fn is_off(&self) -> bool {
        !self.all && self.namespaces.is_empty()
    }

    /// Whether the enrolled pods of `namespace` are strict.
    pub fn covers(&self, namespace: &Name) -> bool {
        self.all || self.namespaces.contains(namespace)
    }
}

/// One policy: the workloads it governs, and what it does with the calls its rules match.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: Name,
    /// It governs workloads of this namespace; of every namespace if it is the mesh's own
    /// (`mesh-system`).
    pub namespace: Name,
    /// Which of them: `{ service: name }`, `{ workloads: { label: value } }`, or every
    /// one if not given.
    #[serde(
        default,
        with = "serde_yaml::with::singleton_map",
        skip_serializing_if = "Option::is_none"
    )]
    pub target: Option<Target>,
    pub action: Action,
    /// Any of them matches a call. An ALLOW policy without rules allows nothing (it makes the
    /// workloads it selects deny by default); a DENY policy without rules denies nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// The workloads a policy governs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// The endpoints of this service of the policy's namespace.
    Service(Name),
    /// The workloads with all of these labels.
    Workloads(BTreeMap<String, String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// A call matches when it comes from one of `from` (anyone if empty) and asks for one of
/// `to` (anything if empty).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// Callers; each given field must match (any of its entries).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs: exact, `spiffe://cluster.local/ns/shop/*` (prefix), `*/sa/orders`
    /// (suffix), or `*` (any caller with an identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<Pattern>,
    /// The callers' namespaces (from their identities), matched the same way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Pattern>,
    /// The callers' pod addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpNet>,
}

/// What is asked; each given field must match (any of its entries). Methods, paths, hosts
/// and headers are HTTP's: a connection not served as HTTP matches none of an ALLOW rule
/// that names them, and a DENY rule ignores them (either way the call is denied sooner).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// The destination pod's ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths without the query: exact, `/api/*` or `*.json`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<Pattern>,
    /// The request's host, without its port, in any case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Pattern>,
    /// Headers that must be there with a matching value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Pattern>,
}

impl Operation {
    /// Whether it names anything only HTTP requests have.
    pub fn is_http(&self) -> bool {
        !self.methods.is_empty()
            || !self.paths.is_empty()
            || !self.hosts.is_empty()
            || !self.headers.is_empty()
    }
}

/// A string matched exactly, by prefix (`abc*`), by suffix (`*abc`), or `*` (anything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Exact(p) => s == p,
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
            Pattern::Suffix(p) => s.ends_with(p.as_str()),
            Pattern::Any => true,
        }
    }

    /// Whether `s` matches, in any case.
    pub fn matches_ignoring_case(&self, s: &str) -> bool {
        let same = |a: Option<&str>, b: &str| a.is_some_and(|a| a.eq_ignore_ascii_case(b));
        match self {
            Pattern::Exact(p) => s.eq_ignore_ascii_case(p),
            Pattern::Prefix(p) => same(s.get(..p.len()), p),
            Pattern::Suffix(p) => same(s.len().checked_sub(p.len()).and_then(|i| s.get(i..)), p),
            Pattern::Any => true,
        }
    }
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let pattern = match (s.strip_prefix('*'), s.strip_suffix('*')) {
            _ if s == "*" => Pattern::Any,
            (Some(rest), None) => Pattern::Suffix(rest.to_owned()),
            (None, Some(rest)) => Pattern::Prefix(rest.to_owned()),
            (None, None) if !s.is_empty() => Pattern::Exact(s.to_owned()),
            _ => {
                return Err(format!(
                    "{s:?}: a pattern is a string, `prefix*`, `*suffix` or `*`"
                ));
            }
        };
        if let Pattern::Exact(p) | Pattern::Prefix(p) | Pattern::Suffix(p) = &pattern
            && p.contains('*')
        {
            return Err(format!(
                "{s:?}: `*` may only start or end a pattern (prefix or suffix)"
            ));
        }
        Ok(pattern)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(p) => f.write_str(p),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Suffix(p) => write!(f, "*{p}"),
            Pattern::Any => f.write_str("*"),
        }
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(PhantomData))
    }
}

/// The checks beyond the shape; a failure names the path under `authorization`.
pub(super) fn validate(authorization: &Authorization) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index as I, Key as K};
    for (p, policy) in authorization.policies.iter().enumerate() {
        let at = |rest: &[Seg]| [&[K("policies"), I(p)], rest].concat();
        let twice = authorization.policies[..p]
            .iter()
            .any(|other| other.name == policy.name && other.namespace == policy.namespace);
        if twice {
            return Err((
                at(&[K("name")]),
                format!(
                    "policy {}/{} is defined twice",
                    policy.namespace, policy.name
                ),
            ));
        }
        validate_policy(policy)
            .map_err(|(path, reason)| ([&[K("policies"), I(p)][..], &path].concat(), reason))?;
    }
    Ok(())
}

/// A policy's own checks, as `path: reason` (`rules[0].to[1].methods[0]: ...`): for a
/// policy from elsewhere (a Kubernetes object).
pub fn check_policy(policy: &AuthorizationPolicy) -> Result<(), String> {
    validate_policy(policy).map_err(|(path, reason)| format!("{}: {reason}", display_path(&path)))
}

fn validate_policy(policy: &AuthorizationPolicy) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index as I, Key as K};
    let at = |rest: &[Seg]| rest.to_vec();
    if let Some(Target::Workloads(labels)) = &policy.target
        && labels.is_empty()
    {
        return Err((
            at(&[K("target"), K("workloads")]),
            "no labels select every workload: leave the target out to mean that".into(),
        ));
    }
    for (r, rule) in policy.rules.iter().enumerate() {
        let at = |rest: &[Seg]| at(&[&[K("rules"), I(r)], rest].concat());
        for (s, source) in rule.from.iter().enumerate() {
            validate_source(source).map_err(|(path, reason)| {
                (at(&[&[K("from"), I(s)], &path[..]].concat()), reason)
            })?;
        }
        for (o, operation) in rule.to.iter().enumerate() {
            validate_operation(operation)
                .map_err(|(path, reason)| (at(&[&[K("to"), I(o)], &path[..]].concat()), reason))?;
        }
    }
    Ok(())
}

fn validate_source(source: &Source) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index as I, Key as K};
    if source.principals.is_empty() && source.namespaces.is_empty() && source.ip_blocks.is_empty() {
        return Err((
            vec![],
            "an empty source matches every caller: leave `from` out to mean that".into(),
        ));
    }
    for (i, principal) in source.principals.iter().enumerate() {
        let fault = match principal {
            Pattern::Exact(id) => SpiffeId::parse(id).err(),
            Pattern::Prefix(prefix) if !prefix.starts_with("spiffe://") => Some(format!(
                "{principal}: a principal's prefix starts with spiffe://"
            )),
            _ => None,
        };
        if let Some(reason) = fault {
            return Err((vec![K("principals"), I(i)], reason));
        }
    }
    Ok(())
}

fn validate_operation(operation: &Operation) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index as I, Key as K};
    if operation.ports.is_empty() && !operation.is_http() {
        return Err((
            vec![],
            "an empty operation matches every call: leave `to` out to mean that".into(),
        ));
    }
    if let Some(i) = operation.ports.iter().position(|&p| p == 0) {
        return Err((vec![K("ports"), I(i)], "port 0 is not a port".into()));
    }
    for (i, method) in operation.methods.iter().enumerate() {
        if Method::from_bytes(method.as_bytes()).is_err() || method.to_ascii_uppercase() != *method
        {
            return Err((
                vec![K("methods"), I(i)],
                format!("{method:?} is not an uppercase HTTP method"),
            ));
        }
    }
    for (i, path) in operation.paths.iter().enumerate() {
        if let Pattern::Exact(p) | Pattern::Prefix(p) = path
            && !p.starts_with('/')
        {
            return Err((
                vec![K("paths"), I(i)],
                format!("{path}: a path starts with /"),
            ));
        }
    }
    for name in operation.headers.keys() {
        if HeaderName::from_bytes(name.as_bytes()).is_err() || name.to_ascii_lowercase() != *name {
            return Err((
                vec![K("headers")],
                format!("{name:?} is not a lowercase header name"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_exact_prefix_suffix_or_any() {
        let cases = [
            ("/charge", "/charge", true),
            ("/charge", "/charges", false),
            ("/api/*", "/api/v1", true),
            ("/api/*", "/apiv1", false),
            ("*.json", "/a/b.json", true),
            ("*.json", "/a/b.jsonp", false),
            ("*", "", true),
        ];
        for (pattern, s, expected) in cases {
            let pattern: Pattern = pattern.parse().unwrap();
            assert_eq!(pattern.matches(s), expected, "{pattern} on {s}");
        }
        for bad in ["", "a*b", "**", "*a*"] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
    }
}
