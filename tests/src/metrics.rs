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
}
