//! Caps on how many of something (connections, handshakes) are open at once, in all and per
//! source address, and token buckets for how fast new ones come: what one hostile pod or peer
//! can hold of the agent, how much of its CPU it can spend, and a service's rate limits.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// How many may be open at once.
pub struct Limit {
    total: usize,
    per_source: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why [`Limit::enter`] said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// All of the limit is in use.
    Total,
    /// The source holds its share.
    Source,
}

impl Full {
    /// `total` or `source`, as the case is.
    pub fn pick<T>(self, total: T, source: T) -> T {
        match self {
            Full::Total => total,
            Full::Source => source,
        }
    }
}

impl Limit {
    pub fn new(total: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_source,
            open: Mutex::default(),
        })
    }

    /// A place for one more from `source` (IPv4-mapped or not), held until the permit is
    /// dropped; or why there is none.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Full> {
        let source = source.to_canonical();
        let mut open = self.lock();
        if open.total >= self.total {
            return Err(Full::Total);
        }
        let mine = open.by_source.entry(source).or_default();
        if *mine >= self.per_source {
            return Err(Full::Source);
        }
        *mine += 1;
        open.total += 1;
        Ok(Permit {
            limit: self.clone(),
            source,
        })
    }

    /// How many are open.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One place in a [`Limit`], given back when dropped.
pub struct Permit {
    limit: Arc<Limit>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.limit.lock();
        open.total -= 1;
        if let Some(mine) = open.by_source.get_mut(&self.source) {
            *mine -= 1;
            if *mine == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// A token bucket: `per_second` on average, `burst` at once.
#[derive(Debug, Clone)]
pub struct Rate {
    per_second: f64,
    burst: f64,
    tokens: f64,
    /// When `tokens` was last topped up.
    at: Instant,
}

impl Rate {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self::per(per_second, Duration::from_secs(1), burst)
    }

    /// `count` every `period` on average, `burst` at once.
    pub fn per(count: u32, period: Duration, burst: u32) -> Self {
        Self {
            per_second: f64::from(count) / period.as_secs_f64(),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now()).is_ok()
    }

    /// Takes a token if there is one, else says how long until there is.
    pub fn take_or_wait(&mut self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> Result<(), Duration> {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.per_second > 0.0 {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        } else {
            Err(Duration::MAX)
        }
    }

    /// Whether the bucket is full again (its owner has been quiet for a while).
    fn is_full_at(&self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens + earned >= self.burst
    }
}

/// A [`Rate`] for each key (a source address, a caller's identity). Keys whose bucket is full
/// again are forgotten, and at most [`RatePerKey::MAX_KEYS`] are tracked: beyond, new keys are
/// refused until some quiet down.
pub struct RatePerKey<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Rate>>,
}

/// A [`Rate`] for each source address, IPv4-mapped or not.
pub type RatePerSource = RatePerKey<IpAddr>;

impl<K: Hash + Eq> RatePerKey<K> {
    pub const MAX_KEYS: usize = 4096;

    /// Each key gets buckets like `rate`.
    pub fn like(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::default(),
        }
    }

    /// Takes a token of `key`'s bucket if there is one, else says how long until there is.
    pub fn take_or_wait(&self, key: K) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= Self::MAX_KEYS && !buckets.contains_key(&key) {
            buckets.retain(|_, bucket| !bucket.is_full_at(now));
            if buckets.len() >= Self::MAX_KEYS {
                return Err(Duration::from_secs(1));
            }
        }
        buckets
            .entry(key)
            .or_insert_with(|| Rate {
                at: now,
                ..self.rate.clone()
            })
            .take_at(now)
    }
}

impl RatePerSource {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self::like(Rate::new(per_second, burst))
    }

    /// Takes a token of `source`'s bucket if there is one.
    pub fn take(&self, source: IpAddr) -> bool {
        self.take_or_wait(source.to_canonical()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_rate_allows_its_burst_then_its_pace() {
        let mut rate = Rate::new(10, 5);
        let t0 = rate.at;
        assert_eq!((0..8).filter(|_| rate.take_at(t0).is_ok()).count(), 5);
        // 10 per second: one more every 100 ms.
        assert_eq!(
            rate.take_at(t0 + Duration::from_millis(50)),
            Err(Duration::from_millis(50))
        );
        assert!(rate.take_at(t0 + Duration::from_millis(100)).is_ok());
        assert!(rate.take_at(t0 + Duration::from_millis(100)).is_err());
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..8).filter(|_| rate.take_at(later).is_ok()).count(), 5);
    }

    #[test]
    fn each_source_has_its_own_rate_and_quiet_ones_are_forgotten() {
        let rates = RatePerSource::new(1, 2);
        let t0 = Instant::now();
        let a: IpAddr = "198.18.1.2".parse().unwrap();
        let b: IpAddr = "198.18.1.3".parse().unwrap();
        assert!(rates.take_at(a, t0).is_ok() && rates.take_at(a, t0).is_ok());
        assert_eq!(rates.take_at(a, t0), Err(Duration::from_secs(1)));
        assert!(rates.take_at(b, t0).is_ok());
        // Fill the table with sources that used a token each.
        for i in 0..RatePerSource::MAX_KEYS {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(i as u128 + 1));
            let _ = rates.take_at(ip, t0);
        }
        let newcomer: IpAddr = "198.18.1.4".parse().unwrap();
        assert!(rates.take_at(newcomer, t0).is_err(), "the table is full");
        // A second later every bucket is full again: the quiet sources are forgotten.
        assert!(rates.take_at(newcomer, t0 + Duration::from_secs(2)).is_ok());
        assert!(rates.buckets.lock().unwrap().len() < 10);
    }

    #[test]
    fn caps_each_source_and_the_total() {
        let limit = Limit::new(3, 2);
        let a: IpAddr = "198.18.1.2".parse().unwrap();
        let b: IpAddr = "198.18.1.3".parse().unwrap();
        let a1 = limit.enter(a).unwrap();
        let _a2 = limit.enter("::ffff:198.18.1.2".parse().unwrap()).unwrap();
        assert_eq!(limit.enter(a).err(), Some(Full::Source));
        let _b1 = limit.enter(b).unwrap();
        assert_eq!(limit.enter(b).err(), Some(Full::Total));
        assert_eq!(limit.open(), 3);
        drop(a1);
        assert_eq!(limit.open(), 2);
        let _b2 = limit.enter(b).unwrap();
        assert_eq!(limit.enter(a).err(), Some(Full::Total));
    }

    #[test]
    fn a_source_with_nothing_open_is_forgotten() {
        let limit = Limit::new(10, 10);
        let permit = limit.enter("198.18.1.2".parse().unwrap()).unwrap();
        drop(permit);
        assert!(limit.lock().by_source.is_empty());
    }
}
