//! End-to-end: HTTP through the agents, driven by stock clients (curl over HTTP/1.1 and h2c,
//! h2load, ab, bash's `/dev/tcp`) from an enrolled pod, to `mesh-testpod serve --http` pods on
//! this node and the next. The in-process tests cover the rules one by one; these check that
//! real clients and the real capture path get them.

use mesh_tests::{Lab, LabSpec, Running, ServiceSpec, sum};

/// `cart` (HTTP, at 198.19.0.20): `cart-v1` on n1, `cart-v2` on n2. Requests with
/// `x-canary: 1` go to v2, `/sleep/...` must answer within 300 ms, the rest split 50/50.
const CART: &str = "198.19.0.20";
/// `flaky` (HTTP, at 198.19.0.21): `ok` answers, `broken` always answers 503; the route
/// retries gateway errors, with a budget as large as the requests (the default, a fifth,
/// would let some 503s through when half the endpoints fail, as it is meant to).
const FLAKY: &str = "198.19.0.21";
/// `greeter` (auto, at 198.19.0.22): the echo server, which speaks first.
const GREETER: &str = "198.19.0.22";
/// `guarded` (HTTP, at 198.19.0.23): `ok` and `broken`, no retries, but outlier detection
/// (three 5xx in a row eject, half the endpoints may be out).
const GUARDED: &str = "198.19.0.23";
/// `capped` (HTTP, at 198.19.0.24): `ok` behind a circuit breaker of 4 requests in flight.
const CAPPED: &str = "198.19.0.24";

fn spec() -> LabSpec {
    let cart_routes = "[\
        { name: canary, matches: [{ headers: [{ name: x-canary, value: \"1\" }] }], backends: [{ subset: { version: v2 } }] }, \
        { name: slow, matches: [{ path: { prefix: /sleep } }], timeout: 300ms }, \
        { name: split, backends: [{ subset: { version: v1 }, weight: 1 }, { subset: { version: v2 }, weight: 1 }] }]";
    let flaky_routes = "[{ name: retried, retry: { attempts: 3, on: [gateway-error], backoff: 5ms, budget_percent: 100 } }]";
    LabSpec::default()
        .node("n1")
        .node("n2")
        .pod("n1", "client", true)
        .pod("n1", "cart-v1", false)
        .pod("n2", "cart-v2", false)
        .pod("n1", "ok", false)
        .pod("n1", "broken", false)
        .pod("n1", "greeter", false)
        .service(
            ServiceSpec::echo("cart", &[CART], &["cart-v1", "cart-v2"])
                .http("http", Some(cart_routes))
                .label("cart-v1", "{ version: v1 }")
                .label("cart-v2", "{ version: v2 }"),
        )
        .service(
            ServiceSpec::echo("flaky", &[FLAKY], &["ok", "broken"])
                .http("http", Some(flaky_routes)),
        )
        .service(ServiceSpec::echo("greeter", &[GREETER], &["greeter"]).http("auto", None))
        .service(
            ServiceSpec::echo("guarded", &[GUARDED], &["ok", "broken"])
                .http("http", None)
                .port_field("outlier_detection: { consecutive_5xx: 3, max_ejected_percent: 50 }"),
        )
        .service(
            ServiceSpec::echo("capped", &[CAPPED], &["ok"])
                .http("http", None)
                .port_field("circuit_breakers: { max_requests: 4 }"),
        )
}

/// The HTTP pods of [`spec`], serving on 8080.
fn serve(lab: &Lab) -> Vec<Running> {
    let http = |pod: &str, extra: &[&str]| lab.serve_http(pod, extra).unwrap();
    vec![
        http("cart-v1", &[]),
        http("cart-v2", &[]),
        http("ok", &[]),
        http("broken", &["--always-status", "503"]),
        lab.spawn("greeter", &["serve", "--listen", "[::]:8080"])
            .unwrap(),
    ]
}

/// `curl` in the client pod: its output (`-w` formats included).
fn curl(lab: &Lab, args: &[&str]) -> String {
    let mut all = vec!["-sS", "-m", "20"];
    all.extend(args);
    let out = lab.run_program("client", "curl", &all).unwrap();
    assert!(out.status.success(), "curl {args:?}: {}", out.stderr);
    out.stdout
}

/// The status codes of `n` requests, one after another, by `curl args`.
fn status_codes(lab: &Lab, n: usize, args: &[&str]) -> Vec<String> {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend(args);
    (0..n).map(|_| curl(lab, &all)).collect()
}

