//! `mesh-testpod`: what runs inside a lab pod for the end-to-end tests.
//!
//! Servers print `ready` once listening. Clients print `key=value` words and exit 0 when
//! every byte came back as sent, or print why not and exit 1. A watchdog ends any command
//! that hangs, so a broken data path fails a test instead of stalling it.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

mod bench;
mod grpc;
mod traces;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{Barrier, Semaphore},
};

/// Ends a client command that has not finished by then.
const WATCHDOG: Duration = Duration::from_secs(180);
const CHUNK: usize = 64 * 1024;
/// Connections `echo --connections` opens at once: thousands of SYNs at once overflow a
/// listener's backlog (the kernel's cap is 4,096), and a dropped SYN is sent again only 1, 3,
/// 7, ... 63 s later.
const OPENING_AT_ONCE: usize = 256;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server. Each connection first gets a banner line `local=<addr> peer=<addr>`,
    /// then everything it sends back, until it half-closes.
    Serve {
        /// `IP:PORT` or `IP:FIRST-LAST` (IPv6 in brackets); may be repeated.
        #[arg(long, required = true)]
        listen: Vec<String>,
        /// Also a sink on these: read and drop everything; at the end of the input, answer
        /// `received=<bytes>` and close.
        #[arg(long)]
        sink: Vec<String>,
        /// Also a source on these: read a decimal byte count and a newline, send that many
        /// bytes of the pattern, and close.
        #[arg(long)]
        source: Vec<String>,
        /// Also a holder on these: accept and keep each connection open, never reading.
        #[arg(long)]
        hold: Vec<String>,
        /// Also an HTTP server (HTTP/1.1 and h2c) on these: answers with `x-pod: <name>` and
        /// the request's body; `/status/N` answers N, `/sleep/MS` reads the body and answers
        /// with it only after MS ms.
        #[arg(long)]
        http: Vec<String>,
        /// The name the HTTP server answers with.
        #[arg(long, default_value = "pod")]
        name: String,
        /// The HTTP server answers every request with this status (a failing pod).
        #[arg(long)]
        always_status: Option<u16>,
        /// Also a gRPC server (h2c) on these: `/bench.Echo/Call` answers with its payload.
        #[arg(long)]
        grpc: Vec<String>,
        /// The HTTP server exports a span per traced request to this OTLP/gRPC collector
        /// (`http://ip:port`), as an instrumented app does.
        #[arg(long)]
        trace_to: Option<String>,
    },
    /// An OTLP/gRPC trace collector: prints `ready`, then appends each span it receives to
    /// `out` as a JSON line.
    Collect {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        out: PathBuf,
    },
    /// POSTs `bytes` bytes to `/echo` of an `--http` server over HTTP/1.1, waits `pause_ms`
    /// without reading, then reads the answer as a tokio app does (64 KiB reads, a short one
    /// taken for an empty socket): `received=<body bytes>`. Fails after 10 s without a byte.
    SlowPost {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: usize,
        #[arg(long)]
        pause_ms: u64,
    },
    /// Asks a `--source` server for `bytes` bytes, prints `ready`, waits `pause_ms` without
    /// reading, then reads and checks every byte: `received=<bytes>`.
    Download {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// A writer: prints `ready` once connected, then writes until a write fails, at most
    /// `limit` bytes; prints `flood=<EAGAIN, the error or limit> written=<bytes>`.
    Flood {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1 << 30)]
        limit: u64,
        /// Non-blocking writes: the first that would block ends it (`EAGAIN`).
        #[arg(long)]
        nonblocking: bool,
    },
    /// Sends `bytes` bytes of a pattern through an echo server and checks that they come back.
    Echo {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        /// Once connected, print `ready`, send half the bytes, and wait for this file to
        /// appear before sending the rest.
        #[arg(long)]
        pause_until: Option<PathBuf>,
        /// Echo over this many connections at once (all connected before any sends).
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    /// Connects to `ip` at every port of `ports` at once; each connection must reach the
    /// server listening on its own port, and echo its own bytes.
    Fanout {
        #[arg(long)]
        ip: IpAddr,
        /// `FIRST-LAST`.
        #[arg(long)]
        ports: String,
    },
    /// Opens a tunnel to an agent's inbound port as a peer agent would: TLS 1.3 with the given
    /// client certificate (DER; none if not given), HTTP/2, CONNECTs to `authority`. Prints
    /// `probe=status status=<code of the first>` and, for each status, `status_<code>=<count>`
    /// (`status_error` for streams that got none) if the agent answered, `probe=refused
    /// error=...` if not.
    Probe {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        authority: String,
        /// CONNECTs to send on the one connection, up to 50 at a time.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Open this many tunnels one after another, each with one CONNECT held open, and
        /// print `tunnels_ok=<n> tunnels_failed=<n>` (instead of sending `streams`).
        #[arg(long)]
        tunnels: Option<usize>,
        /// Reset each stream this long after it is answered (as a hostile peer does to make
        /// the agent dial and drop pods); without it, each answered stream is closed cleanly
        /// (its end sent, the pod's answer read to its end).
        #[arg(long)]
        reset_after_ms: Option<u64>,
    },
    /// An HTTP/1.1 request (GET unless told) of `url` (`http://ip:port/path?query`): prints
    /// `status=<code> content_type=<type>` on the first line, then the body.
    Get {
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "GET")]
        method: String,
    },
    /// Load for the benchmark: request/response latency, bulk throughput or new connections
    /// per second against a `serve` server.
    Bench(bench::Bench),
    /// Tries one connect and prints `connect=ok peer=<getpeername>` or
    /// `connect=<error kind>`.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
    },
}

