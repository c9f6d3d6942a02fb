//! Load balancing over a service port's endpoints: power of two choices over least
//! outstanding connections, or round robin; endpoints that keep failing to connect are
//! ejected for a backoff that grows each time, and come back on their first success. On an
//! HTTP port with outlier detection, endpoints that keep answering with errors are ejected
//! too, never more than a set share of the port's at once.
//!
//! Time is tokio's clock and chance is `fastrand`'s generator of the thread, so tests run
//! ejections on a paused clock and choices from a seed (`fastrand::seed`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tracing::{info, warn};

use super::locality;
use crate::config::Period;

/// Consecutive connect failures that eject an endpoint.
const EJECT_AFTER: u32 = 3;
/// The first ejection's length; each further one doubles it, up to [`MAX_EJECTION`].
const BASE_EJECTION: Duration = Duration::from_secs(2);
const MAX_EJECTION: Duration = Duration::from_secs(120);
/// The longest an outlier is ejected, however many times in a row.
const MAX_OUTLIER_EJECTION: Duration = Duration::from_secs(300);

/// How a service port picks among its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Two endpoints at random; the one with fewer open connections wins.
    #[default]
    LeastOutstanding,
    RoundRobin,
}

/// Ejection of the endpoints of an HTTP port that keep answering with errors (Envoy's and
/// Istio's outlier detection): the n-th ejection in a row lasts n times the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetection {
    /// 5xx answers in a row (gateway errors among them) that eject an endpoint; 0 never.
    pub consecutive_5xx: u32,
    /// Gateway errors in a row (502, 503, 504, gRPC UNAVAILABLE or DEADLINE_EXCEEDED, a reset
    /// connection, a try timed out) that eject an endpoint; 0 never.
    pub consecutive_gateway_errors: u32,
    /// How long the first ejection lasts (up to 300 s for later ones).
    pub base_ejection: Period,
    /// The most of the port's endpoints ejected at once, in percent; one may always be.
    pub max_ejected_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 5,
            base_ejection: Period(Duration::from_secs(30)),
            max_ejected_percent: 10,
        }
    }
}

/// How an endpoint answered a request, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    Fine,
    ServerError,
    GatewayError,
}

