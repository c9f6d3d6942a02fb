//! End-to-end: locality across three nodes in two regions (n1 and n2 in eu-west, zones a and
//! b; n3 in us-east), driven by curl from a pod of n1: the caller's zone first, its region
//! when the zone's endpoint is down, and a service pinned to eu-west that never crosses to
//! us-east, even with nothing left inside (by the agents' counters and a capture of the
//! links between the nodes).

use mesh_tests::{Lab, LabSpec, Running, ServiceSpec, frames, sum};

const CATALOG: &str = "198.19.0.40";
const PAYMENTS: &str = "198.19.0.41";

fn spec() -> LabSpec {
    let topology = |region: &str, zone: &str| {
        format!(
            "{{ topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: {zone} }}"
        )
    };
    LabSpec::default()
        .node("n1")
        .node("n2")
        .node("n3")
        .node_labels("n1", &topology("eu-west", "eu-west-a"))
        .node_labels("n2", &topology("eu-west", "eu-west-b"))
        .node_labels("n3", &topology("us-east", "us-east-a"))
        .pod("n1", "client", true)
        .pod("n1", "catalog-1", true)
        .pod("n2", "catalog-2", true)
        .pod("n3", "catalog-3", true)
        .pod("n2", "payments-2", true)
        .pod("n3", "payments-3", true)
        .service(ServiceSpec::echo(
            "catalog",
            &[CATALOG],
            &["catalog-1", "catalog-2", "catalog-3"],
        ))
        .service(
            ServiceSpec::echo("payments", &[PAYMENTS], &["payments-2", "payments-3"])
                .service_field("allowed_regions: [eu-west]"),
        )
}

/// Which pod answered `curl http://vip/` from the client, or `-` if none did.
fn answered_by(lab: &Lab, vip: &str) -> String {
    let url = format!("http://{vip}/");
    let args = [
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%header{x-pod}",
        "--connect-timeout",
        "3",
        "-m",
        "10",
        &url,
    ];
    let out = lab.run_program("client", "curl", &args).unwrap();
    match out.stdout.trim() {
        "" => "-".to_owned(),
        pod => pod.to_owned(),
    }
}

/// Who answered `n` calls to `vip`, in order.
fn answers(lab: &Lab, vip: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| answered_by(lab, vip)).collect()
}

#[test]
fn calls_stay_in_the_zone_then_the_region_and_pinned_ones_never_leave_it() {
    let lab = Lab::new(spec()).unwrap();
    let _agents: Vec<_> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| lab.start_agent(n, &[]).unwrap())
        .collect();
    let mut catalog: Vec<Running> = ["catalog-1", "catalog-2", "catalog-3"]
        .iter()
        .map(|p| lab.serve_http(p, &[]).unwrap())
        .collect();
    let mut payments: Vec<Running> = ["payments-2", "payments-3"]
        .iter()
        .map(|p| lab.serve_http(p, &[]).unwrap())
        .collect();
    let capture = lab.capture("locality").unwrap();

    // The caller's zone takes every call while its endpoint is up.
    assert_eq!(answers(&lab, CATALOG, 10), vec!["catalog-1"; 10]);
    // Down: the region's takes them (its connect failures retried there, then ejected),
    // never the other region's.
    drop(catalog.remove(0));
    assert_eq!(answers(&lab, CATALOG, 10), vec!["catalog-2"; 10]);

    // Pinned to eu-west: n2's endpoint only; with it down, nothing, rather than us-east.
    assert_eq!(answers(&lab, PAYMENTS, 5), vec!["payments-2"; 5]);
    drop(payments.remove(0));
    assert_eq!(answers(&lab, PAYMENTS, 5), vec!["-"; 5]);
    let pinned = lab.metrics_when("n1", |m| {
        sum(m, "mesh_refusals_total{reason=\"pinned\"}") >= 5.0
    });
    assert_eq!(sum(&pinned, "mesh_refusals_total{reason=\"pinned\"}"), 5.0);

    // Nothing of n1 ever went to n3: no tunnel, no connection at all.
    let file = lab.stop_capture(capture).unwrap();
    let to_n3 = frames(
        &file,
        "ip.src == 198.18.0.1 && ip.dst == 198.18.0.3",
        &["tcp.dstport"],
    )
    .unwrap();
    assert!(to_n3.is_empty(), "n1 sent to n3: {to_n3:?}");
    let to_n2 = frames(
        &file,
        "ip.src == 198.18.0.1 && ip.dst == 198.18.0.2 && tcp.dstport == 15008",
        &["frame.number"],
    )
    .unwrap();
    assert!(!to_n2.is_empty(), "the capture saw the calls to n2");
    drop(payments);
}
