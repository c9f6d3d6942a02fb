//! The trust bundle: the CA certificates a peer's chain must lead to, read from a file the
//! agent follows (a ConfigMap on Kubernetes). A root added or removed applies from the next
//! handshake on: no restart, and established connections go on untouched.

use std::{
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{identity::tls, observability::metrics::Metrics};

/// How often the bundle's file is looked at.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The CA certificates peers are checked against, as they are now.
pub struct TrustBundle {
    file: Option<PathBuf>,
    current: RwLock<Arc<Roots>>,
    /// Counts the changes, for whoever renews certificates when the roots move.
    changes: watch::Sender<u64>,
}

/// One version of the bundle, with what the verifiers need of it.
pub struct Roots {
    pub certs: Vec<CertificateDer<'static>>,
    pub store: Arc<RootCertStore>,
    /// webpki's client verifier for these roots (chain, validity, client-auth usage).
    pub client_verifier: Arc<dyn ClientCertVerifier>,
}

impl Roots {
    fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self> {
        if certs.is_empty() {
            bail!("no certificate in the trust bundle");
        }
        let mut store = RootCertStore::empty();
        for cert in &certs {
            store
                .add(cert.clone())
                .context("a trust bundle certificate is not a usable trust anchor")?;
        }
        let store = Arc::new(store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), tls::provider())
                .build()
                .context("cannot build the client certificate verifier")?;
        Ok(Self {
            certs,
            store,
            client_verifier,
        })
    }

    /// Whether `cert` is one of the bundle's.
    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.certs.iter().any(|c| c.as_ref() == cert.as_ref())
    }
}

/// The certificates of a PEM text.
fn parse(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("unreadable PEM")
}

impl TrustBundle {
    /// Reads the bundle from `file` (PEM, any number of certificates); [`Self::follow`]
    /// keeps it up to date.
    pub fn load(file: PathBuf) -> Result<Arc<Self>> {
        let pem =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let roots = parse(&pem)
            .and_then(Roots::new)
            .with_context(|| format!("{}", file.display()))?;
        Ok(Self::with(Some(file), roots))
    }

    /// A bundle of `certs` that never changes.
    pub fn fixed(certs: Vec<CertificateDer<'static>>) -> Result<Arc<Self>> {
        Ok(Self::with(None, Roots::new(certs)?))
    }

    fn with(file: Option<PathBuf>, roots: Roots) -> Arc<Self> {
        Arc::new(Self {
            file,
            current: RwLock::new(Arc::new(roots)),
            changes: watch::Sender::new(0),
        })
    }

    /// The roots as they are now.
    pub fn roots(&self) -> Arc<Roots> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ticks at each change of the roots.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Puts `certs` in place as the roots.
    pub fn replace(&self, certs: Vec<CertificateDer<'static>>) -> Result<()> {
        let roots = Arc::new(Roots::new(certs)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = roots;
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Looks at the file every second until the bundle is dropped: a changed, valid bundle
    /// replaces the current one; an invalid one is logged and counted, and the current one
    /// stays.
    pub async fn follow(self: Arc<Self>, metrics: Arc<Metrics>) {
        let Some(file) = self.file.clone() else {
            return;
        };
        metrics
            .trust_bundle_certificates
            .set(self.roots().certs.len() as i64);
        let mut last = std::fs::read(&file).ok();
        let weak = Arc::downgrade(&self);
        drop(self);
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            let Some(bundle) = weak.upgrade() else { return };
            let pem = match std::fs::read(&file) {
                Ok(pem) if Some(&pem) != last.as_ref() => pem,
                Ok(_) => continue,
                Err(e) => {
                    if last.take().is_some() {
                        warn!(file = %file.display(), "cannot read the trust bundle, the current one stays: {e}");
                    }
                    continue;
                }
            };
            let result = match parse(&pem).and_then(|certs| bundle.replace(certs)) {
                Ok(()) => {
                    let roots = bundle.roots().certs.len();
                    info!(file = %file.display(), roots, "trust bundle changed");
                    metrics.trust_bundle_certificates.set(roots as i64);
                    "applied"
                }
                Err(e) => {
                    warn!(file = %file.display(), "trust bundle change rejected, the current one stays: {e:#}");
                    "rejected"
                }
            };
            metrics
                .trust_bundle_reloads
                .get_or_create(&crate::observability::metrics::ResultLabels { result })
                .inc();
            last = Some(pem);
        }
    }
}
