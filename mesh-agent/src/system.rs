//! What the agent needs from the host, checked up front with errors that say what to do.

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::warn_sampled;

/// Where bpffs is expected; the agent pins under `BPFFS/mesh/<node>`.
pub const BPFFS: &str = "/sys/fs/bpf";

const LISTEN_BACKLOG: i32 = 4096;

/// Listens on `port` on every address of both families; `what` names the port in errors.
pub fn listen(port: u16, what: &str) -> io::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on the {what} port {port}: {e}"),
        )
    })?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. A failed accept
/// (out of file descriptors or memory) is logged and waited out rather than spun on.
pub async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                warn_sampled!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether both ends of `stream` are this host (rather than a pod or another host): a
/// connection to one of the host's own addresses leaves from that same address (the kernel's
/// local routes), and one to loopback stays on it. A pod cannot pass for the host: with the
/// host's address as its source, the handshake's answer would never reach it.
pub fn within_this_host(stream: &TcpStream) -> bool {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => {
            let peer = peer.ip().to_canonical();
            peer.is_loopback() || local.ip().to_canonical() == peer
        }
        // Cannot tell: treat it as the host.
        _ => true,
    }
}

/// Makes closing `stream` send a reset (SO_LINGER 0) instead of a clean end: how a proxied
/// connection whose other side failed tells its app that the transfer was cut.
pub fn reset_on_close(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO)) {
        warn!("cannot make a connection close with a reset: {e}");
    }
}

/// Fails unless the agent runs as root (it loads eBPF programs and attaches them to cgroups).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "mesh-agent must run as root: it loads eBPF programs and attaches them to cgroups \
             (try: sudo mesh-agent ...)"
        );
    }
    Ok(())
}

/// Gives the heap's free pages back to the kernel. glibc keeps them after a burst of
/// allocations — parsing a large config, or the kernel's BTF while loading the programs —
/// which would otherwise stay in the agent's resident memory for good.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Every address of the host's (the agent's network namespace's) interfaces: where its
/// own connections to its pods come from.
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: an entry of the list getifaddrs made, not freed yet.
        let (address, next) = unsafe { ((*entry).ifa_addr, (*entry).ifa_next) };
        // SAFETY: `address` is null or points at a sockaddr of the family it names.
        match unsafe { address.as_ref() }.map(|a| i32::from(a.sa_family)) {
            Some(libc::AF_INET) => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let v4 = unsafe { &*address.cast::<libc::sockaddr_in>() };
                // In network order: its bytes are the address's.
                addresses.push(IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes()));
            }
            Some(libc::AF_INET6) => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let v6 = unsafe { &*address.cast::<libc::sockaddr_in6>() };
                addresses.push(IpAddr::from(v6.sin6_addr.s6_addr));
            }
            _ => {}
        }
        entry = next;
    }
    // SAFETY: the list getifaddrs made, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}

/// Raises the limit on open files as far as allowed (as root, to the kernel's ceiling): a proxy
/// holds two descriptors per connection, and the usual soft limit of 1024 is soon reached.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Root may raise the hard limit too, up to the kernel's per-process ceiling.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok());
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if let Some(ceiling) = ceiling.filter(|c| *c > limit.rlim_max) {
            let raised = libc::rlimit {
                rlim_cur: ceiling,
                rlim_max: ceiling,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return;
            }
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on most systems,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    mount_point("cgroup2")?.context(
        "no cgroup v2 hierarchy is mounted (nothing of type cgroup2 in /proc/mounts); \
         the mesh attaches its programs to cgroup v2: boot with systemd.unified_cgroup_hierarchy=1 \
         or mount one with `mount -t cgroup2 none /sys/fs/cgroup`",
    )
}

/// Fails unless bpffs is mounted at [`BPFFS`].
pub fn require_bpffs() -> Result<()> {
    let mounted = mounts()?
        .iter()
        .any(|(dir, fstype)| dir == Path::new(BPFFS) && fstype == "bpf");
    if !mounted {
        bail!(
            "bpffs is not mounted at {BPFFS}, where the mesh pins its programs and maps: \
             mount it with `mount -t bpf bpf {BPFFS}`"
        );
    }
    Ok(())
}

/// Resolves a cgroup given relative to the cgroup v2 mount (or as an absolute path under it)
/// to its directory; fails if it does not exist.
pub fn cgroup_dir(mount: &Path, cgroup: &str) -> Result<PathBuf> {
    let path = Path::new(cgroup);
    let dir = if path.starts_with(mount) {
        path.to_owned()
    } else {
        mount.join(cgroup.trim_start_matches('/'))
    };
    if !dir.is_dir() {
        bail!(
            "cgroup {cgroup} does not exist (looked for {}); create it or name an existing one",
            dir.display()
        );
    }
    Ok(dir)
}

fn mount_point(fstype: &str) -> Result<Option<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .find(|(_, t)| t == fstype)
        .map(|(dir, _)| dir))
}

/// (mount point, filesystem type) of every mount.
fn mounts() -> Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let dir = fields.next()?;
            let fstype = fields.next()?;
            Some((PathBuf::from(unescape_mount(dir)), fstype.to_owned()))
        })
        .collect())
}

/// /proc/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape_mount(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount(r"/plain"), "/plain");
        assert_eq!(unescape_mount(r"/odd\x"), r"/odd\x");
    }

    #[test]
    fn cgroup2_is_found_on_this_machine() {
        let mount = cgroup2_mount().unwrap();
        assert!(mount.join("cgroup.procs").exists(), "{}", mount.display());
    }

    #[test]
    fn missing_cgroup_is_named() {
        let e = cgroup_dir(Path::new("/sys/fs/cgroup"), "/no-such-mesh-cgroup").unwrap_err();
        assert!(
            e.to_string()
                .contains("cgroup /no-such-mesh-cgroup does not exist")
        );
    }
}
