//! When a failed try is tried again: the route's conditions, the method (only idempotent
//! ones unless the route says otherwise), the number of tries, and a budget that caps retries
//! at a share of the route's requests, so that an outage does not multiply the load on what
//! is left. Waits between tries back off exponentially with full jitter.

use std::{sync::Mutex, time::Duration};

use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::config::http::{self as config, RetryOn};

/// The window over which the budget counts requests and retries.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries per second the budget always allows, however few the requests.
const BUDGET_MIN_PER_SECOND: u64 = 10;
/// The longest wait between tries.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How a try went, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tried {
    /// The endpoint could not be reached: the request was not sent.
    ConnectFailed,
    /// The connection broke (or the try timed out) before a response.
    Reset,
    /// A response with this status and, for gRPC, this `grpc-status`.
    Answered(StatusCode, Option<u32>),
}

impl Tried {
    /// Its metric label (`mesh_request_retries_total{reason}`).
    pub fn reason(self) -> &'static str {
        match self {
            Tried::ConnectFailed => "connect_failure",
            Tried::Reset => "reset",
            Tried::Answered(_, Some(_)) => "grpc_status",
            Tried::Answered(..) => "status",
        }
    }
}

/// A route's retry policy.
#[derive(Debug)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    on: Vec<RetryOn>,
    non_idempotent: bool,
    backoff: Duration,
    budget: Budget,
}

impl RetryPolicy {
    pub fn new(retry: &config::Retry) -> Self {
        Self {
            attempts: retry.attempts,
            per_try_timeout: retry.per_try_timeout.map(|p| p.0),
            on: retry.on.clone(),
            non_idempotent: retry.non_idempotent,
            backoff: retry.backoff.0,
            budget: Budget::new(retry.budget_percent),
        }
    }

    /// A route without a retry policy of its own: a connect failure (the request was not
    /// sent) is tried on another endpoint, up to three tries in all.
    pub fn connect_failures_only() -> Self {
        Self {
            attempts: 3,
            per_try_timeout: None,
            on: vec![RetryOn::ConnectFailure],
            non_idempotent: true,
            backoff: Duration::ZERO,
            budget: Budget::new(20),
        }
    }

    /// Counts a request in the budget (each request, once).
    pub fn requested(&self) {
        self.budget.requested();
    }

    /// Whether `tried` (try number `attempt`, from 1) calls for another try of a `method`
    /// request whose body can be sent again (`replayable`); if so it is taken from the budget.
    pub fn again(&self, method: &Method, replayable: bool, attempt: u32, tried: Tried) -> bool {
        let idempotent = !matches!(*method, Method::POST | Method::PATCH) || self.non_idempotent;
        let matched = self.on.iter().find(|on| matches(**on, tried));
        // A request never sent may go again whatever it is, if its body can; so may a gRPC
        // call on a status the route lists (gRPC's own retry policy: every call is a POST,
        // and the listed codes are the user's word that it may).
        let safe = idempotent
            || tried == Tried::ConnectFailed
            || matches!(matched, Some(RetryOn::Grpc(_)));
        attempt < self.attempts && replayable && safe && matched.is_some() && self.budget.withdraw()
    }

    /// How long to wait before try number `attempt` + 1: a random share of the base backoff
    /// doubled for each try so far, at most [`MAX_BACKOFF`].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        ceiling.mul_f64(fastrand::f64())
    }
}

fn matches(on: RetryOn, tried: Tried) -> bool {
    match (on, tried) {
        (RetryOn::ConnectFailure, Tried::ConnectFailed) => true,
        (RetryOn::Reset, Tried::Reset) => true,
        (RetryOn::ServerError, Tried::Answered(status, _)) => status.is_server_error(),
        (RetryOn::GatewayError, Tried::Answered(status, _)) => matches!(status.as_u16(), 502..=504),
        (RetryOn::Status(code), Tried::Answered(status, _)) => status.as_u16() == code,
        (RetryOn::Grpc(code), Tried::Answered(_, Some(grpc))) => grpc == code,
        _ => false,
    }
}

/// Retries allowed: `percent` of the requests of the last window, at least
/// [`BUDGET_MIN_PER_SECOND`] per second. The previous window counts in proportion to how much
/// of it the sliding window still covers.
#[derive(Debug)]
struct Budget {
    percent: u64,
    counts: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    start: Instant,
    requests: u64,
    retries: u64,
    previous_requests: u64,
    previous_retries: u64,
}

impl Budget {
    fn new(percent: u32) -> Self {
        Self {
            percent: u64::from(percent),
            counts: Mutex::new(Counts {
                start: Instant::now(),
                requests: 0,
                retries: 0,
                previous_requests: 0,
                previous_retries: 0,
            }),
        }
    }

