//! Where the kubelet puts a pod's cgroup v2 directory, from the pod's UID, for both of its
//! cgroup drivers: `cgroupfs` (`/kubepods/burstable/pod<uid>`) and `systemd`
//! (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`, the
//! UID's dashes turned into underscores). Guaranteed pods sit right under `kubepods`.

use std::path::Path;

use crate::config::CgroupPath;

/// The QoS classes' sub-trees; guaranteed pods have none.
const QOS_CLASSES: [Option<&str>; 3] = [None, Some("burstable"), Some("besteffort")];

/// The pod's cgroup directory relative to the cgroup v2 mount `root`, if it exists there.
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<CgroupPath> {
    candidates(uid)
        .into_iter()
        .find(|path| root.join(path.trim_start_matches('/')).is_dir())
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
        let root = std::env::temp_dir().join(format!(
            "mesh-cgroups-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(root.join(dir.trim_start_matches('/'))).unwrap();
        let cgroup = pod_cgroup(&root, UID).map(|c| c.to_string());
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
    fn another_pods_directory_is_not_this_one() {
        assert_eq!(
            found("/kubepods/burstable/pod00000000-0000-0000-0000-000000000000"),
            None
        );
    }
}
