//! The programs' event counters, readable from any process through their pin.

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use mesh_common::Counter;

use super::{pin_dir, pins, take_map};

/// The programs' per-CPU event counters.
pub struct Counters(PerCpuArray<MapData, u64>);

impl Counters {
    /// Takes the counters out of the loaded object.
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        Ok(Self(take_map(ebpf, "COUNTERS")?))
    }

    /// Opens the counters pinned for `node` (the newest layout's), from any process.
    pub fn open_pinned(node: &str) -> Result<Self> {
        let path = pins::find(&pin_dir(node), "COUNTERS")
            .into_iter()
            .next()
            .with_context(|| format!("no counters are pinned for the node {node}"))?;
        let data = MapData::from_pin(&path)
            .with_context(|| format!("cannot open the pinned map {}", path.display()))?;
        Ok(Self(PerCpuArray::try_from(Map::PerCpuArray(data))?))
    }

    /// The counter summed over all CPUs.
    pub fn get(&self, counter: Counter) -> Result<u64> {
        let values = self.0.get(&(counter as u32), 0)?;
        Ok(values.iter().sum())
    }
}
