//! The mesh's per-node agent: loads the eBPF programs, recovers the original destinations of
//! captured connections and forwards them.
//!
//! `app` is the composition root; `config` reads the YAML; `discovery` brings the mesh's
//! state, `state` models it; `proxy` carries connections; `identity` holds SPIFFE IDs, the CA,
//! certificates and TLS configs, and `ca` is the cluster's CA service; `datapath` is the kernel side; `observability` is metrics,
//! logs and the admin API.

pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod discovery;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod handover;
pub mod identity;
pub mod observability;
pub mod proxy;
pub mod state;
pub mod system;
#[cfg(test)]
pub mod testing;
pub mod workers;