fn main() -> ExitCode {
    mesh_agent::system::raise_fd_limit();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-testpod: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if let Cmd::Serve {
            listen,
            sink,
            source,
            hold,
            http,
            name,
            always_status,
            grpc,
            trace_to,
        } = &cli.command
        {
            let name: &'static str = Box::leak(name.clone().into_boxed_str());
            if let Some(url) = trace_to {
                traces::trace_to(url, name)?;
            }
            let always_status = *always_status;
            // Servers run until the test stops them.
            return serve(&[
                (listen, Role::Echo),
                (sink, Role::Sink),
                (source, Role::Source),
                (hold, Role::Hold),
                (
                    http,
                    Role::Http {
                        name,
                        always_status,
                    },
                ),
                (grpc, Role::Grpc),
            ])
            .await;
        }
        if let Cmd::Collect { listen, out } = &cli.command {
            return traces::collect(*listen, out).await;
        }
        match tokio::time::timeout(WATCHDOG, run(cli.command)).await {
            Ok(result) => result,
            Err(_) => bail!("watchdog: still running after {WATCHDOG:?}"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-testpod: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Serve { .. } | Cmd::Collect { .. } => bail!("servers run without the watchdog"),
        Cmd::SlowPost {
            connect,
            bytes,
            pause_ms,
        } => slow_post(connect, bytes, Duration::from_millis(pause_ms)).await,
        Cmd::Download {
            connect,
            bytes,
            pause_ms,
        } => download(connect, bytes, Duration::from_millis(pause_ms)).await,
        Cmd::Flood {
            connect,
            limit,
            nonblocking,
        } => flood(connect, limit, nonblocking),
        Cmd::Bench(bench) => bench.run().await,
        Cmd::Echo {
            connect,
            bytes,
            pause_until,
            connections,
        } => echo_all(connect, bytes, pause_until, connections).await,
        Cmd::Fanout { ip, ports } => fanout(ip, parse_range(&ports)?).await,
        Cmd::Probe {
            connect,
            cert,
            key,
            authority,
            streams,
            tunnels,
            reset_after_ms,
        } => {
            let client_cert = match (cert, key) {
                (Some(cert), Some(key)) => Some((std::fs::read(cert)?, std::fs::read(key)?)),
                _ => None,
            };
            let config = probe_config(client_cert)?;
            if let Some(tunnels) = tunnels {
                let (mut ok, mut failed, mut held) = (0, 0, Vec::new());
                for _ in 0..tunnels {
                    match open_tunnel(connect, config.clone(), &authority).await {
                        Ok(tunnel) => {
                            ok += 1;
                            held.push(tunnel);
                        }
                        Err(_) => failed += 1,
                    }
                }
                println!("tunnels_ok={ok} tunnels_failed={failed}");
                return Ok(());
            }
            let reset_after = reset_after_ms.map(Duration::from_millis);
            match probe(connect, config, &authority, streams, reset_after).await {
                Ok(statuses) => {
                    let first = statuses.first().map_or(0, |s| s.map_or(0, |s| s.as_u16()));
                    let mut counts = std::collections::BTreeMap::new();
                    for status in &statuses {
                        let key = status.map_or("error".to_owned(), |s| s.as_u16().to_string());
                        *counts.entry(key).or_insert(0) += 1;
                    }
                    let counts: Vec<String> = counts
                        .iter()
                        .map(|(k, n)| format!("status_{k}={n}"))
                        .collect();
                    println!("probe=status status={first} {}", counts.join(" "));
                }
                Err(e) => println!("probe=refused error={:?}", format!("{e:#}")),
            }
            Ok(())
        }
        Cmd::Get { url, method } => get(&url, &method).await,
        Cmd::Connect { addr } => {
            match TcpStream::connect(addr).await {
                Ok(stream) => println!("connect=ok peer={}", stream.peer_addr()?),
                Err(e) => println!("connect={:?}", e.kind()),
            }
            Ok(())
        }
    }
}

/// The byte at `offset` of every test payload: never constant over a chunk, so a lost,
/// repeated or reordered chunk shows.
fn pattern(offset: u64) -> u8 {
    ((offset % 251) as u8) ^ ((offset / 251) as u8)
}

/// What a server does with each connection.
#[derive(Clone, Copy)]
enum Role {
    Echo,
    Sink,
    Source,
    Hold,
    /// An HTTP server answering as this pod; with every request answered this status, if set.
    Http {
        name: &'static str,
        always_status: Option<u16>,
    },
    Grpc,
}

/// Fills `buf` with the pattern's bytes from `offset` on.
fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(offset + i as u64);
    }
}

