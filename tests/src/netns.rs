//! Network namespaces and cgroups, and running processes inside them.

use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::process;

/// Runs `ip` with `args`; fails with its error output.
pub fn ip(args: &[&str]) -> Result<()> {
    let (status, _, stderr) = process::run(Command::new("ip").args(args))
        .context("cannot run `ip` (install iproute2: cargo xtask setup)")?;
    if !status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), stderr.trim());
    }
    Ok(())
}

/// Runs `ip -n <netns> <args>`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Sets the sysctl at `key` (a path under /proc/sys, like `net/ipv4/ip_forward`) to `value`
/// inside `netns`.
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    let script = format!("echo {value} > /proc/sys/{key}");
    let (status, _, stderr) =
        process::run(Command::new("ip").args(["netns", "exec", netns, "sh", "-c", &script]))
            .context("cannot run a shell in a network namespace")?;
    if !status.success() {
        bail!("{key}={value} in {netns} failed: {}", stderr.trim());
    }
    Ok(())
}

/// The named network namespaces that exist.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Where a process goes: a network namespace and a cgroup v2 directory.
pub struct Placement {
    pub netns: String,
    pub cgroup: PathBuf,
}

impl Placement {
    /// Makes `cmd` start inside this network namespace and cgroup.
    pub fn apply(&self, cmd: &mut Command) -> Result<()> {
        let netns = File::open(Path::new("/run/netns").join(&self.netns))
            .with_context(|| format!("no network namespace {}", self.netns))?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .with_context(|| format!("no cgroup {}", self.cgroup.display()))?;
        // SAFETY: between fork and exec the closure only makes two system calls (setns and
        // write) on descriptors opened before the fork, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// Kills every process in the cgroup subtree `dir` and removes it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (kernel 5.14+) kills the whole subtree at once.
    if let Ok(mut kill) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
    {
        let _ = kill.write_all(b"1");
    }
    remove_dirs_when_empty(dir)
}

fn remove_dirs_when_empty(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dirs_when_empty(&entry.path())?;
        }
    }
    // Killed processes leave the cgroup once they have exited: wait for that.
    for _ in 0..500 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", dir.display())),
        }
    }
    bail!("cgroup {} still has processes", dir.display())
}
