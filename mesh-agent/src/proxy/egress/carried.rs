//! Egress through an in-process agent to a third party on loopback with a CA of its own:
//! HTTP with TLS originated (SNI and certificate checked), TLS passed through by SNI, and
//! hosts nobody declared refused under `registry_only`.

use std::{net::IpAddr, sync::Arc};

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::{
    config::egress::pem_certificates,
    testing::{
        Agent, Loopback, Mesh, cgroup_of, http1_client, sample, test_ca,
        third_party::{ThirdParty, unrelated_ca},
        within,
    },
};

const WEB: u64 = cgroup_of(0);

/// An address outside every node and pod range of `net`: the third party's.
fn outside(net: &Loopback) -> IpAddr {
    let IpAddr::V4(node) = net.node(1) else {
        unreachable!()
    };
    [127, node.octets()[1], 200, 1].into()
}

fn mesh(net: &Loopback) -> Mesh {
    Mesh::node("n1", net.node(1), &net.pod_cidr(1)).workload("shop", "web-0", "web", net.pod(1, 9))
}

/// `yaml` with each line indented by `n` spaces (a PEM block in a YAML block scalar).
fn indented(pem: &str, n: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(n)))
        .collect()
}

async fn get(
    client: &mut hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>,
    host: &str,
) -> (StatusCode, String) {
    let request = Request::get("/")
        .header("host", host)
        .body(Full::default())
        .unwrap();
    let response = within(client.send_request(request)).await.unwrap();
    let status = response.status();
    let body = within(response.into_body().collect()).await.unwrap();
    (
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    )
}

#[tokio::test]
async fn http_goes_out_as_tls_the_agent_originates_and_undeclared_hosts_are_refused() {
    let net = Loopback::reserve();
    let address = outside(&net);
    let third = ThirdParty::start(address, &["api.courier.test", "untrusted.courier.test"]).await;
    let tls_port = third.addr.port();
    let egress = format!(
        "
outbound_policy: registry_only
hosts:
  - names: [api.courier.test]
    ports: [{{ port: 80, protocol: http, tls: originate, target_port: {tls_port} }}]
    ca_certificates: |
{}
  - names: [untrusted.courier.test]
    ports: [{{ port: 80, protocol: http, tls: originate, target_port: {tls_port} }}]
    ca_certificates: |
{}
",
        indented(&third.ca_pem, 6),
        indented(&unrelated_ca(), 6),
    );
    let state = mesh(&net)
        .egress(&egress)
        .resolved("api.courier.test", address)
        .resolved("untrusted.courier.test", address)
        .build();
    let agent = Agent::start(state, test_ca()).await;
    let mut client = http1_client(&agent, net.pod(1, 9), WEB, (address, 80).into()).await;

    let (status, body) = get(&mut client, "api.courier.test").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "third-party api.courier.test")
    );
    // Hosts share the address: each request's Host picks its own, in any case.
    let (status, _) = get(&mut client, "API.courier.test:80").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        *third.server_names.lock().unwrap(),
        ["api.courier.test"],
        "one TLS connection, named by SNI, served both requests"
    );

    // Its certificate does not chain to the CA declared for this name.
    let (status, body) = get(&mut client, "untrusted.courier.test").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("TLS to untrusted.courier.test"), "{body}");

    let (status, body) = get(&mut client, "elsewhere.test").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("elsewhere.test is no declared external host"),
        "{body}"
    );

    let requests = |host: &str, code: u16| {
        sample(
            &agent.registry,
            &format!(
                "mesh_requests_total{{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"{host}\",route=\"egress\",method=\"GET\",code=\"{code}\""
            ),
        )
    };
    // A request's record is written when its response body is done: wait for the last.
    crate::testing::sample_reaches(
        &agent.registry,
        "mesh_requests_total{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"\",route=\"egress\",method=\"GET\",code=\"403\"",
        1.0,
    )
    .await;
    assert_eq!(requests("api.courier.test", 200), 2.0);
    assert_eq!(requests("untrusted.courier.test", 503), 1.0);
    let refused = format!(
        "mesh_egress_refused_total{{source_namespace=\"shop\",source_workload=\"web-0\",destination=\"{address}:80\"}}"
    );
    assert_eq!(sample(&agent.registry, &refused), 1.0);
    agent.stop().await;
}

/// A TLS client trusting `ca_pem`, over a connection captured to `dst`, asking for `name`.
async fn tls_get(
    agent: &Agent,
    net: &Loopback,
    dst: std::net::SocketAddr,
    ca_pem: &str,
    name: &str,
) -> std::io::Result<String> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certificates(ca_pem).unwrap() {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = agent.connect(net.pod(1, 9), WEB, dst).await;
    let server = ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = within(TlsConnector::from(Arc::new(config)).connect(server, conn)).await?;
    let request = format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    within(tls.read_to_string(&mut response)).await?;
    Ok(response)
}

