//! End-to-end: what a user can get wrong is refused with an error that says what to do, and
//! leaves nothing behind.

use std::{ffi::CString, os::unix::process::CommandExt, path::Path, process::Command};

use mesh_agent::datapath::pin_dir;
use mesh_tests::{Lab, LabSpec, Output};

fn lab() -> Lab {
    Lab::new(LabSpec::default().node("n1").pod("n1", "client", true)).unwrap()
}

fn run_agent(lab: &Lab, args: &[&str], prepare: impl FnOnce(&mut Command)) -> Output {
    let out = lab.agent_command("n1", args, prepare).unwrap();
    assert!(!out.status.success(), "mesh-agent {args:?} should fail");
    assert!(
        !pin_dir(&lab.agent_node_name("n1")).exists(),
        "a failed start pins nothing"
    );
    out
}

/// Runs `mesh-agent run` with a valid configuration and `extra` arguments, in a lab of its own.
fn run_with_valid_config(extra: &[&str], prepare: impl FnOnce(&mut Command)) -> Output {
    let lab = lab();
    let config = lab
        .write_file("n1.yaml", &lab.agent_config("n1").unwrap())
        .unwrap();
    let args = [&["run", "--config", config.to_str().unwrap()], extra].concat();
    run_agent(&lab, &args, prepare)
}

/// Runs the command in a mount namespace of its own where `dir` is not mounted: every mount
/// stacked there goes (some machines boot with bpffs mounted twice at /sys/fs/bpf).
fn without_mount(cmd: &mut Command, dir: &Path) {
    let dir = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let root = CString::new("/").unwrap();
    // SAFETY: only system calls between fork and exec, on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let private = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0;
            if !private || libc::umount2(dir.as_ptr(), libc::MNT_DETACH) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Unmount until the path is no mount point any more (EINVAL).
            while libc::umount2(dir.as_ptr(), libc::MNT_DETACH) == 0 {}
            let last = std::io::Error::last_os_error();
            if last.raw_os_error() == Some(libc::EINVAL) {
                Ok(())
            } else {
                Err(last)
            }
        });
    }
}

#[test]
fn invalid_config_names_file_line_and_reason() {
    let lab = lab();
    let text = lab.agent_config("n1").unwrap();
    let line = text.lines().position(|l| l.starts_with("node:")).unwrap() + 1;
    let bad = lab
        .write_file(
            "bad.yaml",
            &text.replacen("pod_cidrs: [", "pod_cidrs: [\"198.18.1.0/33\", ", 1),
        )
        .unwrap();
    let out = run_agent(&lab, &["run", "--config", bad.to_str().unwrap()], |_| {});
    let expected = format!("{}:{line}:", bad.display());
    assert!(
        out.stderr.contains(&expected),
        "{expected} in {}",
        out.stderr
    );
    assert!(out.stderr.contains("pod_cidrs"), "{}", out.stderr);

    let missing = run_agent(&lab, &["run", "--config", "/nonexistent/mesh.yaml"], |_| {});
    assert!(
        missing
            .stderr
            .contains("/nonexistent/mesh.yaml: cannot read"),
        "{}",
        missing.stderr
    );
}

#[test]
fn missing_cgroup_is_named() {
    let out = run_with_valid_config(&["--cgroup", "/no-such-mesh-cgroup"], |_| {});
    assert!(
        out.stderr
            .contains("cgroup /no-such-mesh-cgroup does not exist"),
        "{}",
        out.stderr
    );
}

#[test]
fn not_root_is_refused() {
    let out = run_with_valid_config(&[], |cmd| {
        // SAFETY: only system calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    assert!(out.stderr.contains("must run as root"), "{}", out.stderr);
}

#[test]
fn missing_bpffs_says_how_to_mount_it() {
    let out = run_with_valid_config(&[], |cmd| {
        without_mount(cmd, Path::new(mesh_agent::system::BPFFS))
    });
    assert!(
        out.stderr.contains("bpffs is not mounted at /sys/fs/bpf")
            && out.stderr.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{}",
        out.stderr
    );
}

#[test]
fn missing_cgroup2_is_explained() {
    let mount = mesh_agent::system::cgroup2_mount().unwrap();
    let out = run_with_valid_config(&[], |cmd| without_mount(cmd, &mount));
    assert!(
        out.stderr.contains("no cgroup v2 hierarchy is mounted"),
        "{}",
        out.stderr
    );
}
