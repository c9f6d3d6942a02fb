//! What the agent tells about itself: Prometheus metrics (`metrics`), the per-connection and
//! per-request records and access logs (`access`, `request`), request spans over OTLP
//! (`traces`), sampled warnings (`logs`) and the admin API (`admin`).

pub mod access;
pub mod admin;
pub mod logs;
pub mod metrics;
pub mod request;
pub mod traces;
