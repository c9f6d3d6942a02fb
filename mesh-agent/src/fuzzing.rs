//! Entry points for the fuzzers (`fuzz/`, run by `cargo xtask fuzz`): everything that parses
//! input from outside the agent, each taking raw bytes. None may panic, whatever the bytes.
//! Compiled only under cargo-fuzz (`--cfg fuzzing`).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, LazyLock},
};

use http::{HeaderName, HeaderValue, Method, Request, Uri};
use serde_json::Value;

use crate::{
    config::{CgroupPath, Config, Name},
    discovery::kubernetes::model::Cluster,
    proxy::{balance::EndpointStates, http::detect, plan},
    state::routes::{Route, Routes},
};

/// The configuration reference (every feature), as the fixed state the other targets run in.
const EXAMPLE: &str = include_str!("../../deploy/agent.example.yaml");

static EXAMPLE_CONFIG: LazyLock<Option<Arc<Config>>> = LazyLock::new(|| {
    Config::parse(Path::new("agent.example.yaml"), EXAMPLE)
        .ok()
        .map(Arc::new)
});

static ROUTES: LazyLock<Option<Routes>> = LazyLock::new(|| {
    let config = EXAMPLE_CONFIG.as_ref()?;
    let cgroups = vec![None; config.workloads.len()];
    Some(Routes::new(
        config.clone(),
        &EndpointStates::default(),
        &cgroups,
    ))
});

/// The YAML config, as `mesh-agent run --config` reads it.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(Path::new("fuzz.yaml"), text);
    }
}

/// Kubernetes objects (a JSON list of any kinds), converted into the config of the node
/// `worker-1` (as in the checked-in fixtures).
pub fn kubernetes_objects(data: &[u8]) {
    let Ok(objects) = serde_json::from_slice::<Vec<Value>>(data) else {
        return;
    };
    let mut cluster = Cluster::default();
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        macro_rules! push {
            ($field:ident) => {
                if let Ok(o) = serde_json::from_value(object) {
                    cluster.$field.push(Arc::new(o));
                }
            };
        }
        match kind.as_str() {
            "Namespace" => push!(namespaces),
            "Node" => push!(nodes),
            "Pod" => push!(pods),
            "Service" => push!(services),
            "EndpointSlice" => push!(endpoint_slices),
            "HTTPRoute" => push!(http_routes),
            "GRPCRoute" => push!(grpc_routes),
            "TrafficPolicy" => push!(traffic_policies),
            "AuthorizationPolicy" => push!(authorization_policies),
            "ExternalHost" => push!(external_hosts),
            _ => {}
        }
    }
    let Some(example) = EXAMPLE_CONFIG.as_ref() else {
        return;
    };
    let Ok(node) = "worker-1".parse::<Name>() else {
        return;
    };
    let _ = cluster.config(&node, &example.settings, |uid| {
        format!("/kubepods/pod{uid}").parse::<CgroupPath>().ok()
    });
}

/// A tunnel request's method and authority (`ip:port`), as the inbound side plans it: the
/// first byte picks the method, the rest is the authority.
pub fn connect_authority(data: &[u8]) {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let Some(routes) = ROUTES.as_ref() else {
        return;
    };
    let method = match first % 3 {
        0 => Method::CONNECT,
        1 => Method::GET,
        _ => Method::POST,
    };
    // As hyper hands it over: only what parses as an authority.
    if let Ok(authority) = http::uri::Authority::try_from(rest) {
        let _ = plan::inbound(routes, &method, Some(authority.as_str()));
    }
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = plan::inbound(routes, &method, Some(text));
    }
}

/// A client's first bytes, as `auto` ports judge them.
pub fn protocol_detection(data: &[u8]) {
    let _ = detect::judge(data);
}

/// An HTTP request (`METHOD target` on the first line, `name: value` lines after), routed by
/// every HTTP service port of the example and given its route's header edits.
pub fn http_request(data: &[u8]) {
    let Some(routes) = ROUTES.as_ref() else {
        return;
    };
    let Some(parts) = request(data) else {
        return;
    };
    for service in &routes.config().services {
        for port in &service.ports {
            for address in &service.addresses {
                let Ok(Route::Service(port)) = routes.route(SocketAddr::new(*address, port.port))
                else {
                    continue;
                };
                let Some(http) = &port.http else { continue };
                if let Some(route) = http.route(&parts) {
                    let mut headers = parts.headers.clone();
                    route.request_headers.apply(&mut headers);
                }
            }
        }
    }
}

fn request(data: &[u8]) -> Option<http::request::Parts> {
    let mut lines = data.split(|b| *b == b'\n');
    let mut first = lines.next()?.splitn(2, |b| *b == b' ');
    let method = Method::from_bytes(first.next()?).ok()?;
    let uri = Uri::try_from(first.next()?).ok()?;
    let mut request = Request::builder().method(method).uri(uri);
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value[1..].trim_ascii()),
        ) else {
            continue;
        };
        request = request.header(name, value);
    }
    Some(request.body(()).ok()?.into_parts().0)
}
