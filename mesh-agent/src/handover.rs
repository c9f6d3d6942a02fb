//! Hitless upgrades: a starting agent takes the listening sockets over from the running one.
//!
//! A ready agent offers its listeners on a Unix socket (`/run/mesh/<node>.sock`, in a
//! directory only root may enter). A new agent on the same node connects there before it
//! binds any port and receives the outbound, tunnel and admin listeners as file descriptors
//! (SCM_RIGHTS): the very same sockets, so their accept queues carry on and no connect is
//! ever refused. Both agents accept until the new one writes `ready`; then the old one stops
//! accepting, leaves the programs and maps to the new one and drains its connections. If the
//! new agent goes away before it is ready, the old one carries on as if nothing happened.

use std::{
    io::{self, Read, Write},
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{fs::DirBuilderExt, net::UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, Interest},
    net::{TcpListener, UnixListener, UnixStream},
};
use tracing::{info, warn};

use crate::{
    datapath::OUTBOUND_PORT, observability::admin::ADMIN_PORT, state::routes::TUNNEL_PORT, system,
};

/// Where agents offer their listeners: `<RUN_DIR>/<node>.sock`.
pub const RUN_DIR: &str = "/run/mesh";

/// What an offer starts with; another word means another protocol, and no takeover.
const GREETING: &[u8] = b"mesh-handover/1 outbound tunnel admin\n";
/// What the new agent writes once it accepts connections itself.
const READY: &[u8] = b"ready\n";
/// How long a new agent waits for the running one's offer.
const OFFER_WAIT: Duration = Duration::from_secs(10);

/// The agent's listening sockets, in the order they are handed over.
pub struct Listeners {
    pub outbound: TcpListener,
    pub tunnel: TcpListener,
    pub admin: TcpListener,
}

/// The socket an agent of `node` offers its listeners on, unless told otherwise.
pub fn default_socket(node: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{node}.sock"))
}

impl Listeners {
    /// Takes the listeners over from the agent offering them at `socket`, with the connection
    /// to tell it when to stop; without such an agent, listens anew.
    pub fn take_over_or_listen(socket: &Path) -> Result<(Self, Option<Takeover>)> {
        let stream = match StdUnixStream::connect(socket) {
            Ok(stream) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok((Self::listen()?, None));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot reach the running agent at {} to take its listeners over",
                        socket.display()
                    )
                });
            }
        };
        let (listeners, stream) = receive(stream).with_context(|| {
            format!(
                "the agent at {} did not hand its listeners over; stop it (or remove the \
                 socket if no agent runs) and start again",
                socket.display()
            )
        })?;
        let Some(stream) = stream else {
            // Its sockets are this agent's alone now: serve on them.
            info!(socket = %socket.display(), "took the listeners over; the agent they came from has gone already");
            return Ok((listeners, None));
        };
        info!(socket = %socket.display(), "took the listeners over from the running agent");
        Ok((listeners, Some(Takeover { stream })))
    }

    fn listen() -> Result<Self> {
        Ok(Self {
            outbound: system::listen(OUTBOUND_PORT, "outbound")?,
            tunnel: system::listen(TUNNEL_PORT, "inbound tunnel")?,
            admin: system::listen(ADMIN_PORT, "admin")?,
        })
    }

    /// Copies of the sockets, to offer to the next agent.
    pub fn offer(&self) -> Result<Offer> {
        let copy = |l: &TcpListener| l.as_fd().try_clone_to_owned();
        Ok(Offer {
            sockets: [
                copy(&self.outbound)?,
                copy(&self.tunnel)?,
                copy(&self.admin)?,
            ],
        })
    }
}

/// The new agent's connection to the agent it takes over from.
pub struct Takeover {
    stream: StdUnixStream,
}

impl Takeover {
    /// Tells the old agent to stop accepting: this one accepts from now on.
    pub fn ready(mut self) {
        if let Err(e) = self.stream.write_all(READY) {
            warn!("cannot tell the agent taken over from that this one is ready: {e}");
        }
    }
}

/// The listeners offered on `stream`, and the stream while the offering agent still runs.
fn receive(mut stream: StdUnixStream) -> Result<(Listeners, Option<StdUnixStream>)> {
    stream.set_read_timeout(Some(OFFER_WAIT))?;
    let mut greeting = [0u8; 64];
    let (len, fds) = receive_fds(&stream, &mut greeting)?;
    if &greeting[..len] != GREETING {
        bail!(
            "it offered {:?}, not this version's {:?}",
            String::from_utf8_lossy(&greeting[..len]),
            String::from_utf8_lossy(GREETING)
        );
    }
    let [outbound, tunnel, admin]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|fds: Vec<OwnedFd>| anyhow::anyhow!("it sent {} sockets, not 3", fds.len()))?;
    let listeners = Listeners {
        outbound: listener(outbound, OUTBOUND_PORT)?,
        tunnel: listener(tunnel, TUNNEL_PORT)?,
        admin: listener(admin, ADMIN_PORT)?,
    };
    // Nothing more is read until the end: only the old agent's going away.
    let mut rest = [0u8; 1];
    stream.set_read_timeout(None)?;
    stream.set_nonblocking(true)?;
    match stream.read(&mut rest) {
        Ok(0) => return Ok((listeners, None)),
        Ok(_) => bail!("it sent more than its offer"),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e.into()),
    }
    stream.set_nonblocking(false)?;
    Ok((listeners, Some(stream)))
}

