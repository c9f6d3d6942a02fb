//! Policies enforced through two in-process agents: across nodes by the serving agent (at the
//! CONNECT, or per request), on one node by the calling agent; open connections a change
//! denies are closed.

use std::{net::IpAddr, sync::Arc};

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    config::Protocol,
    discovery::Snapshot,
    testing::{
        Agent, Loopback, Mesh, cgroup_of, echo_pod, http_pod, http1_client, round_trip, routes,
        sample, sample_reaches, test_ca, within,
    },
};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
/// Payments on node 2 (across) and on node 1 (local), over HTTP and TCP.
const PAYMENTS: [u8; 4] = [198, 19, 0, 20];
const PAYMENTS_HERE: [u8; 4] = [198, 19, 0, 21];
const LEDGER: [u8; 4] = [198, 19, 0, 22];
const LEDGER_HERE: [u8; 4] = [198, 19, 0, 23];

/// Only orders, from its own address, may POST /charge to payments (HTTP, 8080) and reach
/// its ledger (TCP, 9000).
fn only_orders(orders: IpAddr) -> String {
    format!(
        "
policies:
  - name: charge
    namespace: shop
    target: {{ workloads: {{ app: payments }} }}
    action: allow
    rules:
      - from: [{{ principals: ['{ORDERS}'], ip_blocks: ['{orders}/32'] }}]
        to: [{{ methods: [POST], paths: [/charge] }}]
      - from: [{{ principals: ['*/sa/orders'] }}]
        to: [{{ ports: [9000] }}]
"
    )
}

/// Node 1 runs web-0, orders-0 and payments-1; node 2 runs payments-2.
struct Shop {
    net: Loopback,
    one: Agent,
    two: Agent,
}

impl Shop {
    /// The shop under the authorization `policies` give for its addresses.
    async fn start(policies: impl Fn(&Loopback) -> String) -> Self {
        let net = Loopback::reserve();
        let ca = test_ca();
        let (one, two) = Self::mesh(&net, &policies(&net));
        for k in [1, 2] {
            http_pod((net.pod(k, 5), 8080).into(), "payments").await;
            echo_pod((net.pod(k, 5), 9000).into()).await;
        }
        Self {
            one: Agent::start(one, ca.clone()).await,
            two: Agent::start(two, ca).await,
            net,
        }
    }

    /// Both nodes' states under `authorization`.
    fn mesh(net: &Loopback, authorization: &str) -> (Snapshot, Snapshot) {
        let services = |mesh: Mesh| {
            let (there, here) = (net.pod(2, 5), net.pod(1, 5));
            mesh.service(
                "shop",
                "payments",
                PAYMENTS.into(),
                (80, 8080),
                &[(there, "n2")],
            )
            .http(Protocol::Http, "[]")
            .service(
                "shop",
                "payments-here",
                PAYMENTS_HERE.into(),
                (80, 8080),
                &[(here, "n1")],
            )
            .http(Protocol::Http, "[]")
            .service(
                "shop",
                "ledger",
                LEDGER.into(),
                (90, 9000),
                &[(there, "n2")],
            )
            .service(
                "shop",
                "ledger-here",
                LEDGER_HERE.into(),
                (90, 9000),
                &[(here, "n1")],
            )
            .authorization(authorization)
        };
        let one = services(
            Mesh::node("n1", net.node(1), &net.pod_cidr(1))
                .peer("n2", net.node(2), &net.pod_cidr(2))
                .workload("shop", "web-0", "web", net.pod(1, 9))
                .workload("shop", "orders-0", "orders", net.pod(1, 8))
                .workload("shop", "payments-1", "payments", net.pod(1, 5)),
        )
        .build();
        let two = services(
            Mesh::node("n2", net.node(2), &net.pod_cidr(2))
                .peer("n1", net.node(1), &net.pod_cidr(1))
                .workload("shop", "payments-2", "payments", net.pod(2, 5)),
        )
        .build();
        (one, two)
    }

    /// Both agents take `authorization` (a config change).
    fn apply(&self, authorization: &str) {
        let (one, two) = Self::mesh(&self.net, authorization);
        self.one.routes.send_replace(Arc::new(routes(one)));
        self.two.routes.send_replace(Arc::new(routes(two)));
    }

    fn web(&self) -> (IpAddr, u64) {
        (self.net.pod(1, 9), cgroup_of(0))
    }

    fn orders(&self) -> (IpAddr, u64) {
        (self.net.pod(1, 8), cgroup_of(1))
    }

    async fn http(
        &self,
        (pod, cgroup): (IpAddr, u64),
        vip: [u8; 4],
    ) -> SendRequest<Full<bytes::Bytes>> {
        http1_client(&self.one, pod, cgroup, (vip, 80).into()).await
    }

    async fn stop(self) {
        self.one.stop().await;
        self.two.stop().await;
    }
}

/// The status and body of `method path`, and whether the pod saw `mesh-source-address`.
async fn call(
    client: &mut SendRequest<Full<bytes::Bytes>>,
    method: &str,
    path: &str,
) -> (StatusCode, String, bool) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "payments")
        // Nobody but an agent says where a request comes from.
        .header("mesh-source-address", "10.0.0.1")
        .body(Full::default())
        .unwrap();
    let response = within(client.send_request(request)).await.unwrap();
    let status = response.status();
    let leaked = response.headers().contains_key("x-mesh-source-address");
    let body = within(response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), leaked)
}

