//! The CA of the lab and the YAML mode: its certificate and key are files the agent reads and
//! signs with itself, again whenever they change (a rotation moves signing to a new key
//! without a restart).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tracing::{info, warn};

use crate::identity::{
    CertificateAuthority, Signed,
    signer::{Signer, SigningRequest},
};

/// A CA whose certificate and key are files (or a Kubernetes Secret mounted as files).
pub struct FileCa {
    files: Option<CaFiles>,
    current: Mutex<Current>,
}

/// The files of a CA.
#[derive(Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The signer in use, and the files' modification times it was read at.
struct Current {
    signer: Arc<Signer>,
    read_at: (Option<SystemTime>, Option<SystemTime>),
}

impl CaFiles {
    fn modified(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let at = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        (at(&self.cert), at(&self.key))
    }
}

impl FileCa {
    /// Reads the CA certificate and key (PEM), and again whenever they change.
    pub fn load(files: CaFiles) -> Result<Self> {
        let read_at = files.modified();
        let signer = Arc::new(Signer::load(&files.cert, &files.key)?);
        Ok(Self {
            files: Some(files),
            current: Mutex::new(Current { signer, read_at }),
        })
    }

    /// Makes a new self-signed CA for `trust_domain`, valid for ten years, and writes its
    /// certificate and key as `ca.crt` and `ca.key` (mode 0600) in `dir`.
    pub fn create(dir: &Path, trust_domain: &str) -> Result<CaFiles> {
        let (cert, key) = Signer::self_signed(trust_domain)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let files = CaFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        };
        std::fs::write(&files.cert, cert)
            .with_context(|| format!("cannot write {}", files.cert.display()))?;
        write_private(&files.key, &key)?;
        Ok(files)
    }

    /// A CA that signs with `signer`, kept in memory.
    pub fn in_memory(signer: Signer) -> Self {
        Self {
            files: None,
            current: Mutex::new(Current {
                signer: Arc::new(signer),
                read_at: (None, None),
            }),
        }
    }

    /// The signer of the files as they are now: read again if they changed; if they no
    /// longer make a CA (half written, say), the last one goes on, and they are tried again
    /// next time.
    pub fn signer_now(&self) -> Arc<Signer> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(files) = &self.files {
            let modified = files.modified();
            if modified != current.read_at {
                match Signer::load(&files.cert, &files.key) {
                    Ok(signer) => {
                        info!(cert = %files.cert.display(), "the CA's files changed: signing with them");
                        *current = Current {
                            signer: Arc::new(signer),
                            read_at: modified,
                        };
                    }
                    Err(e) => {
                        warn!("the CA's files changed but are unusable, the last CA signs: {e:#}")
                    }
                }
            }
        }
        current.signer.clone()
    }
}

impl CertificateAuthority for FileCa {
    fn sign(
        &self,
        csr: CertificateSigningRequestDer<'static>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Signed>> {
        let signed = SigningRequest::parse(&csr)
            .map_err(anyhow::Error::msg)
            .and_then(|request| self.signer_now().sign(&request, ttl));
        Box::pin(std::future::ready(signed))
    }

    fn signer(&self) -> BoxFuture<'_, Result<CertificateDer<'static>>> {
        Box::pin(std::future::ready(Ok(self.signer_now().cert().clone())))
    }
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