/// What the agent knows of one endpoint: open connections and recent connect failures.
/// Shared by every service port that has the endpoint and kept across config reloads.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    outstanding: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    /// Connect failures in a row.
    failures: u32,
    /// 5xx answers in a row, and gateway errors in a row.
    server_errors: u32,
    gateway_errors: u32,
    /// Ejections in a row without a success in between.
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            outstanding: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.health().ejected_until.is_some_and(|t| now < t)
    }

    /// A connect to the endpoint worked: it is healthy again.
    pub fn succeeded(&self) {
        let mut h = self.health();
        if h.ejections > 0 {
            info!(endpoint = %self.addr, "endpoint back after ejection");
        }
        *h = Health::default();
    }

    /// A connect to the endpoint failed; enough in a row eject it (then `true`).
    pub fn failed(&self) -> bool {
        let mut h = self.health();
        h.failures += 1;
        if h.failures >= EJECT_AFTER {
            let length = BASE_EJECTION
                .saturating_mul(1 << h.ejections.min(16))
                .min(MAX_EJECTION);
            h.ejections += 1;
            h.failures = 0;
            h.ejected_until = Some(Instant::now() + length);
            warn!(endpoint = %self.addr, ejection = ?length, "endpoint ejected after {EJECT_AFTER} failed connects");
            return true;
        }
        false
    }

    /// Counts a bad answer; `true` when that makes enough in a row for `policy` to eject.
    fn answered_badly(&self, answered: Answered, policy: &OutlierDetection) -> bool {
        let mut h = self.health();
        h.failures = 0;
        h.server_errors += 1;
        if answered == Answered::GatewayError {
            h.gateway_errors += 1;
        } else {
            h.gateway_errors = 0;
        }
        let reached = |count: u32, limit: u32| limit > 0 && count >= limit;
        let tripped = reached(h.server_errors, policy.consecutive_5xx)
            || reached(h.gateway_errors, policy.consecutive_gateway_errors);
        if tripped {
            h.server_errors = 0;
            h.gateway_errors = 0;
        }
        tripped
    }

    /// Ejects the endpoint as an outlier: the base time once more than last time.
    fn eject_outlier(&self, policy: &OutlierDetection) {
        let mut h = self.health();
        h.ejections += 1;
        let length = policy
            .base_ejection
            .0
            .saturating_mul(h.ejections)
            .min(MAX_OUTLIER_EJECTION);
        h.ejected_until = Some(Instant::now() + length);
        warn!(endpoint = %self.addr, ejection = ?length, "endpoint ejected as an outlier after errors in a row");
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// An endpoint's load and health, as the admin API shows it.
#[derive(Debug, serde::Serialize)]
pub struct EndpointHealth {
    pub address: SocketAddr,
    pub outstanding: usize,
    pub consecutive_failures: u32,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    pub ejections_in_a_row: u32,
    /// How much longer it stays ejected, if it is.
    pub ejected_for_ms: Option<u64>,
}

/// An open connection to an endpoint; counts as outstanding until dropped.
#[derive(Debug)]
pub struct Lease(Arc<EndpointState>);

impl Lease {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every endpoint's state, by address, so a reloaded config finds its endpoints' history.
#[derive(Debug, Default)]
pub struct EndpointStates(Mutex<HashMap<SocketAddr, Weak<EndpointState>>>);

impl EndpointStates {
    /// Forgets the endpoints no routing table holds any more (once per table built, not per
    /// endpoint: that would be quadratic).
    pub fn prune(&self) {
        let mut states = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        states.retain(|_, s| s.strong_count() > 0);
    }

    /// Every endpoint the routing tables hold, by address.
    pub fn snapshot(&self) -> Vec<EndpointHealth> {
        let now = Instant::now();
        let states: Vec<Arc<EndpointState>> = {
            let states = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            states.values().filter_map(Weak::upgrade).collect()
        };
        let mut health: Vec<EndpointHealth> = states
            .iter()
            .map(|s| {
                let h = s.health();
                EndpointHealth {
                    address: s.addr,
                    outstanding: s.outstanding(),
                    consecutive_failures: h.failures,
                    consecutive_5xx: h.server_errors,
                    consecutive_gateway_errors: h.gateway_errors,
                    ejections_in_a_row: h.ejections,
                    ejected_for_ms: h
                        .ejected_until
                        .filter(|t| *t > now)
                        .map(|t| (t - now).as_millis() as u64),
                }
            })
            .collect();
        health.sort_by_key(|h| h.address);
        health
    }

    /// The state of `addr`, made if no routing table holds it any more.
    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut states = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = states.get(&addr).and_then(Weak::upgrade) {
            return state;
        }
        let state = Arc::new(EndpointState::new(addr));
        states.insert(addr, Arc::downgrade(&state));
        state
    }
}

/// The endpoints of one service port and how to choose among them.
#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    outliers: Option<OutlierDetection>,
    /// The most connections or requests an endpoint may have at once (a circuit breaker).
    max_per_endpoint: Option<usize>,
    endpoints: Vec<Arc<EndpointState>>,
    /// Each endpoint's locality level (`locality`): 0 is the closest to this node.
    levels: Vec<u8>,
    /// How many endpoints each level has, from the closest to the farthest; one level (or
    /// none) when there is nothing to prefer.
    level_sizes: Vec<usize>,
    next: AtomicUsize,
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpicked {
    /// None is left to try.
    NoEndpoint,
    /// Every one left has as much as it may have at once.
    AllBusy,
}

impl Balancer {
    /// A balancer over `endpoints`, each with its locality level (in the same order).
    pub fn new(
        strategy: Strategy,
        outliers: Option<OutlierDetection>,
        max_per_endpoint: Option<usize>,
        endpoints: Vec<(Arc<EndpointState>, u8)>,
    ) -> Self {
        let (endpoints, levels): (Vec<_>, Vec<u8>) = endpoints.into_iter().unzip();
        let count = levels.iter().max().map_or(0, |&l| usize::from(l) + 1);
        let mut level_sizes = vec![0; count];
        for &level in &levels {
            level_sizes[usize::from(level)] += 1;
        }
        Self {
            strategy,
            outliers,
            max_per_endpoint,
            endpoints,
            levels,
            level_sizes,
            next: AtomicUsize::new(0),
        }
    }

    /// The endpoint of `lease` answered a request (it was reached); with outlier detection,
    /// enough bad answers in a row eject it unless the port's share of ejected endpoints is
    /// full. `true` if this ejected it.
    pub fn answered(&self, lease: &Lease, answered: Answered) -> bool {
        let endpoint = lease.endpoint();
        let Some(policy) = self.outliers.filter(|_| answered != Answered::Fine) else {
            endpoint.succeeded();
            return false;
        };
        if !endpoint.answered_badly(answered, &policy) {
            return false;
        }
        let now = Instant::now();
        let ejected = self.endpoints.iter().filter(|e| e.ejected(now)).count();
        let share = self.endpoints.len() * usize::from(policy.max_ejected_percent) / 100;
        if ejected >= share.max(1) {
            info!(endpoint = %endpoint.addr, ejected, "outlier kept: the port's share of ejected endpoints is full");
            return false;
        }
        endpoint.eject_outlier(&policy);
        true
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Picks an endpoint not in `tried` and below its cap, preferring ones not ejected, and
    /// among those the closest locality level their health lets (`locality::level_shares`);
    /// if every candidate is ejected, the closest of them is still tried (better a likely
    /// failure than a certain one).
    pub fn pick(&self, tried: &[SocketAddr]) -> Result<Lease, Unpicked> {
        let now = Instant::now();
        if let Some(chosen) = self.two_choices(tried, now) {
            chosen.outstanding.fetch_add(1, Ordering::Relaxed);
            return Ok(Lease(chosen.clone()));
        }
        let untried: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| !tried.contains(&self.endpoints[i].addr))
            .collect();
        if untried.is_empty() {
            return Err(Unpicked::NoEndpoint);
        }
        let open: Vec<usize> = match self.max_per_endpoint {
            Some(max) => untried
                .into_iter()
                .filter(|&i| self.endpoints[i].outstanding() < max)
                .collect(),
            None => untried,
        };
        let healthy: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| !self.endpoints[i].ejected(now))
            .collect();
        let candidates = match healthy.is_empty() {
            false => self.at_level(healthy),
            true => {
                let closest = open.iter().map(|&i| self.levels[i]).min();
                open.into_iter()
                    .filter(|&i| Some(self.levels[i]) == closest)
                    .collect()
            }
        };
        let chosen = match (self.strategy, candidates.len()) {
            (_, 0) => return Err(Unpicked::AllBusy),
            (_, 1) => &self.endpoints[candidates[0]],
            (Strategy::RoundRobin, n) => {
                &self.endpoints[candidates[self.next.fetch_add(1, Ordering::Relaxed) % n]]
            }
            (Strategy::LeastOutstanding, n) => {
                let (a, b) = two_of(n);
                less_loaded(
                    &self.endpoints[candidates[a]],
                    &self.endpoints[candidates[b]],
                )
            }
        };
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(Lease(chosen.clone()))
    }

    /// Least outstanding's two choices without a look at the other endpoints, where they
    /// cannot change the pick: all at one level, and both choices untried, below the cap and
    /// not ejected. A pair drawn so and kept only if both qualify is as uniform over the
    /// qualifying pairs as [`Balancer::pick`]'s draw among the qualifying endpoints, which
    /// takes over when they do not (with a cost that grows with the port's endpoints).
    fn two_choices(&self, tried: &[SocketAddr], now: Instant) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        let one_level = self.level_sizes.iter().filter(|&&size| size > 0).count() <= 1;
        if self.strategy != Strategy::LeastOutstanding || !one_level || n < 2 {
            return None;
        }
        let (a, b) = two_of(n);
        let (a, b) = (&self.endpoints[a], &self.endpoints[b]);
        let qualifies = |e: &EndpointState| {
            !tried.contains(&e.addr)
                && self
                    .max_per_endpoint
                    .is_none_or(|max| e.outstanding() < max)
                && !e.ejected(now)
        };
        (qualifies(a) && qualifies(b)).then(|| less_loaded(a, b))
    }

    /// The endpoints of `healthy` (indexes) at one locality level, drawn by the levels'
    /// shares of the traffic.
    fn at_level(&self, healthy: Vec<usize>) -> Vec<usize> {
        if self.level_sizes.len() <= 1 {
            return healthy;
        }
        let mut ready = vec![0; self.level_sizes.len()];
        for &i in &healthy {
            ready[usize::from(self.levels[i])] += 1;
        }
        let shares = locality::level_shares(&self.level_sizes, &ready);
        let mut draw = fastrand::f64() * shares.iter().sum::<f64>();
        let level = shares
            .iter()
            .position(|&share| {
                draw -= share;
                share > 0.0 && draw < 0.0
            })
            .or_else(|| ready.iter().position(|&n| n > 0))
            .unwrap_or(0) as u8;
        healthy
            .into_iter()
            .filter(|&i| self.levels[i] == level)
            .collect()
    }
}

