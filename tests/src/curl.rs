//! curl opening a connection of its own for every request, at a steady rate: the stock
//! client of the tests that upgrade or fault the mesh under load.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{Daemon, Lab};

/// What a request that went well looks like among [`CurlLoop::outcomes`].
pub const SUCCESS: &str = "code=200 exit=0";

/// A running curl, `requests` GETs at a fixed rate.
pub struct CurlLoop {
    curl: Daemon,
    log: PathBuf,
    requests: usize,
}

impl CurlLoop {
    /// Starts curl in `pod`: `requests` GETs of `url` (as `url/1`, `url/2`...) at `per_second`,
    /// each on a new connection, each given 3 s to connect and 10 s in all.
    pub fn start(
        lab: &Lab,
        pod: &str,
        url: &str,
        requests: usize,
        per_second: u32,
    ) -> Result<Self> {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let name = format!("curl-{pod}-{}", STARTED.fetch_add(1, Ordering::Relaxed));
        let urls = format!("{url}/[1-{requests}]");
        let rate = format!("{per_second}/s");
        let curl = lab.start_in_pod(
            pod,
            &name,
            "curl",
            &[
                "-s",
                "-H",
                "Connection: close",
                "--rate",
                &rate,
                "--connect-timeout",
                "3",
                "-m",
                "10",
                "-w",
                "\ncode=%{http_code} exit=%{exitcode}\n",
                &urls,
            ],
        )?;
        Ok(Self {
            curl,
            log: lab.scratch_path(&format!("{name}.log")),
            requests,
        })
    }

    /// Waits for curl to finish (as long as its requests may take, and a minute more), then
    /// each request's outcome in order: `code=<HTTP status> exit=<curl's exit code>`.
    pub fn outcomes(mut self) -> Result<Vec<String>> {
        let limit = Duration::from_secs(60 + 10 * self.requests as u64 / 20);
        let status = self.curl.wait_within(limit)?;
        let log = std::fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read {}", self.log.display()))?;
        let outcomes: Vec<String> = log
            .lines()
            .filter(|l| l.starts_with("code="))
            .map(String::from)
            .collect();
        anyhow::ensure!(
            outcomes.len() == self.requests,
            "curl ({status}) made {} of its {} requests:\n{log}",
            outcomes.len(),
            self.requests
        );
        Ok(outcomes)
    }
}

/// The outcomes that are not [`SUCCESS`], with their request's number (from 1).
pub fn failures(outcomes: &[String]) -> Vec<(usize, &str)> {
    outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| *o != SUCCESS)
        .map(|(i, o)| (i + 1, o.as_str()))
        .collect()
}