/// Reads to the end, checking that every byte is the pattern's; returns how many came.
async fn read_pattern(rd: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Ok(received);
        }
        for (i, b) in buf[..n].iter().enumerate() {
            let offset = received + i as u64;
            ensure!(
                *b == pattern(offset),
                "byte {offset} came back as {b}, sent {}",
                pattern(offset)
            );
        }
        received += n as u64;
    }
}

async fn serve(specs: &[(&Vec<String>, Role)]) -> Result<()> {
    let mut listeners = Vec::new();
    for (list, role) in specs {
        for spec in list.iter() {
            let (ip, ports) = parse_listen(spec)?;
            for port in ports.0..=ports.1 {
                let addr = SocketAddr::new(ip, port);
                let socket = if ip.is_ipv6() {
                    tokio::net::TcpSocket::new_v6()?
                } else {
                    tokio::net::TcpSocket::new_v4()?
                };
                socket.set_reuseaddr(true)?;
                socket
                    .bind(addr)
                    .with_context(|| format!("cannot bind {addr}"))?;
                listeners.push((socket.listen(1024)?, *role));
            }
        }
    }
    println!("ready");
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, role) in listeners {
        tasks.spawn(accept_loop(listener, role));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, role: Role) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let served = match role {
                Role::Echo => echo_back(stream, peer).await,
                Role::Sink => sink_back(stream).await,
                Role::Source => source(stream).await,
                Role::Hold => hold(stream).await,
                Role::Http {
                    name,
                    always_status,
                } => serve_http(stream, name, always_status).await,
                Role::Grpc => grpc::serve(stream).await,
            };
            if let Err(e) = served {
                eprintln!("mesh-testpod serve: {peer}: {e:#}");
            }
        });
    }
}

