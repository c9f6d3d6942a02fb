//! AuthorizationPolicy (`mesh.dev/v1alpha1`): who may call the workloads of a namespace (of
//! the mesh, in `mesh-system`), by a Service's `targetRef` or a label `selector`; and the
//! namespace labels for strict mode and the mesh-wide default. A policy the agent cannot use
//! is reported with the object and field; its last good version stays in force (a policy
//! never seen good is left out), so a bad edit neither opens nor closes anything.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Namespace;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{last_good::LastGood, policy::TargetRef};
use crate::{
    config::{
        Name,
        authorization::{
            self, Action, Authorization, AuthorizationPolicy as Policy, Operation, Pattern, Rule,
            Source, Strict, Target,
        },
    },
    identity::AGENT_NAMESPACE,
};

/// The namespace label that makes its enrolled pods strict (`true`); on `mesh-system`, every
/// enrolled pod.
pub const STRICT_LABEL: &str = "mesh.dev/strict";
/// The label of `mesh-system` that makes the mesh deny what no ALLOW policy allows (`true`).
pub const DEFAULT_DENY_LABEL: &str = "mesh.dev/default-deny";

/// Who may call the workloads it selects.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "meshauthz",
    namespaced,
    doc = "Who may call which workloads of the namespace (of every namespace, in mesh-system), enforced by the mesh agent of the node each callee runs on. DENY policies win over ALLOW ones; once an ALLOW policy selects a workload, only what one allows reaches it."
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The Service whose endpoints it governs, in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// Or the workloads with these labels. Neither: every workload of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    pub action: ActionSpec,
    /// Any of them matches a call. ALLOW without rules allows nothing; DENY without rules
    /// denies nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ActionSpec {
    #[default]
    Allow,
    Deny,
}

/// A call matches when it comes from one of `from` (anyone if empty) and asks for one of
/// `to` (anything if empty).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<SourceSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<OperationSpec>,
}

/// Callers; each field given must match. Strings match exactly, by prefix (`abc*`), by
/// suffix (`*abc`), or `*`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// SPIFFE IDs, like `spiffe://cluster.local/ns/shop/sa/orders`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// CIDRs of the callers' pod addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
}

/// What is asked; each field given must match. Methods, paths, hosts and headers are
/// HTTP's.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct OperationSpec {
    /// The destination pod's ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Header names (lowercase) and the values they must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// As k8s-openapi's types describe themselves, for the watch; a test checks them against
/// the derived CRD.
impl k8s_openapi::Resource for AuthorizationPolicy {
    const API_VERSION: &'static str = "mesh.dev/v1alpha1";
    const GROUP: &'static str = "mesh.dev";
    const KIND: &'static str = "AuthorizationPolicy";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "authorizationpolicies";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

/// The mesh's authorization from the cluster: the policies (each object's current version
/// if good, else its last good one), strict namespaces and the mesh-wide default from the
/// namespaces' labels. What is wrong is added to `refused`, object and field named.
pub fn authorization(
    objects: &[Arc<AuthorizationPolicy>],
    namespaces: &[Arc<Namespace>],
    last_good: &LastGood<Policy>,
    refused: &mut Vec<String>,
) -> Authorization {
    let mut policies = last_good.convert(objects, |ns, name, o| policy(ns, name, &o.spec), refused);
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let labelled = |ns: &Namespace, label: &str| {
        ns.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(label))
            .is_some_and(|v| v == "true")
    };
    let is_mesh = |ns: &Namespace| ns.metadata.name.as_deref() == Some(AGENT_NAMESPACE);
    let mut strict = Strict {
        all: namespaces
            .iter()
            .any(|ns| is_mesh(ns) && labelled(ns, STRICT_LABEL)),
        namespaces: namespaces
            .iter()
            .filter(|ns| !is_mesh(ns) && labelled(ns, STRICT_LABEL))
            .filter_map(|ns| ns.metadata.name.as_deref()?.parse().ok())
            .collect(),
    };
    strict.namespaces.sort();
    Authorization {
        default_deny: namespaces
            .iter()
            .any(|ns| is_mesh(ns) && labelled(ns, DEFAULT_DENY_LABEL)),
        strict,
        policies,
    }
}