/// A received socket, checked to be a TCP listener on `port`.
fn listener(fd: OwnedFd, port: u16) -> Result<TcpListener> {
    let socket = socket2::Socket::from(fd);
    let local = socket.local_addr()?.as_socket();
    if local.map(|a| a.port()) != Some(port) || !socket.is_listener()? {
        bail!("a socket handed over is not a listener on port {port} but {local:?}");
    }
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// A running agent's listeners, offered to the next agent.
pub struct Offer {
    sockets: [OwnedFd; 3],
}

impl Offer {
    /// Offers the listeners at `socket` until a new agent has taken them over and is ready;
    /// meanwhile `ready` is false (the agent answering probes is not the one starting). If the
    /// socket cannot be made, says so and never returns: upgrades then refuse connections.
    pub async fn serve(self, socket: &Path, ready: &AtomicBool) {
        let listener = match bind(socket) {
            Ok(listener) => listener,
            Err(e) => {
                warn!(
                    socket = %socket.display(),
                    "cannot offer the listeners to the next agent (an upgrade will refuse \
                     connections while no agent listens): {e:#}"
                );
                return std::future::pending().await;
            }
        };
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("cannot accept a handover: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            ready.store(false, Ordering::Relaxed);
            match self.hand_over(stream).await {
                Ok(()) => {
                    info!("a new agent took the listeners over and is ready");
                    return;
                }
                Err(e) => {
                    warn!("a handover to a new agent failed; serving on: {e:#}");
                    ready.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    async fn hand_over(&self, mut stream: UnixStream) -> Result<()> {
        let caller = stream.peer_cred()?;
        // SAFETY: geteuid has no preconditions.
        if caller.uid() != unsafe { libc::geteuid() } {
            bail!("the caller runs as uid {}, not as this agent", caller.uid());
        }
        info!(pid = ?caller.pid(), "a new agent is taking the listeners over");
        let fds = self.sockets.each_ref().map(|s| s.as_raw_fd());
        stream
            .async_io(Interest::WRITABLE, || {
                send_fds(stream.as_raw_fd(), GREETING, &fds)
            })
            .await
            .context("cannot send the listeners")?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(READY.len() as u64)
            .read_to_end(&mut answer)
            .await?;
        if answer != READY {
            bail!(
                "it went away before it was ready (it said {:?})",
                String::from_utf8_lossy(&answer)
            );
        }
        Ok(())
    }
}

/// Listens at `socket`, in a directory only its owner may enter, replacing what was there (a
/// socket left by an agent that crashed, or the one taken over from, which offers no more).
fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", socket.display())),
    }
    UnixListener::bind(socket).with_context(|| format!("cannot listen at {}", socket.display()))
}

/// Removes the socket an agent offered its listeners at (on an exit without a handover).
pub fn withdraw(socket: &Path) {
    if let Err(e) = std::fs::remove_file(socket)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(socket = %socket.display(), "cannot remove the handover socket: {e}");
    }
}

/// A message of one buffer, `iov`, with the control buffer `control`.
fn message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

/// Sends `bytes` with `fds` attached on the Unix socket `fd`.
fn send_fds(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fds_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(fds_len as u32) } as usize];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let msg = message(&mut iov, &mut control);
    // SAFETY: `control` has room for one header and `fds` (CMSG_SPACE), so the first header
    // exists and its data holds `fds_len` bytes; `iov` and `control` outlive the call.
    let sent = unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(fds_len as u32) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(header).cast::<RawFd>(),
            fds.len(),
        );
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
    };
    match usize::try_from(sent) {
        Err(_) => Err(io::Error::last_os_error()),
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, "a short send")),
    }
}

/// Receives a message into `buf` and the file descriptors attached to it (at most 8).
fn receive_fds(stream: &StdUnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    const MAX_FDS: usize = 8;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: `iov` and `control` are valid for writes of the lengths given and outlive the call.
    let len = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed headers;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk only within it, and each SCM_RIGHTS header's data holds
    // whole descriptors, now ours (owned at once, so closed on any error below).
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more sockets came than expected"));
    }
    Ok((len, fds))
}

/// Whether an agent's run ended in a handover (then the new agent owns the pins) or a signal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Signal,
    HandedOver,
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_listener_sent_over_a_unix_socket_accepts_on_the_other_side() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = StdUnixStream::pair().unwrap();
        send_fds(ours.as_raw_fd(), GREETING, &[listener.as_raw_fd()]).unwrap();
        // The sender's copy goes: the socket lives on in the receiver's.
        drop(listener);

        let mut buf = [0u8; 64];
        let (len, mut fds) = receive_fds(&theirs, &mut buf).unwrap();
        assert_eq!(&buf[..len], GREETING);
        assert_eq!(fds.len(), 1);
        let socket = socket2::Socket::from(fds.remove(0));
        socket.set_nonblocking(true).unwrap();
        let received = TcpListener::from_std(socket.into()).unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let (mut accepted, _) = received.accept().await.unwrap();
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn sockets_that_are_not_the_agents_listeners_are_refused() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = listener(OwnedFd::from(other), OUTBOUND_PORT).unwrap_err();
        assert!(
            err.to_string().contains("not a listener on port 15001"),
            "{err}"
        );
    }
}