/// Serves HTTP/1.1 or h2c on `stream` (see `serve --http`).
async fn serve_http(stream: TcpStream, name: &'static str, always: Option<u16>) -> Result<()> {
    use http_body_util::{BodyExt, Full};
    let service = hyper::service::service_fn(
        move |request: http::Request<hyper::body::Incoming>| async move {
            let start = std::time::SystemTime::now();
            let (headers, method) = (request.headers().clone(), request.method().clone());
            let path = request.uri().path().to_owned();
            let mut response = http::Response::new(Full::new(bytes::Bytes::new()));
            response
                .headers_mut()
                .insert("x-pod", http::HeaderValue::from_static(name));
            let status = always.or_else(|| path.strip_prefix("/status/")?.parse().ok());
            if let Some(code) = status {
                *response.status_mut() = http::StatusCode::from_u16(code).unwrap_or_default();
            } else {
                // `/sleep/MS` reads nothing for MS ms (a busy server holding back an upload).
                if let Some(ms) = path.strip_prefix("/sleep/") {
                    tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
                }
                let body = request.into_body().collect().await?.to_bytes();
                *response.body_mut() = Full::new(body);
            }
            let status = response.status().as_u16();
            traces::app_span(&headers, method.as_str(), &path, status, start);
            Ok::<_, hyper::Error>(response)
        },
    );
    hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// See `slow-post`.
async fn slow_post(connect: SocketAddr, bytes: usize, pause: Duration) -> Result<()> {
    let mut stream = TcpStream::connect(connect).await?;
    let head = format!("POST /echo HTTP/1.1\r\nhost: {connect}\r\ncontent-length: {bytes}\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut body = vec![0u8; bytes];
    fill_pattern(&mut body, 0);
    stream.write_all(&body).await?;
    tokio::time::sleep(pause).await;
    let mut answer = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let received = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no byte in 10 s after {} bytes", answer.len()))??;
        ensure!(n > 0, "the answer ended after {} bytes", answer.len());
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n")
            && answer.len() - (end + 4) >= bytes
        {
            ensure!(answer[end + 4..] == body[..], "the answer's body differs");
            break bytes;
        }
    };
    println!("received={received}");
    Ok(())
}

/// Sends as many pattern bytes as the client asks for, then closes.
async fn source(stream: TcpStream) -> Result<()> {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let bytes: u64 = line.trim().parse().context("not a byte count")?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        fill_pattern(&mut buf[..n], sent);
        stream.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    stream.shutdown().await?;
    Ok(())
}

/// Keeps the connection open without reading until the client closes it.
async fn hold(stream: TcpStream) -> Result<()> {
    stream.readable().await?;
    // Readable: data (never read) or the end; wait for the end without reading the data.
    loop {
        let mut probe = [0u8; 1];
        match stream.peek(&mut probe).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// See `Cmd::Download`.
async fn download(addr: SocketAddr, bytes: u64, pause: Duration) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(format!("{bytes}\n").as_bytes()).await?;
    println!("ready");
    tokio::time::sleep(pause).await;
    let received = read_pattern(&mut stream).await?;
    ensure!(received == bytes, "received {received} of {bytes} bytes");
    println!("received={received}");
    Ok(())
}

/// See `Cmd::Flood`.
fn flood(addr: SocketAddr, limit: u64, nonblocking: bool) -> Result<()> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nonblocking(nonblocking)?;
    println!("ready");
    let buf = vec![7u8; CHUNK];
    let mut written = 0u64;
    let outcome = loop {
        if written >= limit {
            break "limit".to_owned();
        }
        match stream.write(&buf) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break "EAGAIN".to_owned(),
            Err(e) => break format!("{:?}", e.to_string()),
        }
    };
    println!("flood={outcome} written={written}");
    Ok(())
}

/// Reads and drops everything, then says how much it was.
async fn sink_back(mut stream: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    stream
        .write_all(format!("received={received}\n").as_bytes())
        .await?;
    stream.shutdown().await?;
    Ok(())
}

async fn echo_back(mut stream: TcpStream, peer: SocketAddr) -> Result<()> {
    let local = stream.local_addr()?;
    stream
        .write_all(format!("local={local} peer={peer}\n").as_bytes())
        .await?;
    let (rd, mut wr) = stream.split();
    let mut rd = BufReader::with_capacity(CHUNK, rd);
    tokio::io::copy_buf(&mut rd, &mut wr).await?;
    wr.shutdown().await?;
    Ok(())
}

