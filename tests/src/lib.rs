//! Fixtures for the end-to-end tests: a lab of nodes and pods in network namespaces and
//! cgroups of its own, the real agent on each node, and the `mesh-testpod` helper in pods.
//!
//! A [`Lab`] removes everything it made when dropped, also when a test panics; a lab left
//! behind by a test process that was killed is removed by the next lab that starts.

mod apiserver;
mod ca_service;
mod certs;
pub mod curl;
mod interrupt;
mod lab;
mod metrics;
mod netns;
mod outside;
mod process;
mod prometheus;
mod topology;
mod wire;

pub use apiserver::{ApiServer, Token};
pub use ca_service::InProcessCa;
pub use certs::{CertFiles, ProbeCert};
pub use interrupt::{catch_interrupt, interrupted};
pub use lab::{
    Agent, Daemon, ENROLLED_NAMESPACE, Footprint, HttpReply, Lab, Output, Running, alive,
    says_reset,
};
pub use metrics::{kernel_count, sum};
pub use prometheus::{Prometheus, Sample};
pub use topology::{LabSpec, PodSpec, ServiceSpec, node_addrs, pod_addrs};
pub use wire::{Capture, frames};