#[test]
fn curl_gets_routes_splits_timeouts_and_whole_bodies_over_http1_and_h2c() {
    let lab = Lab::new(spec()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _pods = serve(&lab);
    let cart = format!("http://{CART}/");

    // The canary header goes to v2, on the other node, over HTTP/1.1 and h2c alike.
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let headers = curl(
            &lab,
            &[
                version,
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-H",
                "x-canary: 1",
                &cart,
            ],
        );
        assert!(headers.contains("x-pod: cart-v2"), "{version}: {headers}");
    }
    // The rest splits between both.
    let pods: Vec<String> = (0..40)
        .map(|_| curl(&lab, &["-D", "-", "-o", "/dev/null", &cart]))
        .collect();
    for pod in ["x-pod: cart-v1", "x-pod: cart-v2"] {
        assert!(
            pods.iter().any(|h| h.contains(pod)),
            "no {pod} in 40 answers"
        );
    }
    // Out of time: 504, and the agent says why.
    let slow = curl(
        &lab,
        &["-w", "%{http_code}", &format!("http://{CART}/sleep/5000")],
    );
    assert_eq!(slow, "lab/cart did not answer in time\n504");
    // 16 MiB each way, byte for byte.
    let sent = lab.scratch_path("body.bin");
    let body: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&sent, &body).unwrap();
    let back = lab.scratch_path("back.bin");
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        curl(
            &lab,
            &[
                version,
                "--data-binary",
                &format!("@{}", sent.display()),
                "-o",
                &back.display().to_string(),
                &format!("http://{CART}/echo"),
            ],
        );
        assert!(
            std::fs::read(&back).unwrap() == body,
            "{version}: the body came back changed"
        );
    }

    let series = |route: &str, method: &str, code: &str| {
        format!(
            "mesh_requests_total{{direction=\"outbound\",source_namespace=\"lab\",source_workload=\"client\",source_identity=\"spiffe://lab.mesh/ns/lab/sa/client\",destination_service=\"lab/cart\",route=\"{route}\",method=\"{method}\",code=\"{code}\""
        )
    };
    let metrics = lab.metrics_when("n1", |m| sum(m, "mesh_requests_total") >= 45.0);
    assert_eq!(
        sum(&metrics, &series("canary", "GET", "200")),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, &series("split", "GET", "200")),
        40.0,
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, &series("slow", "GET", "504")),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, &series("split", "POST", "200")),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, "mesh_request_timeouts_total"),
        1.0,
        "{metrics}"
    );
    assert!(sum(&metrics, "mesh_request_bytes_total") >= (32u32 << 20) as f64);
}

