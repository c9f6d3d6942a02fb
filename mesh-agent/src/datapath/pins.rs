//! Where each map is pinned: `<pin dir>/<NAME>-<layout>` (bpffs takes no dots in names), the layout a fingerprint of what
//! the programs rely on (the map's type, key and value sizes, capacity and flags, and
//! [`mesh_common::MAP_ABI`]). An agent whose map differs in any of them makes a new map beside
//! the old one instead of taking over a map its programs would misread (the broken upgrades
//! of other node proxies); the old map serves the old programs' connections until it is no
//! longer needed, then is unpinned ([`retire`]).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData, SockHash};
use mesh_common::{MAP_ABI, SockPair};
use tracing::{info, warn};

/// A map of the programs and the pin it is loaded from or made at.
#[derive(Clone)]
pub struct MapPin {
    pub name: String,
    pub path: PathBuf,
}

/// How many entries each named map is made with, where not the programs' own number.
pub type Capacities = BTreeMap<String, u32>;

/// How long a retired table of captured connects is kept: a connect captured by the old
/// programs is accepted within this time or not at all.
const CAPTURES_KEPT: Duration = Duration::from_secs(30);
/// How often retired maps still in use are looked at again.
const RETIRE_EVERY: Duration = Duration::from_secs(5);

/// The pins of the pinned maps in `object` under `pin_dir`, with `capacities` applied.
pub fn plan(object: &[u8], pin_dir: &Path, capacities: &Capacities) -> Result<Vec<MapPin>> {
    let object =
        aya_obj::Object::parse(object).context("cannot read the eBPF object's map definitions")?;
    if let Some(unknown) = capacities.keys().find(|n| !object.maps.contains_key(*n)) {
        let names: Vec<&String> = object.maps.keys().collect();
        bail!("there is no map {unknown} to size; the maps are {names:?}");
    }
    let mut pins: Vec<MapPin> = object
        .maps
        .iter()
        .filter(|(_, map)| map.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, map)| {
            let capacity = capacities.get(name).copied().unwrap_or(map.max_entries());
            let layout = fingerprint(&[
                MAP_ABI,
                map.map_type(),
                map.key_size(),
                map.value_size(),
                capacity,
                map.map_flags(),
            ]);
            MapPin {
                name: name.clone(),
                path: pin_dir.join(format!("{name}-{layout:08x}")),
            }
        })
        .collect();
    pins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pins)
}

/// Every pin of the map `name` under `pin_dir`, whatever its layout (also the plain `NAME`
/// of agents from before layouts were named), the newest first.
pub fn find(pin_dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|f| {
                f == name
                    || f.strip_prefix(&prefix).is_some_and(|layout| {
                        layout.len() == 8 && layout.bytes().all(|b| b.is_ascii_hexdigit())
                    })
            })
        })
        .map(|e| {
            let modified = e.metadata().and_then(|m| m.modified());
            (modified.unwrap_or(std::time::UNIX_EPOCH), e.path())
        })
        .collect();
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    found.into_iter().map(|(_, path)| path).collect()
}

/// Unpins the maps of earlier layouts once nothing new can need them: at once if only the
/// old programs use them (they hold their own references), the captured-connect table after
/// [`CAPTURES_KEPT`], and the socket maps once their last socket has closed (unpinning it
/// sooner would tear the shortcut down under open connections).
pub async fn retire(pins: Vec<MapPin>) {
    let mut waiting: Vec<(PathBuf, Retire)> = Vec::new();
    for pin in &pins {
        let Some(dir) = pin.path.parent() else {
            continue;
        };
        for old in find(dir, &pin.name).into_iter().filter(|p| *p != pin.path) {
            match Retire::of(&pin.name) {
                Retire::Now => unpin(&old),
                later => waiting.push((old, later)),
            }
        }
    }
    let started = tokio::time::Instant::now();
    while !waiting.is_empty() {
        tokio::time::sleep(RETIRE_EVERY).await;
        waiting.retain(|(path, rule)| {
            let done = match rule {
                Retire::WhenEmpty => sockets_empty(path),
                Retire::AfterCapturesKept => started.elapsed() >= CAPTURES_KEPT,
                Retire::Now => true,
            };
            if done {
                unpin(path);
            }
            !done
        });
    }
}

/// When a map of an earlier layout may go.
enum Retire {
    /// Only the old programs use it, through their own references.
    Now,
    /// The captured-connect table: once the connects the old programs captured are accepted.
    AfterCapturesKept,
    /// A socket map: once its last socket has closed.
    WhenEmpty,
}

impl Retire {
    fn of(map: &str) -> Self {
        match map {
            "SOCKETS" | "AGENT_ENDS" => Self::WhenEmpty,
            "CAPTURED_BY_CLIENT" => Self::AfterCapturesKept,
            _ => Self::Now,
        }
    }
}

fn sockets_empty(path: &Path) -> bool {
    let sockets = MapData::from_pin(path)
        .map_err(anyhow::Error::from)
        .and_then(|data| Ok(SockHash::<_, SockPair>::try_from(Map::SockHash(data))?));
    match sockets {
        Ok(sockets) => sockets.keys().next().is_none(),
        Err(e) => {
            warn!(pin = %path.display(), "cannot read a retired socket map, unpinning it: {e:#}");
            true
        }
    }
}

fn unpin(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => info!(pin = %path.display(), "unpinned a map of an earlier layout"),
        Err(e) => warn!(pin = %path.display(), "cannot unpin a map of an earlier layout: {e}"),
    }
}

/// FNV-1a over the words: stable across builds and Rust versions, unlike std's hasher.
fn fingerprint(words: &[u32]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in words.iter().flat_map(|w| w.to_le_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_is_named_by_all_it_holds() {
        let base = [1, 2, 4, 8, 1024, 0];
        let named = fingerprint(&base);
        assert_eq!(named, fingerprint(&base), "stable");
        for i in 0..base.len() {
            let mut changed = base;
            changed[i] += 1;
            assert_ne!(fingerprint(&changed), named, "word {i}");
        }
    }

    #[test]
    fn the_pins_of_a_map_are_found_newest_first_and_only_theirs() {
        let dir = std::env::temp_dir().join(format!("mesh-pins-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("SOCKETS"), "").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        for name in [
            "SOCKETS-00000001",
            "SOCKET_ADDRS-00000002",
            "SOCKETS-x",
            "prog_a",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("SOCKETS-0000000a"), "").unwrap();
        let found = find(&dir, "SOCKETS");
        assert_eq!(
            found,
            [
                dir.join("SOCKETS-0000000a"),
                dir.join("SOCKETS-00000001"),
                dir.join("SOCKETS")
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