/// Two different indexes below `n` (at least 2), each pair as likely as any other.
fn two_of(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    (a, (a + 1 + fastrand::usize(..n - 1)) % n)
}

/// Of least outstanding's two choices, the one with fewer open connections (`a` on a tie).
fn less_loaded<'a>(a: &'a Arc<EndpointState>, b: &'a Arc<EndpointState>) -> &'a Arc<EndpointState> {
    if b.outstanding() < a.outstanding() {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(strategy: Strategy, n: u16) -> (EndpointStates, Balancer) {
        with_outliers(strategy, n, None)
    }

    fn with_outliers(
        strategy: Strategy,
        n: u16,
        outliers: Option<OutlierDetection>,
    ) -> (EndpointStates, Balancer) {
        let states = EndpointStates::default();
        let endpoints = (1..=n)
            .map(|p| (states.get(SocketAddr::from(([198, 18, 1, 2], p))), 0))
            .collect();
        (states, Balancer::new(strategy, outliers, None, endpoints))
    }

    /// Answers for the `i`-th endpoint of `b`, in order; `true` for each that ejected it.
    fn answer(b: &Balancer, i: usize, answers: &[Answered]) -> Vec<bool> {
        let addr = b.endpoints[i].addr;
        let others: Vec<SocketAddr> = b
            .endpoints
            .iter()
            .map(|e| e.addr)
            .filter(|a| *a != addr)
            .collect();
        answers
            .iter()
            .map(|a| {
                // Every other endpoint tried: the pick is the `i`-th, ejected or not.
                let lease = b.pick(&others).unwrap();
                assert_eq!(lease.endpoint().addr, addr);
                b.answered(&lease, *a)
            })
            .collect()
    }

    const OUTLIERS: OutlierDetection = OutlierDetection {
        consecutive_5xx: 3,
        consecutive_gateway_errors: 0,
        base_ejection: Period(Duration::from_secs(10)),
        max_ejected_percent: 50,
    };

    #[test]
    fn round_robin_takes_turns() {
        let (_states, b) = balancer(Strategy::RoundRobin, 3);
        let ports: Vec<u16> = (0..6)
            .map(|_| b.pick(&[]).unwrap().endpoint().addr.port())
            .collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn least_outstanding_evens_out_open_connections() {
        let (_states, b) = balancer(Strategy::LeastOutstanding, 4);
        // Held open: with two choices the busiest endpoint never runs far ahead.
        let leases: Vec<Lease> = (0..400).map(|_| b.pick(&[]).unwrap()).collect();
        let counts: Vec<usize> = b.endpoints.iter().map(|e| e.outstanding()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 400);
        assert!(
            counts.iter().all(|&c| (95..=105).contains(&c)),
            "{counts:?}"
        );
        drop(leases);
        assert!(b.endpoints.iter().all(|e| e.outstanding() == 0));
    }

    #[test]
    fn picks_among_many_skip_the_tried_the_full_and_the_ejected_first() {
        let states = EndpointStates::default();
        let endpoints = (1..=20)
            .map(|p| (states.get(SocketAddr::from(([198, 18, 1, 2], p))), 2))
            .collect();
        // At most one connection each.
        let b = Balancer::new(Strategy::LeastOutstanding, None, Some(1), endpoints);
        for e in &b.endpoints[..5] {
            for _ in 0..EJECT_AFTER {
                e.failed();
            }
        }
        let tried: Vec<SocketAddr> = b.endpoints[5..10].iter().map(|e| e.addr).collect();
        let leases: Vec<Lease> = (0..10).map(|_| b.pick(&tried).unwrap()).collect();
        let mut picked: Vec<u16> = leases.iter().map(|l| l.endpoint().addr.port()).collect();
        picked.sort();
        assert_eq!(picked, (11..=20).collect::<Vec<_>>());
        // The healthy ones full: an ejected one is still better than nothing.
        let last = b.pick(&tried).unwrap();
        assert!((1..=5).contains(&last.endpoint().addr.port()));
    }

    #[test]
    fn retries_skip_what_was_tried() {
        let (_states, b) = balancer(Strategy::LeastOutstanding, 2);
        let first = b.pick(&[]).unwrap().endpoint().addr;
        let second = b.pick(&[first]).unwrap().endpoint().addr;
        assert_ne!(first, second);
        assert_eq!(b.pick(&[first, second]).unwrap_err(), Unpicked::NoEndpoint);
    }

    #[test]
    fn failing_endpoints_are_ejected_with_growing_backoff_and_return_on_success() {
        let (_states, b) = balancer(Strategy::RoundRobin, 2);
        let bad = b.endpoints[0].clone();
        for _ in 0..EJECT_AFTER {
            bad.failed();
        }
        assert!(bad.ejected(Instant::now()));
        let first_until = bad.health().ejected_until.unwrap();
        for _ in 0..10 {
            assert_ne!(b.pick(&[]).unwrap().endpoint().addr, bad.addr);
        }
        // Everything else tried: an ejected endpoint is still better than nothing.
        let other = b.endpoints[1].addr;
        assert_eq!(b.pick(&[other]).unwrap().endpoint().addr, bad.addr);

        for _ in 0..EJECT_AFTER {
            bad.failed();
        }
        let second_until = bad.health().ejected_until.unwrap();
        assert!(
            second_until - first_until >= BASE_EJECTION,
            "the second ejection is longer"
        );

        bad.succeeded();
        assert!(!bad.ejected(Instant::now()));
        assert_eq!(bad.health().ejections, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_ends_after_its_backoff_on_tokios_clock() {
        let (_states, b) = balancer(Strategy::RoundRobin, 2);
        let bad = b.endpoints[0].clone();
        for _ in 0..EJECT_AFTER {
            bad.failed();
        }
        assert!(bad.ejected(Instant::now()));
        tokio::time::advance(BASE_EJECTION - Duration::from_millis(1)).await;
        assert!(bad.ejected(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!bad.ejected(Instant::now()));
        // Back in the rotation, though not yet healthy: the next failure ejects it again,
        // for twice as long.
        assert_eq!(b.pick(&[]).unwrap().endpoint().addr, bad.addr);
        for _ in 0..EJECT_AFTER {
            bad.failed();
        }
        let until = bad.health().ejected_until.unwrap();
        assert_eq!(until - Instant::now(), 2 * BASE_EJECTION);
    }

    #[test]
    fn least_outstanding_choices_repeat_from_a_seed() {
        let (_states, b) = balancer(Strategy::LeastOutstanding, 8);
        let picks = || -> Vec<u16> {
            fastrand::seed(7);
            (0..20)
                .map(|_| b.pick(&[]).unwrap().endpoint().addr.port())
                .collect()
        };
        assert_eq!(picks(), picks());
    }

    #[test]
    fn reloaded_tables_share_endpoint_state() {
        let states = EndpointStates::default();
        let addr = SocketAddr::from(([198, 18, 1, 2], 80));
        let a = states.get(addr);
        a.failed();
        assert!(Arc::ptr_eq(&a, &states.get(addr)));
        drop(a);
        states.prune();
        assert!(states.snapshot().is_empty(), "forgotten once unused");
        assert_eq!(states.get(addr).health().failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_in_a_row_eject_an_outlier_for_longer_each_time() {
        use Answered::{Fine, ServerError as E};
        let (_states, b) = with_outliers(Strategy::RoundRobin, 4, Some(OUTLIERS));
        let bad = b.endpoints[0].clone();
        // A good answer between errors starts the count again.
        assert_eq!(answer(&b, 0, &[E, E, Fine, E, E]), [false; 5]);
        assert_eq!(answer(&b, 0, &[E]), [true]);
        assert!(bad.ejected(Instant::now()));
        for _ in 0..20 {
            assert_ne!(b.pick(&[]).unwrap().endpoint().addr, bad.addr);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!bad.ejected(Instant::now()));
        // Still failing once back: ejected again, for twice the base.
        assert_eq!(answer(&b, 0, &[E, E, E]), [false, false, true]);
        let until = bad.health().ejected_until.unwrap();
        assert_eq!(until - Instant::now(), Duration::from_secs(20));
        // A good answer once back ends the series: the next ejection is the base again.
        tokio::time::advance(Duration::from_secs(20)).await;
        answer(&b, 0, &[Fine, E, E, E]);
        let until = bad.health().ejected_until.unwrap();
        assert_eq!(until - Instant::now(), Duration::from_secs(10));
    }

    #[test]
    fn gateway_errors_have_their_own_count() {
        use Answered::{GatewayError as G, ServerError as E};
        let policy = OutlierDetection {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 2,
            ..OUTLIERS
        };
        let (_states, b) = with_outliers(Strategy::RoundRobin, 2, Some(policy));
        // 500s never eject here, and one between gateway errors breaks their series.
        assert_eq!(answer(&b, 0, &[E, E, E, G, E, G]), [false; 6]);
        assert_eq!(answer(&b, 0, &[G]), [true]);
    }

    #[test]
    fn no_more_than_the_share_is_ejected_and_one_always_may_be() {
        use Answered::ServerError as E;
        let (_states, b) = with_outliers(Strategy::RoundRobin, 4, Some(OUTLIERS));
        assert_eq!(answer(&b, 0, &[E, E, E]), [false, false, true]);
        assert_eq!(answer(&b, 1, &[E, E, E]), [false, false, true]);
        // Half of four are out: the third stays in, and so do the rest.
        assert_eq!(answer(&b, 2, &[E, E, E, E, E, E]), [false; 6]);
        let now = Instant::now();
        assert_eq!(b.endpoints.iter().filter(|e| e.ejected(now)).count(), 2);

        let tiny = OutlierDetection {
            max_ejected_percent: 10,
            ..OUTLIERS
        };
        let (_states, b) = with_outliers(Strategy::RoundRobin, 2, Some(tiny));
        assert_eq!(answer(&b, 0, &[E, E, E]), [false, false, true]);
        assert_eq!(answer(&b, 1, &[E, E, E]), [false; 3]);
    }

    #[test]
    fn without_outlier_detection_errors_eject_nothing() {
        use Answered::{GatewayError as G, ServerError as E};
        let (_states, b) = balancer(Strategy::RoundRobin, 2);
        assert_eq!(answer(&b, 0, &[E, G, E, G, E, G, E, G]), [false; 8]);
        // An answer is a connect that worked: it ends a series of connect failures.
        let ep = b.endpoints[0].clone();
        ep.failed();
        ep.failed();
        answer(&b, 0, &[E]);
        ep.failed();
        assert!(!ep.ejected(Instant::now()));
    }

    #[test]
    fn endpoints_at_their_cap_are_passed_over_and_all_busy_is_told_apart() {
        let states = EndpointStates::default();
        let endpoints = (1..=2)
            .map(|p| (states.get(SocketAddr::from(([198, 18, 1, 2], p))), 0))
            .collect();
        let b = Balancer::new(Strategy::RoundRobin, None, Some(2), endpoints);
        let mut leases: Vec<Lease> = (0..4).map(|_| b.pick(&[]).unwrap()).collect();
        assert!(b.endpoints.iter().all(|e| e.outstanding() == 2));
        assert_eq!(b.pick(&[]).unwrap_err(), Unpicked::AllBusy);
        // One ends: the next pick is the endpoint it freed, however the turns go.
        let freed = leases.remove(0).endpoint().addr;
        for _ in 0..3 {
            let lease = b.pick(&[]).unwrap();
            assert_eq!(lease.endpoint().addr, freed);
        }
    }

    /// A balancer over endpoints at the given locality levels (port = index + 1).
    fn by_levels(levels: &[u8]) -> (EndpointStates, Balancer) {
        let states = EndpointStates::default();
        let endpoints = (1..)
            .zip(levels)
            .map(|(p, &level)| (states.get(SocketAddr::from(([198, 18, 1, 2], p))), level))
            .collect();
        let b = Balancer::new(Strategy::LeastOutstanding, None, None, endpoints);
        (states, b)
    }

    /// How many of `n` picks went to each level.
    fn picks_per_level(b: &Balancer, n: usize, tried: &[SocketAddr]) -> Vec<usize> {
        let mut counts = vec![0; 3];
        for _ in 0..n {
            let lease = b.pick(tried).unwrap();
            let i = b
                .endpoints
                .iter()
                .position(|e| e.addr == lease.endpoint().addr);
            counts[usize::from(b.levels[i.unwrap()])] += 1;
        }
        counts
    }

    fn eject(endpoint: &EndpointState) {
        for _ in 0..EJECT_AFTER {
            endpoint.failed();
        }
    }

    #[test]
    fn the_closest_healthy_level_takes_the_traffic_and_spills_over_as_it_fails() {
        fastrand::seed(7);
        // Three endpoints in the caller's zone, two in its region, two elsewhere.
        let (_states, b) = by_levels(&[0, 0, 0, 1, 1, 2, 2]);
        assert_eq!(picks_per_level(&b, 1000, &[]), [1000, 0, 0]);
        // One of three left in the zone covers 47 %; the region takes the rest.
        eject(&b.endpoints[0]);
        eject(&b.endpoints[1]);
        let counts = picks_per_level(&b, 1000, &[]);
        assert!((420..=520).contains(&counts[0]), "{counts:?}");
        assert_eq!(counts[0] + counts[1], 1000, "{counts:?}");
        // The zone down: the region alone; the region down too: the rest.
        eject(&b.endpoints[2]);
        assert_eq!(picks_per_level(&b, 200, &[]), [0, 200, 0]);
        eject(&b.endpoints[3]);
        eject(&b.endpoints[4]);
        assert_eq!(picks_per_level(&b, 200, &[]), [0, 0, 200]);
        // The zone back: all of it again.
        for e in &b.endpoints[..3] {
            e.succeeded();
        }
        assert_eq!(picks_per_level(&b, 200, &[]), [200, 0, 0]);
    }

    #[test]
    fn a_retry_leaves_a_level_whose_endpoints_were_all_tried() {
        fastrand::seed(7);
        let (_states, b) = by_levels(&[0, 1, 1, 2]);
        let first = b.pick(&[]).unwrap().endpoint().addr;
        assert_eq!(first, b.endpoints[0].addr);
        assert_eq!(picks_per_level(&b, 100, &[first]), [0, 100, 0]);
    }

    #[test]
    fn with_every_endpoint_ejected_the_closest_is_still_tried() {
        let (_states, b) = by_levels(&[1, 0, 2]);
        for e in &b.endpoints {
            eject(e);
        }
        assert_eq!(b.pick(&[]).unwrap().endpoint().addr, b.endpoints[1].addr);
    }
}
