//! The kernel side: loading, attaching and pinning the eBPF programs (here), the maps that
//! mirror the agent's state and hold original destinations (`maps`), the programs' counters
//! (`counters`), the connects the outbound policy refused (`refused`), and the kernel's own
//! struct layouts read from its BTF (`btf`).
//!
//! Everything of one node lives under `/sys/fs/bpf/mesh/<node>`: the maps (by their names and
//! layouts, see `pins`), the programs (`prog_<name>`) and the cgroup links (`link_<name>`). Pinned links keep
//! the programs attached after the agent exits; a restarted agent reuses the pinned maps, so
//! enrollment and counters survive it. Removing the directory detaches and frees everything.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapError, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkMsg, SockOps,
        links::FdLink,
    },
};
use mesh_common::{KernelLayout, SockPair};
use tracing::{debug, info, warn};

use crate::system::BPFFS;

pub mod btf;
pub mod counters;
pub mod maps;
pub mod pins;
pub mod refused;

use btf::Btf;
use counters::Counters;
use maps::{OrigDstTable, StateMaps};
use pins::{Capacities, MapPin};
use refused::RefusedConnects;

/// The compiled eBPF programs (`cargo xtask build-ebpf`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// The agent's outbound listener port, where captured connects go.
pub const OUTBOUND_PORT: u16 = 15001;

const CGROUP_PROGRAMS: [&str; 6] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_getpeername4",
    "mesh_getpeername6",
    "mesh_sockops",
    "mesh_strict",
];

/// The directory holding a node's pins.
pub fn pin_dir(node: &str) -> PathBuf {
    Path::new(BPFFS).join("mesh").join(node)
}

/// Loaded programs, and the maps they use, pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// No agent had pinned anything on this node before.
    fresh: bool,
    maps: Vec<MapPin>,
    shortcut: bool,
    layout: KernelLayout,
}

/// What [`Datapath::load`] hands out: the programs and, each to its one user, their log and maps.
pub struct Loaded {
    pub datapath: Datapath,
    /// Drains the programs' aya-log records; keep it alive as long as the programs.
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    pub state: StateMaps,
    pub orig_dst: OrigDstTable,
    pub refused: RefusedConnects,
    pub counters: Counters,
}

impl Datapath {
    /// Loads the programs with the node's pinned maps where their layout is the programs'
    /// (see [`pins`]), making and pinning the others; `capacities` size maps beyond the
    /// programs' own numbers. Nothing is attached yet: fill the state maps, then
    /// [`Datapath::attach`]. `log_level` is the most verbose aya-log level the programs emit.
    ///
    /// Without `shortcut`, the sk_msg program will not be attached: same-node traffic between
    /// pods and the agent goes through TCP/IP (to measure what the shortcut saves).
    pub fn load(
        node: &str,
        log_level: aya_log::Level,
        shortcut: bool,
        capacities: &Capacities,
    ) -> Result<Loaded> {
        let pin_dir = pin_dir(node);
        let fresh = !pin_dir.exists();
        std::fs::create_dir_all(&pin_dir)
            .with_context(|| format!("cannot create the pin directory {}", pin_dir.display()))?;
        let loaded = load(&pin_dir, fresh, log_level, shortcut, capacities);
        if loaded.is_err() {
            remove_if_fresh(&pin_dir, fresh);
        }
        loaded
    }

    /// Attaches the programs to the cgroup v2 directory `cgroup` and pins them, replacing
    /// the node's earlier attachments (each new one is in place before the old one goes).
    ///
    /// If it fails on a node that had no pins, it removes what it pinned; an earlier agent's
    /// pins stay (in use: what was replaced was replaced by working programs).
    pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
        let attached = self.attach_all(cgroup);
        if attached.is_err() {
            remove_if_fresh(&self.pin_dir, self.fresh);
        }
        attached
    }

    fn attach_all(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_fd = File::open(cgroup)
            .with_context(|| format!("cannot open the cgroup {}", cgroup.display()))?;
        for name in CGROUP_PROGRAMS {
            attach_to_cgroup(&mut self.ebpf, name, &cgroup_fd, &self.pin_dir)
                .with_context(|| format!("cannot attach {name} to {}", cgroup.display()))?;
        }
        if self.shortcut && self.layout.is_known() {
            attach_sk_msg(&mut self.ebpf, &self.pin_dir)
                .context("cannot attach mesh_redirect to SOCKETS")?;
        } else if self.shortcut {
            warn!(
                "this kernel cannot bound what the sk_msg shortcut queues (its struct sk_psock \
                 has no msg_tot_len, from the 2026 sockmap FIONREAD fix): the shortcut is off and same-node \
                 traffic goes through TCP/IP"
            );
        } else {
            warn!("the sk_msg shortcut is off: same-node traffic goes through TCP/IP");
        }
        info!(
            cgroup = %cgroup.display(),
            pins = %self.pin_dir.display(),
            "eBPF programs attached"
        );
        Ok(())
    }

    /// Where this node's pins live.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Unpins, as each stops being needed, the maps of earlier layouts that this agent's
    /// maps replaced (see [`pins::retire`]); run once attached.
    pub fn retire_replaced_maps(&self) -> impl Future<Output = ()> + use<> {
        pins::retire(self.maps.clone())
    }

    /// Unpins everything of this node: once the agent's handles close, the programs are
    /// detached and the maps freed.
    pub fn unpin(&self) -> Result<()> {
        unpin(&self.pin_dir)
    }
}

fn remove_if_fresh(pin_dir: &Path, fresh: bool) {
    if fresh && let Err(e) = std::fs::remove_dir_all(pin_dir) {
        warn!(pins = %pin_dir.display(), "cannot remove a failed load's pins: {e}");
    }
}

