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

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::Barrier,
};

/// Ends a client command that has not finished by then.
const WATCHDOG: Duration = Duration::from_secs(180);
const CHUNK: usize = 64 * 1024;

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
    /// Tries one connect and prints `connect=ok` or `connect=<error kind>`.
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
        if let Cmd::Serve { listen } = &cli.command {
            // Servers run until the test stops them.
            return serve(listen).await;
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
        Cmd::Serve { listen } => serve(&listen).await,
        Cmd::Echo {
            connect,
            bytes,
            pause_until,
        } => echo(connect, bytes, pause_until).await,
        Cmd::Fanout { ip, ports } => fanout(ip, parse_range(&ports)?).await,
        Cmd::Connect { addr } => {
            match TcpStream::connect(addr).await {
                Ok(_) => println!("connect=ok"),
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

async fn serve(listen: &[String]) -> Result<()> {
    let mut listeners = Vec::new();
    for spec in listen {
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
            listeners.push(socket.listen(1024)?);
        }
    }
    println!("ready");
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        tasks.spawn(accept_loop(listener));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = echo_back(stream, peer).await {
                eprintln!("mesh-testpod serve: {peer}: {e:#}");
            }
        });
    }
}

async fn echo_back(mut stream: TcpStream, peer: SocketAddr) -> Result<()> {
    let local = stream.local_addr()?;
    stream
        .write_all(format!("local={local} peer={peer}\n").as_bytes())
        .await?;
    let (mut rd, mut wr) = stream.split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await?;
    Ok(())
}

async fn echo(addr: SocketAddr, bytes: u64, pause_until: Option<PathBuf>) -> Result<()> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(CHUNK, rd);
    let mut banner = String::new();
    rd.read_line(&mut banner).await?;
    ensure!(banner.ends_with('\n'), "no banner from the server");
    let banner_len = banner.len();
    if pause_until.is_some() {
        println!("ready");
    }

    let writer = tokio::spawn(async move {
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
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            wr.write_all(&buf[..n]).await?;
            sent += n as u64;
        }
        wr.shutdown().await?;
        anyhow::Ok(())
    });

    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            break;
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
    if received != bytes {
        writer.abort();
        bail!("{received} of {bytes} bytes came back before the connection closed");
    }
    writer.await??;
    let mut words = banner.split_whitespace();
    let local = words.next().unwrap_or_default();
    let peer = words.next().unwrap_or_default();
    println!("banner_{local} banner_{peer} banner_bytes={banner_len} echoed={received}");
    Ok(())
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
