//! The data path in user space: what to do with a connection, decided from the state alone
//! (`plan`), carried out for captured connections (`outbound`) and peer agents' tunnels
//! (`inbound`), the mTLS + HTTP/2 CONNECT tunnel between them (`tunnel`), endpoint choice
//! and health (`balance`), the byte copy (`copy`), liveness of peers (`liveness`) and the caps
//! on what a peer or pod may hold (`limit`).

pub mod balance;
pub mod copy;
pub mod inbound;
pub mod limit;
pub mod liveness;
pub mod outbound;
pub mod plan;
pub mod tunnel;