/// Runs `connections` echoes at once; prints the first one's banner, the bytes of all the
/// banners (their lengths differ with the ports in them), the bytes each echoed and the
/// addresses of every server (`server_ips`) and agent (`agent_ips`) seen.
async fn echo_all(
    addr: SocketAddr,
    bytes: u64,
    pause_until: Option<PathBuf>,
    connections: usize,
) -> Result<()> {
    let barrier = Arc::new(Barrier::new(connections));
    let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        tasks.spawn(echo(
            addr,
            bytes,
            pause_until.clone(),
            barrier.clone(),
            opening.clone(),
        ));
    }
    let mut banners = Vec::new();
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok(banner) => banners.push(banner),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {connections} connections failed; the first: {}",
        failures.len(),
        failures[0]
    );
    // The distinct addresses (without ports) of the servers reached and of the agents that
    // connected to them.
    let ips = |i: usize| -> String {
        let set: std::collections::BTreeSet<String> = banners
            .iter()
            .filter_map(|b| {
                let (_, addr) = b.split_whitespace().nth(i)?.split_once('=')?;
                Some(
                    addr.parse::<SocketAddr>()
                        .ok()?
                        .ip()
                        .to_canonical()
                        .to_string(),
                )
            })
            .collect();
        set.into_iter().collect::<Vec<_>>().join(",")
    };
    let first = &banners[0];
    let mut words = first.split_whitespace();
    let local = words.next().unwrap_or_default();
    let peer = words.next().unwrap_or_default();
    println!(
        "banner_{local} banner_{peer} banner_bytes={} echoed={bytes} connections={connections} server_ips={} agent_ips={}",
        banners.iter().map(String::len).sum::<usize>(),
        ips(0),
        ips(1),
    );
    Ok(())
}

/// One echo of `bytes` bytes, opened in its turn (`opening`); every byte must come back as
/// sent. Returns the server's banner.
async fn echo(
    addr: SocketAddr,
    bytes: u64,
    pause_until: Option<PathBuf>,
    barrier: Arc<Barrier>,
    opening: Arc<Semaphore>,
) -> Result<String> {
    let opened = async {
        let _turn = opening.acquire().await?;
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(CHUNK, rd);
        let mut banner = String::new();
        rd.read_line(&mut banner).await?;
        ensure!(banner.ends_with('\n'), "no banner from the server");
        anyhow::Ok((rd, wr, banner))
    }
    .await;
    // A connection that failed still counts at the barrier, so the others do not wait for it.
    barrier.wait().await;
    let (mut rd, mut wr, banner) = opened?;
    if pause_until.is_some() {
        println!("ready");
    }

    let mut writer = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        let half = bytes / 2;
        while sent < bytes {
            if let Some(path) = &pause_until
                && sent >= half
            {
                while !path.exists() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let limit = if pause_until.is_some() && sent < half {
                half
            } else {
                bytes
            };
            let n = usize::try_from((limit - sent).min(CHUNK as u64))?;
            fill_pattern(&mut buf[..n], sent);
            wr.write_all(&buf[..n]).await?;
            sent += n as u64;
        }
        wr.shutdown().await?;
        anyhow::Ok(())
    });

    let received = read_pattern(&mut rd).await?;
    if received != bytes {
        // A reset is reported to whichever call on the socket comes first; when that was the
        // writer's, the reader saw only the end. Say what the writer saw.
        let sending = match tokio::time::timeout(Duration::from_secs(1), &mut writer).await {
            Ok(Ok(Err(e))) => format!(" (sending: {e})"),
            _ => String::new(),
        };
        writer.abort();
        bail!("{received} of {bytes} bytes came back before the connection closed{sending}");
    }
    writer.await??;
    Ok(banner)
}

async fn fanout(ip: IpAddr, (first, last): (u16, u16)) -> Result<()> {
    let count = usize::from(last - first) + 1;
    let barrier = Arc::new(Barrier::new(count));
    let mut tasks = tokio::task::JoinSet::new();
    for port in first..=last {
        let barrier = barrier.clone();
        tasks.spawn(async move {
            let opened = open_and_check(SocketAddr::new(ip, port)).await;
            // Every connection stays open until all are: they are concurrent for real.
            barrier.wait().await;
            let mut stream = opened?;
            let token = u64::from(port).to_le_bytes();
            stream.write_all(&token).await?;
            let mut back = [0u8; 8];
            stream.read_exact(&mut back).await?;
            ensure!(
                back == token,
                "port {port}: echoed {back:?}, sent {token:?}"
            );
            anyhow::Ok(())
        });
    }
    let mut ok = 0;
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok(()) => ok += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    println!("connections={count} ok={ok}");
    match first_error {
        Some(e) => Err(e.context(format!("{} of {count} connections failed", count - ok))),
        None => Ok(()),
    }
}

/// Connects and checks that the server that answered listens on the port dialled.
async fn open_and_check(addr: SocketAddr) -> Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let mut stream = BufReader::new(stream);
    let mut banner = String::new();
    stream.read_line(&mut banner).await?;
    let local = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("local="))
        .context("no banner")?;
    let local: SocketAddr = local.parse()?;
    ensure!(
        local.port() == addr.port(),
        "dialled port {} but reached the server on {local}",
        addr.port()
    );
    Ok(stream)
}

