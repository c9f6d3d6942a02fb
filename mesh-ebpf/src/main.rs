//! Kernel side of the mesh.
//!
//! - `mesh_connect4` / `mesh_connect6` (`cgroup/connect4`, `cgroup/connect6`): a TCP connect
//!   from an enrolled cgroup to a destination the mesh owns is rewritten to the agent's
//!   outbound listener; the original destination is kept under the socket cookie. So is one
//!   to a declared external host (`EXTERNAL`, or any address at a port of `EXTERNAL_PORTS`).
//!   Under `registry_only` (`OUTBOUND_POLICY`), an enrolled pod's connect to anything else
//!   but loopback fails with EPERM, counted per pod and destination in `REFUSED_CONNECTS`.
//! - `mesh_getpeername4` / `mesh_getpeername6` (`cgroup/getpeername*`): a captured socket
//!   reports the address its app dialled, not the agent's.
//! - `mesh_sockops` (`sock_ops`): when a captured connect is established, its original
//!   destination moves to a map keyed by the client's address and port (what the agent sees
//!   from `accept`), and the ends of app↔agent connections join two SOCKHASHes: the app's
//!   `SOCKETS`, the agent's `AGENT_ENDS`.
//! - `mesh_redirect` (`sk_msg`, on `SOCKETS` only): an app's send goes straight into the
//!   receive queue of the agent's end, skipping the TCP/IP stack and the veth between them,
//!   as long as that queue holds less than its receive buffer; past that the app sends
//!   through TCP/IP (TCP's own backpressure) until the agent has read everything. The
//!   agent's own sends run no program and go through TCP/IP: only the agent, which reads
//!   until EAGAIN, ever reads a socket whose bytes came both ways.
//! - `mesh_strict` (`cgroup_skb/ingress`): a strict pod (its cgroup or an ancestor in
//!   `STRICT`) accepts TCP connections only from its node's addresses (`NODE_ADDRESSES`: the
//!   agent's dials, the kubelet's probes) and loopback; packets from elsewhere to its
//!   listening sockets are dropped.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        bpf_sock_addr, sk_action::SK_PASS,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie, bpf_probe_read_kernel,
        bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockHash, lpm_trie::Key,
    },
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, error};
use mesh_common::{
    Addr, AgentListener, COUNTER_SLOTS, Captured, Counter, KernelLayout, MAX_CGROUP_DEPTH,
    REGISTRY_ONLY, SET_MEMBER, SK_USER_DATA_FLAGS, SK_USER_DATA_PSOCK, SockAddr, SockPair,
    ipv4_mapped, ipv4_unmapped,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
/// `cgroup/connect*` verdict that lets the connect go on.
const ALLOW: i32 = 1;
/// `cgroup/connect*` verdict that fails the connect with EPERM.
const DENY: i32 = 0;

/// Set of enrolled cgroup ids; a connect is enrolled if its cgroup or an ancestor is here.
#[map]
static ENROLLED: HashMap<u64, u8> = HashMap::pinned(16_384, 0);

/// Set of meshed service addresses and ports.
#[map]
static OWNED_SERVICES: HashMap<SockAddr, u8> = HashMap::pinned(262_144, 0);

/// Set of meshed address ranges (pod CIDRs), any port.
#[map]
static OWNED_CIDRS: LpmTrie<Addr, u8> = LpmTrie::pinned(4096, 0);

/// Set of declared external hosts' addresses and ports (resolved by the agent).
#[map]
static EXTERNAL: HashMap<SockAddr, u8> = HashMap::pinned(65_536, 0);

/// Set of ports at which connects to any address are external (hosts declared by a wildcard
/// name: the agent tells them apart by SNI or Host).
#[map]
static EXTERNAL_PORTS: HashMap<u16, u8> = HashMap::pinned(1024, 0);

/// At index 0: `REGISTRY_ONLY`, or anything else for `allow_any`.
#[map]
static OUTBOUND_POLICY: Array<u32> = Array::pinned(1, 0);

/// Connects refused under `registry_only`, counted by pod cgroup and destination; the agent
/// reads them to count and log them by workload.
#[map]
static REFUSED_CONNECTS: LruPerCpuHashMap<Captured, u64> = LruPerCpuHashMap::pinned(4096, 0);

/// Set of strict pods' cgroup ids: a pod is strict if its cgroup or an ancestor is here.
#[map]
static STRICT: HashMap<u64, u8> = HashMap::pinned(16_384, 0);

/// Set of the node's own addresses, from which strict pods accept connections.
#[map]
static NODE_ADDRESSES: HashMap<Addr, u8> = HashMap::pinned(1024, 0);

/// The agent's outbound listener, at index 0.
#[map]
static AGENT: Array<AgentListener> = Array::pinned(1, 0);

/// A captured connect (original destination and enrolled cgroup), by socket cookie, for the
/// socket's life: the agent gets it through `CAPTURED_BY_CLIENT`, `getpeername` reports its
/// destination. Cookies are never reused, so a closed socket's entry only waits for eviction.
#[map]
static CAPTURED_BY_COOKIE: LruHashMap<u64, Captured> = LruHashMap::pinned(65_536, 0);

/// A captured connection once established, by the client's address and port; the agent takes
/// (reads and deletes) it after `accept`.
#[map]
static CAPTURED_BY_CLIENT: LruHashMap<SockAddr, Captured> = LruHashMap::pinned(65_536, 0);

/// The apps' ends of app↔agent connections, keyed by the connection as each socket sees
/// it; `mesh_redirect` runs on their sends.
#[map]
static SOCKETS: SockHash<SockPair> = SockHash::pinned(131_072, 0);

/// The agent's ends of app↔agent connections, by the same key: the targets of
/// `mesh_redirect`. No program runs on their sends, which go through TCP/IP: past the bound
/// a socket holds bytes in two queues (redirected, and from TCP/IP) that the kernel reads
/// one per call, and an app that takes a short read for an empty socket (as tokio does)
/// would wait for the rest forever; only the agent, which reads until EAGAIN, gets
/// redirected bytes.
#[map]
static AGENT_ENDS: SockHash<SockPair> = SockHash::pinned(131_072, 0);

/// The kernel socket (`struct sock *`, as a number) of each end in `SOCKETS` and
/// `AGENT_ENDS`, by the same key: `mesh_redirect` reads the peer's queue and sequence
/// numbers through it.
#[map]
static SOCKET_ADDRS: LruHashMap<SockPair, u64> = LruHashMap::pinned(131_072, 0);

/// Sockets whose sends go through TCP/IP for now: their peer was not in `AGENT_ENDS` yet, or
/// its queue was full. A socket leaves this set only once its peer has read every byte it
/// sent through TCP/IP, so a redirected send never overtakes one on the wire.
#[map]
static MSG_PASSTHROUGH: LruHashMap<SockPair, u8> = LruHashMap::pinned(131_072, 0);

/// Offsets of the kernel fields `mesh_redirect` reads; the agent sets them at load from the
/// kernel's BTF. All zero (unknown) means no send is redirected.
#[unsafe(no_mangle)]
static KERNEL_LAYOUT: KernelLayout = KernelLayout {
    sock_user_data: 0,
    sock_rcvbuf: 0,
    tcp_write_seq: 0,
    tcp_copied_seq: 0,
    psock_msg_tot_len: 0,
    _pad: 0,
};

/// Per-CPU event counters, indexed by `mesh_common::Counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[inline(always)]
fn count(counter: Counter, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, valid for the duration of the program.
        unsafe { *slot += by };
    }
}

