//! Circuit breakers of a service port (Envoy's, and Istio's connection pool settings): caps on
//! what this agent sends to the port at once — connections, HTTP requests, requests waiting for
//! one of those, retries, and load per endpoint. Over a cap the agent answers at once (HTTP 503
//! flagged `circuit_open`, TCP a refused connection) rather than pile more on a service that
//! is behind already. The counts start afresh with each config change, as Envoy's do when a
//! cluster changes.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A port's caps; none is set unless given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections to the port at once: a TCP port's proxied connections, an HTTP port's
    /// client connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// HTTP requests in flight to the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// HTTP requests that may wait for one of `max_requests` to end (within the route's
    /// timeout); none wait if 0.
    pub max_pending_requests: u32,
    /// Retries in flight to the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Connections (TCP) or requests (HTTP) at once per endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_endpoint: Option<u32>,
}

/// The cap that turned something away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tripped {
    Connections,
    Requests,
    PendingRequests,
    Retries,
    PerEndpoint,
}

impl Tripped {
    pub const ALL: [Tripped; 5] = [
        Tripped::Connections,
        Tripped::Requests,
        Tripped::PendingRequests,
        Tripped::Retries,
        Tripped::PerEndpoint,
    ];

    /// Its metric label (`mesh_circuit_breaker_rejections_total{limit}`).
    pub fn label(self) -> &'static str {
        match self {
            Tripped::Connections => "connections",
            Tripped::Requests => "requests",
            Tripped::PendingRequests => "pending_requests",
            Tripped::Retries => "retries",
            Tripped::PerEndpoint => "per_endpoint",
        }
    }

    /// What is at its cap, for a message.
    pub fn what(self) -> &'static str {
        match self {
            Tripped::Connections => "connections",
            Tripped::Requests => "requests in flight",
            Tripped::PendingRequests => "requests waiting",
            Tripped::Retries => "retries in flight",
            Tripped::PerEndpoint => "load on every endpoint",
        }
    }
}

/// One service port's counts against its [`Limits`].
#[derive(Debug)]
pub struct Breaker {
    limits: Limits,
    connections: Arc<AtomicU32>,
    requests: Option<Arc<Semaphore>>,
    pending: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
}

/// A place under a cap, given back when dropped.
#[derive(Debug)]
#[must_use = "the place is given back when dropped"]
pub struct Slot {
    count: Option<Arc<AtomicU32>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn free() -> Self {
        Self {
            count: None,
            _permit: None,
        }
    }

    /// One more of `count`, unless that would pass `limit`.
    fn take(count: &Arc<AtomicU32>, limit: Option<u32>) -> Option<Self> {
        let Some(limit) = limit else {
            return Some(Self::free());
        };
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self {
                count: Some(count.clone()),
                _permit: None,
            })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(count) = &self.count {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Breaker {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            connections: Arc::default(),
            requests: limits
                .max_requests
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            pending: Arc::default(),
            retries: Arc::default(),
        }
    }

    /// The most requests or connections an endpoint may have at once.
    pub fn max_per_endpoint(&self) -> Option<usize> {
        self.limits.max_per_endpoint.map(|n| n as usize)
    }

    /// A place for a connection to the port.
    pub fn connection(&self) -> Result<Slot, Tripped> {
        Slot::take(&self.connections, self.limits.max_connections).ok_or(Tripped::Connections)
    }

    /// A place for a retry.
    pub fn retry(&self) -> Result<Slot, Tripped> {
        Slot::take(&self.retries, self.limits.max_retries).ok_or(Tripped::Retries)
    }

    /// A place for a request: at once, or after waiting among the pending ones.
    pub async fn request(&self) -> Result<Slot, Tripped> {
        let Some(requests) = &self.requests else {
            return Ok(Slot::free());
        };
        if let Ok(permit) = requests.clone().try_acquire_owned() {
            return Ok(Slot {
                count: None,
                _permit: Some(permit),
            });
        }
        let waiting = Slot::take(&self.pending, Some(self.limits.max_pending_requests)).ok_or(
            if self.limits.max_pending_requests == 0 {
                Tripped::Requests
            } else {
                Tripped::PendingRequests
            },
        )?;
        // The semaphore is never closed.
        let permit = requests
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Tripped::Requests)?;
        drop(waiting);
        Ok(Slot {
            count: None,
            _permit: Some(permit),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn connections_and_retries_are_capped_and_given_back() {
        let b = Breaker::new(Limits {
            max_connections: Some(2),
            max_retries: Some(1),
            ..Limits::default()
        });
        let (one, _two) = (b.connection().unwrap(), b.connection().unwrap());
        assert_eq!(b.connection().unwrap_err(), Tripped::Connections);
        drop(one);
        let _three = b.connection().unwrap();
        let retry = b.retry().unwrap();
        assert_eq!(b.retry().unwrap_err(), Tripped::Retries);
        drop(retry);
        let _retry = b.retry().unwrap();
    }

    #[test]
    fn nothing_is_capped_unless_asked() {
        let b = Breaker::new(Limits::default());
        let held: Vec<Slot> = (0..10_000).map(|_| b.connection().unwrap()).collect();
        assert_eq!(held.len(), 10_000);
        assert_eq!(b.max_per_endpoint(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_over_the_cap_wait_among_the_pending_or_are_turned_away() {
        let b = Arc::new(Breaker::new(Limits {
            max_requests: Some(1),
            max_pending_requests: 1,
            ..Limits::default()
        }));
        let first = b.request().await.unwrap();
        // The second waits for the first; a third finds the waiting room full.
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.request().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(b.request().await.unwrap_err(), Tripped::PendingRequests);
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.unwrap().unwrap();

        let none_wait = Breaker::new(Limits {
            max_requests: Some(1),
            ..Limits::default()
        });
        let _first = none_wait.request().await.unwrap();
        assert_eq!(none_wait.request().await.unwrap_err(), Tripped::Requests);
    }
}
