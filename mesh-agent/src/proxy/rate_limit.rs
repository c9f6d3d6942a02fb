//! A service port's rate limits, enforced by the agent serving its endpoints (whatever node
//! the caller is on): token buckets in the agent (`local`: the port's, a route's, or one per
//! caller identity) and the limits of an Envoy rate limit service (`global`). Over a limit,
//! an HTTP request gets 429 and a connection to a `tcp` port is refused.

pub mod global;

use std::{sync::Mutex, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use serde::{Deserialize, Serialize};

use crate::{
    config::Period,
    identity::SpiffeId,
    observability::metrics::Metrics,
    proxy::{
        limit::{Rate, RatePerKey},
        rate_limit::global::{Ask, GlobalLimiter},
    },
    state::routes::ServicePort,
};

/// Whether `port` takes one more request on `route` (none for a connection to a `tcp` port)
/// from `source` (none: a caller without an identity): its local buckets first, then the rate limit `service` if the port asks it.
/// A refusal is counted.
pub async fn check(
    port: &ServicePort,
    route: Option<&str>,
    source: Option<&SpiffeId>,
    service: Option<&GlobalLimiter>,
    metrics: &Metrics,
) -> Result<(), Limited> {
    let Some(limits) = &port.rate_limits else {
        return Ok(());
    };
    let checked = match (limits.take(route, source), &limits.domain, service) {
        (Ok(()), Some(domain), Some(service)) => {
            let ask = Ask {
                domain,
                service: &port.service,
                route,
                source,
            };
            service.check(&ask).await
        }
        (taken, _, _) => taken,
    };
    if let Err(limited) = &checked {
        metrics.rate_limited(&port.service, limited.by);
    }
    checked
}

/// A port's rate limits as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Token buckets of each serving agent: a service whose endpoints are on three nodes takes
    /// up to three times the rate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local: Vec<LocalLimit>,
    /// Asks the rate limit service of the settings about every request (or connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<GlobalLimit>,
}

/// One token bucket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLimit {
    /// Requests (connections on a `tcp` port) per `per`, on average.
    pub requests: u32,
    #[serde(default = "one_second")]
    pub per: Period,
    /// How many may come at once; `requests` if not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Only the requests this route takes; all of the port's if not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A bucket for each caller identity rather than one for all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
}

fn one_second() -> Period {
    Period(Duration::from_secs(1))
}

/// The rate limit service's domain for a port's requests.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalLimit {
    pub domain: String,
}

/// Why a request or connection is turned away, and what the answer tells the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// `local` or `global`.
    pub by: &'static str,
    /// How long until the caller may try again.
    pub retry_after: Duration,
    /// The limit: so many per window, if known.
    pub limit: Option<(u32, Duration)>,
    /// Headers the rate limit service asked to add.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Limited {
    /// The headers of a 429: `retry-after` in whole seconds and the `x-ratelimit-*` headers
    /// (Envoy's), then the service's own.
    pub fn response_headers(&self, headers: &mut HeaderMap) {
        let seconds = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        if let Some((limit, window)) = self.limit {
            let window = window.as_secs().max(1);
            if let Ok(value) = HeaderValue::try_from(format!("{limit}, {limit};w={window}")) {
                headers.insert(X_RATELIMIT_LIMIT.clone(), value);
            }
            headers.insert(X_RATELIMIT_REMAINING.clone(), HeaderValue::from(0));
            headers.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from(seconds));
        }
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
    }
}

static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// A port's limits with their buckets (new ones with each config: counts start again).
pub struct RateLimiter {
    buckets: Vec<(LocalLimit, Bucket)>,
    /// The rate limit service's domain, if it is asked.
    pub domain: Option<String>,
}

enum Bucket {
    Shared(Mutex<Rate>),
    /// Callers without an identity share the bucket of `None`.
    PerSource(RatePerKey<Option<SpiffeId>>),
}

impl RateLimiter {
    pub fn new(limits: &RateLimits) -> Self {
        let buckets = limits
            .local
            .iter()
            .map(|limit| {
                let rate = Rate::per(limit.requests, limit.per.0, limit.burst());
                let bucket = if limit.per_source {
                    Bucket::PerSource(RatePerKey::like(rate))
                } else {
                    Bucket::Shared(Mutex::new(rate))
                };
                (limit.clone(), bucket)
            })
            .collect();
        Self {
            buckets,
            domain: limits.global.as_ref().map(|g| g.domain.clone()),
        }
    }

