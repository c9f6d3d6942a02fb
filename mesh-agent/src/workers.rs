//! The data path's threads (by default one per core, `--worker-threads`), each a
//! current-thread runtime that accepts on the shared listening sockets and runs every
//! connection it accepted to its end, with tunnel and upstream pools of its own. A
//! connection's tasks (its copy loop, its tunnel's HTTP/2 connection, its pooled upstream) so
//! wake one another on one thread, never across threads.
//! The control plane (config, certificates, admin API) stays on the main runtime.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    thread::{self, JoinHandle},
};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// What a worker thread runs until it stops accepting, built on the thread (its sockets
/// register with that thread's runtime) from what was made for that thread.
pub type Serve<T> = Arc<dyn Fn(T) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

/// The running worker threads.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    stopped_accepting: Vec<oneshot::Receiver<()>>,
    end: CancellationToken,
}

impl Workers {
    /// Starts a thread for each of `per_thread`, each running `serve` of its own and then
    /// the connections it accepted until [`Workers::end`].
    pub fn start<T: Send + 'static>(per_thread: Vec<T>, serve: Serve<T>) -> io::Result<Self> {
        let end = CancellationToken::new();
        let mut threads = Vec::with_capacity(per_thread.len());
        let mut stopped_accepting = Vec::with_capacity(per_thread.len());
        for (index, own) in per_thread.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stopped, stopped_rx) = oneshot::channel();
            let (serve, end) = (serve.clone(), end.clone());
            let thread = thread::Builder::new()
                .name(format!("mesh-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(async {
                        serve(own).await;
                        let _ = stopped.send(());
                        // Its connections go on (the grace period) until the agent ends.
                        end.cancelled().await;
                    });
                })?;
            threads.push(thread);
            stopped_accepting.push(stopped_rx);
        }
        Ok(Self {
            threads,
            stopped_accepting,
            end,
        })
    }

    /// Waits until every thread has stopped accepting (the agent's stop token was cancelled).
    pub async fn stopped_accepting(&mut self) {
        for stopped in self.stopped_accepting.drain(..) {
            if stopped.await.is_err() {
                warn!("a worker thread ended before it stopped accepting");
            }
        }
    }

    /// Ends the threads: the connections still on them are dropped (closed).
    pub fn end(self) {
        self.end.cancel();
        for thread in self.threads {
            if thread.join().is_err() {
                warn!("a worker thread panicked");
            }
        }
    }
}

/// How many worker threads to run: one per core this process may use.
pub fn per_core() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        io::Read,
        net::{TcpListener, TcpStream},
        os::fd::{AsFd, OwnedFd},
        time::Duration,
    };

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Two workers accept on one listening socket, each serving what it accepted on its own
    /// thread (it answers with that thread's name), until told to stop accepting.
    #[tokio::test]
    async fn workers_share_a_listener_and_serve_on_their_own_threads() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let per_thread: Vec<(OwnedFd, CancellationToken)> = (0..2)
            .map(|_| (listener.as_fd().try_clone_to_owned().unwrap(), stop.clone()))
            .collect();
        let serve: Serve<(OwnedFd, CancellationToken)> = Arc::new(|(fd, stop)| {
            Box::pin(async move {
                let listener = tokio::net::TcpListener::from_std(TcpListener::from(fd)).unwrap();
                loop {
                    let (mut conn, _) = tokio::select! {
                        accepted = listener.accept() => accepted.unwrap(),
                        () = stop.cancelled() => return,
                    };
                    tokio::spawn(async move {
                        let name = thread::current().name().unwrap_or_default().to_owned();
                        conn.write_all(name.as_bytes()).await.unwrap();
                    });
                }
            })
        });
        let mut workers = Workers::start(per_thread, serve).unwrap();

        let served_by: HashSet<String> = tokio::task::spawn_blocking(move || {
            (0..200)
                .map(|_| {
                    let mut conn = TcpStream::connect(addr).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut name = String::new();
                    conn.read_to_string(&mut name).unwrap();
                    name
                })
                .collect()
        })
        .await
        .unwrap();
        assert!(
            served_by.iter().all(|n| n.starts_with("mesh-worker-")),
            "{served_by:?}"
        );

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), workers.stopped_accepting())
            .await
            .expect("both workers stop accepting");
        workers.end();
    }
}
