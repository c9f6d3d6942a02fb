//! Caps on how many of something (connections, handshakes) are open at once, in all and per
//! source address: what one hostile pod or peer can hold of the agent.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

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
    /// `total` or `source`, as the case is (metric labels, say).
    pub fn pick(self, total: &'static str, source: &'static str) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

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
