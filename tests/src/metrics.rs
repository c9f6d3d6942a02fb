//! Reading an agent's `/metrics` in a lab, as the tests check them.

use std::time::{Duration, Instant};

use mesh_agent::datapath::counters::Counters;
use mesh_common::Counter;

use crate::Lab;

/// What the eBPF programs of the agent named `node_name` counted of `counter` (from their
/// pinned counters, which outlive the agent).
pub fn kernel_count(node_name: &str, counter: Counter) -> u64 {
    Counters::open_pinned(node_name)
        .and_then(|c| c.get(counter))
        .unwrap_or_else(|e| panic!("cannot read the counters of {node_name}: {e:#}"))
}

/// The sum of the series in `scrape` whose lines start with `prefix` (a name and any leading
/// labels).
pub fn sum(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

impl Lab {
    /// What `node`'s agent shows at /metrics.
    pub fn scrape(&self, node: &str) -> String {
        let k = self.spec.node_index(node).unwrap();
        self.http(node, "GET", &format!("http://198.18.0.{k}:15020/metrics"))
            .unwrap()
            .body
    }

    /// `node`'s metrics once `done` holds for them: the agent counts a connection when it is
    /// done with it, which may be after the client has gone. Fails after a minute with the
    /// last scrape.
    pub fn metrics_when(&self, node: &str, done: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let text = self.scrape(node);
            if done(&text) {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the agent of {node} never counted what was expected:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `node`'s metrics once `count` of them is above zero and has not moved for a second:
    /// for clients whose number of connections the test does not know (a stock client may
    /// give up early). Fails after a minute with the last scrape.
    pub fn metrics_settled(&self, node: &str, count: impl Fn(&str) -> f64) -> String {
        let started = Instant::now();
        let mut last = self.scrape(node);
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let text = self.scrape(node);
            if count(&text) > 0.0 && count(&text) == count(&last) {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the agent of {node} never settled:\n{text}"
            );
            last = text;
        }
    }

    /// Checks that `node`'s agent, flooded with failing TLS handshakes since `since`, let at
    /// most its burst (500) and rate (100 a second) of them through and shed the rest, once
    /// its counts settle; returns the seconds that took. `context` (what the flood printed,
    /// say) goes into a failure.
    pub fn assert_handshakes_within_rate(&self, node: &str, since: Instant, context: &str) -> f64 {
        let failed = |s: &str| sum(s, "mesh_tls_handshake_failures_total{side=\"inbound\"");
        let shed = |s: &str| sum(s, "mesh_refusals_total{reason=\"handshake_rate\"}");
        let scrape = self.metrics_settled(node, |s| failed(s) + shed(s));
        let elapsed = since.elapsed().as_secs_f64();
        let (handshakes, shed) = (failed(&scrape), shed(&scrape));
        assert!(
            handshakes <= 500.0 + 100.0 * (elapsed + 1.0),
            "{handshakes} handshakes in {elapsed:.1} s\n{context}"
        );
        assert!(shed > 0.0, "nothing shed in {elapsed:.1} s: {context}");
        elapsed
    }
}
