//! TrafficPolicy (`mesh.dev/v1alpha1`), the mesh's own resource: outlier detection, circuit
//! breakers and rate limits for a Service's ports, attached by `targetRef` as the Gateway API's policy
//! attachment does (all the Service's ports, or the one `port` names). When several attach to
//! the same port, the oldest wins (then namespace/name), as among Gateway API policies; a
//! policy whose settings do not fit a port (request caps on a TCP port, say, or global rate
//! limits without a rate limit service in the settings) is left out for that port, with the
//! reason. `deploy/crds.yaml` is `mesh-agent crds`: made from these
//! types, checked by a test.

use k8s_openapi::jiff::Timestamp;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Period, Service},
    proxy::{
        balance::OutlierDetection,
        breaker::Limits,
        rate_limit::{GlobalLimit, LocalLimit, RateLimits},
    },
};

/// Traffic policy for a Service's ports.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "tp",
    namespaced,
    doc = "Outlier detection and circuit breakers for a Service's ports, applied by every mesh agent calling it, and rate limits, applied by the agents serving it."
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service it applies to, in the policy's namespace.
    pub target_ref: TargetRef,
    /// Only this port of the Service; all its ports if not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Ejects endpoints that keep answering with errors (HTTP ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Caps on what each agent sends to the port at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<CircuitBreakersSpec>,
    /// How fast the port's endpoints take requests (connections on a TCP port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsSpec>,
}

/// Rate limits, kept by the agents serving the port.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct RateLimitsSpec {
    /// Token buckets of each serving agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local: Vec<LocalLimitSpec>,
    /// Asks the rate limit service the agents' settings name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<GlobalLimitSpec>,
}

/// One token bucket.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalLimitSpec {
    /// Requests (connections on a TCP port) per `per`.
    #[schemars(range(min = 1))]
    pub requests: u32,
    /// Like `1s` (the default), `1m` or `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
    /// How many may come at once (default `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// Only the requests this route (an HTTPRoute rule's name) takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A bucket for each caller identity rather than one for all.
    #[serde(default)]
    pub per_source: bool,
}

/// The rate limit service's domain for the port's requests.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct GlobalLimitSpec {
    pub domain: String,
}

/// What a policy attaches to: a Service (group "" or "core", kind Service).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// Outlier detection; a field not given takes the mesh's default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// 5xx answers in a row that eject an endpoint (default 5; 0 never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Gateway errors in a row that eject an endpoint (default 5; 0 never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// The first ejection's length, like `30s` (the default); later ones are longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection: Option<String>,
    /// The most of the port's endpoints ejected at once, in percent (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejected_percent: Option<u8>,
}

/// Circuit breakers; a cap not given is not set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakersSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_per_endpoint: Option<u32>,
}

/// As k8s-openapi's types describe themselves, for the watch (which names what it reads by
/// these); a test checks them against the derived CRD.
impl k8s_openapi::Resource for TrafficPolicy {
    const API_VERSION: &'static str = "mesh.dev/v1alpha1";
    const GROUP: &'static str = "mesh.dev";
    const KIND: &'static str = "TrafficPolicy";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "trafficpolicies";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl TrafficPolicy {
    fn attaches_to(&self, namespace: &str, service: &str, port: u16) -> bool {
        let target = &self.spec.target_ref;
        self.metadata.namespace.as_deref() == Some(namespace)
            && matches!(target.group.as_str(), "" | "core")
            && target.kind == "Service"
            && target.name == service
            && self.spec.port.is_none_or(|p| p == port)
    }

