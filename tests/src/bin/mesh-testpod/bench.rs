//! `mesh-testpod bench`: load against a `serve` server, measured from the client. Prints
//! `key=value` words: latencies in microseconds, rates per second, throughput in MiB/s.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

const CHUNK: usize = 64 * 1024;

/// What to measure.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    /// Request/response on long-lived connections: `size` bytes out, the same back.
    Rr,
    /// One connection per request: connect, `size` bytes out and back, close.
    Connect,
    /// `bytes` bytes to an echo server and back at once.
    BulkBoth,
    /// `bytes` bytes one way, to a sink.
    BulkOne,
    /// `bytes` bytes to an echo server while not reading for `pause_ms`, then everything
    /// back: `held_mib` is how much the host's TCP memory grew meanwhile (a slow reader).
    PausedEcho,
    /// HTTP/1.1 keep-alive requests to a `serve --http` server: a POST of `size` bytes, the
    /// same back.
    Http,
    /// Unary gRPC calls to a `serve --grpc` server, `size` bytes each way: `connections`
    /// callers share one HTTP/2 connection, as a gRPC channel's do.
    Grpc,
}

#[derive(Debug, clap::Args)]
pub struct Bench {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Message size for `rr`, `connect`, `http` and `grpc`.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Connections (or, for `connect`, workers; for `grpc`, callers) at once.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests per connection (`rr`, `http`), worker (`connect`) or caller (`grpc`).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Bytes for the bulk modes.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// For `rr`: a sink that a bulk transfer fills from another thread meanwhile, so the
    /// round trips share the path (and the tunnel) with it.
    #[arg(long)]
    load: Option<SocketAddr>,
    /// For `paused-echo`: how long the reader pauses.
    #[arg(long, default_value_t = 3000)]
    pause_ms: u64,
}

impl Bench {
    pub async fn run(self) -> Result<()> {
        match self.mode {
            Mode::Rr | Mode::Connect | Mode::Http | Mode::Grpc => {
                let load = self.load.map(Load::start).transpose()?;
                let measured = self.requests().await;
                if let Some(load) = load {
                    load.stop()?;
                }
                measured
            }
            Mode::BulkBoth | Mode::BulkOne => self.bulk().await,
            Mode::PausedEcho => self.paused_echo().await,
        }
    }

    async fn paused_echo(&self) -> Result<()> {
        let (mut rd, mut wr, _) = open(self.connect).await?;
        let bytes = self.bytes;
        let before = tcp_memory_pages()?;
        let writer = tokio::spawn(async move { send(&mut wr, bytes).await });
        let pause = Instant::now();
        let mut peak = before;
        while pause.elapsed() < Duration::from_millis(self.pause_ms) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak = peak.max(tcp_memory_pages()?);
        }
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        writer.await??;
        ensure!(received == bytes, "{received} of {bytes} bytes came back");
        let held = peak.saturating_sub(before) as f64 * 4096.0 / f64::from(1 << 20);
        println!("bytes={bytes} held_mib={held:.1}");
        Ok(())
    }

    async fn requests(&self) -> Result<()> {
        let started = Instant::now();
        let mut latencies = Vec::new();
        if let Mode::Grpc = self.mode {
            latencies =
                crate::grpc::calls(self.connect, self.size, self.connections, self.requests)
                    .await?;
        } else {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..self.connections {
                let (addr, size, requests, mode) =
                    (self.connect, self.size, self.requests, self.mode);
                tasks.spawn(async move {
                    match mode {
                        Mode::Rr => rr(addr, size, requests).await,
                        Mode::Http => http(addr, size, requests).await,
                        _ => connects(addr, size, requests).await,
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                latencies.extend(done??);
            }
        }
        let wall = started.elapsed();
        latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
            latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        println!(
            "requests={} p50_us={:.1} p99_us={:.1} p999_us={:.1} per_second={:.0}",
            latencies.len(),
            at(0.5),
            at(0.99),
            at(0.999),
            latencies.len() as f64 / wall.as_secs_f64()
        );
        Ok(())
    }

    async fn bulk(&self) -> Result<()> {
        let (mut rd, mut wr, _) = open(self.connect).await?;
        let bytes = self.bytes;
        let started = Instant::now();
        let writer = tokio::spawn(async move { send(&mut wr, bytes).await });
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        // A sink answers only once, at the end: what it says is kept.
        let mut reply = Vec::new();
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            received += n as u64;
            if matches!(self.mode, Mode::BulkOne) {
                reply.extend_from_slice(&buf[..n]);
            }
        }
        writer.await??;
        let wall = started.elapsed();
        match self.mode {
            Mode::BulkOne => {
                let reply = String::from_utf8_lossy(&reply);
                ensure!(
                    reply.trim_end() == format!("received={bytes}"),
                    "the sink says {reply:?}"
                );
            }
            _ => ensure!(received == bytes, "{received} of {bytes} bytes came back"),
        }
        let mib = bytes as f64 / f64::from(1 << 20);
        println!(
            "bytes={bytes} seconds={:.3} mib_per_second={:.1}",
            wall.as_secs_f64(),
            mib / wall.as_secs_f64()
        );
        Ok(())
    }
}

/// `TCP: ... mem N` of /proc/net/sockstat: the host's TCP memory in pages (one count for the
/// whole host, whatever the network namespace).
fn tcp_memory_pages() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    text.lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|n| n.parse().ok())
        .context("no TCP memory in /proc/net/sockstat")
}

