//! What crosses the wire between a lab's nodes, captured with tshark on the switch.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use mesh_agent::state::routes::TUNNEL_PORT;

use crate::{
    Lab,
    netns::Placement,
    process::{self, EXIT_LIMIT},
    topology,
};

/// A closed port the capture's first packets go to (the discard port).
pub const KNOCK_PORT: u16 = 9;

/// A capture of every TCP packet between the lab's nodes (and the hosts outside the mesh);
/// stopped when dropped.
pub struct Capture {
    child: Child,
    file: PathBuf,
    status: PathBuf,
    /// Knocks seen in the file so far.
    knocks: usize,
}

impl Lab {
    /// Starts capturing on the switch every node is plugged into (the lab needs two nodes).
    pub fn capture(&self, name: &str) -> Result<Capture> {
        let file = self.scratch_path(&format!("{name}.pcapng"));
        let status = self.scratch_path(&format!("{name}.tshark.log"));
        let cgroup = self.cgroup_root().join("capture");
        std::fs::create_dir_all(&cgroup)?;
        let mut cmd = Command::new("tshark");
        cmd.args(["-q", "-i", "br0", "-f", "tcp", "-w"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&status)?);
        Placement {
            netns: self.netns_name("switch"),
            cgroup,
        }
        .apply(&mut cmd)?;
        let child = cmd
            .spawn()
            .context("cannot run tshark (install it: cargo xtask setup)")?;
        let capture = Capture {
            child,
            file,
            status,
            knocks: 0,
        };
        self.knock(capture)
    }

    /// Knocks on a closed port of node 2 from node 1 until the knock shows up in the file:
    /// everything captured before it is in the file too (tshark writes in batches).
    fn knock(&self, mut capture: Capture) -> Result<Capture> {
        let (first, _) = self
            .spec
            .nodes
            .split_first()
            .context("a capture needs nodes")?;
        let start = Instant::now();
        let node2 = topology::node_addrs(2).0;
        let before = capture.knocks;
        loop {
            self.run_on_node(
                first,
                &["connect", "--addr", &format!("{node2}:{KNOCK_PORT}")],
            )?;
            let seen = frames(
                &capture.file,
                &format!("tcp.dstport == {KNOCK_PORT} && tcp.flags.syn == 1"),
                &["frame.number"],
            );
            if let Ok(seen) = seen
                && seen.len() > before
            {
                capture.knocks = seen.len();
                return Ok(capture);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "tshark captured nothing: {}",
                    std::fs::read_to_string(&capture.status)?
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops `capture` and returns its file, once everything captured is in it.
    pub fn stop_capture(&self, capture: Capture) -> Result<PathBuf> {
        let mut capture = self.knock(capture)?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(capture.child.id() as i32, libc::SIGINT) };
        process::wait_within(&mut capture.child, EXIT_LIMIT).context("tshark did not stop")?;
        Ok(capture.file.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The frames of `file` that `filter` (a tshark display filter) matches, one line each with
/// `fields`; the tunnel port is decoded as TLS, with TCP reassembly over two passes (so a
/// segment of a TLS record is known as such).
pub fn frames(file: &PathBuf, filter: &str, fields: &[&str]) -> Result<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-2", "-n", "-r"]).arg(file).args([
        "-d",
        &format!("tcp.port=={TUNNEL_PORT},tls"),
        "-Y",
        filter,
        "-T",
        "fields",
    ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let (status, stdout, stderr) = process::run(&mut cmd).context("cannot run tshark")?;
    if !status.success() {
        bail!("tshark -Y {filter:?}: {stderr}");
    }
    Ok(stdout.lines().map(str::to_owned).collect())
}