    fn name(&self) -> String {
        format!(
            "TrafficPolicy {}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Its settings as the config has them, or why they cannot be.
    fn settings(&self) -> Result<PortSettings, String> {
        let outliers = match &self.spec.outlier_detection {
            None => None,
            Some(o) => {
                let defaults = OutlierDetection::default();
                let base_ejection = match &o.base_ejection {
                    None => defaults.base_ejection,
                    Some(text) => text.parse::<Period>()?,
                };
                Some(OutlierDetection {
                    consecutive_5xx: o.consecutive_5xx.unwrap_or(defaults.consecutive_5xx),
                    consecutive_gateway_errors: o
                        .consecutive_gateway_errors
                        .unwrap_or(defaults.consecutive_gateway_errors),
                    base_ejection,
                    max_ejected_percent: o
                        .max_ejected_percent
                        .unwrap_or(defaults.max_ejected_percent),
                })
            }
        };
        let limits = self.spec.circuit_breakers.as_ref().map(|c| Limits {
            max_connections: c.max_connections,
            max_requests: c.max_requests,
            max_pending_requests: c.max_pending_requests.unwrap_or(0),
            max_retries: c.max_retries,
            max_per_endpoint: c.max_per_endpoint,
        });
        let rate_limits = match &self.spec.rate_limits {
            None => None,
            Some(r) => Some(RateLimits {
                local: r
                    .local
                    .iter()
                    .map(|l| {
                        Ok(LocalLimit {
                            requests: l.requests,
                            per: match &l.per {
                                None => Period(std::time::Duration::from_secs(1)),
                                Some(text) => text.parse()?,
                            },
                            burst: l.burst,
                            route: l.route.clone(),
                            per_source: l.per_source,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                global: r.global.as_ref().map(|g| GlobalLimit {
                    domain: g.domain.clone(),
                }),
            }),
        };
        Ok(PortSettings {
            outliers,
            limits,
            rate_limits,
        })
    }
}

/// A policy's settings for a port, as the config has them.
struct PortSettings {
    outliers: Option<OutlierDetection>,
    limits: Option<Limits>,
    rate_limits: Option<RateLimits>,
}

/// Gives each service port the settings of the oldest policy attached to it that fits it
/// (global rate limits only if the settings name a `rate_limit_service`); the others are left
/// out with the reason.
pub fn attach_policies(
    policies: &[std::sync::Arc<TrafficPolicy>],
    services: &mut [Service],
    rate_limit_service: bool,
    skipped: &mut Vec<String>,
) {
    let mut policies: Vec<&TrafficPolicy> = policies.iter().map(|p| &**p).collect();
    fn key(p: &TrafficPolicy) -> (Option<Timestamp>, Option<&str>, Option<&str>) {
        let m = &p.metadata;
        (
            m.creation_timestamp.as_ref().map(|t| t.0),
            m.namespace.as_deref(),
            m.name.as_deref(),
        )
    }
    policies.sort_by(|a, b| key(a).cmp(&key(b)));
    for service in services.iter_mut() {
        let (namespace, name) = (service.namespace.to_string(), service.name.to_string());
        for port in &mut service.ports {
            let mut attached = policies
                .iter()
                .filter(|p| p.attaches_to(&namespace, &name, port.port));
            let Some(policy) = attached.next() else {
                continue;
            };
            for later in attached {
                skipped.push(format!(
                    "{}: {} attaches to {namespace}/{name} port {} already",
                    later.name(),
                    policy.name(),
                    port.port
                ));
            }
            let fitted = policy.settings().and_then(|settings| {
                let global = settings
                    .rate_limits
                    .as_ref()
                    .is_some_and(|r| r.global.is_some());
                if global && !rate_limit_service {
                    return Err(
                        "rate_limits.global: the agents' settings name no rate_limit_service"
                            .into(),
                    );
                }
                let mut candidate = port.clone();
                candidate.outlier_detection = settings.outliers;
                candidate.circuit_breakers = settings.limits;
                candidate.rate_limits = settings.rate_limits;
                candidate.check_policies().map(|()| candidate)
            });
            match fitted {
                Ok(fitted) => *port = fitted,
                Err(why) => skipped.push(format!(
                    "{}: not for {namespace}/{name} port {}: {why}",
                    policy.name(),
                    port.port
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// `deploy/crds.yaml` is what the types make (`mesh-agent crds > deploy/crds.yaml`).
    #[test]
    fn the_crd_manifest_is_made_from_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crds_yaml(),
            "deploy/crds.yaml differs from the TrafficPolicy type: run `cargo run -p mesh-agent -- crds > deploy/crds.yaml`"
        );
        use k8s_openapi::Resource;
        let crd = TrafficPolicy::crd();
        assert_eq!(crd.spec.group, TrafficPolicy::GROUP);
        assert_eq!(crd.spec.names.plural, TrafficPolicy::URL_PATH_SEGMENT);
        assert_eq!(crd.spec.names.kind, TrafficPolicy::KIND);
        assert_eq!(crd.spec.versions[0].name, TrafficPolicy::VERSION);
    }

    fn crds_yaml() -> String {
        crate::cli::crds_yaml()
    }

    fn policy(name: &str, created: i64, spec: serde_json::Value) -> std::sync::Arc<TrafficPolicy> {
        let created = k8s_openapi::jiff::Timestamp::from_second(created).unwrap();
        let mut p: TrafficPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": { "name": name, "namespace": "shop" },
            "spec": spec,
        }))
        .unwrap();
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            created,
        ));
        std::sync::Arc::new(p)
    }

    #[test]
    fn the_oldest_policy_that_fits_a_port_is_applied() {
        let mut services: Vec<Service> = serde_yaml::from_str(
            "- { name: cart, namespace: shop, addresses: [198.19.0.10], ports: [{ port: 80, protocol: http }, { port: 9000 }] }
- { name: orders, namespace: shop, addresses: [198.19.0.11], ports: [{ port: 80, protocol: http }] }",
        )
        .unwrap();
        let cart = json_ref("cart");
        let policies = [
            policy(
                "newer",
                2_000,
                serde_json::json!({ "targetRef": cart, "circuitBreakers": { "maxRequests": 7 } }),
            ),
            policy(
                "older",
                1_000,
                serde_json::json!({
                    "targetRef": cart,
                    "outlierDetection": { "consecutive5xx": 3, "baseEjection": "10s" },
                    "circuitBreakers": { "maxConnections": 100 }
                }),
            ),
            policy(
                "tcp-only",
                3_000,
                serde_json::json!({ "targetRef": json_ref("orders"), "port": 9000, "circuitBreakers": { "maxConnections": 1 } }),
            ),
        ];
        let mut skipped = Vec::new();
        attach_policies(&policies, &mut services, false, &mut skipped);
        let http = &services[0].ports[0];
        assert_eq!(
            http.outlier_detection,
            Some(OutlierDetection {
                consecutive_5xx: 3,
                base_ejection: Period(std::time::Duration::from_secs(10)),
                ..OutlierDetection::default()
            })
        );
        assert_eq!(
            http.circuit_breakers,
            Some(Limits {
                max_connections: Some(100),
                ..Limits::default()
            })
        );
        // The TCP port cannot take outlier detection: left out there, with the reason.
        assert_eq!(services[0].ports[1].outlier_detection, None);
        assert_eq!(services[0].ports[1].circuit_breakers, None);
        // orders has no port 9000: nothing attaches.
        assert_eq!(services[1].ports[0].circuit_breakers, None);
        assert_eq!(
            skipped,
            [
                "TrafficPolicy shop/newer: TrafficPolicy shop/older attaches to shop/cart port 80 already",
                "TrafficPolicy shop/newer: TrafficPolicy shop/older attaches to shop/cart port 9000 already",
                "TrafficPolicy shop/older: not for shop/cart port 9000: outlier_detection: outlier detection counts HTTP answers: give the port a protocol (http, http2, grpc or auto)",
            ]
        );
    }

    #[test]
    fn rate_limits_attach_and_global_ones_need_a_rate_limit_service() {
        let yaml = "- { name: orders, namespace: shop, addresses: [198.19.0.11], ports: [{ port: 80, protocol: http }] }";
        let policies = [policy(
            "limits",
            1_000,
            serde_json::json!({
                "targetRef": json_ref("orders"),
                "rateLimits": {
                    "local": [{ "requests": 10, "per": "1m", "perSource": true }],
                    "global": { "domain": "shop" }
                }
            }),
        )];
        for service in [true, false] {
            let mut services: Vec<Service> = serde_yaml::from_str(yaml).unwrap();
            let mut skipped = Vec::new();
            attach_policies(&policies, &mut services, service, &mut skipped);
            let expected: RateLimits = serde_yaml::from_str(
                "{ local: [{ requests: 10, per: 1m, per_source: true }], global: { domain: shop } }",
            )
            .unwrap();
            if service {
                assert_eq!(services[0].ports[0].rate_limits, Some(expected));
                assert!(skipped.is_empty(), "{skipped:?}");
            } else {
                assert_eq!(services[0].ports[0].rate_limits, None);
                assert_eq!(
                    skipped,
                    [
                        "TrafficPolicy shop/limits: not for shop/orders port 80: rate_limits.global: the agents' settings name no rate_limit_service"
                    ]
                );
            }
        }
    }

    fn json_ref(service: &str) -> serde_json::Value {
        serde_json::json!({ "kind": "Service", "name": service })
    }
}