/// The enrolled cgroup of the current task: its own or its nearest enrolled ancestor's id.
#[inline(always)]
fn enrolled_cgroup() -> Option<u64> {
    for level in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; returns 0 past the task's own cgroup.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        if unsafe { ENROLLED.get(id) }.is_some() {
            return Some(id);
        }
    }
    None
}

/// Whether the socket of `skb` is in a strict pod's cgroup (or below it).
#[inline(always)]
fn in_strict_cgroup(skb: *mut aya_ebpf::bindings::__sk_buff) -> bool {
    for level in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; returns 0 past the socket's own cgroup.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, level) };
        if id == 0 {
            return false;
        }
        if unsafe { STRICT.get(id) }.is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn is_owned(dst: &SockAddr) -> bool {
    // SAFETY: the values are plain bytes read only for their presence.
    unsafe { OWNED_SERVICES.get(dst) }.is_some()
        || OWNED_CIDRS.get(Key::new(128, dst.addr)).is_some()
}

#[inline(always)]
fn is_external(dst: &SockAddr) -> bool {
    // SAFETY: the values are plain bytes read only for their presence.
    unsafe { EXTERNAL.get(dst) }.is_some() || unsafe { EXTERNAL_PORTS.get(dst.port) }.is_some()
}

#[inline(always)]
fn registry_only() -> bool {
    OUTBOUND_POLICY.get(0).is_some_and(|p| *p == REGISTRY_ONLY)
}

/// Loopback (127.0.0.0/8, ::1) or unspecified (the local host too): always allowed.
#[inline(always)]
fn is_local(addr: &Addr) -> bool {
    match ipv4_unmapped(addr) {
        Some(v4) => v4[0] == 127 || v4 == [0, 0, 0, 0],
        None => {
            let mut i = 0;
            while i < 15 {
                if addr[i] != 0 {
                    return false;
                }
                i += 1;
            }
            addr[15] <= 1
        }
    }
}

/// Counts a refused connect under its pod and destination.
#[inline(always)]
fn note_refused(refused: &Captured) {
    match REFUSED_CONNECTS.get_ptr_mut(refused) {
        // SAFETY: this CPU's slot of a live entry, valid for the program's run.
        Some(count) => unsafe { *count += 1 },
        None => {
            // Fails only when the entry was just made by another CPU: one count lost.
            let _ = REFUSED_CONNECTS.insert(refused, 1, 0);
        }
    }
}

#[inline(always)]
fn agent() -> Option<&'static AgentListener> {
    AGENT.get(0)
}

