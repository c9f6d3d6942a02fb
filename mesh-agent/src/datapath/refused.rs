//! Connects the kernel refused under `registry_only`: `REFUSED_CONNECTS` counts them by pod
//! cgroup and destination; the agent reads it every [`POLL`], counts what is new by workload
//! and destination, and logs it with the workload's name.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap},
};
use mesh_common::Captured;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{maps::socket_addr, take_map};
use crate::{
    observability::metrics::Metrics,
    state::routes::{LocalWorkload, Routes},
    warn_sampled,
};

/// How often the refusals are read.
const POLL: Duration = Duration::from_secs(2);

/// The kernel's counts of refused connects.
pub struct RefusedConnects(PerCpuHashMap<MapData, Captured, u64>);

impl RefusedConnects {
    /// Takes the map out of the loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self(take_map(ebpf, "REFUSED_CONNECTS")?))
    }

    /// Every (cgroup, destination) and its count, summed over the CPUs.
    fn counts(&self) -> HashMap<(u64, SocketAddr), u64> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| {
                let count = per_cpu.iter().sum();
                ((key.cgroup, socket_addr(&key.dst)), count)
            })
            .collect()
    }

    /// Counts and logs new refusals until `stop` is cancelled.
    pub async fn follow(
        self,
        routes: watch::Receiver<Arc<Routes>>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        // What was counted already: a restarted agent does not count old refusals again.
        let mut seen = self.counts();
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = stop.cancelled() => return,
            }
            let now = self.counts();
            let routes = routes.borrow().clone();
            for (&(cgroup, destination), &count) in &now {
                // An entry the kernel evicted and made again starts from 1.
                let new = match seen.get(&(cgroup, destination)) {
                    Some(&before) if before <= count => count - before,
                    _ => count,
                };
                if new == 0 {
                    continue;
                }
                let workload = routes.workload_of_cgroup(cgroup);
                let source = LocalWorkload::label_values(workload.map(|w| &**w));
                metrics.egress_refused(&source, destination, new);
                let name = workload.map_or_else(
                    || format!("cgroup {cgroup}"),
                    |w| format!("{}/{}", w.namespace, w.name),
                );
                warn_sampled!(workload = %name, %destination, refused = new, "connects refused: the destination is neither the mesh's nor a declared external host (outbound policy registry_only)");
            }
            seen = now;
        }
    }
}
