//! The certificates this agent holds: one per local workload identity plus its own. Each is
//! kept by a task of its own: asked of the CA (again with backoff while it fails), renewed at
//! half its lifetime (with jitter, so a node's renewals do not bunch up), and soon after the
//! CA moves signing to another key; a new certificate is swapped in without touching
//! established connections, and while the CA is down the current one goes on serving.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use rustls::{ClientConfig, ServerConfig, pki_types::CertificateDer};
use tokio::{sync::watch, task::AbortHandle};
use tracing::{info, warn};

use crate::{
    identity::{
        CertificateAuthority, Issued, SpiffeId,
        bundle::TrustBundle,
        issue,
        tls::{self, CertSlot},
    },
    observability::metrics::{IdentityLabels, Metrics, ResultLabels},
};

/// Renewal happens at half the lifetime, give or take this share of it.
const JITTER: f64 = 0.1;
/// The first wait before asking the CA again after it failed; it doubles from there.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait before another try when the CA fails.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often the CA is asked which certificate it signs with.
const SIGNER_CHECK: Duration = Duration::from_secs(5);
/// After the CA's signer changed, every certificate is renewed within this long (spread, so
/// that a node's requests do not all come at once).
const ROTATION_SPREAD: Duration = Duration::from_secs(5);

/// Issues, renews and hands out the certificates of this node's identities.
pub struct Certificates {
    shared: Arc<Shared>,
    held: Mutex<HashMap<SpiffeId, Holding>>,
}

/// What every identity's task needs.
struct Shared {
    ca: Arc<dyn CertificateAuthority>,
    bundle: Arc<TrustBundle>,
    trust_domain: String,
    ttl: Duration,
    /// Ticks when a certificate is issued for the first time.
    issued: watch::Sender<u64>,
    /// Ticks when the CA's signer changed: every certificate is to be renewed soon.
    rotation: watch::Sender<u64>,
    expiries: Expiries,
    metrics: Arc<Metrics>,
}

/// One held identity: its certificate once issued, and the task keeping it.
struct Holding {
    ready: Arc<OnceLock<Ready>>,
    keeper: AbortHandle,
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// An identity's certificate slot and the tunnel client configuration presenting it.
struct Ready {
    slot: Arc<CertSlot>,
    client: Arc<ClientConfig>,
}

/// When each held certificate expires, kept up to date by issuing and renewal, and its gauge.
struct Expiries {
    by_id: Mutex<BTreeMap<SpiffeId, SystemTime>>,
    metrics: Arc<Metrics>,
}

impl Certificates {
    /// Certificates of `ca`, checked against `bundle`, living `ttl`; the agent's own identity
    /// is held from the start.
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        bundle: Arc<TrustBundle>,
        trust_domain: &str,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let shared = Arc::new(Shared {
            ca,
            bundle,
            trust_domain: trust_domain.to_owned(),
            ttl,
            issued: watch::Sender::new(0),
            rotation: watch::Sender::new(0),
            expiries: Expiries {
                by_id: Mutex::default(),
                metrics: metrics.clone(),
            },
            metrics,
        });
        tokio::spawn(watch_signer(Arc::downgrade(&shared)));
        let certificates = Self {
            shared,
            held: Mutex::new(HashMap::new()),
        };
        certificates.hold(&BTreeSet::new());
        certificates
    }

    /// The agent's own identity.
    fn agent(&self) -> SpiffeId {
        SpiffeId::agent(&self.shared.trust_domain)
    }

    /// Holds certificates for exactly `ids` and the agent's own identity: new ones are asked
    /// for now (see [`Self::issued`]), ones no longer wanted are dropped (their renewal stops).
    pub fn hold(&self, ids: &BTreeSet<SpiffeId>) {
        let agent = self.agent();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|id, _| {
            let keep = ids.contains(id) || *id == agent;
            if !keep {
                self.shared.expiries.forget(id);
            }
            keep
        });
        for id in ids.iter().chain([&agent]) {
            if held.contains_key(id) {
                continue;
            }
            let ready = Arc::new(OnceLock::new());
            let keeper = tokio::spawn(keep(self.shared.clone(), id.clone(), ready.clone()));
            held.insert(
                id.clone(),
                Holding {
                    ready,
                    keeper: keeper.abort_handle(),
                },
            );
        }
    }

    /// Waits until every held one of `ids` (and the agent's identity) has its certificate.
    pub async fn issued(&self, ids: &BTreeSet<SpiffeId>) {
        let mut ticks = self.shared.issued.subscribe();
        let agent = self.agent();
        loop {
            let missing = {
                let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                ids.iter()
                    .chain([&agent])
                    .any(|id| held.get(id).is_some_and(|h| h.ready.get().is_none()))
            };
            if !missing || ticks.changed().await.is_err() {
                return;
            }
        }
    }

    /// The held identities still waiting for their first certificate.
    pub fn pending(&self) -> Vec<SpiffeId> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.iter()
            .filter(|(_, h)| h.ready.get().is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The inbound tunnel's server configuration, presenting the agent identity, once it
    /// has its first certificate.
    pub async fn server_config(&self) -> Result<Arc<ServerConfig>> {
        self.issued(&BTreeSet::new()).await;
        let slot = {
            let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            held.get(&self.agent())
                .and_then(|h| h.ready.get())
                .map(|ready| ready.slot.clone())
        };
        let slot = slot.ok_or_else(|| anyhow::anyhow!("the agent's identity is not held"))?;
        tls::server_config(self.shared.bundle.clone(), &self.shared.trust_domain, slot)
    }

    /// Every held identity (the agent's too) and when its certificate expires.
    pub fn expiries(&self) -> BTreeMap<SpiffeId, SystemTime> {
        self.shared
            .expiries
            .by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The tunnel client configuration presenting `id`'s certificate, if it is held and
    /// issued.
    pub fn client_config(&self, id: &SpiffeId) -> Option<Arc<ClientConfig>> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(id)?.ready.get().map(|ready| ready.client.clone())
    }

    /// The trust bundle the certificates are checked against.
    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.shared.bundle
    }
}