/// Remembers the connecting socket's capture; false if it can't.
#[inline(always)]
fn remember(ctx: &SockAddrContext, captured: &Captured) -> bool {
    // SAFETY: `bpf_get_socket_cookie` accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    CAPTURED_BY_COOKIE.insert(cookie, captured, 0).is_ok()
}

#[inline(always)]
fn is_tcp(sa: &bpf_sock_addr) -> bool {
    sa.protocol == IPPROTO_TCP
}

/// What the capture programs decided for a connect.
enum Capture {
    /// Not meshed: leave it alone.
    No,
    /// Meshed, but its original destination could not be kept: fail it rather than let it
    /// out unencrypted; or refused by the outbound policy.
    Refused,
    /// Meshed and recorded: rewrite it to the agent.
    Yes,
}

/// The part connect4 and connect6 share. `family_ok`: the agent listens on the family the
/// connect would be rewritten to.
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst: &SockAddr, family_ok: bool) -> Capture {
    let Some(cgroup) = enrolled_cgroup() else {
        count(Counter::ConnectsPassed, 1);
        return Capture::No;
    };
    let captured = Captured {
        cgroup,
        dst: *dst,
        _pad: 0,
    };
    if !(is_owned(dst) || is_external(dst)) {
        if registry_only() && !is_local(&dst.addr) {
            note_refused(&captured);
            count(Counter::ConnectsRefused, 1);
            return Capture::Refused;
        }
        count(Counter::ConnectsPassed, 1);
        return Capture::No;
    }
    if !family_ok {
        count(Counter::ConnectsPassed, 1);
        return Capture::No;
    }
    if !remember(ctx, &captured) {
        error!(
            ctx,
            "cannot record an original destination; refusing the connect"
        );
        return Capture::Refused;
    }
    count(Counter::ConnectsCaptured, 1);
    debug!(ctx, "captured a connect to port {}", dst.port);
    Capture::Yes
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(agent) = agent().filter(|_| is_tcp(sa)) else {
        return ALLOW;
    };
    let dst = SockAddr::new(
        ipv4_mapped(sa.user_ip4.to_ne_bytes()),
        u16::from_be(sa.user_port as u16),
    );
    match capture(&ctx, &dst, agent.has_ipv4 != 0) {
        Capture::No => ALLOW,
        Capture::Refused => DENY,
        Capture::Yes => {
            sa.user_ip4 = u32::from_ne_bytes(agent.ipv4);
            sa.user_port = u32::from(agent.port.to_be());
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(agent) = agent().filter(|_| is_tcp(sa)) else {
        return ALLOW;
    };
    let dst = SockAddr::new(
        words_to_addr(sa.user_ip6),
        u16::from_be(sa.user_port as u16),
    );
    // A dual-stack socket reaching an IPv4 peer is sent to the agent's IPv4 address.
    let (family_ok, target) = match ipv4_unmapped(&dst.addr) {
        Some(_) => (agent.has_ipv4 != 0, ipv4_mapped(agent.ipv4)),
        None => (agent.has_ipv6 != 0, agent.ipv6),
    };
    match capture(&ctx, &dst, family_ok) {
        Capture::No => ALLOW,
        Capture::Refused => DENY,
        Capture::Yes => {
            sa.user_ip6 = addr_to_words(&target);
            sa.user_port = u32::from(agent.port.to_be());
            ALLOW
        }
    }
}

/// The original destination of the socket `ctx` is about, if it was captured.
#[inline(always)]
fn dialled(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: `bpf_get_socket_cookie` accepts the sock_addr context; the value is copied.
    unsafe { CAPTURED_BY_COOKIE.get(bpf_get_socket_cookie(ctx.as_ptr())) }.map(|c| c.dst)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = dialled(&ctx)
        && let Some(ip) = ipv4_unmapped(&dst.addr)
    {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = u32::from_ne_bytes(ip);
        sa.user_port = u32::from(dst.port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = dialled(&ctx) {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6 = addr_to_words(&dst.addr);
        sa.user_port = u32::from(dst.port.to_be());
    }
    ALLOW
}

#[inline(always)]
fn words_to_addr(words: [u32; 4]) -> Addr {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    addr
}

#[inline(always)]
fn addr_to_words(addr: &Addr) -> [u32; 4] {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ]);
        i += 1;
    }
    words
}

/// The 16-byte form of a socket's address, from the fields of a `sock_ops` or `sk_msg` context.
#[inline(always)]
fn socket_addr(family: u32, ip4: u32, ip6: [u32; 4]) -> Option<Addr> {
    match family {
        AF_INET => Some(ipv4_mapped(ip4.to_ne_bytes())),
        AF_INET6 => Some(words_to_addr(ip6)),
        _ => None,
    }
}

/// The address fields of a `sock_ops` or `sk_msg` context, which have the same names and
/// encodings: `remote_port` in network byte order in the upper half of a u32, `local_port`
/// in host byte order.
struct SocketFields {
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

/// Reads the address fields of a `bpf_sock_ops` or `sk_msg_md`.
///
/// Every field is read once, up front, with a volatile load of its own: otherwise LLVM may
/// merge the IPv4 and IPv6 paths into a load through a computed context pointer, which the
/// verifier refuses ("dereference of modified ctx ptr").
macro_rules! socket_fields {
    ($ctx:expr) => {{
        let c = $ctx;
        // SAFETY: `c` is the program's context pointer; each field is a plain u32 the
        // verifier lets the program read.
        unsafe {
            use core::ptr::{addr_of, read_volatile as rd};
            SocketFields {
                family: rd(addr_of!((*c).family)),
                local_ip4: rd(addr_of!((*c).local_ip4)),
                remote_ip4: rd(addr_of!((*c).remote_ip4)),
                local_ip6: [
                    rd(addr_of!((*c).local_ip6[0])),
                    rd(addr_of!((*c).local_ip6[1])),
                    rd(addr_of!((*c).local_ip6[2])),
                    rd(addr_of!((*c).local_ip6[3])),
                ],
                remote_ip6: [
                    rd(addr_of!((*c).remote_ip6[0])),
                    rd(addr_of!((*c).remote_ip6[1])),
                    rd(addr_of!((*c).remote_ip6[2])),
                    rd(addr_of!((*c).remote_ip6[3])),
                ],
                local_port: rd(addr_of!((*c).local_port)),
                remote_port: rd(addr_of!((*c).remote_port)),
            }
        }
    }};
}

impl SocketFields {
    /// The connection as this socket sees it.
    #[inline(always)]
    fn pair(&self) -> Option<SockPair> {
        Some(SockPair {
            local: SockAddr::new(
                socket_addr(self.family, self.local_ip4, self.local_ip6)?,
                self.local_port as u16,
            ),
            remote: SockAddr::new(
                socket_addr(self.family, self.remote_ip4, self.remote_ip6)?,
                u32::from_be(self.remote_port) as u16,
            ),
        })
    }
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    let Some(pair) = socket_fields!(ctx.ops).pair() else {
        return 0;
    };
    let app_end = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    let shortcut = if app_end {
        hand_over_capture(&ctx, &pair)
    } else {
        is_agent_listener(&pair.local)
    };
    if shortcut {
        let _ = MSG_PASSTHROUGH.remove(pair);
        // SAFETY: the context is the `bpf_sock_ops` of the established socket; its address
        // is kept as a number, only ever read through `bpf_probe_read_kernel`.
        let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk } as u64;
        if SOCKET_ADDRS.insert(pair, sk, 0).is_err() {
            error!(&ctx, "sock_ops: cannot record a socket's address");
            return 0;
        }
        let mut key = pair;
        // SAFETY: the context is the `bpf_sock_ops` of the established socket.
        let ops = unsafe { &mut *ctx.ops };
        let added = if app_end {
            SOCKETS.update(&mut key, ops, 0)
        } else {
            AGENT_ENDS.update(&mut key, ops, 0)
        };
        if let Err(e) = added {
            error!(&ctx, "sock_ops: cannot add a socket to its SOCKHASH: {}", e);
        }
    }
    0
}

/// Copies a captured socket's record from its cookie to its client address;
/// true if the socket was captured.
#[inline(always)]
fn hand_over_capture(ctx: &SockOpsContext, pair: &SockPair) -> bool {
    // SAFETY: `bpf_get_socket_cookie` accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(captured) = (unsafe { CAPTURED_BY_COOKIE.get(cookie) }).copied() else {
        return false;
    };
    if CAPTURED_BY_CLIENT.insert(pair.local, captured, 0).is_err() {
        error!(ctx, "sock_ops: cannot record original destination");
        return false;
    }
    count(Counter::OrigDstRecorded, 1);
    true
}

