//! How an endpoint's answer counts for outlier detection, told to its port once known: at the
//! response's headers, or — for a gRPC call whose status comes after its messages — at the
//! trailers.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};

use crate::{
    observability::metrics::Metrics,
    proxy::balance::{Answered, Lease},
    state::routes::ServicePort,
};

/// The `grpc-status` of a response's headers (a trailers-only answer) or of its trailers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// How an answer counts; a gRPC status as gRPC maps it to HTTP (UNAVAILABLE 503,
/// DEADLINE_EXCEEDED 504, INTERNAL, UNKNOWN and DATA_LOSS 500).
pub fn answered_as(status: StatusCode, grpc_status: Option<u32>) -> Answered {
    match (status.as_u16(), grpc_status) {
        (502..=504, _) | (_, Some(4 | 14)) => Answered::GatewayError,
        (500..=599, _) | (_, Some(2 | 13 | 15)) => Answered::ServerError,
        _ => Answered::Fine,
    }
}

/// Tells `port`'s outlier detection how the endpoint of `lease` answered; counts an ejection.
pub fn report(metrics: &Metrics, port: &ServicePort, lease: &Lease, answered: Answered) {
    if port.answered(lease, answered) {
        metrics.outlier_ejected(&port.service, lease.endpoint().addr);
    }
}

/// A report still to make: a gRPC call's status, due in its trailers.
pub struct Pending {
    pub port: Arc<ServicePort>,
    pub metrics: Arc<Metrics>,
}

impl Pending {
    /// The call ended with `grpc_status`.
    pub fn report(self, lease: &Lease, grpc_status: u32) {
        let answered = answered_as(StatusCode::OK, Some(grpc_status));
        report(&self.metrics, &self.port, lease, answered);
    }
}
