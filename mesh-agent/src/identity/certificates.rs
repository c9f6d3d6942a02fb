//! The certificates this agent holds: one per local workload identity plus its own, each
//! renewed at half its lifetime (with jitter, so a node's renewals do not bunch up) and
//! swapped in without touching established connections.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use rustls::{ClientConfig, ServerConfig};
use tracing::{info, warn};

use crate::{
    identity::{
        CertificateAuthority, SpiffeId,
        tls::{self, CertSlot},
    },
    observability::metrics::{IdentityLabels, Metrics},
};

/// Renewal happens at half the lifetime, give or take this share of it.
const JITTER: f64 = 0.1;
/// The longest wait before another try when the CA fails.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Issues, renews and hands out the certificates of this node's identities.
pub struct Certificates {
    ca: Arc<dyn CertificateAuthority>,
    trust_domain: String,
    ttl: Duration,
    /// Tunnel client configurations by identity; each keeps its certificate slot alive
    /// (renewal holds only a weak reference).
    held: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
    expiries: Arc<Expiries>,
}

/// When each held certificate expires, kept up to date by issuing and renewal, and its gauge.
struct Expiries {
    by_id: Mutex<BTreeMap<SpiffeId, SystemTime>>,
    metrics: Arc<Metrics>,
}

impl Certificates {
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        trust_domain: &str,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            ttl,
            held: Mutex::new(HashMap::new()),
            expiries: Arc::new(Expiries {
                by_id: Mutex::default(),
                metrics,
            }),
        }
    }

    /// The inbound tunnel's server configuration, presenting the agent identity (issued now
    /// and renewed from here on).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let id = SpiffeId::agent(&self.trust_domain);
        let slot = Arc::new(self.issue_slot(&id)?);
        tokio::spawn(renew(
            self.ca.clone(),
            id,
            Arc::downgrade(&slot),
            self.ttl,
            self.expiries.clone(),
        ));
        tls::server_config(self.ca.trust_bundle(), &self.trust_domain, slot)
    }

    /// Holds certificates for exactly `ids`: new ones are issued now, ones no longer wanted are
    /// dropped (their renewal stops). If an issue fails, nothing changes.
    pub fn hold(&self, ids: &BTreeSet<SpiffeId>) -> Result<()> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mut issued = Vec::new();
        for id in ids.iter().filter(|id| !held.contains_key(*id)) {
            let slot = Arc::new(self.issue_slot(id)?);
            let client =
                tls::client_config(self.ca.trust_bundle(), &self.trust_domain, slot.clone())?;
            issued.push((id.clone(), client, slot));
        }
        held.retain(|id, _| {
            let keep = ids.contains(id);
            if !keep {
                self.expiries.forget(id);
            }
            keep
        });
        for (id, client, slot) in issued {
            tokio::spawn(renew(
                self.ca.clone(),
                id.clone(),
                Arc::downgrade(&slot),
                self.ttl,
                self.expiries.clone(),
            ));
            held.insert(id, client);
        }
        Ok(())
    }

    /// Every held identity (the agent's too) and when its certificate expires.
    pub fn expiries(&self) -> BTreeMap<SpiffeId, SystemTime> {
        self.expiries
            .by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The tunnel client configuration presenting `id`'s certificate, if it is held.
    pub fn client_config(&self, id: &SpiffeId) -> Option<Arc<ClientConfig>> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(id).cloned()
    }

    fn issue_slot(&self, id: &SpiffeId) -> Result<CertSlot> {
        let issued = self
            .ca
            .issue(id, self.ttl)
            .with_context(|| format!("cannot get a certificate for {id}"))?;
        info!(%id, valid_for = ?self.ttl, "certificate issued");
        self.expiries.record(id, issued.not_after);
        CertSlot::new(issued)
    }
}