fn load(
    pin_dir: &Path,
    fresh: bool,
    log_level: aya_log::Level,
    shortcut: bool,
    capacities: &Capacities,
) -> Result<Loaded> {
    if !shortcut && pin_dir.join("prog_mesh_redirect").exists() {
        bail!(
            "an earlier agent left the sk_msg shortcut attached on this node; unload it first \
             (mesh-agent unload --node ...) to run without it"
        );
    }
    let layout = if shortcut {
        kernel_layout()?
    } else {
        KernelLayout::default()
    };
    let maps = pins::plan(OBJECT, pin_dir, capacities)?;
    let mut loader = EbpfLoader::new();
    for map in &maps {
        loader.map_pin_path(&map.name, map.path.as_path());
    }
    for (name, capacity) in capacities {
        loader.map_max_entries(name, *capacity);
    }
    let mut ebpf = loader
        .override_global(aya_log::LEVEL, &(log_level as u8), true)
        .override_global("KERNEL_LAYOUT", &layout, true)
        .load(OBJECT)
        .context("cannot load the eBPF programs (does this kernel have BPF and BTF?)")?;
    let logger =
        aya_log::EbpfLogger::init(&mut ebpf).context("cannot read the eBPF programs' log")?;
    Ok(Loaded {
        state: StateMaps::take(&mut ebpf)?,
        orig_dst: OrigDstTable::take(&mut ebpf, &maps)?,
        refused: RefusedConnects::take(&mut ebpf)?,
        counters: Counters::take(&mut ebpf)?,
        logger,
        datapath: Datapath {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            fresh,
            maps,
            shortcut,
            layout,
        },
    })
}

/// Removes a node's pin directory (see [`Datapath::unpin`]). Nothing pinned is not an
/// error: unloading twice, or on a clean node, leaves it clean.
pub fn unpin(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        info!(pins = %pin_dir.display(), "nothing is pinned");
        return Ok(());
    }
    std::fs::remove_dir_all(pin_dir)
        .with_context(|| format!("cannot remove the pins at {}", pin_dir.display()))?;
    info!(pins = %pin_dir.display(), "eBPF programs detached and unpinned");
    Ok(())
}

/// Whether this kernel lets the sk_msg shortcut be attached: its layout (BTF) has every field
/// the shortcut's bound on queued bytes reads. Elsewhere the agent leaves the shortcut off.
pub fn shortcut_possible() -> bool {
    kernel_layout().is_ok_and(|layout| layout.is_known())
}

/// The offsets `mesh_redirect` reads, from the running kernel's BTF; a missing field is 0, and
/// a layout that is not wholly known keeps the shortcut off rather than queue without a bound.
fn kernel_layout() -> Result<KernelLayout> {
    let btf = Btf::from_kernel()?;
    let offset = |strukt: &str, member: &str| -> Result<u32> {
        Ok(btf.member_offset(strukt, member)?.unwrap_or(0))
    };
    let layout = KernelLayout {
        sock_user_data: offset("sock", "sk_user_data")?,
        sock_rcvbuf: offset("sock", "sk_rcvbuf")?,
        tcp_write_seq: offset("tcp_sock", "write_seq")?,
        tcp_copied_seq: offset("tcp_sock", "copied_seq")?,
        psock_msg_tot_len: offset("sk_psock", "msg_tot_len")?,
        _pad: 0,
    };
    debug!(?layout, "kernel layout for the sk_msg shortcut");
    Ok(layout)
}

fn attach_to_cgroup(ebpf: &mut Ebpf, name: &str, cgroup: &File, pin_dir: &Path) -> Result<()> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?;
    // aya attaches through a bpf_link (kernel >= 5.7), which always lets several programs
    // share a cgroup and takes no mode flags, hence `Single`. An earlier agent's programs stay
    // attached until their links are unpinned below, after the new ones are in place.
    let link: FdLink = if name == "mesh_sockops" {
        let p: &mut SockOps = program.try_into()?;
        p.load()?;
        let id = p.attach(cgroup, CgroupAttachMode::Single)?;
        p.take_link(id)?.try_into()?
    } else if name == "mesh_strict" {
        let p: &mut CgroupSkb = program.try_into()?;
        p.load()?;
        let id = p.attach(
            cgroup,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single,
        )?;
        p.take_link(id)?.try_into()?
    } else {
        let p: &mut CgroupSockAddr = program.try_into()?;
        p.load()?;
        let id = p.attach(cgroup, CgroupAttachMode::Single)?;
        p.take_link(id)?.try_into()?
    };
    replace_pin(&pin_dir.join(format!("prog_{name}")))?;
    program.pin(pin_dir.join(format!("prog_{name}")))?;
    let link_pin = pin_dir.join(format!("link_{name}"));
    replace_pin(&link_pin)?;
    link.pin(&link_pin)?;
    Ok(())
}

fn attach_sk_msg(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<()> {
    let sockets: SockHash<MapData, SockPair> = take_map(ebpf, "SOCKETS")?;
    let program: &mut SkMsg = ebpf
        .program_mut("mesh_redirect")
        .context("the eBPF object has no program mesh_redirect")?
        .try_into()?;
    program.load()?;
    // Replaces an earlier agent's program on the pinned map.
    let id = program.attach(sockets.fd())?;
    // The attachment lives in the (pinned) map, not in a handle of ours: keep it when the
    // agent exits; unpinning the map frees both.
    std::mem::forget(program.take_link(id)?);
    let pin = pin_dir.join("prog_mesh_redirect");
    replace_pin(&pin)?;
    program.pin(pin)?;
    Ok(())
}

fn replace_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            debug!(pin = %path.display(), "replaced an earlier pin");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove the old pin {}", path.display())),
    }
}

pub(super) fn take_map<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}