impl Shared {
    /// Puts a new certificate of `id` in place (the first one makes its slot).
    fn put(&self, id: &SpiffeId, ready: &OnceLock<Ready>, issued: Issued) -> Result<SystemTime> {
        let not_after = issued.not_after;
        match ready.get() {
            Some(ready) => ready.slot.replace(issued)?,
            None => {
                let slot = Arc::new(CertSlot::new(issued)?);
                let client =
                    tls::client_config(self.bundle.clone(), &self.trust_domain, slot.clone())?;
                // Only this identity's task sets it.
                let _ = ready.set(Ready { slot, client });
                self.issued.send_modify(|n| *n += 1);
            }
        }
        self.expiries.record(id, not_after);
        Ok(not_after)
    }
}

/// Keeps `id`'s certificate: asks for it until it comes, then renews it at half-life and
/// after the CA's signer changed, until aborted.
async fn keep(shared: Arc<Shared>, id: SpiffeId, ready: Arc<OnceLock<Ready>>) {
    let mut rotation = shared.rotation.subscribe();
    let mut failures = 0;
    loop {
        let started = Instant::now();
        let issued = issue(&*shared.ca, &id, shared.ttl).await;
        let metrics = &shared.metrics;
        metrics
            .certificate_request_duration
            .observe(started.elapsed().as_secs_f64());
        let renewal = ready.get().is_some();
        let put = issued.and_then(|issued| shared.put(&id, &ready, issued));
        let result = if put.is_ok() { "issued" } else { "failed" };
        metrics
            .certificate_requests
            .get_or_create(&ResultLabels { result })
            .inc();
        let wait = match put {
            Ok(not_after) => {
                failures = 0;
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if renewal {
                    info!(%id, valid_for = ?left, "certificate renewed");
                } else {
                    info!(%id, valid_for = ?left, "certificate issued");
                }
                half_life_with_jitter(shared.ttl)
            }
            Err(e) => {
                failures += 1;
                let retry = retry_after(failures, shared.ttl);
                if renewal {
                    warn!(%id, ?retry, "certificate renewal failed, the current one stays: {e:#}");
                } else {
                    warn!(%id, ?retry, "cannot get a certificate yet: {e:#}");
                }
                retry
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Ok(()) = rotation.changed() => {
                tokio::time::sleep(ROTATION_SPREAD.mul_f64(fastrand::f64())).await;
            }
        }
    }
}

/// Asks the CA every few seconds which certificate it signs with; when that changes, every
/// held certificate is renewed soon (a rotation moved signing to a new key).
async fn watch_signer(shared: std::sync::Weak<Shared>) {
    let mut last: Option<CertificateDer<'static>> = None;
    loop {
        let Some(ca) = shared.upgrade().map(|s| s.ca.clone()) else {
            return;
        };
        if let Ok(signer) = ca.signer().await {
            if last.as_ref().is_some_and(|last| *last != signer) {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                info!("the CA signs with another certificate now: renewing every certificate");
                shared.rotation.send_modify(|n| *n += 1);
            }
            last = Some(signer);
        }
        tokio::time::sleep(SIGNER_CHECK).await;
    }
}

/// The wait before the `failures`th retry: doubling from [`FIRST_RETRY`] to a twentieth of
/// the lifetime or [`MAX_RETRY`], whichever is less, with jitter.
fn retry_after(failures: u32, ttl: Duration) -> Duration {
    let ceiling = (ttl / 20).min(MAX_RETRY);
    let doubled = FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(ceiling).mul_f64(0.8 + 0.4 * fastrand::f64())
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

    use crate::testing::{self, FlakyCa};

    fn web() -> SpiffeId {
        SpiffeId::workload("cluster.local", "shop", "web")
    }

    fn certificates(
        ca: &Arc<FlakyCa>,
        ttl: Duration,
    ) -> (prometheus_client::registry::Registry, Certificates) {
        let (registry, metrics) = testing::metrics();
        let bundle = testing::bundle_of(&ca.current());
        let certificates = Certificates::new(ca.clone(), bundle, "cluster.local", ttl, metrics);
        (registry, certificates)
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_are_renewed_at_half_life_and_retried_while_the_ca_fails() {
        let ca = FlakyCa::new();
        let ttl = Duration::from_secs(100);
        let (registry, certificates) = certificates(&ca, ttl);
        certificates.hold(&BTreeSet::from([web()]));
        testing::within(certificates.issued(&BTreeSet::from([web()]))).await;
        let expiry = || certificates.expiries()[&web()];
        let first = expiry();
        // Two identities held: the agent's and web's.
        let issued = || {
            testing::sample(
                &registry,
                "mesh_certificate_requests_total{result=\"issued\"}",
            )
        };
        assert_eq!(issued(), 2.0);
        let gauge = "mesh_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/web\"}";
        assert_eq!(
            testing::sample(&registry, gauge),
            unix_seconds(first) as f64
        );

        // Before the earliest renewal (half-life less the jitter), nothing changes.
        tokio::time::sleep(ttl.mul_f64(0.5 - JITTER) - Duration::from_secs(1)).await;
        assert_eq!(issued(), 2.0);
        // After the latest, both have been renewed.
        tokio::time::sleep(ttl.mul_f64(2.0 * JITTER) + Duration::from_secs(2)).await;
        assert_eq!(issued(), 4.0);
        assert!(expiry() >= first);

        // With the CA down, the certificate stays, and renewal is tried again, ever more
        // slowly up to a twentieth of the lifetime.
        ca.set_down(true);
        tokio::time::sleep(ttl.mul_f64(0.5 + JITTER) + Duration::from_secs(1)).await;
        assert_eq!(issued(), 4.0);
        assert!(certificates.client_config(&web()).is_some());
        let failed = "mesh_certificate_requests_total{result=\"failed\"}";
        assert!(testing::sample(&registry, failed) >= 6.0);
        ca.set_down(false);
        tokio::time::sleep(ttl / 20 + Duration::from_secs(1)).await;
        assert_eq!(issued(), 6.0);

        // An identity no longer held is forgotten, and its gauge with it.
        certificates.hold(&BTreeSet::new());
        assert!(!certificates.expiries().contains_key(&web()));
        assert_eq!(testing::sample(&registry, gauge), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_ca_down_at_first_the_certificates_come_once_it_answers() {
        let ca = FlakyCa::new();
        ca.set_down(true);
        let (_, certificates) = certificates(&ca, Duration::from_secs(3600));
        certificates.hold(&BTreeSet::from([web()]));
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            certificates.issued(&BTreeSet::from([web()])),
        )
        .await;
        assert!(waited.is_err(), "issued while the CA was down");
        assert!(certificates.client_config(&web()).is_none());
        assert_eq!(certificates.pending().len(), 2, "the agent's and web's");
        ca.set_down(false);
        // The next try is at most MAX_RETRY (with jitter) away.
        tokio::time::sleep(MAX_RETRY.mul_f64(1.2)).await;
        testing::within(certificates.issued(&BTreeSet::from([web()]))).await;
        assert!(certificates.client_config(&web()).is_some());
        assert!(certificates.server_config().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_ca_signs_with_a_new_key_every_certificate_is_renewed_soon() {
        let ca = FlakyCa::new();
        let ttl = Duration::from_secs(24 * 3600);
        let (registry, certificates) = certificates(&ca, ttl);
        certificates.hold(&BTreeSet::from([web()]));
        testing::within(certificates.issued(&BTreeSet::from([web()]))).await;
        let issued = || {
            testing::sample(
                &registry,
                "mesh_certificate_requests_total{result=\"issued\"}",
            )
        };
        tokio::time::sleep(SIGNER_CHECK * 2).await;
        assert_eq!(issued(), 2.0, "nothing renewed without a change");

        ca.rotate();
        tokio::time::sleep(SIGNER_CHECK + ROTATION_SPREAD + Duration::from_secs(1)).await;
        assert_eq!(issued(), 4.0, "both renewed");
        // And they stay: the signer did not change again.
        tokio::time::sleep(SIGNER_CHECK * 4).await;
        assert_eq!(issued(), 4.0);
    }

    #[test]
    fn renewal_comes_near_half_life() {
        let ttl = Duration::from_secs(100);
        for _ in 0..1000 {
            let wait = half_life_with_jitter(ttl);
            assert!((45.0..=55.0).contains(&wait.as_secs_f64()), "{wait:?}");
        }
    }

    #[test]
    fn retries_double_up_to_a_ceiling() {
        let ttl = Duration::from_secs(3600);
        let first = retry_after(1, ttl).as_secs_f64();
        assert!((0.2..=0.3).contains(&first), "{first}");
        let tenth = retry_after(10, ttl).as_secs_f64();
        assert!((24.0..=36.0).contains(&tenth), "{tenth}");
        let short = retry_after(10, Duration::from_secs(100)).as_secs_f64();
        assert!(short <= 6.0, "{short}");
    }
}
