//! The mesh's per-node agent: loads the eBPF programs, recovers the original destinations of
//! captured connections and forwards them.

pub mod access;
pub mod admin;
pub mod agent;
pub mod balance;
pub mod btf;
pub mod certificates;
pub mod cli;
pub mod config;
pub mod copy;
pub mod datapath;
pub mod identity;
pub mod inbound;
pub mod kubernetes;
pub mod limit;
pub mod liveness;
pub mod logs;
pub mod metrics;
pub mod outbound;
pub mod reload;
pub mod routing;
pub mod system;
pub mod tls;
pub mod tunnel;
