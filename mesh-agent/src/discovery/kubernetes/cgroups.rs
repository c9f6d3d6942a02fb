//! Where the kubelet puts a pod's cgroup v2 directory, from the pod's UID, for both of its
//! cgroup drivers: `cgroupfs` (`/kubepods/burstable/pod<uid>`) and `systemd`
//! (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`, the
//! UID's dashes turned into underscores). Guaranteed pods sit right under `kubepods`, which
//! sits under the kubelet's `--cgroup-root` (`/` unless told).

use std::path::Path;

use crate::config::CgroupPath;

/// The QoS classes' sub-trees; guaranteed pods have none.
const QOS_CLASSES: [Option<&str>; 3] = [None, Some("burstable"), Some("besteffort")];

/// The pod's cgroup directory relative to the cgroup v2 `mount`, if it exists there;
/// `kubelet_root` is the kubelet's `--cgroup-root`, relative to the mount.
pub fn pod_cgroup(mount: &Path, kubelet_root: &str, uid: &str) -> Option<CgroupPath> {
    let kubelet_root = kubelet_root.trim_end_matches('/');
    candidates(uid)
        .into_iter()
        .map(|path| format!("{kubelet_root}{path}"))
        .find(|path| mount.join(path.trim_start_matches('/')).is_dir())
        .and_then(|path| path.parse().ok())
}

/// Every place the kubelet may have put the pod, both drivers, every QoS class.
fn candidates(uid: &str) -> Vec<String> {
    let systemd_uid = uid.replace('-', "_");
    QOS_CLASSES
        .iter()
        .flat_map(|qos| match qos {
            None => [
                format!("/kubepods/pod{uid}"),
                format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice"),
            ],
            Some(qos) => [
                format!("/kubepods/{qos}/pod{uid}"),
                format!(
                    "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{systemd_uid}.slice"
                ),
            ],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5a8e0c1e-3b2f-4d61-9c7a-0e1f2a3b4c5d";

    fn found(dir: &str) -> Option<String> {
        found_under("/", dir)
    }

    /// Makes `dir` in a temporary mount, looks for the pod under `kubelet_root`.
    fn found_under(kubelet_root: &str, dir: &str) -> Option<String> {
        let root = std::env::temp_dir().join(format!(
            "mesh-cgroups-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(root.join(dir.trim_start_matches('/'))).unwrap();
        let cgroup = pod_cgroup(&root, kubelet_root, UID).map(|c| c.to_string());
        std::fs::remove_dir_all(&root).unwrap();
        cgroup
    }

    #[test]
    fn finds_pods_of_each_driver_and_qos_class() {
        for dir in [
            format!("/kubepods/pod{UID}"),
            format!("/kubepods/burstable/pod{UID}"),
            format!("/kubepods/besteffort/pod{UID}"),
            "/kubepods.slice/kubepods-pod5a8e0c1e_3b2f_4d61_9c7a_0e1f2a3b4c5d.slice".into(),
            "/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod5a8e0c1e_3b2f_4d61_9c7a_0e1f2a3b4c5d.slice"
                .into(),
            "/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod5a8e0c1e_3b2f_4d61_9c7a_0e1f2a3b4c5d.slice"
                .into(),
        ] {
            assert_eq!(found(&dir).as_deref(), Some(dir.as_str()));
        }
    }

    #[test]
    fn finds_pods_under_the_kubelets_cgroup_root() {
        let dir = format!("/node-a/kubepods/burstable/pod{UID}");
        assert_eq!(found_under("/node-a/", &dir).as_deref(), Some(dir.as_str()));
        assert_eq!(found_under("/", &dir), None);
    }

    #[test]
    fn another_pods_directory_is_not_this_one() {
        assert_eq!(
            found("/kubepods/burstable/pod00000000-0000-0000-0000-000000000000"),
            None
        );
    }
}
