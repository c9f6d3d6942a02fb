//! Map keys and values shared by the mesh eBPF programs and the node agent.
//!
//! Every address is stored as 16 bytes in network byte order: IPv6 as is, IPv4 in its
//! IPv4-mapped form (`::ffff:a.b.c.d`). One shape for both families keeps one map per job
//! and lets a dual-stack socket that talks IPv4 meet its IPv4 peer under the same key.
//! Ports are in host byte order. Padding is explicit and always zero, so keys hash the same
//! on both sides.
#![no_std]

/// An IP address in IPv6 or IPv4-mapped IPv6 form, network byte order.
pub type Addr = [u8; 16];

/// The IPv4-mapped form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn ipv4_mapped(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The IPv4 octets of an IPv4-mapped address, or `None` for a real IPv6 address.
#[inline(always)]
pub fn ipv4_unmapped(addr: &Addr) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return None;
        }
        i += 1;
    }
    if addr[10] != 0xff || addr[11] != 0xff {
        return None;
    }
    Some([addr[12], addr[13], addr[14], addr[15]])
}

/// An address and port: a service address, an original destination or a client's source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
}

impl SockAddr {
    #[inline(always)]
    pub const fn new(addr: Addr, port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }
}

/// Both ends of a TCP connection as one socket sees it; the SOCKHASH key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPair {
    pub local: SockAddr,
    pub remote: SockAddr,
}

impl SockPair {
    /// The same connection as the socket at the other end sees it.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
        }
    }
}

/// A connect from an enrolled cgroup (the pod's, an ancestor of the task's own), which says
/// who is calling whatever the source address claims, and where its app meant to go: a
/// captured one, or (as the key of `REFUSED_CONNECTS`) one the outbound policy refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    pub cgroup: u64,
    pub dst: SockAddr,
    pub _pad: u32,
}

/// Where captured connects are sent: the agent's outbound listener.
///
/// Held at index 0 of the `AGENT` array. A family whose flag is zero is not captured, so an
/// empty entry (before the agent has filled it) captures nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentListener {
    /// IPv4 address, network byte order.
    pub ipv4: [u8; 4],
    /// IPv6 address, network byte order.
    pub ipv6: [u8; 16],
    pub port: u16,
    pub has_ipv4: u8,
    pub has_ipv6: u8,
}

/// Byte offsets of the kernel fields `mesh_redirect` reads to bound what it queues in a peer
/// socket, found by the agent in the running kernel's BTF and set as the program's constant
/// `KERNEL_LAYOUT` when it loads it. All zero: unknown, and the program never redirects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `struct sock.sk_user_data`: the socket's `sk_psock`, flags in the low bits.
    pub sock_user_data: u32,
    /// `struct sock.sk_rcvbuf`: the receive buffer size, the bound.
    pub sock_rcvbuf: u32,
    /// `struct tcp_sock.write_seq`: the next byte the socket sends through TCP/IP.
    pub tcp_write_seq: u32,
    /// `struct tcp_sock.copied_seq`: the next byte the reader takes from TCP/IP.
    pub tcp_copied_seq: u32,
    /// `struct sk_psock.msg_tot_len`: bytes queued in the socket's sk_msg ingress queue.
    pub psock_msg_tot_len: u32,
    pub _pad: u32,
}

impl KernelLayout {
    /// Whether every offset is known.
    pub const fn is_known(&self) -> bool {
        self.sock_user_data != 0
            && self.sock_rcvbuf != 0
            && self.tcp_write_seq != 0
            && self.tcp_copied_seq != 0
            && self.psock_msg_tot_len != 0
    }
}

/// Part of every pinned map's layout fingerprint: raise it when a key or value changes
/// meaning without changing size, so that a new agent makes new maps rather than misread the
/// old ones.
pub const MAP_ABI: u32 = 1;

