//! The mesh as this node's agent sees it, built from a config without I/O: the routing table
//! (services, endpoints, local workloads and pods, peer nodes, external hosts), and how a new
//! config replaces the running one.

pub mod egress;
pub mod http;
pub mod reload;
pub mod routes;
