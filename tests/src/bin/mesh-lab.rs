//! `mesh-lab`, run by `cargo xtask lab`: the demo. Two nodes and a small shop of pods in
//! network namespaces, the real agents and eBPF programs, a burst of traffic, and what the
//! mesh did with it. `up` leaves such a lab running for exploration; `down` removes it.

use std::{collections::BTreeMap, net::IpAddr, process::ExitCode, time::Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mesh_agent::datapath::counters::Counters;
use mesh_common::Counter;
use mesh_tests::{
    Agent, Daemon, Lab, LabSpec, Running, ServiceSpec, catch_interrupt,
    curl::{CurlLoop, failures},
    interrupted, sum,
};

/// The shop: services, their addresses and the pods behind them. `web` on n1 calls them all.
const SERVICES: [(&str, &str, &[&str]); 3] = [
    ("cart", "198.19.0.10", &["cart-0", "cart-1"]),
    ("orders", "198.19.0.11", &["orders-0"]),
    ("catalog", "198.19.0.12", &["catalog-0"]),
];
/// Where each backend pod runs.
const PODS: [(&str, &str); 6] = [
    ("cart-0", "n1"),
    ("catalog-0", "n1"),
    ("payments-0", "n1"),
    ("cart-1", "n2"),
    ("orders-0", "n2"),
    ("payments-1", "n2"),
];
/// The HTTP services (every pod also serves HTTP on 8081, exporting its spans): `cart-api`
/// over cart-0 (v1) and cart-1 (v2), split 90/10, `/slow/...` within 200 ms, `x-version: v2`
/// to v2, `/checkout` to v2 at [`CHECKOUTS_PER_MINUTE`] per caller; `payments` over payments-0 and
/// payments-1, which always fails, behind retries; `catalog-api` over catalog-0 behind a
/// circuit breaker of [`CATALOG_CAP`] requests in flight.
const CART_API: &str = "198.19.0.20";
const PAYMENTS: &str = "198.19.0.21";
const CATALOG_API: &str = "198.19.0.22";
/// `orders-api` over orders-0 (a meshed workload, strict): web may read orders (GET) and use
/// the orders echo service, nothing else; nothing outside the mesh reaches orders-0.
const ORDERS_API: &str = "198.19.0.23";
const ORDERS_POLICY: &str = "\
authorization:
  strict: { namespaces: [lab] }
  policies:
    - name: orders-readers
      namespace: lab
      target: { service: orders-api }
      action: allow
      rules:
        - { from: [{ principals: [spiffe://lab.mesh/ns/lab/sa/web] }], to: [{ methods: [GET] }] }
        - { from: [{ principals: [spiffe://lab.mesh/ns/lab/sa/web] }], to: [{ ports: [8080] }] }";
const CATALOG_CAP: usize = 4;
/// The burst against catalog-api: requests, and how many at once (h2load's connections).
const BURST: (usize, usize) = (400, 16);
const CART_API_ROUTES: &str = "[\
    { name: slow, matches: [{ path: { prefix: /sleep } }], timeout: 200ms }, \
    { name: v2, matches: [{ headers: [{ name: x-version, value: v2 }] }], backends: [{ subset: { version: v2 } }] }, \
    { name: checkout, matches: [{ path: { prefix: /checkout } }], backends: [{ subset: { version: v2 } }] }, \
    { name: browse, backends: [{ subset: { version: v1 }, weight: 90 }, { subset: { version: v2 }, weight: 10 }] }]";
const PAYMENTS_ROUTES: &str = "[{ name: pay, retry: { attempts: 3, on: [gateway-error], backoff: 5ms, budget_percent: 100 } }]";
const HTTP_REQUESTS: usize = 200;
/// cart-api's checkout route takes this many requests a minute from each caller.
const CHECKOUTS_PER_MINUTE: usize = 5;
/// Where the agents and the apps send their spans: an OTLP collector on n1.
const COLLECTOR: &str = "198.18.0.1:4317";
/// Where n1's agent dials n1's pods from; n2's agent comes from n2's bridge.
const N1_POD_BRIDGE: &str = "198.18.1.1";
/// A third party outside the mesh: the courier's API (openssl's TLS server, a CA of its own)
/// at 198.18.0.201, its name served by dnsmasq at 198.18.0.202. The shop declares it: orders
/// speaks plain HTTP to it, the agent originates TLS.
const COURIER: &str = "api.courier.example";
const COURIER_ADDRESS: &str = "198.18.0.201";
const DNS_SERVER: &str = "198.18.0.202";
const CONNECTIONS_PER_SERVICE: usize = 20;
/// Calls during the upgrade step, at 100 a second.
const UPGRADE_REQUESTS: usize = 400;
const BYTES_PER_CONNECTION: u64 = 256 * 1024;

/// The mesh lab: two nodes of a small shop, with an agent each.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the lab and leave it running, with commands to explore it.
    Up,
    /// Remove the lab `up` left running.
    Down,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        None => demo(),
        Some(Cmd::Up) => up(),
        Some(Cmd::Down) => down(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a step's start, and its end with how long it took.
fn step<T>(name: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let out = work()?;
    eprintln!(
        "==> {name}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn shop() -> LabSpec {
    let mut spec = LabSpec::default()
        .node("n1")
        .node("n2")
        .outside("courier")
        .outside("dns")
        .setting(&format!("dns_servers: [\"{DNS_SERVER}:53\"]"))
        .pod("n1", "web", true)
        .setting(&format!(
            "tracing: {{ otlp_endpoint: 'http://{COLLECTOR}', sampling: 1.0 }}"
        ))
        .setting(ORDERS_POLICY);
    for (pod, node) in PODS {
        spec = spec.pod(node, pod, pod == "orders-0");
    }
    for (name, vip, endpoints) in SERVICES {
        spec = spec.service(ServiceSpec::echo(name, &[vip], endpoints));
    }
    let http = |name: &str, vip: &str, endpoints: &[&str], routes: &str| ServiceSpec {
        target_port: 8081,
        ..ServiceSpec::echo(name, &[vip], endpoints).http("http", Some(routes))
    };
    spec.service(
        http("cart-api", CART_API, &["cart-0", "cart-1"], CART_API_ROUTES)
            .label("cart-0", "{ version: v1 }")
            .label("cart-1", "{ version: v2 }")
            .port_field(&format!(
                "rate_limits: {{ local: [{{ requests: {CHECKOUTS_PER_MINUTE}, per: 1m, route: checkout, per_source: true }}] }}"
            )),
    )
    .service(http(
        "payments",
        PAYMENTS,
        &["payments-0", "payments-1"],
        PAYMENTS_ROUTES,
    ))
    .service(
        http("catalog-api", CATALOG_API, &["catalog-0"], "[]").port_field(&format!(
            "circuit_breakers: {{ max_requests: {CATALOG_CAP} }}"
        )),
    )
    .service(http("orders-api", ORDERS_API, &["orders-0"], "[]"))
}

/// The shop with the courier declared (its CA `ca_pem`) under the outbound `policy`.
fn with_courier(ca_pem: &str, policy: &str) -> LabSpec {
    shop().setting(&format!(
        "egress: {{ outbound_policy: {policy}, hosts: [{{ names: [{COURIER}], ports: [{{ port: 80, protocol: http, tls: originate }}], ca_certificates: {ca_pem:?} }}] }}"
    ))
}

/// A started shop: the agents of n1 and n2, the backends' servers, the courier and the DNS
/// server outside the mesh, and the courier's CA.
struct Shop {
    agents: [Agent; 2],
    servers: Vec<Running>,
    outside: Vec<Daemon>,
    courier_ca: String,
}

fn start(lab: &Lab) -> Result<Shop> {
    let spans = lab.scratch_path("spans.jsonl").display().to_string();
    let collector =
        lab.spawn_on_node("n1", &["collect", "--listen", COLLECTOR, "--out", &spans])?;
    let (pem, courier_ca) = lab.third_party_pem("courier", &[COURIER])?;
    let hosts = lab.write_file("hosts", &format!("{COURIER_ADDRESS} {COURIER}\n"))?;
    let outside = vec![
        lab.start_tls_server("courier", &pem)?,
        lab.start_dns_server("dns", &hosts)?,
    ];
    let spec = with_courier(&courier_ca, "allow_any");
    let agents = [
        lab.start_agent_with_config("n1", &lab.agent_config_for(&spec, "n1")?, &[])?,
        lab.start_agent_with_config("n2", &lab.agent_config_for(&spec, "n2")?, &[])?,
    ];
    for (agent, node) in agents.iter().zip(["n1", "n2"]) {
        eprintln!(
            "    agent of {node} is up (pid {}): outbound :15001, mTLS tunnel :15008",
            agent.pid()
        );
    }
    let servers = PODS
        .iter()
        .map(|(pod, _)| {
            let trace_to = format!("http://{COLLECTOR}");
            let mut args = vec!["serve", "--listen", "[::]:8080", "--http", "[::]:8081"];
            args.extend(["--name", pod, "--trace-to", &trace_to]);
            if *pod == "payments-1" {
                args.extend(["--always-status", "503"]);
            }
            lab.spawn(pod, &args)
        })
        .chain([Ok(collector)])
        .collect::<Result<Vec<_>>>()?;
    Ok(Shop {
        agents,
        servers,
        outside,
        courier_ca,
    })
}

const LAB_TITLE: &str = "lab: nodes n1 and n2 with a CA; web (meshed), cart-0, catalog-0, \
                         payments-0 on n1; cart-1, orders-0, payments-1 on n2; a courier API \
                         and a DNS server outside the mesh";

fn demo() -> Result<()> {
    catch_interrupt();
    let (lab, mut shop) = step(LAB_TITLE, || {
        let lab = Lab::new(shop()).context("cannot build the lab")?;
        let shop = start(&lab)?;
        Ok((lab, shop))
    })?;
    let [n1, n2] = &shop.agents;

    let before = counters(&n1.node_name)?;
    let title = format!(
        "traffic: web calls each service {CONNECTIONS_PER_SERVICE} times, {} KiB each way",
        BYTES_PER_CONNECTION / 1024
    );
    let tallies = step(&title, || {
        let mut tallies = Vec::new();
        for (name, vip, _) in SERVICES {
            let target = format!("{vip}:80");
            let mut hops: BTreeMap<(String, String), usize> = BTreeMap::new();
            for _ in 0..CONNECTIONS_PER_SERVICE {
                let bytes = BYTES_PER_CONNECTION.to_string();
                let out = lab.run("web", &["echo", "--connect", &target, "--bytes", &bytes]);
                // Ctrl-C reaches the agents and the pods too: stop, whatever they answered.
                if interrupted() {
                    bail!("interrupted; the lab is removed");
                }
                let out = out?;
                let key = (
                    out.field("server_ips").to_owned(),
                    out.field("agent_ips").to_owned(),
                );
                *hops.entry(key).or_default() += 1;
            }
            tallies.push((name, target, hops));
        }
        Ok(tallies)
    })?;
    let after = counters(&n1.node_name)?;

    let web = "spiffe://lab.mesh/ns/lab/sa/web";
    let mib = |connections: usize| {
        (connections as u64 * BYTES_PER_CONNECTION * 2) as f64 / f64::from(1 << 20)
    };
    println!();
    println!("What went where (web runs on n1 as {web}; every byte came back as sent):");
    for (name, target, hops) in &tallies {
        println!("  web -> {name} at {target}");
        for ((server, agent), count) in hops {
            let pod = pod_at(&lab, server);
            let node = PODS.iter().find(|(p, _)| *p == pod).map_or("?", |(_, n)| n);
            let how = if agent == N1_POD_BRIDGE {
                "local hop: n1's agent dialled it directly".to_owned()
            } else {
                "mTLS: n1's agent -> HTTP/2 CONNECT -> n2's agent :15008 -> pod".to_owned()
            };
            println!(
                "    {count:>3} x {pod:<10} {server:<12} on {node}  {how}  ({:.1} MiB)",
                mib(*count)
            );
        }
    }
    println!();
    let n1_log = n1.log();
    let n2_log = n2.log();
    let callers: Vec<&str> = n2_log
        .lines()
        .filter(|l| l.contains("tunnel peer accepted"))
        .filter_map(|l| l.split("caller=").nth(1))
        .collect();
    println!("The tunnel:");
    println!(
        "  n1 opened {} TLS 1.3 connection(s) to n2, presenting web's certificate; streams: {}",
        n1_log.matches("tunnel connection opened").count(),
        n1_log.matches("connected over mTLS").count()
    );
    println!(
        "  n2 verified the chain and accepted {}; refused peers: {}",
        if callers.is_empty() {
            "nobody".to_owned()
        } else {
            callers.join(", ")
        },
        n2_log.matches("tunnel peer refused").count()
    );
    println!();
    println!("From the agents' metrics (GET http://198.18.0.<k>:15020/metrics on node <k>):");
    println!(
        "  {:<6} {:<9} {:<16} {:<7} {:>11} {:>9} {:>9}",
        "agent", "direction", "service", "hop", "connections", "sent", "received"
    );
    for (k, node) in [(1, "n1"), (2, "n2")] {
        let url = format!("http://198.18.0.{k}:15020/metrics");
        let metrics = lab.http(node, "GET", &url)?;
        if metrics.status != 200 {
            bail!("GET {url}: {} {}", metrics.status, metrics.body);
        }
        for row in service_table(&metrics.body) {
            println!(
                "  {node:<6} {:<9} {:<16} {:<7} {:>11} {:>5.1} MiB {:>5.1} MiB",
                row.direction,
                if row.service.is_empty() {
                    "-"
                } else {
                    &row.service
                },
                row.hop,
                row.connections,
                row.sent / f64::from(1 << 20),
                row.received / f64::from(1 << 20),
            );
        }
    }
    println!();
    http_demo(&lab)?;
    egress_demo(&lab, &shop)?;
    upgrade_demo(&lab, &mut shop)?;
    println!("What the eBPF programs of n1 counted:");
    let delta = |c: Counter| after[c as usize] - before[c as usize];
    let redirected_mib = delta(Counter::BytesRedirected) as f64 / f64::from(1 << 20);
    for (what, value) in [
        (
            "connects captured (cgroup/connect4)",
            delta(Counter::ConnectsCaptured).to_string(),
        ),
        (
            "original destinations handed to the agent",
            delta(Counter::OrigDstRecorded).to_string(),
        ),
        (
            "moved socket to socket by sk_msg",
            format!(
                "{redirected_mib:.1} MiB in {} messages",
                delta(Counter::MsgRedirected)
            ),
        ),
        (
            "sends that went through TCP/IP instead",
            delta(Counter::MsgPassed).to_string(),
        ),
    ] {
        println!("  {what:<44} {value}");
    }
    println!();

    step(
        "lab: stopping the agents, removing namespaces, cgroups and pins",
        || {
            let Shop {
                agents,
                servers,
                outside,
                ..
            } = shop;
            drop(servers);
            drop(outside);
            for agent in agents {
                agent.terminate()?;
                let status = agent.wait()?;
                if !status.success() {
                    bail!("an agent exited with {status}");
                }
            }
            drop(lab);
            Ok(())
        },
    )
}

/// n1's agent is replaced while web calls cart-api, a new connection each time: the new agent
/// takes the listeners over, the old one drains and exits; no call fails.
fn upgrade_demo(lab: &Lab, shop: &mut Shop) -> Result<()> {
    let title = format!(
        "upgrade: n1's agent replaced while web calls cart-api {UPGRADE_REQUESTS} times, a new \
         connection each"
    );
    let (outcomes, old_pid, new_pid) = step(&title, || {
        let url = format!("http://{CART_API}");
        let requests = CurlLoop::start(lab, "web", &url, UPGRADE_REQUESTS, 100)?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        let config = std::fs::read_to_string(lab.agent_config_path("n1"))?;
        let new = lab.start_agent_with_config("n1", &config, &[])?;
        let new_pid = new.pid();
        let old = std::mem::replace(&mut shop.agents[0], new);
        old.wait_for_log("handed over to the new agent")?;
        let old_pid = old.pid();
        let status = old.wait()?;
        if !status.success() {
            bail!("the old agent exited with {status}");
        }
        Ok((requests.outcomes()?, old_pid, new_pid))
    })?;
    let failed = failures(&outcomes);
    println!(
        "  the new agent (pid {new_pid}) took the listening sockets over from pid {old_pid}, which \
         stopped accepting, drained and exited"
    );
    println!(
        "  {} calls: {} answered 200, {} failed",
        outcomes.len(),
        outcomes.len() - failed.len(),
        failed.len()
    );
    println!();
    Ok(())
}

/// web calls the HTTP services: the split, the retries, the timeout, then the per-route table.
fn http_demo(lab: &Lab) -> Result<()> {
    let title = format!(
        "HTTP: web sends {HTTP_REQUESTS} requests each to cart-api and payments, and one that is too slow"
    );
    let (split, payments, slow) = step(&title, || {
        let curl_loop = |url: &str, write_out: &str| -> Result<BTreeMap<String, usize>> {
            let script = format!(
                "for i in $(seq {HTTP_REQUESTS}); do curl -s -o /dev/null -m 10 -w '{write_out}\\n' {url}; done"
            );
            let out = lab.run_program("web", "bash", &["-c", &script])?;
            if interrupted() {
                bail!("interrupted; the lab is removed");
            }
            let mut counts = BTreeMap::new();
            for line in out.stdout.lines() {
                *counts.entry(line.to_owned()).or_default() += 1;
            }
            Ok(counts)
        };
        let split = curl_loop(&format!("http://{CART_API}/items"), "%header{x-pod}")?;
        let payments = curl_loop(&format!("http://{PAYMENTS}/pay"), "%{http_code}")?;
        let slow = lab.run_program(
            "web",
            "curl",
            &[
                "-s",
                "-m",
                "10",
                "-w",
                " (%{http_code})",
                &format!("http://{CART_API}/sleep/1000"),
            ],
        )?;
        Ok((split, payments, slow.stdout))
    })?;
    println!();
    println!("HTTP, routed per request by n1's agent (no extra proxy hop):");
    println!("  cart-api, route browse, split 90/10 by endpoint label version:");
    for (pod, count) in &split {
        let version = if pod == "cart-0" { "v1, n1" } else { "v2, n2" };
        println!("    {count:>4} x {pod} ({version})");
    }
    println!("  payments, route pay: payments-1 always answers 503, retries on gateway errors:");
    for (code, count) in &payments {
        println!("    {count:>4} x status {code}");
    }
    println!(
        "  cart-api, route slow (timeout 200ms), GET /sleep/1000: {}",
        slow.replace('\n', "")
    );
    let (requests, at_once) = BURST;
    let title = format!(
        "circuit breaker: h2load sends {requests} slow requests to catalog-api, {at_once} at once"
    );
    let burst = step(&title, || {
        let out = lab.run_program(
            "web",
            "h2load",
            &[
                "-n",
                &requests.to_string(),
                "-c",
                &at_once.to_string(),
                &format!("http://{CATALOG_API}/sleep/20"),
            ],
        )?;
        out.stdout
            .lines()
            .find(|l| l.starts_with("status codes:"))
            .map(str::to_owned)
            .context("h2load printed no status codes")
    })?;
    let metrics = lab
        .http("n1", "GET", "http://198.18.0.1:15020/metrics")?
        .body;
    println!(
        "  catalog-api allows {CATALOG_CAP} requests in flight from each agent; the rest get 503 at once"
    );
    println!("    h2load: {}", burst.trim_start_matches("status codes: "));
    println!(
        "    mesh_circuit_breaker_rejections_total{{service=\"lab/catalog-api\",limit=\"requests\"}} {}",
        sum(
            &metrics,
            "mesh_circuit_breaker_rejections_total{service=\"lab/catalog-api\",limit=\"requests\"}"
        )
    );
    println!();
    rate_limit_demo(lab)?;
    authorization_demo(lab)?;
    trace_demo(lab)?;
    let metrics = lab
        .http("n1", "GET", "http://198.18.0.1:15020/metrics")?
        .body;
    println!("Per route, from n1's /metrics:");
    println!(
        "  {:<12} {:<8} {:>4} {:>9} {:>12} {:>8}",
        "service", "route", "code", "requests", "mean (ms)", "retries"
    );
    for row in route_table(&metrics) {
        println!(
            "  {:<12} {:<8} {:>4} {:>9} {:>12.2} {:>8}",
            row.service.trim_start_matches("lab/"),
            row.route,
            row.code,
            row.requests,
            row.mean_ms,
            row.retries
        );
    }
    println!();
    Ok(())
}

/// web checks out more often than cart-api's checkout route allows: n2's agent, which serves
/// the route's endpoint, answers 429.
fn rate_limit_demo(lab: &Lab) -> Result<()> {
    let tries = CHECKOUTS_PER_MINUTE + 3;
    let title = format!("rate limit: web checks out {tries} times in a row at cart-api");
    let answers = step(&title, || {
        let script = format!(
            "for i in $(seq {tries}); do curl -s -o /dev/null -m 10 -w '%{{http_code}} %header{{retry-after}}\\n' -X POST http://{CART_API}/checkout; done"
        );
        Ok(lab.run_program("web", "bash", &["-c", &script])?.stdout)
    })?;
    let metrics = lab
        .http("n2", "GET", "http://198.18.0.2:15020/metrics")?
        .body;
    println!(
        "  cart-api's route checkout takes {CHECKOUTS_PER_MINUTE} a minute from each caller, counted by n2's agent (it serves cart-1):"
    );
    let answers: Vec<String> = answers
        .lines()
        .map(|l| match l.split_once(' ') {
            Some((code, retry)) if !retry.is_empty() => format!("{code} (retry-after {retry} s)"),
            _ => l.trim().to_owned(),
        })
        .collect();
    println!("    {}", answers.join(", "));
    println!(
        "    mesh_rate_limited_total{{service=\"lab/cart-api\",by=\"local\"}} {} (n2)",
        sum(
            &metrics,
            "mesh_rate_limited_total{service=\"lab/cart-api\",by=\"local\"}"
        )
    );
    println!();
    Ok(())
}

/// web reads orders and tries to write one: n2's agent, where orders-0 runs, decides each
/// request; payments-0, outside the mesh, tries orders-0 directly and the kernel drops it.
fn authorization_demo(lab: &Lab) -> Result<()> {
    let (orders, _) = lab.pod_addrs("orders-0")?;
    let title =
        "authorization: web reads and writes orders; payments-0 (not meshed) goes around the mesh";
    let (read, write, around) = step(title, || {
        let curl = |pod: &str, method: &str, url: &str| -> Result<String> {
            let args = [
                "-s",
                "-m",
                "10",
                "--connect-timeout",
                "2",
                "-X",
                method,
                "-w",
                " %{http_code}",
                url,
            ];
            Ok(lab
                .run_program(pod, "curl", &args)?
                .stdout
                .trim()
                .to_owned())
        };
        Ok((
            curl("web", "GET", &format!("http://{ORDERS_API}/orders"))?,
            curl("web", "POST", &format!("http://{ORDERS_API}/orders"))?,
            curl("payments-0", "GET", &format!("http://{orders}:8081/orders"))?,
        ))
    })?;
    let metrics = lab
        .http("n2", "GET", "http://198.18.0.2:15020/metrics")?
        .body;
    let last_word = |answer: &str| answer.rsplit(' ').next().unwrap_or_default().to_owned();
    println!("  policy lab/orders-readers on orders-api: web may GET; lab is strict");
    println!("    web GET  orders-api -> {}", last_word(&read));
    let (body, code) = write.rsplit_once(' ').unwrap_or_default();
    println!(
        "    web POST orders-api -> {code} {:?} (n2's agent: no ALLOW rule matched)",
        body.trim()
    );
    println!(
        "    payments-0 -> orders-0 {orders}:8081 directly -> {} (no answer: dropped in n2's kernel)",
        last_word(&around)
    );
    println!(
        "    n2: mesh_authorization_decisions_total allow {}, deny {}; mesh_ebpf_strict_dropped_total {}",
        sum(
            &metrics,
            "mesh_authorization_decisions_total{action=\"allow\""
        ),
        sum(
            &metrics,
            "mesh_authorization_decisions_total{action=\"deny\""
        ),
        sum(&metrics, "mesh_ebpf_strict_dropped_total"),
    );
    println!();
    Ok(())
}

/// orders-0 calls the courier's API in plain HTTP: n2's agent opens TLS to it. Then the mesh
/// turns registry_only and an undeclared address fails in n2's kernel.
fn egress_demo(lab: &Lab, shop: &Shop) -> Result<()> {
    let undeclared = format!("http://{DNS_SERVER}:8080/");
    let title = format!(
        "egress: orders-0 calls http://{COURIER}/ (declared, TLS originated), then {undeclared} under registry_only"
    );
    let (courier, refused) = step(&title, || {
        let curl = |url: &str, resolve: Option<String>| -> Result<(String, Option<i32>)> {
            let mut args = vec![
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "10",
                "--connect-timeout",
                "2",
                "-w",
                "%{http_code}",
            ];
            if let Some(resolve) = &resolve {
                args.extend(["--resolve", resolve]);
            }
            args.push(url);
            let out = lab.run_program("orders-0", "curl", &args)?;
            Ok((out.stdout.trim().to_owned(), out.status.code()))
        };
        let resolve = format!("{COURIER}:80:{COURIER_ADDRESS}");
        let courier = curl(&format!("http://{COURIER}/"), Some(resolve))?;
        let spec = with_courier(&shop.courier_ca, "registry_only");
        for (agent, node) in shop.agents.iter().zip(["n1", "n2"]) {
            let reloads = agent.log().matches("config reloaded").count();
            std::fs::write(
                lab.agent_config_path(node),
                lab.agent_config_for(&spec, node)?,
            )?;
            agent.wait_for_log_times("config reloaded", reloads + 1)?;
        }
        let refused = curl(&undeclared, None)?;
        Ok((courier, refused))
    })?;
    let metrics = lab.metrics_when("n2", |m| sum(m, "mesh_egress_refused_total") >= 1.0);
    println!("  the courier's API is declared (names, port 80 http, tls: originate, its CA)");
    println!(
        "    orders-0 GET http://{COURIER}/ -> {} (n2's agent resolved it through dnsmasq, opened TLS to {COURIER_ADDRESS}:443 with SNI {COURIER}, checked its certificate)",
        courier.0
    );
    println!(
        "    n2: mesh_requests_total{{destination_service=\"{COURIER}\",route=\"egress\"}} {}",
        sum(
            &metrics,
            &format!(
                "mesh_requests_total{{direction=\"outbound\",source_namespace=\"lab\",source_workload=\"orders-0\",source_identity=\"spiffe://lab.mesh/ns/lab/sa/orders-0\",destination_service=\"{COURIER}\",route=\"egress\""
            )
        )
    );
    println!(
        "    registry_only: orders-0 -> {undeclared} -> curl exit {} (EPERM from n2's kernel); mesh_egress_refused_total {}",
        refused.1.map_or("?".to_owned(), |c| c.to_string()),
        sum(
            &metrics,
            "mesh_egress_refused_total{source_namespace=\"lab\",source_workload=\"orders-0\""
        )
    );
    println!();
    Ok(())
}

/// One request from web to cart-api's v2 on n2, carrying web's trace context: the spans the
/// collector got for it, as a tree.
fn trace_demo(lab: &Lab) -> Result<()> {
    let (trace, root) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let spans_file = lab.scratch_path("spans.jsonl");
    let spans = step(
        "tracing: web sends one request to cart-api v2 with its traceparent",
        || {
            let out = lab.run_program(
                "web",
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "10",
                    "-H",
                    "x-version: v2",
                    "-H",
                    &format!("traceparent: 00-{trace}-{root}-01"),
                    &format!("http://{CART_API}/items"),
                ],
            )?;
            if !out.status.success() {
                bail!("curl failed: {}", out.stderr);
            }
            let lines = lab.wait_for_lines(&spans_file, |lines| {
                lines.iter().filter(|l| l.contains(trace)).count() >= 3
            });
            Ok(lines
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|s| s["trace_id"] == trace)
                .collect::<Vec<_>>())
        },
    )?;
    println!("  trace {trace}, as the OTLP collector on n1 got it:");
    println!("  web (the caller's own span {root})");
    let mut parent = root.to_owned();
    let mut depth = 1;
    while let Some(span) = spans
        .iter()
        .find(|s| s["parent_span_id"] == parent.as_str())
    {
        let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
        let attribute = |key: &str| span["attributes"][key].as_str().unwrap_or("-").to_owned();
        let node = text("node");
        let from = if node.is_empty() {
            text("service")
        } else {
            format!(
                "{} on {}",
                text("service"),
                node.rsplit('-').next().unwrap_or_default()
            )
        };
        println!(
            "  {:indent$}└─ {:<22} {:<6} {:<18} {:>6.2} ms  status {} {}",
            "",
            text("name"),
            text("kind"),
            from,
            span["duration_us"].as_f64().unwrap_or_default() / 1000.0,
            attribute("http.response.status_code"),
            match attribute("mesh.source.identity").as_str() {
                "-" => String::new(),
                id => format!("caller {id}"),
            },
            indent = depth * 3 - 3,
        );
        parent = text("span_id");
        depth += 1;
    }
    println!();
    Ok(())
}

/// One row of the per-route table.
struct RouteRow {
    service: String,
    route: String,
    code: String,
    requests: u64,
    mean_ms: f64,
    retries: u64,
}

/// Requests, mean duration and retries by service, route and status code.
fn route_table(metrics: &str) -> Vec<RouteRow> {
    let mut sums: BTreeMap<(String, String, String), (u64, f64, f64)> = BTreeMap::new();
    let mut retries: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (name, labels, value) in samples(metrics) {
        let label = |key: &str| label(labels, key);
        let key = (label("destination_service"), label("route"), label("code"));
        match name {
            "mesh_requests_total" => sums.entry(key).or_default().0 += value as u64,
            "mesh_request_duration_seconds_sum" => sums.entry(key).or_default().1 += value,
            "mesh_request_duration_seconds_count" => sums.entry(key).or_default().2 += value,
            "mesh_request_retries_total" => {
                *retries.entry((key.0, key.1)).or_default() += value as u64
            }
            _ => {}
        }
    }
    sums.into_iter()
        .filter(|(_, (requests, ..))| *requests > 0)
        .map(
            |((service, route, code), (requests, seconds, count))| RouteRow {
                retries: retries
                    .get(&(service.clone(), route.clone()))
                    .copied()
                    .unwrap_or(0),
                mean_ms: if count > 0.0 {
                    seconds / count * 1000.0
                } else {
                    0.0
                },
                service,
                route,
                code,
                requests,
            },
        )
        .collect()
}

fn up() -> Result<()> {
    // A session of its own: what the lab runs must not get the terminal's signals.
    // SAFETY: setsid has no memory-safety preconditions.
    if unsafe { libc::setsid() } < 0 {
        bail!("setsid: {}", std::io::Error::last_os_error());
    }
    let lab = step(LAB_TITLE, || {
        let lab = Lab::new_kept(shop())?;
        let Shop {
            agents,
            servers,
            outside,
            ..
        } = start(&lab)?;
        // They go on running after this process exits; `down` removes them.
        std::mem::forget(agents);
        std::mem::forget(servers);
        std::mem::forget(outside);
        Ok(lab)
    })?;
    let web_cgroup = lab.cgroup_root().join("n1").join("web");
    let testpod = std::env::current_exe()?.with_file_name("mesh-testpod");
    println!();
    println!(
        "The lab is up. Services: cart 198.19.0.10:80, orders 198.19.0.11:80, catalog 198.19.0.12:80 (TCP); cart-api {CART_API}:80, payments {PAYMENTS}:80, catalog-api {CATALOG_API}:80, orders-api {ORDERS_API}:80 (HTTP)."
    );
    println!("Call one from web (its netns and cgroup, so the mesh captures it):");
    println!(
        "  sudo sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} {} echo --connect 198.19.0.10:80 --bytes 100000 --connections 10'",
        web_cgroup.display(),
        lab.netns_name("web"),
        testpod.display()
    );
    println!("What each agent measured and knows (on node <k>):");
    println!(
        "  sudo ip netns exec {} curl -s 198.18.0.1:15020/metrics",
        lab.netns_name("n1")
    );
    println!(
        "  sudo ip netns exec {} curl -s 198.18.0.2:15020/config",
        lab.netns_name("n2")
    );
    println!("Watch the agents:");
    for node in ["n1", "n2"] {
        println!(
            "  sudo tail -f {}",
            lab.scratch_path(&format!("agent-{node}.log")).display()
        );
    }
    println!("Remove it: sudo -E cargo xtask lab down");
    lab.keep();
    Ok(())
}

fn down() -> Result<()> {
    if Lab::remove_kept()? {
        eprintln!("==> the lab is removed");
    } else {
        eprintln!("==> no lab was up");
    }
    Ok(())
}

/// One row of the per-service table: connections and bytes by direction, service and hop.
#[derive(Default)]
struct ServiceRow {
    direction: String,
    service: String,
    hop: String,
    connections: u64,
    sent: f64,
    received: f64,
}

/// Sums an agent's connection metrics (OpenMetrics text) by direction, service and hop.
fn service_table(metrics: &str) -> Vec<ServiceRow> {
    let mut rows: BTreeMap<(String, String, String), ServiceRow> = BTreeMap::new();
    for (name, labels, value) in samples(metrics) {
        let label = |key: &str| label(labels, key);
        let key = (
            label("direction"),
            label("destination_service"),
            label("hop"),
        );
        let row = rows.entry(key.clone()).or_insert_with(|| ServiceRow {
            direction: key.0,
            service: key.1,
            hop: key.2,
            ..ServiceRow::default()
        });
        match name {
            "mesh_connections_opened_total" => row.connections += value as u64,
            "mesh_bytes_sent_total" => row.sent += value,
            "mesh_bytes_received_total" => row.received += value,
            _ => {}
        }
    }
    rows.into_values().filter(|r| r.connections > 0).collect()
}

/// The samples of an agent's metrics (OpenMetrics text) that have labels: (name, labels,
/// value).
fn samples(metrics: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    metrics.lines().filter_map(|line| {
        let (name, rest) = line.split_once('{')?;
        let (labels, value) = rest.rsplit_once("} ")?;
        Some((name, labels, value.parse().ok()?))
    })
}

/// The value of the label `key` in `labels` (`a="1",b="2"`), empty if it has none.
fn label(labels: &str, key: &str) -> String {
    labels
        .split(',')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix("=\""))
        .and_then(|v| v.split('"').next())
        .unwrap_or_default()
        .to_owned()
}

/// The name of the shop pod at `ip`.
fn pod_at(lab: &Lab, ip: &str) -> String {
    let ip: Option<IpAddr> = ip.parse().ok();
    PODS.iter()
        .map(|(pod, _)| *pod)
        .find(|pod| lab.pod_addrs(pod).ok().map(|(v4, _)| IpAddr::V4(v4)) == ip)
        .unwrap_or("?")
        .to_owned()
}

fn counters(node_name: &str) -> Result<Vec<u64>> {
    let counters = Counters::open_pinned(node_name)?;
    Counter::ALL.iter().map(|c| counters.get(*c)).collect()
}