#[inline(always)]
fn is_agent_listener(local: &SockAddr) -> bool {
    let Some(agent) = agent() else {
        return false;
    };
    local.port == agent.port
        && ((agent.has_ipv4 != 0 && local.addr == ipv4_mapped(agent.ipv4))
            || (agent.has_ipv6 != 0 && local.addr == agent.ipv6))
}

#[sk_msg]
pub fn mesh_redirect(ctx: SkMsgContext) -> u32 {
    let Some(me) = socket_fields!(ctx.msg).pair() else {
        return SK_PASS;
    };
    let mut peer = me.reversed();
    // SAFETY: read only for presence.
    let passing = unsafe { MSG_PASSTHROUGH.get(me) }.is_some();
    let redirect = match Peer::of(&peer) {
        None => false,
        Some(p) if p.full() => {
            if !passing {
                count(Counter::ShortcutFull, 1);
            }
            false
        }
        Some(p) if passing => {
            let drained = p.read_all_sent_by(&me);
            if drained {
                count(Counter::ShortcutResumed, 1);
            }
            drained
        }
        Some(_) => true,
    };
    let size = u64::from(ctx.size());
    if redirect
        && AGENT_ENDS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
    {
        if passing {
            let _ = MSG_PASSTHROUGH.remove(me);
        }
        count(Counter::MsgRedirected, 1);
        count(Counter::BytesRedirected, size);
    } else {
        // This send takes the TCP/IP path, and so must every later one until the peer has
        // read it, or a redirected send could overtake it.
        if !passing {
            let _ = MSG_PASSTHROUGH.insert(me, SET_MEMBER, 0);
        }
        count(Counter::MsgPassed, 1);
        count(Counter::BytesPassed, size);
    }
    SK_PASS
}

