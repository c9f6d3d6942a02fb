//! The CA service in this process, on a runtime and thread of its own (so that stopping it
//! ends every connection, as a replica going away does), for the tests and the benchmark.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use mesh_agent::{
    ca::{
        DEFAULT_AUDIENCE,
        review::Reviewer,
        server::{CaMetrics, CaService},
    },
    identity::{CaFiles, FileCa},
};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::ApiServer;

/// A running CA service; stops when dropped.
pub struct InProcessCa {
    pub addr: SocketAddr,
    registry: Registry,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessCa {
    /// Serves the CA of `files` for `trust_domain` on 127.0.0.1:`port` (0: any), asking the
    /// cluster `api` serves who callers are.
    pub fn start(api: &ApiServer, files: &CaFiles, trust_domain: &str, port: u16) -> Result<Self> {
        let mut registry = Registry::with_prefix("mesh_ca");
        let metrics = CaMetrics::new(&mut registry);
        let (kubeconfig, files) = (api.kubeconfig().to_owned(), files.clone());
        let trust_domain = trust_domain.to_owned();
        let (bound, address) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let serve = async move {
                let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
                let config =
                    kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
                let service = Arc::new(CaService {
                    ca: Arc::new(FileCa::load(files)?),
                    reviewer: Reviewer::new(
                        kube::Client::try_from(config)?,
                        DEFAULT_AUDIENCE,
                        &trust_domain,
                    ),
                    trust_domain,
                    max_ttl: Duration::from_secs(24 * 3600),
                    metrics,
                });
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
                let _ = bound.send(listener.local_addr());
                let acceptor = service.acceptor().await?;
                tokio::spawn(service.serve(listener, acceptor, CancellationToken::new()));
                let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
                anyhow::Ok(())
            };
            let served = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(serve));
            if let Err(e) = served {
                eprintln!("CA service: {e:#}");
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(30))
            .context("the CA service did not start")??;
        Ok(Self {
            addr,
            registry,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The CA's count of certificate requests answered with `result`.
    pub fn count(&self, result: &str) -> f64 {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        let series = format!("mesh_ca_requests_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Stops it: every connection ends.
    pub fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for InProcessCa {
    fn drop(&mut self) {
        self.stop();
    }
}
