//! HTTP on the serving side: a tunnel stream whose CONNECT says it carries HTTP requests
//! (the calling agent's pooled connection to a pod of this node) is served request by
//! request over one connection to the pod. Each request gets its own record and, when
//! tracing is on, a server span that is the parent of the app's: the place for decisions
//! that belong to the server (its limits, its policy).

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{Request, Response, request::Parts};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1 as client1, http2 as client2},
    server::conn::{http1 as server1, http2 as server2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{Mutex, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    identity::SpiffeId,
    observability::{
        access::workload,
        metrics::{Metrics, RouteLabels},
        request::RequestRecord,
        traces::Tracer,
    },
    proxy::{
        authorization::{self, Call, Decision, HttpCall, SOURCE_ADDRESS},
        copy::Ended,
        http::{
            body::{Counted, Recorded},
            serve::{
                Answer, answer, authority, is_grpc, method_label, served_unless, splice,
                wants_upgrade,
            },
            trace_context::SpanContext,
            upstream::{Body, BoxError},
            verdict,
        },
        rate_limit::{self, global::GlobalLimiter},
    },
    state::{
        http::Upstream,
        routes::{LocalWorkload, Routes, ServicePort},
    },
};

/// What every served stream needs.
pub struct HttpServing {
    pub metrics: Arc<Metrics>,
    /// The current routes: the pods' policies, for streams whose requests are decided each.
    pub routes: watch::Receiver<Arc<Routes>>,
    /// Where request spans go, when tracing is on.
    pub tracer: Option<Arc<Tracer>>,
    /// The rate limit service, if the settings name one.
    pub rate_limit_service: Option<Arc<GlobalLimiter>>,
}

/// The one connection to the pod that a stream's requests go over.
enum Pod {
    /// HTTP/1 requests come one at a time, so the lock is never contended.
    Http1(Mutex<client1::SendRequest<Body>>),
    Http2(client2::SendRequest<Body>),
}

impl Pod {
    async fn send(&self, request: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Pod::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await
            }
            Pod::Http2(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

/// Who calls whom on a stream.
pub struct Parties {
    pub caller: SpiffeId,
    /// The pod called.
    pub target: SocketAddr,
    /// Whether its policies decide each request (else the stream was decided whole).
    pub per_request: bool,
    /// The pod's workload, if meshed.
    pub destination: Option<Arc<LocalWorkload>>,
    /// The service ports the pod serves on the stream's port (usually one).
    pub ports: Vec<Arc<ServicePort>>,
}

/// What every request of a stream shares.
struct Stream {
    pod: Pod,
    labels: RouteLabels,
    caller: SpiffeId,
    target: SocketAddr,
    per_request: bool,
    destination: Option<Arc<LocalWorkload>>,
    /// The service ports the pod serves on the stream's port (usually one), each with its
    /// service's name as a label value.
    ports: Vec<(Arc<ServicePort>, Arc<str>)>,
}

impl Stream {
    /// The service port a request for `host` is for: the one whose service's name the host
    /// starts with (`cart`, `cart.shop.svc.cluster.local`), else the first.
    fn port_for(&self, host: &str) -> Option<&(Arc<ServicePort>, Arc<str>)> {
        let label = host.split(['.', ':']).next().unwrap_or_default();
        self.ports
            .iter()
            .find(|(p, _)| p.service.rsplit('/').next() == Some(label))
            .or(self.ports.first())
    }
}

impl HttpServing {
    /// The decision on a request of `stream` from `source_address` under the pod's current
    /// policies, counted; none where none governs it.
    fn authorize(
        &self,
        stream: &Stream,
        source_address: Option<IpAddr>,
        parts: &Parts,
    ) -> Option<Decision> {
        let call = Call {
            source: Some(&stream.caller),
            source_address,
            port: stream.target.port(),
            http: Some(HttpCall::of(parts, authority(parts))),
        };
        let target = stream.target.ip();
        authorization::decide(&self.routes.borrow(), target, &call, &self.metrics)
    }

    /// Serves the requests that come on `tunnel`, in `protocol`, to `pod`, until either side
    /// is done or `abort` is cancelled.
    pub async fn serve<I>(
        self: Arc<Self>,
        tunnel: I,
        pod: TcpStream,
        protocol: Upstream,
        parties: Parties,
        abort: &CancellationToken,
    ) -> Ended
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let pod = TokioIo::new(pod);
        let pod = match protocol {
            Upstream::Http1 => client1::handshake(pod).await.map(|(sender, connection)| {
                tokio::spawn(connection.with_upgrades());
                Pod::Http1(Mutex::new(sender))
            }),
            Upstream::Http2 => client2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(pod)
                .await
                .map(|(sender, connection)| {
                    tokio::spawn(connection);
                    Pod::Http2(sender)
                }),
        };
        let pod = match pod {
            Ok(pod) => pod,
            Err(e) => return Ended::Failed(std::io::Error::other(e)),
        };
        let Parties {
            caller,
            target,
            per_request,
            destination,
            ports,
        } = parties;
        let [destination_namespace, destination_workload, _] =
            LocalWorkload::label_values(destination.as_deref());

        let stream = Arc::new(Stream {
            pod,
            labels: RouteLabels {
                direction: "inbound",
                source_namespace: caller.namespace().into(),
                source_workload: Arc::from(""),
                source_identity: caller.to_string().into(),
                // The workload served, for a request that is for none of its services.
                destination_service: workload(&destination_namespace, &destination_workload).into(),
                route: Arc::from(""),
                method: "",
            },
            caller,
            target,
            per_request,
            destination,
            ports: ports
                .into_iter()
                .map(|port| {
                    let service = Arc::from(port.service.as_str());
                    (port, service)
                })
                .collect(),
        });
        let service = service_fn(move |request| {
            let (this, stream) = (self.clone(), stream.clone());
            async move { Ok::<_, Infallible>(this.handle(request, &stream).await) }
        });
        let tunnel = TokioIo::new(tunnel);
        let served = async {
            match protocol {
                Upstream::Http1 => {
                    server1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(tunnel, service)
                        .with_upgrades()
                        .await
                }
                Upstream::Http2 => {
                    server2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .serve_connection(tunnel, service)
                        .await
                }
            }
        };
        served_unless(served, abort).await
    }

    async fn handle(&self, mut request: Request<Incoming>, stream: &Stream) -> Response<Body> {
        let upgrade = wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let span = SpanContext::carry_on(self.tracer.as_ref(), &mut parts.headers);
        let authority = authority(&parts);
        let port = stream.port_for(authority);
        let route = port.and_then(|(port, _)| port.http.as_ref()?.route(&parts));
        let mut labels = RouteLabels {
            method: method_label(&parts.method),
            ..stream.labels.clone()
        };
        if let Some((_, service)) = port {
            labels.destination_service = service.clone();
        }
        let mut record = RequestRecord::new(
            self.metrics.clone(),
            labels,
            authority,
            parts.uri.path(),
            span,
        );
        if let Some(route) = route {
            record.routed(&route.name);
        }
        record.served_by(stream.destination.clone());
        let (grpc, version, method) =
            (is_grpc(&parts.headers), parts.version, parts.method.clone());
        let source_address = authorization::source_address(&parts.headers);
        parts.headers.remove(SOURCE_ADDRESS);
        if stream.per_request
            && let Some(decision) = self.authorize(stream, source_address, &parts)
            && !decision.allowed
        {
            let service = port.map_or("", |(port, _)| port.service.as_str());
            let why = Answer::Denied(decision.policy);
            return answer(record, why, service, grpc, version);
        }
        if let Some((port, _)) = port {
            let checked = rate_limit::check(
                port,
                route.map(|r| &*r.name),
                Some(&stream.caller),
                self.rate_limit_service.as_deref(),
                &self.metrics,
            )
            .await;
            if let Err(limited) = checked {
                let why = Answer::RateLimited(limited);
                return answer(record, why, &port.service, grpc, version);
            }
        }
        let body = Counted::new(body, record.request_bytes.clone());
        let request = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
        match stream.pod.send(request).await {
            Ok(mut response) => {
                if let Some(upgrade) = upgrade {
                    splice(upgrade, &mut response, &method);
                }
                let grpc_status = verdict::grpc_status(response.headers());
                record.answered(response.status().as_u16(), grpc_status, None);
                response.map(|body| {
                    Recorded::new(body.map_err(BoxError::from), record, None).boxed_unsync()
                })
            }
            Err(e) => {
                debug!("the pod broke off a request: {e}");
                answer(
                    record,
                    Answer::Reset(e.to_string()),
                    "the pod",
                    grpc,
                    version,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use http_body_util::Full;

    use crate::{
        config::Protocol,
        testing::{
            Agent, Loopback, Mesh, cgroup_of, collector::Collector, echo_pod, http_pod,
            http1_client, rate_limit_service::RateLimitServer, round_trip, sample, sample_reaches,
            test_ca, within,
        },
    };

    const VIP: [u8; 4] = [198, 19, 0, 10];

    /// n1 runs web-0 (at `web`), n2 runs cart-0 (at `cart`) and shop-admin-0 (at `admin`); the
    /// service cart (port 80, `protocol`) has its endpoint on n2, `change` adds to both states.
    async fn shop(
        net: &Loopback,
        protocol: Protocol,
        change: impl Fn(Mesh) -> Mesh,
    ) -> (Agent, Agent) {
        let ca = test_ca();
        let (web, cart, admin) = (net.pod(1, 9), net.pod(2, 2), net.pod(2, 3));
        let routes =
            "[{ name: checkout, matches: [{ path: { prefix: /checkout } }] }, { name: browse }]";
        let mesh = |node: &str, k: u8, peer: &str, j: u8| {
            let mesh = Mesh::node(node, net.node(k), &net.pod_cidr(k))
                .peer(peer, net.node(j), &net.pod_cidr(j))
                .workload("shop", "web-0", "web", web)
                .workload("shop", "cart-0", "cart", cart)
                .workload("shop", "admin-0", "admin", admin)
                .service("shop", "cart", VIP.into(), (80, 8080), &[(cart, "n2")]);
            let mesh = match protocol {
                Protocol::Tcp => mesh,
                http => mesh.http(http, routes),
            };
            change(mesh).build()
        };
        let one = Agent::start(mesh("n1", 1, "n2", 2), ca.clone()).await;
        let two = Agent::start(mesh("n2", 2, "n1", 1), ca).await;
        (one, two)
    }

    async fn get(
        client: &mut hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>,
        path: &str,
    ) -> http::Response<hyper::body::Incoming> {
        let request = http::Request::get(path)
            .header("host", "cart")
            .body(Full::default())
            .unwrap();
        within(client.send_request(request)).await.unwrap()
    }

    /// The serving agent keeps one set of buckets for the port, whichever node calls: a route's
    /// bucket, and one per caller.
    #[tokio::test]
    async fn requests_over_a_local_limit_get_429_from_the_serving_agent() {
        let net = Loopback::reserve();
        let (one, two) = shop(&net, Protocol::Http, |mesh| {
            mesh.rate_limits(
                "local: [{ requests: 2, per: 1h, route: checkout }, { requests: 3, per: 1h, per_source: true }]",
            )
        })
        .await;
        let _pod = http_pod((net.pod(2, 2), 8080).into(), "cart-0").await;
        let mut web = http1_client(&one, net.pod(1, 9), cgroup_of(0), (VIP, 80).into()).await;
        let mut admin = http1_client(&two, net.pod(2, 3), cgroup_of(2), (VIP, 80).into()).await;
        // Two checkouts an hour, whoever calls: one from each node, then 429.
        assert_eq!(get(&mut web, "/checkout").await.status(), StatusCode::OK);
        assert_eq!(get(&mut admin, "/checkout").await.status(), StatusCode::OK);
        let limited = get(&mut web, "/checkout").await;
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        let headers = limited.headers();
        assert_eq!(
            headers["retry-after"], "1800",
            "half an hour to the next token"
        );
        assert_eq!(headers["x-ratelimit-limit"], "2, 2;w=3600");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        drop(limited);
        // Three requests an hour per caller: web has used one (the limited one took no token),
        // admin one.
        assert_eq!(get(&mut web, "/items").await.status(), StatusCode::OK);
        assert_eq!(get(&mut web, "/items").await.status(), StatusCode::OK);
        assert_eq!(
            get(&mut web, "/items").await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(get(&mut admin, "/items").await.status(), StatusCode::OK);
        let series =
            |by: &str| format!("mesh_rate_limited_total{{service=\"shop/cart\",by=\"{by}\"}}");
        // Limited where the endpoint is: n2 answered every 429, n1 passed them on.
        sample_reaches(&two.registry, &series("local"), 2.0).await;
        assert_eq!(sample(&one.registry, &series("local")), 0.0);
        sample_reaches(
            &one.registry,
            "mesh_requests_total{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"shop/cart\",route=\"checkout\",method=\"GET\",code=\"429\"",
            1.0,
        )
        .await;
        one.stop().await;
        two.stop().await;
    }

    #[tokio::test]
    async fn connections_over_a_tcp_ports_limit_are_refused_and_the_endpoint_kept() {
        let net = Loopback::reserve();
        let (one, two) = shop(&net, Protocol::Tcp, |mesh| {
            mesh.rate_limits("local: [{ requests: 1, per: 1h }]")
        })
        .await;
        let _pod = echo_pod((net.pod(2, 2), 8080).into()).await;
        let connect = || one.connect(net.pod(1, 9), cgroup_of(0), (VIP, 80).into());
        assert_eq!(
            round_trip(connect().await, b"order").await.unwrap(),
            b"order"
        );
        let refused = round_trip(connect().await, b"order").await;
        assert!(
            refused.as_ref().map_or(true, |back| back.is_empty()),
            "the second connection came through: {refused:?}"
        );
        sample_reaches(
            &two.registry,
            "mesh_refusals_total{reason=\"rate_limited\"}",
            1.0,
        )
        .await;
        sample_reaches(
            &one.registry,
            "mesh_refusals_total{reason=\"rate_limited\"}",
            1.0,
        )
        .await;
        assert_eq!(sample(&one.registry, "mesh_endpoint_ejections_total"), 0.0);
        one.stop().await;
        two.stop().await;
    }

    /// Served request by request on n2 (the port has limits), an upgrade still passes through
    /// and h2c requests keep their bodies both ways.
    #[tokio::test]
    async fn upgrades_and_http2_pass_through_the_serving_agent() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = |mesh: Mesh| mesh.rate_limits("local: [{ requests: 1000 }]");
        for protocol in [Protocol::Http, Protocol::Http2] {
            let net = Loopback::reserve();
            let (one, two) = shop(&net, protocol, limits).await;
            let _pod = http_pod((net.pod(2, 2), 8080).into(), "cart-0").await;
            let (web, vip) = (net.pod(1, 9), (VIP, 80).into());
            if protocol == Protocol::Http {
                let mut client = http1_client(&one, web, cgroup_of(0), vip).await;
                let request = http::Request::get("/ws")
                    .header("host", "cart")
                    .header("upgrade", "echo")
                    .header("connection", "upgrade")
                    .body(Full::default())
                    .unwrap();
                let response = within(client.send_request(request)).await.unwrap();
                assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
                let upgraded = within(hyper::upgrade::on(response)).await.unwrap();
                let mut upgraded = hyper_util::rt::TokioIo::new(upgraded);
                upgraded.write_all(b"ping").await.unwrap();
                let mut pong = [0u8; 4];
                within(upgraded.read_exact(&mut pong)).await.unwrap();
                assert_eq!(&pong, b"ping");
            } else {
                let mut client = crate::testing::http2_client(&one, web, cgroup_of(0), vip).await;
                let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
                let request = http::Request::post("http://cart/echo")
                    .body(Full::new(bytes::Bytes::from(body.clone())))
                    .unwrap();
                let response = within(client.send_request(request)).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                use http_body_util::BodyExt;
                let back = within(response.into_body().collect())
                    .await
                    .unwrap()
                    .to_bytes();
                assert!(back == body, "the body came back changed");
            }
            sample_reaches(
                &two.registry,
                "mesh_requests_total{direction=\"inbound\"",
                1.0,
            )
            .await;
            one.stop().await;
            two.stop().await;
        }
    }

    /// The rate limit service is asked about every request with the port's descriptors; its
    /// answer's limit, reset and headers reach the caller.
    #[tokio::test]
    async fn the_rate_limit_service_decides_and_its_absence_fails_open_or_closed() {
        let net = Loopback::reserve();
        let rls = RateLimitServer::start(
            (net.node(3), 8081).into(),
            &[("destination_service=shop/cart,route=checkout", 1)],
        )
        .await;
        let (one, two) = shop(&net, Protocol::Http, |mesh| {
            mesh.rate_limits("global: { domain: shop }")
                .rate_limit_service(rls.addr, "allow")
        })
        .await;
        let _pod = http_pod((net.pod(2, 2), 8080).into(), "cart-0").await;
        let mut web = http1_client(&one, net.pod(1, 9), cgroup_of(0), (VIP, 80).into()).await;
        assert_eq!(get(&mut web, "/checkout").await.status(), StatusCode::OK);
        let limited = get(&mut web, "/checkout").await;
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()["retry-after"], "30");
        assert_eq!(limited.headers()["x-ratelimit-limit"], "1, 1;w=60");
        assert_eq!(limited.headers()["x-limited-by"], "test-rls");
        drop(limited);
        assert_eq!(get(&mut web, "/items").await.status(), StatusCode::OK);
        let asked = rls.asked();
        assert_eq!(asked.len(), 3);
        assert_eq!(asked[0].domain, "shop");
        let descriptors: Vec<Vec<(String, String)>> = asked[0]
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        let entry = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let service = entry("destination_service", "shop/cart");
        assert_eq!(
            descriptors,
            vec![
                vec![service.clone()],
                vec![
                    service.clone(),
                    entry("source_identity", "spiffe://cluster.local/ns/shop/sa/web")
                ],
                vec![service, entry("route", "checkout")],
            ]
        );
        sample_reaches(
            &two.registry,
            "mesh_rate_limited_total{service=\"shop/cart\",by=\"global\"}",
            1.0,
        )
        .await;
        one.stop().await;
        two.stop().await;

        // No service at that address: requests pass, or are refused, as the setting says.
        drop(rls);
        for (mode, status) in [
            ("allow", StatusCode::OK),
            ("deny", StatusCode::TOO_MANY_REQUESTS),
        ] {
            let net = Loopback::reserve();
            let gone = (net.node(3), 8081).into();
            let (one, two) = shop(&net, Protocol::Http, |mesh| {
                mesh.rate_limits("global: { domain: shop }")
                    .rate_limit_service(gone, mode)
            })
            .await;
            let _pod = http_pod((net.pod(2, 2), 8080).into(), "cart-0").await;
            let mut web = http1_client(&one, net.pod(1, 9), cgroup_of(0), (VIP, 80).into()).await;
            assert_eq!(get(&mut web, "/checkout").await.status(), status, "{mode}");
            let outcome = if mode == "allow" { "allowed" } else { "denied" };
            sample_reaches(
                &two.registry,
                &format!("mesh_rate_limit_service_failures_total{{outcome=\"{outcome}\"}}"),
                1.0,
            )
            .await;
            one.stop().await;
            two.stop().await;
        }
    }

    fn hex(id: &[u8]) -> String {
        id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// web-0 on n1 calls cart on n2: the caller's span, the calling agent's (client) and the
    /// serving agent's (server) chain up to the app, whose request names the last as parent.
    #[tokio::test]
    async fn a_request_is_traced_from_the_caller_through_both_agents_to_the_app() {
        let net = Loopback::reserve();
        let ca = test_ca();
        let collector = Collector::start((net.node(3), 4317).into()).await;
        let (web, cart) = (net.pod(1, 9), net.pod(2, 2));
        let mesh = |node: &str, k: u8, peer: &str, j: u8| {
            Mesh::node(node, net.node(k), &net.pod_cidr(k))
                .peer(peer, net.node(j), &net.pod_cidr(j))
                .workload("shop", "web-0", "web", web)
                .workload("shop", "cart-0", "cart", cart)
                .service("shop", "cart", VIP.into(), (80, 8080), &[(cart, "n2")])
                .http(Protocol::Http, "[]")
                .tracing(collector.addr)
        };
        let pod = http_pod((cart, 8080).into(), "cart-0").await;
        let one = Agent::start(mesh("n1", 1, "n2", 2).build(), ca.clone()).await;
        let two = Agent::start(mesh("n2", 2, "n1", 1).build(), ca).await;
        let mut client = http1_client(&one, web, cgroup_of(0), (VIP, 80).into()).await;
        let (trace, caller_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
        let request = http::Request::get("/items/7")
            .header("host", "cart")
            .header("traceparent", format!("00-{trace}-{caller_span}-01"))
            .header("tracestate", "shop=web")
            .body(Full::default())
            .unwrap();
        let response = within(client.send_request(request)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let app_parent = response.headers()["x-traceparent"]
            .to_str()
            .unwrap()
            .to_owned();
        drop(response);
        assert_eq!(pod.requests.load(std::sync::atomic::Ordering::Relaxed), 1);

        let spans = collector.spans(2).await;
        let by_kind = |kind: i32| {
            spans
                .iter()
                .find(|s| s.span.kind == kind)
                .unwrap_or_else(|| panic!("no span of kind {kind} in {spans:#?}"))
        };
        let (client_span, server_span) = (by_kind(3), by_kind(2));
        for s in [client_span, server_span] {
            assert_eq!(hex(&s.span.trace_id), trace);
        }
        assert_eq!(hex(&client_span.span.parent_span_id), caller_span);
        assert_eq!(client_span.span.parent_span_id.len(), 8);
        assert_eq!(server_span.span.parent_span_id, client_span.span.span_id);
        assert_eq!(
            app_parent,
            format!("00-{trace}-{}-01", hex(&server_span.span.span_id)),
            "the app's span is the serving agent's child"
        );
        assert_eq!(client_span.resource("k8s.node.name").as_deref(), Some("n1"));
        assert_eq!(server_span.resource("k8s.node.name").as_deref(), Some("n2"));
        assert_eq!(client_span.span.name, "GET shop/cart");
        for (key, value) in [
            ("http.request.method", "GET"),
            ("http.response.status_code", "200"),
            ("url.path", "/items/7"),
            ("server.address", "cart"),
            ("mesh.destination.service", "shop/cart"),
            (
                "mesh.source.identity",
                "spiffe://cluster.local/ns/shop/sa/web",
            ),
            ("mesh.source.workload", "shop/web-0"),
            ("network.peer.address", &cart.to_string()),
        ] {
            assert_eq!(client_span.attribute(key).as_deref(), Some(value), "{key}");
        }
        for (key, value) in [
            (
                "mesh.source.identity",
                "spiffe://cluster.local/ns/shop/sa/web",
            ),
            ("mesh.destination.service", "shop/cart"),
            ("mesh.destination.workload", "shop/cart-0"),
            (
                "mesh.destination.identity",
                "spiffe://cluster.local/ns/shop/sa/cart",
            ),
            ("mesh.route", "default"),
            ("http.response.status_code", "200"),
        ] {
            assert_eq!(server_span.attribute(key).as_deref(), Some(value), "{key}");
        }
        sample_reaches(
            &one.registry,
            "mesh_trace_spans_total{outcome=\"exported\"}",
            1.0,
        )
        .await;
        one.stop().await;
        two.stop().await;
    }
}