/// The least a peer's sk_msg queue may hold before sends go through TCP/IP, whatever its
/// receive buffer says: the receive buffer stays at its initial size on this path (TCP grows
/// it only for bytes read from TCP/IP), and a reader that keeps up needs room for a burst.
const QUEUE_FLOOR: i64 = 2 << 20;

/// The kernel socket of the receiving end of a send, read through `KERNEL_LAYOUT`.
struct Peer {
    sk: u64,
    layout: KernelLayout,
}

impl Peer {
    /// The peer's socket, if it joined `AGENT_ENDS` and the kernel's layout is known.
    #[inline(always)]
    fn of(peer: &SockPair) -> Option<Self> {
        // SAFETY: the constant is set at load; a volatile read keeps the compiler from
        // taking the all-zero initial value for it.
        let layout = unsafe { core::ptr::read_volatile(&KERNEL_LAYOUT) };
        if !layout.is_known() {
            return None;
        }
        // SAFETY: plain value copied out of the map.
        let sk = unsafe { SOCKET_ADDRS.get(peer) }.copied()?;
        Some(Self { sk, layout })
    }

    /// Whether the peer's sk_msg queue holds its receive buffer's worth (at least
    /// `QUEUE_FLOOR`) or more, or cannot be read, which counts as full: one message beyond
    /// the bound is the most it holds.
    #[inline(always)]
    fn full(&self) -> bool {
        let Some(user_data) = read::<u64>(self.sk, self.layout.sock_user_data) else {
            return true;
        };
        if user_data & SK_USER_DATA_PSOCK == 0 {
            return true;
        }
        let psock = user_data & !SK_USER_DATA_FLAGS;
        let queued = read::<u32>(psock, self.layout.psock_msg_tot_len);
        let bound = read::<i32>(self.sk, self.layout.sock_rcvbuf);
        match (queued, bound) {
            (Some(queued), Some(bound)) => i64::from(queued) >= i64::from(bound).max(QUEUE_FLOOR),
            _ => true,
        }
    }

