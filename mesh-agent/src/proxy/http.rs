//! HTTP on the calling side: a captured connection to an HTTP port (or to an `auto` one whose
//! client's first bytes are HTTP: `detect`) is served as HTTP/1.1 or HTTP/2 (`serve`), each
//! request routed, balanced, timed and retried on its own (`retry`), over pooled connections
//! to the endpoints (`upstream`); bodies pass through counted (`body`); how each endpoint
//! answered goes to its port's outlier detection (`verdict`); each request carries its span's
//! trace context on (`trace_context`). Plain HTTP to declared external hosts is served by
//! `egress`.

pub mod body;
pub mod detect;
pub mod egress;
pub mod retry;
pub mod serve;
pub mod serving;
pub mod trace_context;
pub mod upstream;
pub mod verdict;
