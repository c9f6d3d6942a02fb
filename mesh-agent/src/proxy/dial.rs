//! Dialling a pod of this node: bounded in time, a shortage of the node's own told apart from
//! the pod's failure, and a connection that landed on the node itself (not a pod) refused.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{net::TcpStream, time::timeout};
use tracing::debug;

use crate::system;

/// How long a connect may take, directly or through a tunnel, before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no answer within {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("the agent is out of file descriptors or memory: {0}")]
    OutOfResources(io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("{0} is this node's own address")]
    OnHost(SocketAddr),
}

impl DialError {
    /// A failed connect: this node's shortage (out of descriptors or memory), or the
    /// destination's failure.
    pub fn from_io(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                Self::OutOfResources(e)
            }
            _ => Self::Failed(e.to_string()),
        }
    }
}

/// Dials the pods (and host-network endpoints) of this node.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalDialer {
    /// Accept a pod connection whose both ends are this host: only where the pods themselves
    /// are loopback addresses (the in-process tests). Off, such a connection is reset.
    pub allow_host: bool,
}

impl LocalDialer {
    /// A connection to `target`, an endpoint the state names (it may be on the host network),
    /// with TCP_NODELAY.
    pub async fn endpoint(self, target: SocketAddr) -> Result<TcpStream, DialError> {
        let stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
            .await
            .map_err(|_| DialError::Timeout)?
            .map_err(DialError::from_io)?;
        if let Err(e) = stream.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }
        Ok(stream)
    }

    /// A connection to `target`, an address a pod or a peer chose: refused (and reset) if it
    /// landed on this host rather than a pod.
    pub async fn pod(self, target: SocketAddr) -> Result<TcpStream, DialError> {
        let pod = self.endpoint(target).await?;
        if !self.allow_host && system::within_this_host(&pod) {
            system::reset_on_close(&pod);
            return Err(DialError::OnHost(target));
        }
        Ok(pod)
    }
}