/// A bulk transfer to a sink on a thread of its own, until stopped.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<std::io::Result<u64>>,
}

impl Load {
    fn start(sink: SocketAddr) -> Result<Self> {
        use std::{io::Write, sync::atomic::Ordering};
        let mut stream = std::net::TcpStream::connect(sink)
            .with_context(|| format!("cannot connect to {sink}"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let buf = vec![0x5au8; CHUNK];
            let mut sent = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                stream.write_all(&buf)?;
                sent += CHUNK as u64;
            }
            Ok(sent)
        });
        // Let it fill the path before the round trips start.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { stop, thread })
    }

    fn stop(self) -> Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        ensure!(sent > 0, "the load sent nothing");
        Ok(())
    }
}

/// Writes `bytes` bytes, then ends the stream.
async fn send(wr: &mut Writer, bytes: u64) -> Result<()> {
    let buf = vec![0x5au8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        wr.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    wr.shutdown().await?;
    Ok(())
}

type Reader = BufReader<tokio::net::tcp::OwnedReadHalf>;
type Writer = tokio::net::tcp::OwnedWriteHalf;

/// Connects and reads the server's banner line (an echo server's; a sink sends none).
async fn open(addr: SocketAddr) -> Result<(Reader, Writer, bool)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(CHUNK, rd);
    // The echo server speaks first; a sink never does. Wait briefly for a banner.
    let mut banner = String::new();
    let spoke = tokio::time::timeout(Duration::from_millis(200), rd.read_line(&mut banner))
        .await
        .is_ok();
    Ok((rd, wr, spoke))
}

/// `requests` request/response rounds on one connection; the latency of each.
async fn rr(addr: SocketAddr, size: usize, requests: usize) -> Result<Vec<Duration>> {
    let (mut rd, mut wr, _) = open(addr).await?;
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        wr.write_all(&out).await?;
        rd.read_exact(&mut back).await?;
        latencies.push(t.elapsed());
    }
    Ok(latencies)
}

/// `requests` HTTP/1.1 requests on one keep-alive connection; the latency of each to the end
/// of its response.
async fn http(addr: SocketAddr, size: usize, requests: usize) -> Result<Vec<Duration>> {
    use http_body_util::{BodyExt, Full};
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let body = bytes::Bytes::from(vec![0x5au8; size]);
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        let request = http::Request::post("/echo")
            .header(http::header::HOST, "bench")
            .body(Full::new(body.clone()))?;
        let response = sender.send_request(request).await?;
        ensure!(
            response.status().is_success(),
            "answered {}",
            response.status()
        );
        let back = response.into_body().collect().await?.to_bytes();
        ensure!(
            back.len() == size,
            "{} of {size} bytes came back",
            back.len()
        );
        latencies.push(t.elapsed());
    }
    Ok(latencies)
}

/// `requests` connections one after another, each one round; the latency of each from the
/// connect to the answer.
async fn connects(addr: SocketAddr, size: usize, requests: usize) -> Result<Vec<Duration>> {
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut banner = String::new();
        rd.read_line(&mut banner).await?;
        wr.write_all(&out).await?;
        rd.read_exact(&mut back).await?;
        latencies.push(t.elapsed());
    }
    Ok(latencies)
}
