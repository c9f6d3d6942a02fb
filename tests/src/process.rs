//! Bounded waits on child processes: every wait has a limit after which the child is killed
//! and the caller fails saying what the child had printed.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};

/// How long a process that should end by itself may run before the test gives up on it.
pub const EXIT_LIMIT: Duration = Duration::from_secs(180);

/// How long the reader of a killed process's output waits for what is left in the pipe (a
/// grandchild may hold it open).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Reads `source` to its end on a thread of its own; the text arrives on the receiver.
pub fn read_to_end(mut source: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = source.read_to_end(&mut bytes);
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

/// What a reader from [`read_to_end`] got, waiting at most `limit`.
pub fn collect(text: Option<mpsc::Receiver<String>>, limit: Duration) -> String {
    text.and_then(|rx| rx.recv_timeout(limit).ok())
        .unwrap_or_default()
}

/// Waits at most `limit` for `child` to exit; past it, kills it and says so.
pub fn wait_within(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits at most `limit` for `child` (its stdout and stderr piped) to exit and returns its
/// status and output; a child still running then is killed and the error holds its output.
pub fn finish(mut child: Child, limit: Duration) -> Result<(ExitStatus, String, String)> {
    let stdout = child.stdout.take().map(read_to_end);
    let stderr = child.stderr.take().map(read_to_end);
    match wait_within(&mut child, limit) {
        Ok(status) => Ok((
            status,
            collect(stdout, EXIT_LIMIT),
            collect(stderr, EXIT_LIMIT),
        )),
        Err(e) => Err(anyhow!(
            "{e}\n--- its stdout ---\n{}\n--- its stderr ---\n{}",
            collect(stdout, DRAIN_LIMIT),
            collect(stderr, DRAIN_LIMIT)
        )),
    }
}

/// Runs `cmd` (stdin empty, stdout and stderr piped) to its end, at most [`EXIT_LIMIT`]:
/// its status and output.
pub fn run(cmd: &mut Command) -> Result<(ExitStatus, String, String)> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    finish(child, EXIT_LIMIT)
}

/// Reads the first line of `stdout` within `limit`; the reader comes back for later reads.
pub fn first_line(
    stdout: BufReader<ChildStdout>,
    limit: Duration,
) -> Result<(String, BufReader<ChildStdout>)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = stdout;
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send((line, stdout));
    });
    rx.recv_timeout(limit)
        .map_err(|_| anyhow!("printed no line within {limit:?}"))
}
