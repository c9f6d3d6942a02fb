//! The proxied connections open now, for whatever must walk them: the admin API lists them
//! (`/connections`), a shutdown whose grace period ends names those it cuts, and a policy
//! change closes those it now denies. Each is registered by its record
//! (`observability::access`) once connected, and leaves when the record is dropped.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    identity::{SpiffeId, certificates::unix_seconds},
    observability::metrics::{ConnectionLabels, Metrics},
    proxy::authorization::{Call, Decision},
    state::routes::Routes,
};

/// One open connection, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct OpenConnection {
    pub direction: &'static str,
    pub source: SocketAddr,
    /// Empty for a caller the mesh does not know.
    pub source_identity: String,
    pub destination: SocketAddr,
    /// `namespace/name` of the service dialled, empty for a pod dialled directly.
    pub destination_service: String,
    pub hop: &'static str,
    pub opened_unix: i64,
}

impl OpenConnection {
    pub fn new(labels: &ConnectionLabels, source: SocketAddr, destination: SocketAddr) -> Self {
        Self {
            direction: labels.direction,
            source,
            source_identity: labels.source_identity.clone(),
            destination,
            destination_service: labels.destination_service.clone(),
            hop: labels.hop,
            opened_unix: unix_seconds(SystemTime::now()),
        }
    }
}

/// A connection into a pod of this node, as authorization decides on it: decided again
/// whenever the policies change.
#[derive(Debug)]
pub struct Authorized {
    pub source: Option<SpiffeId>,
    pub source_address: Option<IpAddr>,
    /// The pod called.
    pub destination: SocketAddr,
    /// Cancelled to close the connection.
    pub cut: CancellationToken,
}

impl Authorized {
    /// The decision on it under `routes`' policies; `None` if the pod is no workload of
    /// this node's now (nothing governs it).
    fn decide(&self, routes: &Routes) -> Option<Decision> {
        let workload = routes.workload_at(self.destination.ip())?;
        Some(workload.authorization.decide(&Call {
            source: self.source.as_ref(),
            source_address: self.source_address,
            port: self.destination.port(),
            http: None,
        }))
    }
}

/// Every open proxied connection of the agent.
#[derive(Debug, Default)]
pub struct OpenConnections(Mutex<Table>);

#[derive(Debug, Default)]
struct Table {
    next: u64,
    open: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    connection: OpenConnection,
    authorized: Option<Authorized>,
}

/// A connection's place in [`OpenConnections`], given up when dropped.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    table: Arc<OpenConnections>,
}

impl OpenConnections {
    /// Adds `connection` (one into a pod, `authorized` so) until the registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        connection: OpenConnection,
        authorized: Option<Authorized>,
    ) -> Registration {
        let mut table = self.lock();
        let id = table.next;
        table.next += 1;
        let entry = Entry {
            connection,
            authorized,
        };
        table.open.insert(id, entry);
        Registration {
            id,
            table: self.clone(),
        }
    }

    /// Every open connection, oldest first.
    pub fn list(&self) -> Vec<OpenConnection> {
        let table = self.lock();
        let mut ids: Vec<&u64> = table.open.keys().collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| table.open[id].connection.clone())
            .collect()
    }

    /// Decides again on every connection into a pod under `routes`' policies, and closes
    /// those now denied: each with the decision.
    pub fn cut_denied(&self, routes: &Routes) -> Vec<(OpenConnection, Decision)> {
        let table = self.lock();
        table
            .open
            .values()
            .filter_map(|entry| {
                let authorized = entry.authorized.as_ref()?;
                let decision = authorized.decide(routes).filter(|d| !d.allowed)?;
                authorized.cut.cancel();
                Some((entry.connection.clone(), decision))
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes the open connections each new state's policies deny, counted and logged, until
/// `routes` closes.
pub async fn cut_denied_on_change(
    open: Arc<OpenConnections>,
    mut routes: watch::Receiver<Arc<Routes>>,
    metrics: Arc<Metrics>,
) {
    while routes.changed().await.is_ok() {
        let current = routes.borrow_and_update().clone();
        for (connection, decision) in open.cut_denied(&current) {
            metrics.authorization_cut(&decision.policy);
            warn!(
                source = %connection.source,
                source_identity = connection.source_identity,
                destination = %connection.destination,
                policy = &*decision.policy,
                "open connection closed: the policies now deny it"
            );
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().open.remove(&self.id);
    }
}
