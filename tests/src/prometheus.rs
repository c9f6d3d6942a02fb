//! A real Prometheus (Debian's `prometheus`) inside a lab node, scraping the agents' admin
//! ports, and queries of its HTTP API.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Lab, netns::Placement, topology};

/// How long Prometheus may take to start, or a query to see what it waits for.
const WATCHDOG: Duration = Duration::from_secs(60);
/// Where Prometheus listens, inside its node's network namespace.
const LISTEN: &str = "127.0.0.1:9090";

/// A Prometheus running on a lab node; stopped when dropped.
pub struct Prometheus<'lab> {
    lab: &'lab Lab,
    node: String,
    child: Child,
}

/// One series of a query's result.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Lab {
    /// Starts Prometheus on `node` (its network namespace, listening on loopback there),
    /// scraping every node's agent at its admin port each second.
    pub fn start_prometheus(&self, node: &str) -> Result<Prometheus<'_>> {
        let targets: Vec<String> = (1..=self.spec.nodes.len())
            .filter_map(|k| u8::try_from(k).ok())
            .map(|k| format!("\"{}:15020\"", topology::node_addrs(k).0))
            .collect();
        let config = self.write_file(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: mesh\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let log = std::fs::File::create(self.scratch_path("prometheus.log"))?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.scratch_path("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Placement {
            netns: self.netns_name(node),
            cgroup: self.cgroup_root().join(node).join("host"),
        }
        .apply(&mut cmd)?;
        let child = cmd
            .spawn()
            .context("cannot run prometheus (install it: cargo xtask setup)")?;
        let prometheus = Prometheus {
            lab: self,
            node: node.to_owned(),
            child,
        };
        let started = Instant::now();
        while !prometheus
            .get("/-/ready")
            .is_ok_and(|body| body.contains("Ready"))
        {
            if started.elapsed() > WATCHDOG {
                bail!(
                    "prometheus did not get ready: {}",
                    std::fs::read_to_string(self.scratch_path("prometheus.log"))?
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }
}

impl Prometheus<'_> {
    /// The body of a GET of `path` on Prometheus' HTTP API.
    fn get(&self, path: &str) -> Result<String> {
        let reply = self
            .lab
            .http(&self.node, "GET", &format!("http://{LISTEN}{path}"))?;
        if reply.status != 200 {
            bail!("GET {path}: {} {}", reply.status, reply.body);
        }
        Ok(reply.body)
    }

    /// The result of an instant query.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let body: Value = serde_json::from_str(&self.get(&format!("/api/v1/query?{query}"))?)?;
        let results = body["data"]["result"]
            .as_array()
            .with_context(|| format!("{promql}: no result in {body}"))?;
        results
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = r["value"][1].as_str().context("no value")?.parse::<f64>()?;
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// The single value of `promql` once it equals `expected`; fails with the last value seen
    /// if it never does (Prometheus scrapes each second, so this waits a scrape or two).
    pub fn wait_for_value(&self, promql: &str, expected: f64) -> Result<()> {
        let started = Instant::now();
        loop {
            let samples = self.query(promql)?;
            let values: Vec<f64> = samples.iter().map(|s| s.value).collect();
            if values == [expected] {
                return Ok(());
            }
            if started.elapsed() > WATCHDOG {
                bail!("{promql} is {samples:?}, not {expected}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The result of `promql` once it has any series (a rate needs two scrapes).
    pub fn wait_for_data(&self, promql: &str) -> Result<Vec<Sample>> {
        let started = Instant::now();
        loop {
            let samples = self.query(promql)?;
            if !samples.is_empty() {
                return Ok(samples);
            }
            if started.elapsed() > WATCHDOG {
                bail!("{promql} has no data");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Prometheus' view of its scrape targets: (address, health, last error).
    pub fn targets(&self) -> Result<Vec<(String, String, String)>> {
        let body: Value = serde_json::from_str(&self.get("/api/v1/targets")?)?;
        let active = body["data"]["activeTargets"]
            .as_array()
            .context("no active targets")?;
        Ok(active
            .iter()
            .map(|t| {
                let field = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
                (
                    t["labels"]["instance"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    field("health"),
                    field("lastError"),
                )
            })
            .collect())
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
