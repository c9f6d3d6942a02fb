//! The data path in user space: what to do with a connection, decided from the state alone
//! (`plan`), carried out for captured connections (`outbound`) and peer agents' tunnels
//! (`inbound`), the mTLS + HTTP/2 CONNECT tunnel between them (`tunnel`), endpoint choice
//! and health (`balance`) by locality (`locality`), a service's caps on what its callers send at once (`breaker`) and
//! on how fast (`rate_limit`), who may call whom (`authorization`), the byte copy (`copy`), dialling pods (`dial`), connections to external hosts (`egress`), liveness of
//! peers (`liveness`), the caps on what a peer or pod may hold (`limit`), and why a
//! connection is refused (`refusal`).

pub mod authorization;
pub mod balance;
pub mod breaker;
pub mod copy;
pub mod dial;
pub mod egress;
pub mod http;
pub mod inbound;
pub mod limit;
pub mod liveness;
pub mod locality;
pub mod open;
pub mod outbound;
pub mod plan;
pub mod rate_limit;
pub mod refusal;
pub mod shortcut;
pub mod tunnel;
