//! Reading an agent's `/metrics` in a lab, as the tests check them.

use std::time::{Duration, Instant};

use crate::Lab;

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
}
