//! The proxied connections open now, for whatever must walk them: the admin API lists them
//! (`/connections`), and a shutdown whose grace period ends names those it cuts. Each is
//! registered by its record (`observability::access`) once connected, and leaves when the
//! record is dropped.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use serde::Serialize;

use crate::{identity::certificates::unix_seconds, observability::metrics::ConnectionLabels};

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

/// Every open proxied connection of the agent.
#[derive(Debug, Default)]
pub struct OpenConnections(Mutex<Table>);

#[derive(Debug, Default)]
struct Table {
    next: u64,
    open: HashMap<u64, OpenConnection>,
}

/// A connection's place in [`OpenConnections`], given up when dropped.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    table: Arc<OpenConnections>,
}

impl OpenConnections {
    /// Adds `connection` until the registration is dropped.
    pub fn register(self: &Arc<Self>, connection: OpenConnection) -> Registration {
        let mut table = self.lock();
        let id = table.next;
        table.next += 1;
        table.open.insert(id, connection);
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
        ids.into_iter().map(|id| table.open[id].clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().open.remove(&self.id);
    }
}