    /// Takes a token of every bucket that a request on `route` (none on a `tcp` port) from
    /// `source` counts against; the first that has none says so.
    pub fn take(&self, route: Option<&str>, source: Option<&SpiffeId>) -> Result<(), Limited> {
        let counts = |limit: &LocalLimit| limit.route.is_none() || limit.route.as_deref() == route;
        for (limit, bucket) in self.buckets.iter().filter(|(limit, _)| counts(limit)) {
            let taken = match bucket {
                Bucket::Shared(rate) => rate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take_or_wait(),
                Bucket::PerSource(rates) => rates.take_or_wait(source.cloned()),
            };
            if let Err(wait) = taken {
                return Err(Limited {
                    by: "local",
                    retry_after: wait,
                    limit: Some((limit.requests, limit.per.0)),
                    headers: Vec::new(),
                });
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field(
                "local",
                &self.buckets.iter().map(|(l, _)| l).collect::<Vec<_>>(),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

impl LocalLimit {
    fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests)
    }

    /// What is wrong with it, if anything: the key and the reason.
    pub fn fault(&self, routes: &[&str]) -> Option<(&'static str, String)> {
        if self.requests == 0 {
            return Some(("requests", "a rate of 0 lets nothing through".into()));
        }
        if self.per.0.is_zero() {
            return Some(("per", "a rate needs a period".into()));
        }
        if self.burst == Some(0) {
            return Some(("burst", "a burst of 0 lets nothing through".into()));
        }
        match &self.route {
            Some(route) if !routes.contains(&route.as_str()) => {
                Some(("route", format!("the port has no route {route}")))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(sa: &str) -> SpiffeId {
        SpiffeId::workload("cluster.local", "shop", sa)
    }

    fn limit(yaml: &str) -> LocalLimit {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_a_route_and_each_caller_have_their_buckets() {
        let limiter = RateLimiter::new(&RateLimits {
            local: vec![
                limit("{ requests: 100 }"),
                limit("{ requests: 2, route: checkout }"),
                limit("{ requests: 60, per: 1m, burst: 3, per_source: true }"),
            ],
            global: None,
        });
        let (web, admin) = (caller("web"), caller("admin"));
        let (web, admin) = (Some(&web), Some(&admin));
        // Two checkouts a second, whoever calls.
        assert!(limiter.take(Some("checkout"), web).is_ok());
        assert!(limiter.take(Some("checkout"), admin).is_ok());
        let limited = limiter.take(Some("checkout"), admin).unwrap_err();
        assert_eq!(limited.by, "local");
        assert_eq!(limited.limit, Some((2, Duration::from_secs(1))));
        assert_eq!(limited.retry_after, Duration::from_millis(500));
        // Three at once from each caller, then one a second.
        assert!(limiter.take(Some("browse"), web).is_ok());
        assert!(limiter.take(Some("browse"), web).is_ok());
        assert!(limiter.take(Some("browse"), web).is_err());
        assert!(limiter.take(None, admin).is_ok(), "admin has a token left");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limiter.take(Some("browse"), web).is_ok());
        assert!(limiter.take(Some("browse"), web).is_err());
    }

    #[test]
    fn a_429_says_when_to_come_back() {
        let limited = Limited {
            by: "local",
            retry_after: Duration::from_millis(200),
            limit: Some((5, Duration::from_secs(1))),
            headers: Vec::new(),
        };
        let mut headers = HeaderMap::new();
        limited.response_headers(&mut headers);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers["x-ratelimit-limit"], "5, 5;w=1");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
    }

    #[test]
    fn limits_that_cannot_work_are_named() {
        let routes = ["checkout"];
        let fault = |yaml| limit(yaml).fault(&routes);
        assert_eq!(fault("{ requests: 0 }").unwrap().0, "requests");
        assert_eq!(fault("{ requests: 1, per: 0s }").unwrap().0, "per");
        assert_eq!(fault("{ requests: 1, burst: 0 }").unwrap().0, "burst");
        assert_eq!(
            fault("{ requests: 1, route: cart }"),
            Some(("route", "the port has no route cart".into()))
        );
        assert_eq!(fault("{ requests: 10, per: 1m, route: checkout }"), None);
    }
}
