//! The maps the agent keeps in step with its state (the listener, enrolled cgroups, owned
//! destinations) and the one it reads: where captured connections were going.

use std::{
    collections::HashSet,
    hash::Hash,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key},
};
use mesh_common::{
    Addr, AgentListener, Captured, REGISTRY_ONLY, SET_MEMBER, SockAddr, ipv4_mapped, ipv4_unmapped,
};
use tracing::{info, warn};

use super::{
    OUTBOUND_PORT,
    pins::{self, MapPin},
    take_map,
};
use crate::{
    config::{Config, egress::OutboundPolicy},
    proxy::outbound::{CapturedConnect, Captures},
    state::reload::Mirror,
    system,
};

/// The maps that mirror the agent's state: the listener, enrolled cgroups, owned
/// destinations, strict pods and the node's addresses they accept connections from.
pub struct StateMaps {
    enrolled: HashMap<MapData, u64, u8>,
    external: HashMap<MapData, SockAddr, u8>,
    external_ports: HashMap<MapData, u16, u8>,
    outbound_policy: Array<MapData, u32>,
    strict: HashMap<MapData, u64, u8>,
    node_addresses: HashMap<MapData, Addr, u8>,
    owned_services: HashMap<MapData, SockAddr, u8>,
    owned_cidrs: LpmTrie<MapData, Addr, u8>,
    agent: Array<MapData, AgentListener>,
}

impl StateMaps {
    /// Takes the state maps out of the loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            enrolled: take_map(ebpf, "ENROLLED")?,
            external: take_map(ebpf, "EXTERNAL")?,
            external_ports: take_map(ebpf, "EXTERNAL_PORTS")?,
            outbound_policy: take_map(ebpf, "OUTBOUND_POLICY")?,
            strict: take_map(ebpf, "STRICT")?,
            node_addresses: take_map(ebpf, "NODE_ADDRESSES")?,
            owned_services: take_map(ebpf, "OWNED_SERVICES")?,
            owned_cidrs: take_map(ebpf, "OWNED_CIDRS")?,
            agent: take_map(ebpf, "AGENT")?,
        })
    }
}

impl Mirror for StateMaps {
    /// Makes the maps match `config`: adds what is new, removes what is gone.
    /// `cgroups` are the workloads' cgroup ids ([`workload_cgroups`]).
    fn sync(&mut self, config: &Config, cgroups: &[Option<u64>]) -> Result<()> {
        let listener = AgentListener {
            ipv4: config.node.ipv4().map_or([0; 4], |a| a.octets()),
            ipv6: config.node.ipv6().map_or([0; 16], |a| a.octets()),
            port: OUTBOUND_PORT,
            has_ipv4: config.node.ipv4().is_some().into(),
            has_ipv6: config.node.ipv6().is_some().into(),
        };
        self.agent.set(0, listener, 0).context("cannot set AGENT")?;

        let enrolled: HashSet<u64> = cgroups.iter().flatten().copied().collect();
        sync_set(&mut self.enrolled, &enrolled, "ENROLLED")?;

        let strict: HashSet<u64> = config
            .workloads
            .iter()
            .zip(cgroups)
            .filter(|(w, _)| config.authorization.strict.covers(&w.namespace))
            .filter_map(|(_, cgroup)| *cgroup)
            .collect();
        sync_set(&mut self.strict, &strict, "STRICT")?;
        // The node's own connections to its pods come from any of its interfaces' addresses.
        let host = system::host_addresses().unwrap_or_else(|e| {
            warn!("cannot list this host's addresses, strict pods accept only the node's configured ones: {e}");
            Vec::new()
        });
        let node_addresses: HashSet<Addr> = config
            .node
            .addresses
            .iter()
            .chain(&host)
            .map(|a| addr(*a))
            .collect();
        sync_set(&mut self.node_addresses, &node_addresses, "NODE_ADDRESSES")?;

        let services: HashSet<SockAddr> = config
            .services
            .iter()
            .flat_map(|s| {
                s.addresses.iter().flat_map(|a| {
                    s.ports
                        .iter()
                        .map(|p| sock_addr(SocketAddr::new(*a, p.port)))
                })
            })
            .collect();
        sync_set(&mut self.owned_services, &services, "OWNED_SERVICES")?;

        let cidrs: HashSet<(u32, Addr)> = config
            .pod_cidrs()
            .map(|net| match net {
                ipnet::IpNet::V4(n) => (
                    96 + u32::from(n.prefix_len()),
                    ipv4_mapped(n.network().octets()),
                ),
                ipnet::IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
            })
            .collect();
        let present: Vec<Key<Addr>> = self.owned_cidrs.keys().collect::<Result<_, _>>()?;
        for key in &present {
            if !cidrs.contains(&(key.prefix_len(), key.data())) {
                self.owned_cidrs.remove(key)?;
            }
        }
        for (prefix_len, addr) in &cidrs {
            self.owned_cidrs
                .insert(&Key::new(*prefix_len, *addr), SET_MEMBER, 0)
                .context("cannot fill OWNED_CIDRS")?;
        }
        let external: HashSet<SockAddr> = config
            .egress
            .addresses()
            .map(|(addr, _)| sock_addr(addr))
            .collect();
        sync_set(&mut self.external, &external, "EXTERNAL")?;
        let external_ports: HashSet<u16> = config.egress.wildcard_ports().collect();
        sync_set(&mut self.external_ports, &external_ports, "EXTERNAL_PORTS")?;
        // Last: the external hosts are captured before anything else is refused.
        let policy = match config.egress.outbound_policy {
            OutboundPolicy::RegistryOnly => REGISTRY_ONLY,
            OutboundPolicy::AllowAny => 0,
        };
        self.outbound_policy
            .set(0, policy, 0)
            .context("cannot set OUTBOUND_POLICY")?;
        info!(
            external = external.len(),
            external_ports = external_ports.len(),
            enrolled = enrolled.len(),
            strict = strict.len(),
            service_ports = services.len(),
            cidrs = cidrs.len(),
            "eBPF maps synced"
        );
        Ok(())
    }
}

