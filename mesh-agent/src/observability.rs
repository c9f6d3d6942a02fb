//! What the agent tells about itself: Prometheus metrics (`metrics`), the per-connection
//! record and access log (`access`), sampled warnings (`logs`) and the admin API (`admin`).

pub mod access;
pub mod admin;
pub mod logs;
pub mod metrics;