    /// The counts, moved on to the window of now.
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = c.start.elapsed();
        if elapsed >= 2 * BUDGET_WINDOW {
            *c = Counts {
                start: Instant::now(),
                requests: 0,
                retries: 0,
                previous_requests: 0,
                previous_retries: 0,
            };
        } else if elapsed >= BUDGET_WINDOW {
            c.start += BUDGET_WINDOW;
            c.previous_requests = std::mem::take(&mut c.requests);
            c.previous_retries = std::mem::take(&mut c.retries);
        }
        c
    }

    fn requested(&self) {
        self.counts().requests += 1;
    }

    /// Takes one retry, if the budget has one.
    fn withdraw(&self) -> bool {
        let mut c = self.counts();
        let left_of_previous = 1.0 - c.start.elapsed().as_secs_f64() / BUDGET_WINDOW.as_secs_f64();
        let weigh = |current: u64, previous: u64| {
            current as f64 + previous as f64 * left_of_previous.clamp(0.0, 1.0)
        };
        let requests = weigh(c.requests, c.previous_requests);
        let retries = weigh(c.retries, c.previous_retries);
        let floor = (BUDGET_MIN_PER_SECOND * BUDGET_WINDOW.as_secs()) as f64;
        let allowed = (requests * self.percent as f64 / 100.0).max(floor);
        if retries + 1.0 > allowed {
            return false;
        }
        c.retries += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Period;

    fn policy(on: &[RetryOn], attempts: u32, budget_percent: u32) -> RetryPolicy {
        RetryPolicy::new(&config::Retry {
            attempts,
            per_try_timeout: None,
            on: on.to_vec(),
            non_idempotent: false,
            backoff: Period(Duration::from_millis(25)),
            budget_percent,
        })
    }

    const OK: Tried = Tried::Answered(StatusCode::OK, None);
    const UNAVAILABLE: Tried = Tried::Answered(StatusCode::SERVICE_UNAVAILABLE, None);

    #[tokio::test(start_paused = true)]
    async fn what_is_retried() {
        let p = policy(
            &[
                RetryOn::GatewayError,
                RetryOn::Status(409),
                RetryOn::Grpc(14),
            ],
            3,
            100,
        );
        let get = Method::GET;
        let rows = [
            // (method, replayable, attempt, tried, again)
            (&get, true, 1, UNAVAILABLE, true),
            (&get, true, 2, UNAVAILABLE, true),
            (&get, true, 3, UNAVAILABLE, false),
            (&get, false, 1, UNAVAILABLE, false),
            (&get, true, 1, OK, false),
            (
                &get,
                true,
                1,
                Tried::Answered(StatusCode::INTERNAL_SERVER_ERROR, None),
                false,
            ),
            (
                &get,
                true,
                1,
                Tried::Answered(StatusCode::CONFLICT, None),
                true,
            ),
            (
                &get,
                true,
                1,
                Tried::Answered(StatusCode::OK, Some(14)),
                true,
            ),
            (
                &get,
                true,
                1,
                Tried::Answered(StatusCode::OK, Some(2)),
                false,
            ),
            (&get, true, 1, Tried::Reset, false),
            (&Method::POST, true, 1, UNAVAILABLE, false),
            (
                &Method::POST,
                true,
                1,
                Tried::Answered(StatusCode::OK, Some(14)),
                true,
            ),
            (&Method::PUT, true, 1, UNAVAILABLE, true),
        ];
        for (method, replayable, attempt, tried, again) in rows {
            p.requested();
            assert_eq!(
                p.again(method, replayable, attempt, tried),
                again,
                "{method} replayable={replayable} attempt={attempt} {tried:?}"
            );
        }
        // A POST never sent may go again, under a policy that retries connect failures.
        let connects = policy(&[RetryOn::ConnectFailure], 2, 100);
        assert!(connects.again(&Method::POST, true, 1, Tried::ConnectFailed));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_a_share_of_requests() {
        let p = policy(&[RetryOn::GatewayError], 2, 20);
        // 1,000 requests in a window, every one failing: 200 retries, not 1,000.
        let retried = (0..1000)
            .filter(|_| {
                p.requested();
                p.again(&Method::GET, true, 1, UNAVAILABLE)
            })
            .count();
        assert_eq!(retried, 200);
        // Two windows later the counts start again; few requests still get the floor.
        tokio::time::advance(2 * BUDGET_WINDOW).await;
        let retried = (0..150)
            .filter(|_| {
                p.requested();
                p.again(&Method::GET, true, 1, UNAVAILABLE)
            })
            .count();
        assert_eq!(
            retried as u64,
            BUDGET_MIN_PER_SECOND * BUDGET_WINDOW.as_secs()
        );
    }

    #[test]
    fn backoff_grows_with_jitter_to_a_ceiling() {
        let p = policy(&[RetryOn::Reset], 10, 20);
        for attempt in 1..10 {
            let ceiling = (Duration::from_millis(25) * (1 << (attempt - 1))).min(MAX_BACKOFF);
            for _ in 0..100 {
                assert!(p.backoff(attempt) <= ceiling);
            }
        }
    }
}
