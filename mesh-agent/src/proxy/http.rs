//! HTTP on the calling side: a captured connection to an HTTP port is served as HTTP/1.1 or
//! HTTP/2 and each request routed, balanced, timed and retried on its own (`retry`).

pub mod retry;