/// The bit of `sk_user_data` that says it points at an `sk_psock`.
pub const SK_USER_DATA_PSOCK: u64 = 4;
/// The flag bits of `sk_user_data`, below the pointer.
pub const SK_USER_DATA_FLAGS: u64 = 7;

/// The value of maps that are sets (`ENROLLED`, `OWNED_SERVICES`, `OWNED_CIDRS`,
/// `EXTERNAL`, `EXTERNAL_PORTS`, `MSG_PASSTHROUGH`): only the key's presence means anything.
pub const SET_MEMBER: u8 = 1;

/// `OUTBOUND_POLICY[0]` when an enrolled pod may connect only to the mesh, declared external
/// hosts and loopback (any other value: anywhere).
pub const REGISTRY_ONLY: u32 = 1;

/// How deep below the cgroup v2 root the capture program looks for an enrolled ancestor.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Indexes of the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// TCP connects rewritten to the agent.
    ConnectsCaptured = 0,
    /// TCP connects from the attached subtree left alone (not enrolled or not owned).
    ConnectsPassed = 1,
    /// Captured connections whose original destination was handed to the agent.
    OrigDstRecorded = 2,
    /// Messages that `sk_msg` put straight into the peer socket.
    MsgRedirected = 3,
    /// Bytes that `sk_msg` put straight into the peer socket.
    BytesRedirected = 4,
    /// Messages an app's shortcut socket sent through the TCP/IP stack instead (the agent's
    /// queue full, or the agent's end not in `AGENT_ENDS` yet). The agent's own sends always
    /// take TCP/IP and are not counted.
    MsgPassed = 5,
    /// Times a socket left the shortcut because its peer's queue reached the bound.
    ShortcutFull = 6,
    /// Times a socket came back to the shortcut once its peer had read everything.
    ShortcutResumed = 7,
    /// Bytes of those messages.
    BytesPassed = 8,
    /// TCP packets to a strict pod's listening socket from outside its node, dropped.
    StrictDropped = 9,
    /// Connects of enrolled pods to undeclared destinations refused (`registry_only`).
    ConnectsRefused = 10,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 11] = [
        Counter::ConnectsCaptured,
        Counter::ConnectsPassed,
        Counter::OrigDstRecorded,
        Counter::MsgRedirected,
        Counter::BytesRedirected,
        Counter::MsgPassed,
        Counter::ShortcutFull,
        Counter::ShortcutResumed,
        Counter::BytesPassed,
        Counter::StrictDropped,
        Counter::ConnectsRefused,
    ];

    /// The counter's name in snake case, as the agent reports it.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectsCaptured => "connects_captured",
            Counter::ConnectsPassed => "connects_passed",
            Counter::OrigDstRecorded => "orig_dst_recorded",
            Counter::MsgRedirected => "msg_redirected",
            Counter::BytesRedirected => "bytes_redirected",
            Counter::MsgPassed => "msg_passed",
            Counter::ShortcutFull => "shortcut_full",
            Counter::ShortcutResumed => "shortcut_resumed",
            Counter::BytesPassed => "bytes_passed",
            Counter::StrictDropped => "strict_dropped",
            Counter::ConnectsRefused => "connects_refused",
        }
    }
}

/// Number of slots in the `COUNTERS` array.
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, hold only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::SockPair {}
    unsafe impl aya::Pod for super::AgentListener {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::Captured {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapping_round_trips() {
        let mapped = ipv4_mapped([198, 18, 1, 2]);
        assert_eq!(ipv4_unmapped(&mapped), Some([198, 18, 1, 2]));
        let mut v6 = mapped;
        v6[0] = 0x20;
        assert_eq!(ipv4_unmapped(&v6), None);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<SockAddr>(), 20);
        assert_eq!(core::mem::size_of::<SockPair>(), 40);
        assert_eq!(core::mem::size_of::<AgentListener>(), 24);
        assert_eq!(core::mem::size_of::<KernelLayout>(), 24);
        assert_eq!(core::mem::size_of::<Captured>(), 32);
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