#[test]
fn load_from_h2load_and_ab_is_answered_whole_and_retries_hide_a_broken_endpoint() {
    let lab = Lab::new(spec()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _pods = serve(&lab);

    // h2load: HTTP/2 (prior knowledge), many streams on few connections, across nodes too.
    let out = lab
        .run_program(
            "client",
            "h2load",
            &[
                "-n",
                "2000",
                "-c",
                "8",
                "-m",
                "8",
                &format!("http://{CART}/"),
            ],
        )
        .unwrap();
    assert!(
        out.stdout.contains("2000 succeeded, 0 failed, 0 errored"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    // ab: HTTP/1.0 keep-alive; half the endpoints always fail, the route's retries hide it.
    let out = lab
        .run_program(
            "client",
            "ab",
            &["-n", "400", "-c", "4", "-k", &format!("http://{FLAKY}/")],
        )
        .unwrap();
    assert!(
        out.stdout.contains("Complete requests:      400"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("Failed requests:        0"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("Non-2xx responses"), "{}", out.stdout);
    // A POST is not retried: some of 20 reach the broken endpoint and fail.
    let codes = status_codes(&lab, 20, &["-d", "order", &format!("http://{FLAKY}/")]);
    assert!(codes.iter().any(|c| c == "503"), "{codes:?}");
    assert!(codes.iter().any(|c| c == "200"), "{codes:?}");

    let metrics = lab.metrics_when("n1", |m| sum(m, "mesh_requests_total") >= 2420.0);
    let retries = sum(&metrics, "mesh_request_retries_total");
    assert!(retries >= 1.0, "{metrics}");
    assert_eq!(
        sum(
            &metrics,
            "mesh_requests_total{direction=\"outbound\",source_namespace=\"lab\",source_workload=\"client\",source_identity=\"spiffe://lab.mesh/ns/lab/sa/client\",destination_service=\"lab/flaky\",route=\"retried\",method=\"GET\",code=\"200\""
        ),
        400.0,
        "{metrics}"
    );
}

#[test]
fn an_outlier_is_ejected_and_h2load_trips_a_circuit_breaker() {
    let lab = Lab::new(spec()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let _pods = serve(&lab);

    // `broken` answers 503 three times, then is out: `ok` answers the rest.
    let codes = status_codes(&lab, 30, &[&format!("http://{GUARDED}/")]);
    let failed = codes.iter().filter(|c| *c == "503").count();
    assert_eq!(failed, 3, "{codes:?}");
    assert!(
        codes[codes.len() - 10..].iter().all(|c| c == "200"),
        "{codes:?}"
    );

    // 16 connections of slow requests against a cap of 4 in flight: the rest get 503 at
    // once, each counted.
    let out = lab
        .run_program(
            "client",
            "h2load",
            &[
                "-n",
                "400",
                "-c",
                "16",
                "-m",
                "1",
                &format!("http://{CAPPED}/sleep/20"),
            ],
        )
        .unwrap();
    let status_codes = out
        .stdout
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("no status codes from h2load: {}", out.stdout))
        .to_owned();
    // "status codes: 120 2xx, 0 3xx, 0 4xx, 280 5xx"
    let count = |class: &str| -> f64 {
        status_codes
            .split(',')
            .find_map(|part| {
                part.trim()
                    .strip_suffix(class)?
                    .split_whitespace()
                    .last()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {class} in {status_codes:?}"))
    };
    let (ok, turned_away) = (count(" 2xx"), count(" 5xx"));
    assert!(ok >= 4.0 && turned_away >= 1.0, "{status_codes}");
    assert_eq!(ok + turned_away, 400.0, "{status_codes}");

    let metrics = lab.metrics_when("n1", |m| {
        sum(m, "mesh_circuit_breaker_rejections_total") >= turned_away
    });
    assert_eq!(
        sum(
            &metrics,
            "mesh_circuit_breaker_rejections_total{service=\"lab/capped\",limit=\"requests\"}"
        ),
        turned_away,
        "{metrics}"
    );
    assert_eq!(
        sum(
            &metrics,
            "mesh_endpoint_ejections_total{service=\"lab/guarded\""
        ),
        1.0,
        "{metrics}"
    );
}

#[test]
fn a_server_first_protocol_works_on_an_auto_port_and_bad_http_gets_400() {
    let lab = Lab::new(spec()).unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let _pods = serve(&lab);

    // The client sends nothing and waits for the server's greeting: the port waits for HTTP
    // as long as protocol_detection_timeout (1 s), then carries the bytes as they are.
    let greeted = format!("exec 3<>/dev/tcp/{GREETER}/80 && read -t 10 line <&3 && echo \"$line\"");
    let out = lab
        .run_program("client", "bash", &["-c", &greeted])
        .unwrap();
    assert!(
        out.stdout.starts_with("local="),
        "{}{}",
        out.stdout,
        out.stderr
    );

    // A header line without a colon is no HTTP: 400 from the agent's HTTP server.
    let bad = format!(
        "exec 3<>/dev/tcp/{CART}/80 && printf 'GET / HTTP/1.1\\r\\nHost: cart\\r\\nno colon here\\r\\n\\r\\n' >&3 && read -t 10 line <&3 && echo \"$line\""
    );
    let out = lab.run_program("client", "bash", &["-c", &bad]).unwrap();
    assert!(
        out.stdout.starts_with("HTTP/1.1 400"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

/// `shop` (HTTP, at 198.19.0.30): the `shop` pod on n2, an instrumented app that exports its
/// own spans; checkouts are limited to two an hour.
const SHOP: &str = "198.19.0.30";
/// The OTLP collector, on node n1's own address.
const COLLECTOR: &str = "198.18.0.1:4317";

#[test]
fn curl_requests_are_traced_through_both_agents_to_the_app_and_rate_limited_with_429() {
    let routes =
        "[{ name: checkout, matches: [{ path: { prefix: /checkout } }] }, { name: browse }]";
    let lab = Lab::new(
        LabSpec::default()
            .node("n1")
            .node("n2")
            .pod("n1", "client", true)
            .pod("n2", "shop", false)
            .setting(&format!(
                "tracing: {{ otlp_endpoint: 'http://{COLLECTOR}', sampling: 1.0 }}"
            ))
            .service(
                ServiceSpec::echo("shop", &[SHOP], &["shop"])
                    .http("http", Some(routes))
                    .port_field(
                        "rate_limits: { local: [{ requests: 2, per: 1h, route: checkout }] }",
                    ),
            ),
    )
    .unwrap();
    let spans = lab.scratch_path("spans.jsonl");
    let out = spans.display().to_string();
    let _collector = lab
        .spawn_on_node("n1", &["collect", "--listen", COLLECTOR, "--out", &out])
        .unwrap();
    let _a1 = lab.start_agent("n1", &[]).unwrap();
    let _a2 = lab.start_agent("n2", &[]).unwrap();
    let trace_to = format!("http://{COLLECTOR}");
    let _app = lab.serve_http("shop", &["--trace-to", &trace_to]).unwrap();

    // The caller's own span is the root: curl sends its traceparent.
    let (trace, root) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("traceparent: 00-{trace}-{root}-01");
    let checkout = format!("http://{SHOP}/checkout/7");
    let codes = status_codes(&lab, 1, &["-H", &traceparent, &checkout]);
    assert_eq!(codes, ["200"]);
    let tree = lab.wait_for_lines(&spans, |lines| {
        lines.iter().filter(|l| l.contains(trace)).count() >= 3
    });
    let span = |kind: &str, service: &str| -> serde_json::Value {
        tree.iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|s| s["trace_id"] == trace && s["kind"] == kind && s["service"] == service)
            .unwrap_or_else(|| panic!("no {kind} span of {service} in {tree:#?}"))
    };
    let (calling, serving, app) = (
        span("client", "mesh-agent"),
        span("server", "mesh-agent"),
        span("server", "shop"),
    );
    assert_eq!(calling["parent_span_id"], root, "{calling}");
    assert_eq!(calling["node"], lab.agent_node_name("n1"));
    assert_eq!(serving["parent_span_id"], calling["span_id"], "{serving}");
    assert_eq!(serving["node"], lab.agent_node_name("n2"));
    assert_eq!(app["parent_span_id"], serving["span_id"], "{app}");
    assert_eq!(app["name"], "GET /checkout/7");
    for s in [&calling, &serving] {
        assert_eq!(s["attributes"]["http.response.status_code"], "200", "{s}");
        assert_eq!(s["attributes"]["mesh.route"], "checkout", "{s}");
        assert_eq!(
            s["attributes"]["mesh.source.identity"], "spiffe://lab.mesh/ns/lab/sa/client",
            "{s}"
        );
    }
    assert_eq!(
        calling["attributes"]["mesh.destination.service"],
        "lab/shop"
    );

    // Two checkouts an hour: the second passes, the third gets 429 from n2's agent.
    assert_eq!(status_codes(&lab, 1, &[&checkout]), ["200"]);
    let limited = curl(&lab, &["-D", "-", "-o", "/dev/null", &checkout]);
    assert!(limited.starts_with("HTTP/1.1 429"), "{limited}");
    // Half an hour to the next token, less the seconds since the bucket was filled.
    let retry_after: u64 = limited
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no retry-after: {limited}"));
    assert!((1700..=1800).contains(&retry_after), "{limited}");
    assert!(
        limited.contains("x-ratelimit-limit: 2, 2;w=3600"),
        "{limited}"
    );
    // Other routes are not limited.
    assert_eq!(
        status_codes(&lab, 3, &[&format!("http://{SHOP}/items")]),
        ["200"; 3]
    );
    let metrics = lab.metrics_when("n2", |m| {
        sum(
            m,
            "mesh_rate_limited_total{service=\"lab/shop\",by=\"local\"}",
        ) >= 1.0
    });
    assert_eq!(
        sum(
            &metrics,
            "mesh_rate_limited_total{service=\"lab/shop\",by=\"local\"}"
        ),
        1.0,
        "{metrics}"
    );
    let metrics = lab.metrics_when("n1", |m| {
        sum(m, "mesh_trace_spans_total{outcome=\"exported\"}") >= 6.0
    });
    assert_eq!(
        sum(&metrics, "mesh_trace_spans_total{outcome=\"dropped\"}"),
        0.0
    );
}