#[tokio::test]
async fn tls_passes_through_to_the_hosts_its_sni_names() {
    let net = Loopback::reserve();
    let address = outside(&net);
    let third = ThirdParty::start(address, &["eu.sms.test", "elsewhere.test"]).await;
    let port = third.addr.port();
    // A wildcard: any address at the port is captured, the SNI tells the hosts apart.
    let egress = format!(
        "
outbound_policy: registry_only
hosts:
  - names: ['*.sms.test']
    ports: [{{ port: {port}, tls: passthrough }}]
"
    );
    let agent = Agent::start(mesh(&net).egress(&egress).build(), test_ca()).await;

    let response = tls_get(&agent, &net, third.addr, &third.ca_pem, "eu.sms.test")
        .await
        .unwrap();
    assert!(response.ends_with("third-party eu.sms.test"), "{response}");
    let refused = tls_get(&agent, &net, third.addr, &third.ca_pem, "elsewhere.test").await;
    assert!(
        refused.is_err(),
        "an undeclared SNI got through: {refused:?}"
    );
    assert_eq!(*third.server_names.lock().unwrap(), ["eu.sms.test"]);
    let connections = "mesh_connections_opened_total{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"web-0\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"*.sms.test\",destination_namespace=\"\",destination_workload=\"\",hop=\"egress\"}";
    assert_eq!(sample(&agent.registry, connections), 1.0);
    assert_eq!(
        sample(
            &agent.registry,
            "mesh_refusals_total{reason=\"undeclared_host\"}"
        ),
        1.0
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_host_with_egress_nodes_leaves_from_them_through_the_tunnel() {
    let net = Loopback::reserve();
    let address = outside(&net);
    let third = ThirdParty::start(address, &["api.courier.test"]).await;
    let tls_port = third.addr.port();
    let egress = |selector: &str| {
        format!(
            "
outbound_policy: registry_only
hosts:
  - names: [api.courier.test]
    ports: [{{ port: 80, protocol: http, tls: originate, target_port: {tls_port} }}]
    egress_nodes: {{ mesh.dev/egress: '{selector}' }}
    ca_certificates: |
{}
",
            indented(&third.ca_pem, 6)
        )
    };
    // n2 is the egress node; web runs on n1.
    let node = |k: u8| if k == 1 { "n1" } else { "n2" };
    let build = |k: u8, selector: &str| {
        let other = 3 - k;
        let mut mesh = Mesh::node(node(k), net.node(k), &net.pod_cidr(k))
            .peer(node(other), net.node(other), &net.pod_cidr(other))
            .node_label("n2", "mesh.dev/egress", "true")
            .egress(&egress(selector))
            .resolved("api.courier.test", address);
        if k == 1 {
            mesh = mesh.workload("shop", "web-0", "web", net.pod(1, 9));
        }
        mesh.build()
    };
    let ca = test_ca();
    let one = Agent::start(build(1, "true"), ca.clone()).await;
    let two = Agent::start(build(2, "true"), ca.clone()).await;
    let mut client = http1_client(&one, net.pod(1, 9), WEB, (address, 80).into()).await;
    let (status, body) = get(&mut client, "api.courier.test").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "third-party api.courier.test")
    );
    // n1 served the request and sent it through the tunnel; n2 carried it out, TLS included.
    let requests = |workload: &str| {
        format!(
            "mesh_requests_total{{direction=\"outbound\",source_namespace=\"shop\",source_workload=\"{workload}\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_service=\"api.courier.test\",route=\"egress\",method=\"GET\",code=\"200\""
        )
    };
    crate::testing::sample_reaches(&one.registry, &requests("web-0"), 1.0).await;
    crate::testing::sample_reaches(&two.registry, &requests(""), 1.0).await;
    assert_eq!(*third.server_names.lock().unwrap(), ["api.courier.test"]);

    // No node with the labels: answered 503, nothing leaves.
    one.routes
        .send_replace(Arc::new(crate::testing::routes(build(1, "elsewhere"))));
    let mut client = http1_client(&one, net.pod(1, 9), WEB, (address, 80).into()).await;
    let (status, body) = get(&mut client, "api.courier.test").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("egress nodes"), "{body}");
    assert_eq!(third.server_names.lock().unwrap().len(), 1);
    one.stop().await;
    two.stop().await;
}