/// Renews `slot`'s certificate at half-life until the slot is dropped.
async fn renew(
    ca: Arc<dyn CertificateAuthority>,
    id: SpiffeId,
    slot: Weak<CertSlot>,
    ttl: Duration,
    expiries: Arc<Expiries>,
) {
    let mut wait = half_life_with_jitter(ttl);
    loop {
        tokio::time::sleep(wait).await;
        let Some(slot) = slot.upgrade() else { return };
        let renewed = ca.issue(&id, ttl).and_then(|issued| {
            let not_after = issued.not_after;
            slot.replace(issued).map(|()| {
                expiries.record(&id, not_after);
                not_after
            })
        });
        wait = match renewed {
            Ok(not_after) => {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                info!(%id, valid_for = ?left, "certificate renewed");
                half_life_with_jitter(ttl)
            }
            Err(e) => {
                let retry = (ttl / 20).min(MAX_RETRY);
                warn!(%id, ?retry, "certificate renewal failed, the current one stays: {e:#}");
                retry
            }
        };
    }
}

fn expiry_labels(id: &SpiffeId) -> IdentityLabels {
    IdentityLabels {
        identity: id.to_string(),
    }
}

impl Expiries {
    /// Notes when `id`'s certificate expires, and sets its gauge.
    fn record(&self, id: &SpiffeId, not_after: SystemTime) {
        self.by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), not_after);
        self.metrics
            .certificate_expiry
            .get_or_create(&expiry_labels(id))
            .set(unix_seconds(not_after));
    }

    fn forget(&self, id: &SpiffeId) {
        self.by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        self.metrics.certificate_expiry.remove(&expiry_labels(id));
    }
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn half_life_with_jitter(ttl: Duration) -> Duration {
    let spread = 1.0 + JITTER * (2.0 * fastrand::f64() - 1.0);
    (ttl / 2).mul_f64(spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicBool, Ordering};

    use rustls::pki_types::CertificateDer;

    use crate::{identity::Issued, testing};

    /// The test CA, failing while `down` is set.
    struct FlakyCa {
        ca: Arc<dyn CertificateAuthority>,
        down: AtomicBool,
    }

    impl CertificateAuthority for FlakyCa {
        fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Issued> {
            if self.down.load(Ordering::Relaxed) {
                anyhow::bail!("the CA is down");
            }
            self.ca.issue(id, ttl)
        }

        fn trust_bundle(&self) -> &[CertificateDer<'static>] {
            self.ca.trust_bundle()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_are_renewed_at_half_life_and_retried_while_the_ca_fails() {
        let ca = Arc::new(FlakyCa {
            ca: testing::test_ca(),
            down: AtomicBool::new(false),
        });
        let (registry, metrics) = testing::metrics();
        let ttl = Duration::from_secs(100);
        let certificates = Certificates::new(ca.clone(), "cluster.local", ttl, metrics);
        let web = SpiffeId::workload("cluster.local", "shop", "web");
        certificates.hold(&BTreeSet::from([web.clone()])).unwrap();
        let expiry = || certificates.expiries()[&web];
        let first = expiry();
        let gauge = "mesh_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/web\"}";
        assert_eq!(
            testing::sample(&registry, gauge),
            unix_seconds(first) as f64
        );

        // Before the earliest renewal (half-life less the jitter), nothing changes.
        tokio::time::sleep(ttl.mul_f64(0.5 - JITTER) - Duration::from_secs(1)).await;
        assert_eq!(expiry(), first);
        // After the latest, it has been renewed.
        tokio::time::sleep(ttl.mul_f64(2.0 * JITTER) + Duration::from_secs(2)).await;
        let renewed = expiry();
        assert!(renewed > first);

        // With the CA down, the certificate stays, and renewal is tried again every 5 s.
        ca.down.store(true, Ordering::Relaxed);
        tokio::time::sleep(ttl.mul_f64(0.5 + JITTER) + Duration::from_secs(1)).await;
        assert_eq!(expiry(), renewed);
        assert!(certificates.client_config(&web).is_some());
        ca.down.store(false, Ordering::Relaxed);
        tokio::time::sleep(ttl / 20 + Duration::from_secs(1)).await;
        assert!(expiry() > renewed);

        // An identity no longer held is forgotten, and its gauge with it.
        certificates.hold(&BTreeSet::new()).unwrap();
        assert!(certificates.expiries().is_empty());
        assert_eq!(testing::sample(&registry, gauge), 0.0);
    }

    #[test]
    fn renewal_comes_near_half_life() {
        let ttl = Duration::from_secs(100);
        for _ in 0..1000 {
            let wait = half_life_with_jitter(ttl);
            assert!((45.0..=55.0).contains(&wait.as_secs_f64()), "{wait:?}");
        }
    }
}