/// The policy `spec` makes, or why it cannot (`spec.<field>: reason`).
fn policy(namespace: &str, name: &str, spec: &AuthorizationPolicySpec) -> Result<Policy, String> {
    let at = |path: String, why: String| format!("spec.{path}: {why}");
    let target = match (&spec.target_ref, &spec.selector) {
        (Some(_), Some(_)) => {
            return Err(at(
                "selector".into(),
                "give targetRef or selector, not both".into(),
            ));
        }
        (Some(target), None) => {
            if !matches!(target.group.as_str(), "" | "core") || target.kind != "Service" {
                return Err(at(
                    "targetRef".into(),
                    format!(
                        "{}/{} is not a Service: policies attach to Services",
                        target.group, target.kind
                    ),
                ));
            }
            Some(Target::Service(
                target
                    .name
                    .parse::<Name>()
                    .map_err(|e| at("targetRef.name".into(), e))?,
            ))
        }
        (None, Some(selector)) => Some(Target::Workloads(selector.match_labels.clone())),
        (None, None) => None,
    };
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().enumerate() {
        let patterns = |field: String, values: &[String]| -> Result<Vec<Pattern>, String> {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| v.parse().map_err(|e| at(format!("{field}[{i}]"), e)))
                .collect()
        };
        let mut from = Vec::new();
        for (s, source) in rule.from.iter().enumerate() {
            let field = |f: &str| format!("rules[{r}].from[{s}].{f}");
            from.push(Source {
                principals: patterns(field("principals"), &source.principals)?,
                namespaces: patterns(field("namespaces"), &source.namespaces)?,
                ip_blocks: source
                    .ip_blocks
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        b.parse()
                            .map_err(|e| at(field(&format!("ipBlocks[{i}]")), format!("{b}: {e}")))
                    })
                    .collect::<Result<_, _>>()?,
            });
        }
        let mut to = Vec::new();
        for (o, operation) in rule.to.iter().enumerate() {
            let field = |f: &str| format!("rules[{r}].to[{o}].{f}");
            to.push(Operation {
                ports: operation.ports.clone(),
                methods: operation.methods.clone(),
                paths: patterns(field("paths"), &operation.paths)?,
                hosts: patterns(field("hosts"), &operation.hosts)?,
                headers: operation
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        let value = v
                            .parse()
                            .map_err(|e| at(field(&format!("headers.{k}")), e))?;
                        Ok((k.clone(), value))
                    })
                    .collect::<Result<_, String>>()?,
            });
        }
        rules.push(Rule { from, to });
    }
    let policy = Policy {
        name: name.parse().map_err(|e| at("metadata.name".into(), e))?,
        namespace: namespace
            .parse()
            .map_err(|e| at("metadata.namespace".into(), e))?,
        target,
        action: match spec.action {
            ActionSpec::Allow => Action::Allow,
            ActionSpec::Deny => Action::Deny,
        },
        rules,
    };
    // The config's checks, on this policy alone: their paths are the spec's.
    authorization::check_policy(&policy).map_err(|e| format!("spec.{}", camel_case(&e)))?;
    Ok(policy)
}