fn parse_listen(spec: &str) -> Result<(IpAddr, (u16, u16))> {
    let (host, ports) = spec
        .rsplit_once(':')
        .with_context(|| format!("{spec:?}: expected IP:PORT or IP:FIRST-LAST"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().with_context(|| format!("{spec:?}: bad IP"))?;
    let range = if ports.contains('-') {
        parse_range(ports)?
    } else {
        let p = ports.parse()?;
        (p, p)
    };
    Ok((ip, range))
}

fn parse_range(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("{s:?}: expected FIRST-LAST"))?;
    let (a, b): (u16, u16) = (a.parse()?, b.parse()?);
    ensure!(a <= b, "{s:?}: empty range");
    Ok((a, b))
}

/// CONNECTs through an agent's inbound tunnel port, `streams` of them on one connection (50 at
/// a time), each reset `reset_after` it is answered or else closed cleanly; each one's status
/// (`None` for a stream that got none). The agent's own certificate is not checked (the probe
/// tests the agent's checks of its clients).
async fn probe(
    agent: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    authority: &str,
    streams: usize,
    reset_after: Option<Duration>,
) -> Result<Vec<Option<http::StatusCode>>> {
    let (sender, connection) = tunnel_handshake(agent, config).await?;
    let driver = tokio::spawn(connection);
    let connect = move |mut sender: hyper::client::conn::http2::SendRequest<_>| {
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(http_body_util::Empty::<bytes::Bytes>::new());
        async move {
            let response = sender.send_request(request.ok()?).await.ok()?;
            let status = response.status();
            if status.is_success()
                && let Ok(stream) = hyper::upgrade::on(response).await
            {
                let mut stream = hyper_util::rt::TokioIo::new(stream);
                match reset_after {
                    Some(after) => tokio::time::sleep(after).await,
                    None => {
                        let _ = stream.shutdown().await;
                        let mut rest = Vec::new();
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            stream.read_to_end(&mut rest),
                        )
                        .await;
                    }
                }
            }
            Some(status)
        }
    };
    // The first answer says whether the connection is any good.
    let first = connect(sender.clone())
        .await
        .context("the first CONNECT got no answer")?;
    let mut statuses = vec![Some(first)];
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 1..streams {
        if tasks.len() == 50
            && let Some(done) = tasks.join_next().await
        {
            statuses.push(done?);
        }
        tasks.spawn(connect(sender.clone()));
    }
    while let Some(done) = tasks.join_next().await {
        statuses.push(done?);
    }
    driver.abort();
    Ok(statuses)
}

/// A client config with `client_cert` (DER certificate and PKCS#8 key; none if `None`) that
/// accepts any server certificate.
fn probe_config(client_cert: Option<(Vec<u8>, Vec<u8>)>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

type TunnelSender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// TLS and HTTP/2 with an agent's inbound port: the request sender and the connection to drive.
async fn tunnel_handshake(
    agent: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(
    TunnelSender,
    impl std::future::Future<Output = hyper::Result<()>> + Send + 'static,
)> {
    let tcp = TcpStream::connect(agent).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::IpAddress(agent.ip().into()),
            tcp,
        )
        .await?;
    Ok(hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?)
}

/// A tunnel with one CONNECT to `authority` answered 2xx and held open (until dropped).
async fn open_tunnel(
    agent: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    authority: &str,
) -> Result<(
    tokio::task::JoinHandle<hyper::Result<()>>,
    hyper::upgrade::Upgraded,
)> {
    let (mut sender, connection) = tunnel_handshake(agent, config).await?;
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    ensure!(response.status().is_success(), "{}", response.status());
    Ok((driver, hyper::upgrade::on(response).await?))
}

/// Accepts whatever certificate the server shows, checking only its signatures.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn get(url: &str, method: &str) -> Result<()> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url.parse()?;
    let authority = uri
        .authority()
        .context("the URL has no host:port")?
        .as_str();
    let tcp = TcpStream::connect(authority).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(uri.clone())
        .header(http::header::HOST, authority)
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .replace(' ', "");
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    println!("status={status} content_type={content_type}");
    print!("{}", String::from_utf8_lossy(&body));
    Ok(())
}