fn sync_set<K: Pod + Eq + Hash>(
    map: &mut HashMap<MapData, K, u8>,
    want: &HashSet<K>,
    name: &str,
) -> Result<()> {
    let present: Vec<K> = map.keys().collect::<Result<_, _>>()?;
    for key in present.iter().filter(|k| !want.contains(k)) {
        map.remove(key)?;
    }
    for key in want {
        map.insert(key, SET_MEMBER, 0)
            .with_context(|| format!("cannot fill {name}"))?;
    }
    Ok(())
}

/// The cgroup id of each of `config`'s workloads, in order; `None` (logged) for a workload
/// whose cgroup is not there: it is not enrolled. `cgroup_mount` is where their paths start.
pub fn workload_cgroups(config: &Config, cgroup_mount: &Path) -> Vec<Option<u64>> {
    config
        .workloads
        .iter()
        .map(|w| {
            let dir = w.cgroup.under(cgroup_mount);
            cgroup_id(&dir)
                .inspect_err(|e| {
                    warn!(
                        workload = %format!("{}/{}", w.namespace, w.name),
                        cgroup = %dir.display(),
                        "not enrolled: {e}"
                    );
                })
                .ok()
        })
        .collect()
}

/// The id the kernel gives a cgroup v2 directory: its inode number.
fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).map(|m| m.ino())
}

/// An address in the maps' form (IPv4 mapped into IPv6).
fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A socket address in the maps' form.
fn sock_addr(socket: SocketAddr) -> SockAddr {
    SockAddr::new(addr(socket.ip()), socket.port())
}

/// A socket address from the maps' form, IPv4-mapped addresses as IPv4.
pub(super) fn socket_addr(addr: &SockAddr) -> SocketAddr {
    let ip = match ipv4_unmapped(&addr.addr) {
        Some(v4) => IpAddr::from(v4),
        None => IpAddr::from(addr.addr),
    };
    SocketAddr::new(ip, addr.port)
}

/// Captured connections, by the client's address.
pub struct OrigDstTable {
    table: CapturedByClient,
    /// Its pin; the same table of other layouts (another agent's programs, during an
    /// upgrade) is pinned beside it.
    pin: PathBuf,
    /// Those other tables, as last listed, and the pin directory's modification time then
    /// (a miss lists them again only when a pin came or went).
    others: Vec<CapturedByClient>,
    others_listed: Option<SystemTime>,
}

type CapturedByClient = HashMap<MapData, SockAddr, Captured>;

impl OrigDstTable {
    /// Takes the table out of the loaded object; `maps` say where it is pinned.
    pub(super) fn take(ebpf: &mut Ebpf, maps: &[MapPin]) -> Result<Self> {
        let own = maps
            .iter()
            .find(|m| m.name == "CAPTURED_BY_CLIENT")
            .context("the eBPF object has no pinned CAPTURED_BY_CLIENT")?;
        Ok(Self {
            table: take_map(ebpf, "CAPTURED_BY_CLIENT")?,
            pin: own.path.clone(),
            others: Vec::new(),
            others_listed: None,
        })
    }

    /// The same table pinned with other layouts whose keys and values this agent reads (a
    /// resized one), for connects captured by the other agent's programs while both run.
    fn others(&mut self) -> &mut [CapturedByClient] {
        let dir = self.pin.parent().unwrap_or(Path::new("/"));
        let modified = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified != self.others_listed {
            self.others = pins::find(dir, "CAPTURED_BY_CLIENT")
                .into_iter()
                .filter(|p| *p != self.pin)
                .filter_map(|path| {
                    let data = MapData::from_pin(&path).ok()?;
                    HashMap::try_from(Map::LruHashMap(data)).ok()
                })
                .collect();
            self.others_listed = modified;
        }
        &mut self.others
    }
}

impl Captures for OrigDstTable {
    fn take(&mut self, client: SocketAddr) -> Option<CapturedConnect> {
        let key = sock_addr(client);
        let take_from = |table: &mut CapturedByClient| {
            let captured = table.get(&key, 0).ok()?;
            if let Err(e) = table.remove(&key) {
                warn!(%client, "cannot forget an original destination: {e}");
            }
            Some(captured)
        };
        let captured = match take_from(&mut self.table) {
            Some(captured) => captured,
            None => self.others().iter_mut().find_map(take_from)?,
        };
        Some(CapturedConnect {
            dst: socket_addr(&captured.dst),
            cgroup: captured.cgroup,
        })
    }
}
