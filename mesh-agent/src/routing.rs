//! Where a captured connection goes: a service address to one of its endpoints, a pod
//! address as it is.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use ipnet::IpNet;

use crate::config::Config;

/// The routing table built from a [`Config`].
pub struct Routes {
    services: HashMap<SocketAddr, ServicePort>,
    pod_cidrs: Vec<IpNet>,
}

/// One port of one service and the endpoints behind it.
struct ServicePort {
    service: String,
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

/// Where to dial for one captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `namespace/name` of the service, or `None` for a connection straight to a pod.
    pub service: Option<String>,
    pub target: SocketAddr,
}

/// Why a captured connection has nowhere to go.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoRoute {
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    #[error("{0} is neither a service address nor in a pod CIDR")]
    NotOwned(SocketAddr),
}

impl Routes {
    pub fn new(config: &Config) -> Self {
        let mut services = HashMap::new();
        for s in &config.services {
            for port in &s.ports {
                let endpoints: Vec<SocketAddr> = s
                    .endpoints
                    .iter()
                    .map(|e| SocketAddr::new(e.address, port.target_port()))
                    .collect();
                for addr in &s.addresses {
                    services.insert(
                        SocketAddr::new(*addr, port.port),
                        ServicePort {
                            service: format!("{}/{}", s.namespace, s.name),
                            endpoints: endpoints.clone(),
                            next: AtomicUsize::new(0),
                        },
                    );
                }
            }
        }
        Self {
            services,
            pod_cidrs: config.pod_cidrs.clone(),
        }
    }

    /// The target for a connection whose original destination was `dst`. Endpoints of a
    /// service take turns.
    pub fn route(&self, dst: SocketAddr) -> Result<Route, NoRoute> {
        if let Some(port) = self.services.get(&dst) {
            if port.endpoints.is_empty() {
                return Err(NoRoute::NoEndpoints(port.service.clone()));
            }
            let turn = port.next.fetch_add(1, Ordering::Relaxed) % port.endpoints.len();
            return Ok(Route {
                service: Some(port.service.clone()),
                target: port.endpoints[turn],
            });
        }
        if self.pod_cidrs.iter().any(|net| net.contains(&dst.ip())) {
            return Ok(Route {
                service: None,
                target: dst,
            });
        }
        Err(NoRoute::NotOwned(dst))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn routes() -> Routes {
        let config = Config::parse(
            Path::new("t.yaml"),
            "\
node: { name: n1, addresses: [198.18.0.1] }
pod_cidrs: [198.18.1.0/24]
services:
  - name: cart
    namespace: shop
    addresses: [198.19.0.10, \"2001:2:ff::10\"]
    ports: [{ port: 80, target_port: 8080 }, { port: 81 }]
    endpoints: [{ address: 198.18.1.2, node: n1 }, { address: 198.18.1.3, node: n1 }]
  - name: empty
    namespace: shop
    addresses: [198.19.0.11]
    ports: [{ port: 80 }]
",
        )
        .unwrap();
        Routes::new(&config)
    }

    #[test]
    fn service_ports_map_to_target_ports_in_turn() {
        let r = routes();
        let vip: SocketAddr = "198.19.0.10:80".parse().unwrap();
        let targets: Vec<_> = (0..4).map(|_| r.route(vip).unwrap().target).collect();
        let a: SocketAddr = "198.18.1.2:8080".parse().unwrap();
        let b: SocketAddr = "198.18.1.3:8080".parse().unwrap();
        assert_eq!(targets, vec![a, b, a, b]);
        let v6 = r.route("[2001:2:ff::10]:81".parse().unwrap()).unwrap();
        assert_eq!(v6.service.as_deref(), Some("shop/cart"));
        assert_eq!(v6.target.port(), 81);
    }

    #[test]
    fn pod_addresses_route_as_they_are() {
        let dst: SocketAddr = "198.18.1.7:9000".parse().unwrap();
        let route = routes().route(dst).unwrap();
        assert_eq!(
            route,
            Route {
                service: None,
                target: dst
            }
        );
    }

    #[test]
    fn unroutable_destinations_say_why() {
        let r = routes();
        assert_eq!(
            r.route("198.19.0.11:80".parse().unwrap()),
            Err(NoRoute::NoEndpoints("shop/empty".into()))
        );
        let stray: SocketAddr = "198.19.0.10:8080".parse().unwrap();
        assert_eq!(r.route(stray), Err(NoRoute::NotOwned(stray)));
    }
}