    /// Whether the peer's reader has taken every byte that `me` sent through TCP/IP: then
    /// a redirected send cannot overtake any of them.
    #[inline(always)]
    fn read_all_sent_by(&self, me: &SockPair) -> bool {
        // SAFETY: plain value copied out of the map.
        let Some(mine) = (unsafe { SOCKET_ADDRS.get(me) }).copied() else {
            return false;
        };
        let sent = read::<u32>(mine, self.layout.tcp_write_seq);
        let read_up_to = read::<u32>(self.sk, self.layout.tcp_copied_seq);
        matches!((sent, read_up_to), (Some(s), Some(r)) if s == r)
    }
}

/// A `T` at `offset` in the kernel object at address `base`.
#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: `bpf_probe_read_kernel` checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}

/// `cgroup_skb` verdicts.
const PASS: i32 = 1;
const DROP: i32 = 0;
/// `bpf_sock.state` of a listening socket (`BPF_TCP_LISTEN`).
const TCP_LISTEN: u32 = 10;
/// Ethertypes as `__sk_buff.protocol` holds them (network byte order).
const ETH_P_IP: u32 = 0x0008;
const ETH_P_IPV6: u32 = 0xdd86;

#[cgroup_skb(ingress)]
pub fn mesh_strict(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context's socket field, null-checked before use.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // SAFETY: a socket the kernel gave; the result is null-checked.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return PASS;
    }
    // Only packets to a listening TCP socket start connections: everything else (replies to
    // the pod's own connections, established ones) passes without a lookup.
    // SAFETY: a full socket, null-checked above.
    let (protocol, state) = unsafe { ((*sk).protocol, (*sk).state) };
    if protocol != IPPROTO_TCP || state != TCP_LISTEN || !in_strict_cgroup(skb) {
        return PASS;
    }
    // The data starts at the IP header.
    // SAFETY: reading the context's protocol field.
    let source = match unsafe { (*skb).protocol } {
        ETH_P_IP => ctx.load::<[u8; 4]>(12).ok().map(ipv4_mapped),
        ETH_P_IPV6 => ctx.load::<Addr>(8).ok(),
        _ => None,
    };
    let from_node = source.is_some_and(|a| {
        // SAFETY: the values are plain bytes read only for their presence.
        is_loopback(&a) || unsafe { NODE_ADDRESSES.get(a) }.is_some()
    });
    if from_node {
        return PASS;
    }
    count(Counter::StrictDropped, 1);
    DROP
}

/// 127.0.0.0/8 (IPv4-mapped) or ::1.
#[inline(always)]
fn is_loopback(a: &Addr) -> bool {
    match ipv4_unmapped(a) {
        Some(v4) => v4[0] == 127,
        None => a[..15].iter().all(|b| *b == 0) && a[15] == 1,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