/// The config's field names as the resource spells them (`ip_blocks` → `ipBlocks`).
fn camel_case(text: &str) -> String {
    text.replace("ip_blocks", "ipBlocks")
        .replace("target.workloads", "selector.matchLabels")
        .replace("target", "targetRef")
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;
    use crate::discovery::kubernetes::model::tests::fixture;

    fn objects() -> Vec<Arc<AuthorizationPolicy>> {
        fixture("authorizationpolicies.yaml")
    }

    #[test]
    fn policies_and_namespace_labels_make_the_meshs_authorization() {
        let mut namespaces: Vec<Arc<Namespace>> = fixture("namespaces.yaml");
        let mesh_system: Namespace = serde_yaml::from_str(
            "metadata: { name: mesh-system, labels: { mesh.dev/strict: 'true', mesh.dev/default-deny: 'true' } }",
        )
        .unwrap();
        let mut refused = Vec::new();
        let without = authorization(&objects(), &namespaces, &LastGood::default(), &mut refused);
        assert!(refused.is_empty(), "{refused:?}");
        assert!(!without.default_deny && !without.strict.all);
        let names: Vec<String> = without
            .policies
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        assert_eq!(
            names,
            [
                "mesh-system/no-legacy",
                "shop/cart-readers",
                "shop/payments-charge"
            ]
        );
        let charge = &without.policies[2];
        assert_eq!(
            charge.target,
            Some(Target::Service("payments".parse().unwrap()))
        );
        assert_eq!(
            charge.rules[1].from[0].ip_blocks[0].to_string(),
            "10.244.0.0/16"
        );
        assert_eq!(
            charge.rules[0].to[0].paths[1],
            Pattern::Prefix("/refunds/".into())
        );
        let readers = &without.policies[1];
        assert_eq!(
            readers.target,
            Some(Target::Workloads([("app".into(), "cart".into())].into()))
        );
        assert_eq!(
            readers.rules[0].to[0].headers["x-tenant"],
            Pattern::Prefix("acme".into())
        );

        namespaces.push(Arc::new(mesh_system));
        let with = authorization(&objects(), &namespaces, &LastGood::default(), &mut refused);
        assert!(
            with.default_deny && with.strict.all,
            "mesh-system speaks for the mesh"
        );
    }

    #[test]
    fn a_bad_edit_is_refused_by_object_and_field_and_the_last_good_version_stays() {
        let last_good = LastGood::default();
        let mut refused = Vec::new();
        let good = authorization(&objects(), &[], &last_good, &mut refused);
        let mut edited = objects();
        let mut bad = (*edited[0]).clone();
        bad.spec.rules[0].from[0].principals[0] = "spiffe://cluster.local/orders".into();
        edited[0] = Arc::new(bad.clone());
        let kept = authorization(&edited, &[], &last_good, &mut refused);
        assert_eq!(kept, good, "the last good version stays");
        assert_eq!(
            refused,
            [
                "AuthorizationPolicy shop/payments-charge: spec.rules[0].from[0].principals[0]: \"spiffe://cluster.local/orders\" is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (its last good version stays)"
            ]
        );
        // A policy never seen good is left out; a deleted one is forgotten.
        let cases = [
            (
                serde_json::json!({ "ipBlocks": ["10.0.0.0/33"] }),
                "spec.rules[0].from[0].ipBlocks[0]: 10.0.0.0/33: invalid IP address syntax",
            ),
            (
                serde_json::json!({ "principals": ["spiffe://a*b"] }),
                "spec.rules[0].from[0].principals[0]: \"spiffe://a*b\": `*` may only start or end a pattern (prefix or suffix)",
            ),
            (
                serde_json::json!({}),
                "spec.rules[0].from[0]: an empty source matches every caller",
            ),
        ];
        for (source, expected) in cases {
            let mut new = bad.clone();
            new.metadata.name = Some("new".into());
            new.spec.rules[0].from[0] = serde_json::from_value(source).unwrap();
            let mut refused = Vec::new();
            let made = authorization(&[Arc::new(new)], &[], &LastGood::default(), &mut refused);
            assert!(made.policies.is_empty());
            assert!(
                refused[0].starts_with(&format!("AuthorizationPolicy shop/new: {expected}")),
                "{refused:?}"
            );
        }
        let mut both = bad.clone();
        both.spec.selector = Some(Selector::default());
        let mut refused = Vec::new();
        authorization(&[Arc::new(both)], &[], &LastGood::default(), &mut refused);
        assert!(
            refused[0].contains("spec.selector: give targetRef or selector, not both"),
            "{refused:?}"
        );
    }

    #[test]
    fn the_crd_names_what_the_watch_reads() {
        use k8s_openapi::Resource;
        let crd = AuthorizationPolicy::crd();
        assert_eq!(crd.spec.group, AuthorizationPolicy::GROUP);
        assert_eq!(crd.spec.names.plural, AuthorizationPolicy::URL_PATH_SEGMENT);
        assert_eq!(crd.spec.names.kind, AuthorizationPolicy::KIND);
        assert_eq!(crd.spec.versions[0].name, AuthorizationPolicy::VERSION);
    }
}
