//! The YAML file as the source of the mesh's state: followed by polling, a change read once
//! the file has settled, parsed away from the threads that carry traffic.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use crate::{
    config::Config, discovery::Snapshots, observability::metrics::Metrics, state::reload::rejected,
    system,
};

/// How often the file is looked at. Polling (rather than inotify) also follows a Kubernetes
/// ConfigMap, whose files are swapped through symlinks.
const POLL: Duration = Duration::from_millis(500);
/// How long a changed file must stay unchanged before it is read: a file being written in
/// place is not applied half-written (replacing it with a rename is atomic and still best).
pub const SETTLE: Duration = Duration::from_secs(1);

/// Sends each change of `file` that parses as a [`Config`] to `configs`, once the file has
/// stayed unchanged for [`SETTLE`], until the task is dropped; a change that does not parse is
/// counted and logged. The file is read and parsed on a blocking thread, away from traffic.
pub async fn follow_file(file: PathBuf, configs: Snapshots, metrics: Arc<Metrics>) {
    // The file as last read (sent or refused), and as last seen changing.
    let mut read = stamp(&file);
    let mut changing = read;
    let mut unchanged_since = Instant::now();
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let now = stamp(&file);
        if now != changing {
            changing = now;
            unchanged_since = Instant::now();
        }
        if changing == read || unchanged_since.elapsed() < SETTLE {
            continue;
        }
        read = changing;
        let path = file.clone();
        match tokio::task::spawn_blocking(move || Config::load(&path)).await {
            Ok(Ok(config)) => {
                configs.send_replace(Some(Arc::new(config)));
            }
            Ok(Err(e)) => rejected(&metrics, &e),
            Err(e) => rejected(&metrics, &format!("reading the config failed: {e}")),
        }
        system::release_freed_memory();
    }
}

/// What changes when the file does: modification time, size, inode.
fn stamp(file: &Path) -> Option<(SystemTime, u64, u64)> {
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;

    use super::*;

    const NODE: &str = "\
node: { name: n1, addresses: [198.18.0.1], pod_cidrs: [198.18.1.0/24] }
identity: { ca_cert: ca.crt, ca_key: ca.key }
";

    fn with_services(n: usize) -> String {
        let mut text = format!("{NODE}services:\n");
        for i in 0..n {
            text += &format!(
                "  - {{ name: s{i}, namespace: shop, addresses: [198.19.0.{i}], ports: [{{ port: 80 }}] }}\n"
            );
        }
        text
    }

    /// A file written in two parts with a pause between them is applied once, whole.
    #[tokio::test(start_paused = true)]
    async fn a_file_written_in_parts_is_read_once_it_settles() {
        let dir = std::env::temp_dir().join(format!("mesh-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("node.yaml");
        std::fs::write(&file, with_services(1)).unwrap();
        let (configs, mut updates) = watch::channel(None);
        let metrics = Arc::new(Metrics::new(&mut Default::default()));
        let follower = tokio::spawn(follow_file(file.clone(), configs, metrics));
        tokio::time::sleep(POLL).await;

        let whole = with_services(3);
        let (first, rest) = whole.split_at(whole.rfind("  - ").unwrap());
        // The first part is a valid config of two services: applying it would drop the third.
        std::fs::write(&file, first).unwrap();
        tokio::time::sleep(SETTLE - POLL).await;
        std::fs::write(&file, whole.clone()).unwrap();
        assert!(rest.contains("s2"));

        updates.changed().await.unwrap();
        let config = updates.borrow_and_update().clone().unwrap();
        assert_eq!(config.services.len(), 3);
        // And nothing more comes: the settled file was read once.
        tokio::time::sleep(10 * SETTLE).await;
        assert!(!updates.has_changed().unwrap());
        follower.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
