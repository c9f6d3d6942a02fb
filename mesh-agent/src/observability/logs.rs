//! Warnings a peer or a pod can repeat at will (a refused handshake, an uncaptured connect)
//! are sampled: each call site logs at most [`BURST`] lines per [`WINDOW`], and the first line
//! after that carries how many were held back. Metrics count every occurrence.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long one sampling window lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How many lines a call site logs per window.
pub const BURST: u32 = 5;

/// One call site's window. Made by [`warn_sampled!`].
pub struct Sample(Mutex<Window>);

struct Window {
    start: Option<Instant>,
    logged: u32,
    held_back: u64,
}

impl Sample {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self(Mutex::new(Window {
            start: None,
            logged: 0,
            held_back: 0,
        }))
    }

    /// `Some(held back since the last line)` if this occurrence is to be logged now.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if w.start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged == BURST {
            w.held_back += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.held_back))
    }
}

/// `tracing::warn!`, sampled per call site (see the module's doc); a line after some were held
/// back says how many in its `held_back` field.
#[macro_export]
macro_rules! warn_sampled {
    ($($arg:tt)+) => {{
        static SAMPLE: $crate::observability::logs::Sample = $crate::observability::logs::Sample::new();
        match SAMPLE.admit() {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(held_back) => ::tracing::warn!(held_back, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_held_back() {
        let sample = Sample::new();
        let t0 = Instant::now();
        let admitted: Vec<Option<u64>> = (0..BURST + 3).map(|_| sample.admit_at(t0)).collect();
        let mut expected = vec![Some(0); BURST as usize];
        expected.extend([None, None, None]);
        assert_eq!(admitted, expected);
        // Still the same window.
        assert_eq!(sample.admit_at(t0 + WINDOW / 2), None);
        // The next window's first line says how many were held back.
        assert_eq!(sample.admit_at(t0 + WINDOW), Some(4));
        assert_eq!(sample.admit_at(t0 + WINDOW), Some(0));
    }
}
