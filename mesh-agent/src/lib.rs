//! The mesh's per-node agent: loads the eBPF programs, recovers the original destinations of
//! captured connections and forwards them.

pub mod agent;
pub mod config;
pub mod datapath;
pub mod outbound;
pub mod reload;
pub mod routing;
pub mod system;
