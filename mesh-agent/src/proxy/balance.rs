//! Load balancing over a service port's endpoints: power of two choices over least
//! outstanding connections, or round robin; endpoints that keep failing to connect are
//! ejected for a backoff that grows each time, and come back on their first success.
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

/// Consecutive connect failures that eject an endpoint.
const EJECT_AFTER: u32 = 3;
/// The first ejection's length; each further one doubles it, up to [`MAX_EJECTION`].
const BASE_EJECTION: Duration = Duration::from_secs(2);
const MAX_EJECTION: Duration = Duration::from_secs(120);

/// How a service port picks among its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Two endpoints at random; the one with fewer open connections wins.
    #[default]
    LeastOutstanding,
    RoundRobin,
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
    failures: u32,
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
    endpoints: Vec<Arc<EndpointState>>,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(strategy: Strategy, endpoints: Vec<Arc<EndpointState>>) -> Self {
        Self {
            strategy,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Picks an endpoint not in `tried`, preferring ones not ejected; if every candidate is
    /// ejected, one of them is still tried (better a likely failure than a certain one).
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Lease> {
        let now = Instant::now();
        let untried: Vec<&Arc<EndpointState>> = self
            .endpoints
            .iter()
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        let healthy: Vec<&Arc<EndpointState>> = untried
            .iter()
            .copied()
            .filter(|e| !e.ejected(now))
            .collect();
        let candidates = if healthy.is_empty() { untried } else { healthy };
        let chosen = match (self.strategy, candidates.len()) {
            (_, 0) => return None,
            (_, 1) => candidates[0],
            (Strategy::RoundRobin, n) => candidates[self.next.fetch_add(1, Ordering::Relaxed) % n],
            (Strategy::LeastOutstanding, n) => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (candidates[a], candidates[b]);
                if b.outstanding() < a.outstanding() {
                    b
                } else {
                    a
                }
            }
        };
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Lease(chosen.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(strategy: Strategy, n: u16) -> (EndpointStates, Balancer) {
        let states = EndpointStates::default();
        let endpoints = (1..=n)
            .map(|p| states.get(SocketAddr::from(([198, 18, 1, 2], p))))
            .collect();
        (states, Balancer::new(strategy, endpoints))
    }

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
    fn retries_skip_what_was_tried() {
        let (_states, b) = balancer(Strategy::LeastOutstanding, 2);
        let first = b.pick(&[]).unwrap().endpoint().addr;
        let second = b.pick(&[first]).unwrap().endpoint().addr;
        assert_ne!(first, second);
        assert!(b.pick(&[first, second]).is_none());
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
}