#[tokio::test]
async fn http_rules_are_decided_per_request_where_the_callee_lives() {
    let shop = Shop::start(|net| only_orders(net.pod(1, 8))).await;
    for vip in [PAYMENTS, PAYMENTS_HERE] {
        let mut orders = shop.http(shop.orders(), vip).await;
        let mut web = shop.http(shop.web(), vip).await;
        let cases = [
            // (who, method, path, status)
            (true, "POST", "/charge", StatusCode::OK),
            (true, "GET", "/charge", StatusCode::FORBIDDEN),
            (true, "POST", "/refund", StatusCode::FORBIDDEN),
            (false, "POST", "/charge", StatusCode::FORBIDDEN),
        ];
        for (is_orders, method, path, expected) in cases {
            let client = if is_orders { &mut orders } else { &mut web };
            let (status, body, leaked) = call(client, method, path).await;
            assert_eq!(status, expected, "{method} {path} to {vip:?}: {body}");
            if status == StatusCode::FORBIDDEN {
                assert_eq!(body, "RBAC: access denied\n");
            }
            assert!(!leaked, "the pod saw mesh-source-address");
        }
    }
    let denied = "mesh_authorization_decisions_total{action=\"deny\",policy=\"no-allow-match\"}";
    let allowed = "mesh_authorization_decisions_total{action=\"allow\",policy=\"shop/charge\"}";
    // Across nodes the serving agent decided, on this node the calling one.
    for agent in [&shop.one, &shop.two] {
        sample_reaches(&agent.registry, denied, 3.0).await;
        assert_eq!(sample(&agent.registry, allowed), 1.0);
    }
    shop.stop().await;
}

#[tokio::test]
async fn connections_are_decided_at_the_connect_and_cut_when_a_change_denies_them() {
    let shop = Shop::start(|net| only_orders(net.pod(1, 8))).await;
    let authorization = only_orders(shop.net.pod(1, 8));
    let connect = |(pod, cgroup): (IpAddr, u64), vip: [u8; 4]| {
        shop.one.connect(pod, cgroup, (vip, 90).into())
    };
    for vip in [LEDGER, LEDGER_HERE] {
        let allowed = round_trip(connect(shop.orders(), vip).await, b"entry")
            .await
            .unwrap();
        assert_eq!(allowed, b"entry", "orders to {vip:?}");
        let denied = round_trip(connect(shop.web(), vip).await, b"entry").await;
        assert!(
            denied.as_ref().map_or(true, |back| back.is_empty()),
            "web reached {vip:?}: {denied:?}"
        );
    }
    // Refused at the CONNECT on node 2, before the dial on node 1.
    let refused = "mesh_refusals_total{reason=\"denied\"}";
    sample_reaches(&shop.two.registry, refused, 1.0).await;
    sample_reaches(&shop.one.registry, refused, 2.0).await;

    // Long connections of orders to both ledgers; then a policy denies orders' address.
    let mut open = Vec::new();
    for vip in [LEDGER, LEDGER_HERE] {
        let mut conn = connect(shop.orders(), vip).await;
        conn.write_all(b"x").await.unwrap();
        let mut byte = [0; 1];
        within(conn.read_exact(&mut byte)).await.unwrap();
        open.push(conn);
    }
    let no_orders = format!(
        "{authorization}  - {{ name: freeze, namespace: shop, action: deny, rules: [{{ from: [{{ ip_blocks: ['{}/32'] }}] }}] }}\n",
        shop.net.pod(1, 8)
    );
    shop.apply(&no_orders);
    for mut conn in open {
        // Closed (an end or a reset), not left open: that would time out.
        let mut rest = Vec::new();
        let read = within(conn.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "more came: {read:?}");
    }
    let cut = "mesh_authorization_cuts_total{policy=\"shop/freeze\"}";
    sample_reaches(&shop.one.registry, cut, 1.0).await;
    sample_reaches(&shop.two.registry, cut, 1.0).await;
    shop.stop().await;
}

/// Policies that never look into requests decide the pooled HTTP connection's CONNECT: a
/// denied caller's requests get 403 from the calling agent, and the endpoint is not ejected.
#[tokio::test]
async fn an_http_caller_denied_at_the_connect_gets_403_and_ejects_nothing() {
    let shop = Shop::start(|_| {
        format!(
            "policies: [{{ name: orders-only, namespace: shop, action: allow, rules: [{{ from: [{{ principals: ['{ORDERS}'] }}] }}] }}]"
        )
    })
    .await;
    let mut web = shop.http(shop.web(), PAYMENTS).await;
    let mut orders = shop.http(shop.orders(), PAYMENTS).await;
    for _ in 0..3 {
        let (status, body, _) = call(&mut web, "GET", "/charge").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body, "RBAC: access denied\n");
    }
    let (status, body, _) = call(&mut orders, "GET", "/charge").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Each of web's requests asked for a connection, and was refused one.
    sample_reaches(
        &shop.two.registry,
        "mesh_refusals_total{reason=\"denied\"}",
        3.0,
    )
    .await;
    assert_eq!(
        sample(&shop.one.registry, "mesh_endpoint_ejections_total"),
        0.0
    );
    shop.stop().await;
}
