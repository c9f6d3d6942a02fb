//! A client of the Envoy rate limit service (`envoy.service.ratelimit.v3`, gRPC), so the
//! existing service (envoyproxy/ratelimit with Redis, Limitador, ...) keeps the counts every
//! node shares. Each request (or connection) is described three ways, and is over the limit
//! if any description is:
//!
//! - `destination_service` = `namespace/name`
//! - `destination_service`, then `route` = the route's name (HTTP only)
//! - `destination_service`, then `source_identity` = the caller's SPIFFE ID (if it has one)
//!
//! When the service cannot answer in time, the request passes or is refused as the settings
//! say; both are counted.

use std::{sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, uri::PathAndQuery};
use serde::{Deserialize, Serialize};
use tonic::{client::Grpc, transport::Channel};
use tonic_prost::ProstCodec;

use crate::{
    config::Period, identity::SpiffeId, observability::metrics::Metrics, proxy::rate_limit::Limited,
};

/// Where the rate limit service is and what to do when it does not answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitService {
    /// Its gRPC address, like `http://ratelimit.ratelimit:8081`.
    pub address: String,
    /// How long a request waits for its answer.
    #[serde(default = "default_timeout")]
    pub timeout: Period,
    /// `allow` (the default) lets requests through while the service is away; `deny` refuses
    /// them.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

fn default_timeout() -> Period {
    Period(Duration::from_millis(100))
}

/// What a request gets when the rate limit service does not answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    #[default]
    Allow,
    Deny,
}

/// What is asked of the service about one request.
pub struct Ask<'a> {
    pub domain: &'a str,
    pub service: &'a str,
    pub route: Option<&'a str>,
    pub source: Option<&'a SpiffeId>,
}

/// The connection to the service, shared by every request.
pub struct GlobalLimiter {
    grpc: Grpc<Channel>,
    timeout: Duration,
    failure_mode: FailureMode,
    metrics: Arc<Metrics>,
}

const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

impl GlobalLimiter {
    /// A client of `settings`' service; it connects when first asked (and again as needed).
    pub fn new(settings: &RateLimitService, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(settings.address.clone())?
            .connect_timeout(settings.timeout.0)
            .connect_lazy();
        Ok(Self {
            grpc: Grpc::new(channel),
            timeout: settings.timeout.0,
            failure_mode: settings.failure_mode,
            metrics,
        })
    }

    /// Whether the service lets the request of `ask` through.
    pub async fn check(&self, ask: &Ask<'_>) -> Result<(), Limited> {
        let asked = tokio::time::timeout(self.timeout, self.should_rate_limit(request(ask))).await;
        let error = match asked {
            Ok(Ok(response)) => return verdict(response),
            Ok(Err(status)) => status.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        let allowed = self.failure_mode == FailureMode::Allow;
        self.metrics.rate_limit_service_failed(allowed);
        crate::warn_sampled!(%error, allowed, "the rate limit service did not answer");
        if allowed {
            Ok(())
        } else {
            Err(Limited {
                by: "global",
                retry_after: Duration::from_secs(1),
                limit: None,
                headers: Vec::new(),
            })
        }
    }

    async fn should_rate_limit(
        &self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let response = grpc
            .unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(SHOULD_RATE_LIMIT),
                ProstCodec::default(),
            )
            .await?;
        Ok(response.into_inner())
    }
}

fn request(ask: &Ask<'_>) -> RateLimitRequest {
    let entry = |key: &str, value: &str| Entry {
        key: key.to_owned(),
        value: value.to_owned(),
    };
    let service = entry("destination_service", ask.service);
    let mut descriptors = vec![Descriptor {
        entries: vec![service.clone()],
    }];
    if let Some(source) = ask.source {
        descriptors.push(Descriptor {
            entries: vec![
                service.clone(),
                entry("source_identity", &source.to_string()),
            ],
        });
    }
    if let Some(route) = ask.route {
        descriptors.push(Descriptor {
            entries: vec![service, entry("route", route)],
        });
    }
    RateLimitRequest {
        domain: ask.domain.to_owned(),
        descriptors,
        hits_addend: 1,
    }
}

/// The service's answer as the agent acts on it: through, or limited by the first
/// description over its limit.
fn verdict(response: RateLimitResponse) -> Result<(), Limited> {
    if response.overall_code != Code::OverLimit as i32 {
        return Ok(());
    }
    let over = response
        .statuses
        .iter()
        .find(|s| s.code == Code::OverLimit as i32);
    let limit = over.and_then(|s| {
        let limit = s.current_limit.as_ref()?;
        let unit = match limit.unit {
            1 => 1,
            2 => 60,
            3 => 3600,
            4 => 86_400,
            _ => return None,
        };
        Some((limit.requests_per_unit, Duration::from_secs(unit)))
    });
    let retry_after = over
        .and_then(|s| s.duration_until_reset.as_ref())
        .map(|d| {
            Duration::from_secs(d.seconds.max(0) as u64)
                + Duration::from_nanos(d.nanos.max(0) as u64)
        })
        .or(limit.map(|(_, window)| window))
        .unwrap_or(Duration::from_secs(1));
    let headers = response
        .response_headers_to_add
        .iter()
        .filter_map(|h| {
            let name = HeaderName::try_from(h.key.as_str()).ok()?;
            let value = if h.raw_value.is_empty() {
                HeaderValue::from_str(&h.value).ok()?
            } else {
                HeaderValue::from_bytes(&h.raw_value).ok()?
            };
            Some((name, value))
        })
        .collect();
    Err(Limited {
        by: "global",
        retry_after,
        limit,
        headers,
    })
}

/// `envoy.service.ratelimit.v3.RateLimitRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<Descriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor` (without an override).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Descriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

/// `RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse` (the fields the agent reads).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    #[prost(enumeration = "Code", tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
    #[prost(message, repeated, tag = "3")]
    pub response_headers_to_add: Vec<EnvoyHeader>,
}

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    Unknown = 0,
    Ok = 1,
    OverLimit = 2,
}

/// `RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<ProtoDuration>,
}

/// `RateLimitResponse.RateLimit`: so many per unit (1 second, 2 minute, 3 hour, 4 day).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvoyHeader {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}
