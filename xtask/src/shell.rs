//! Running commands and reporting progress.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Prints a task's start; [`Step::done`] prints how long it took.
pub struct Step {
    name: String,
    started: Instant,
}

impl Step {
    pub fn start(name: impl Into<String>) -> Self {
        let name = name.into();
        eprintln!("==> {name}");
        Self {
            name,
            started: Instant::now(),
        }
    }

    pub fn done(self) {
        eprintln!(
            "==> {}: done in {}",
            self.name,
            human(self.started.elapsed())
        );
    }
}

/// A duration as people read it: `850 ms`, `12.3 s`, `4 min 05 s`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1.0 {
        format!("{} ms", d.as_millis())
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        format!("{} min {:02} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// Runs `cmd` with inherited output; fails with the command line if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    eprintln!("    $ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its standard output, or `None` if it fails or is missing.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command as a shell line.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fails unless this process runs as root: `cargo xtask <task>` makes network namespaces
/// and loads eBPF programs.
pub fn require_root(task: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {task}` makes network namespaces and loads eBPF programs: \
             run it as root (sudo -E cargo xtask {task})"
        );
    }
    Ok(())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// Kills a process and every process below it if it outlives its time, unless stopped first:
/// a hung run must fail, not hold CI until CI's own limit.
pub struct Watchdog {
    finished: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    /// Watches process `pid` (called `what` when it is killed) for `limit`.
    pub fn start(what: &'static str, limit: Duration, pid: u32) -> Self {
        let finished = Arc::new(AtomicBool::new(false));
        let thread = {
            let finished = finished.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                while !finished.load(Ordering::Relaxed) {
                    if started.elapsed() > limit {
                        eprintln!("{what} ran past {limit:?}: killing it and what it started");
                        kill_tree(pid);
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        Self { finished, thread }
    }

    /// The process ended in time.
    pub fn stop(self) {
        self.finished.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Kills `root` and every process below it.
fn kill_tree(root: u32) {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut doomed = vec![root];
    let mut i = 0;
    while let Some(&pid) = doomed.get(i) {
        doomed.extend(parents.iter().filter(|(_, p)| *p == pid).map(|(c, _)| *c));
        i += 1;
    }
    for pid in doomed {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}
