//! Decisions without sockets: from the state, who calls and what it asked for, what the
//! outbound and inbound paths are to do. The paths carry a plan out; each case is a row of the
//! tables below.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::Method;

use crate::{
    proxy::refusal::Refusal,
    state::routes::{LocalWorkload, Route, Routes},
};

/// What the outbound path does with a captured connection: carry it along `route` as
/// `source` (a local workload, or nobody the mesh knows).
pub struct OutboundPlan {
    pub source: Option<Arc<LocalWorkload>>,
    pub route: Route,
}

/// What the inbound path does with a tunnel stream: dial `target`, a pod of this node
/// (`destination` if it is a meshed workload).
#[derive(Debug)]
pub struct InboundPlan {
    pub target: SocketAddr,
    pub destination: Option<Arc<LocalWorkload>>,
}

/// The plan for a connection captured from `caller` in the enrolled cgroup `cgroup`, whose
/// original destination is `dst`. Who calls is settled first: a pod that took another's
/// address is refused whatever it dialled.
pub fn outbound(
    routes: &Routes,
    caller: IpAddr,
    cgroup: u64,
    dst: SocketAddr,
) -> Result<OutboundPlan, Refusal> {
    let source = routes.caller(caller, cgroup)?;
    let route = routes.route(dst)?;
    Ok(OutboundPlan { source, route })
}

/// The plan for a tunnel stream asking `method` for `authority`.
pub fn inbound(
    routes: &Routes,
    method: &Method,
    authority: Option<&str>,
) -> Result<InboundPlan, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::NotConnect(method.clone()));
    }
    let authority = authority.unwrap_or_default();
    let target: SocketAddr = authority
        .parse()
        .map_err(|_| Refusal::BadAuthority(authority.to_owned()))?;
    if !routes.is_local_pod(target.ip()) {
        return Err(Refusal::NotLocalPod(target));
    }
    Ok(InboundPlan {
        target,
        destination: routes.workload_at(target.ip()).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        state::routes::Hop,
        testing::{self, Mesh, cgroup_of},
    };

    const WEB_CGROUP: u64 = cgroup_of(0);

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    fn routes() -> Routes {
        testing::routes(
            Mesh::node("n1", ip("198.18.0.1"), "198.18.1.0/24")
                .peer("n2", ip("198.18.0.2"), "198.18.2.0/24")
                .workload("shop", "web-0", "web", ip("198.18.1.9"))
                .unmeshed(ip("198.18.1.20"))
                .service(
                    "shop",
                    "cart",
                    ip("198.19.0.10"),
                    (80, 8080),
                    &[(ip("198.18.1.2"), "n1"), (ip("198.18.2.3"), "n2")],
                )
                .service("shop", "empty", ip("198.19.0.11"), (80, 80), &[])
                .build(),
        )
    }

    /// An outbound plan in a word: `service shop/cart as web-0`, `pod local as -`, ...
    fn outbound_case(routes: &Routes, caller: &str, cgroup: u64, dst: &str) -> String {
        match outbound(
            routes,
            caller.parse().unwrap(),
            cgroup,
            dst.parse().unwrap(),
        ) {
            Ok(plan) => {
                let source = plan.source.map_or("-".to_owned(), |w| w.name.clone());
                let route = match plan.route {
                    Route::Service(port) => format!("service {}", port.service),
                    Route::External(e) => format!("external {}", e.dialled),
                    Route::Pod {
                        hop: Hop::Local, ..
                    } => "pod local".to_owned(),
                    Route::Pod {
                        hop: Hop::Tunnel(peer),
                        ..
                    } => format!("pod via {}", peer.node),
                };
                format!("{route} as {source}")
            }
            Err(refusal) => format!("refused {}", refusal.reason()),
        }
    }

    #[test]
    fn outbound_plans() {
        let r = routes();
        let web = "198.18.1.9";
        let rows = [
            // (caller, cgroup, original destination, plan)
            (
                web,
                WEB_CGROUP,
                "198.19.0.10:80",
                "service shop/cart as web-0",
            ),
            (web, WEB_CGROUP, "198.18.2.7:9000", "pod via n2 as web-0"),
            (web, WEB_CGROUP, "198.18.1.2:8080", "pod local as web-0"),
            (web, WEB_CGROUP, "198.18.1.20:5432", "pod local as web-0"),
            // The bridge's address, in the pod CIDR but no pod's.
            (web, WEB_CGROUP, "198.18.1.1:15020", "refused no_route"),
            (web, WEB_CGROUP, "198.19.0.11:80", "refused no_route"),
            (web, WEB_CGROUP, "198.19.9.9:80", "refused no_route"),
            // web-0's address from another cgroup; web-0's cgroup from another address.
            (web, 7, "198.19.0.10:80", "refused caller_mismatch"),
            (
                "198.18.1.50",
                WEB_CGROUP,
                "198.19.0.10:80",
                "refused caller_mismatch",
            ),
            // A caller the mesh does not know goes as nobody.
            ("198.18.1.50", 7, "198.19.0.10:80", "service shop/cart as -"),
            (
                "::ffff:198.18.1.9",
                WEB_CGROUP,
                "198.19.0.10:80",
                "service shop/cart as web-0",
            ),
        ];
        for (caller, cgroup, dst, expected) in rows {
            assert_eq!(
                outbound_case(&r, caller, cgroup, dst),
                expected,
                "{caller} (cgroup {cgroup}) -> {dst}"
            );
        }
    }

    #[test]
    fn inbound_plans() {
        let r = routes();
        let connect = Method::CONNECT;
        let rows: [(&Method, Option<&str>, &str); 10] = [
            // (method, authority, plan)
            (
                &connect,
                Some("198.18.1.9:8080"),
                "dial 198.18.1.9:8080 (web-0)",
            ),
            (
                &connect,
                Some("198.18.1.2:8080"),
                "dial 198.18.1.2:8080 (-)",
            ),
            (
                &connect,
                Some("198.18.1.20:5432"),
                "dial 198.18.1.20:5432 (-)",
            ),
            (&connect, Some("198.18.1.1:15020"), "refused not_local_pod"),
            (
                &connect,
                Some("[::ffff:198.18.1.1]:15020"),
                "refused not_local_pod",
            ),
            (&connect, Some("127.0.0.1:15020"), "refused not_local_pod"),
            (&connect, Some("198.18.2.3:8080"), "refused not_local_pod"),
            (&connect, Some("cart.shop:80"), "refused bad_authority"),
            (&connect, None, "refused bad_authority"),
            (&Method::GET, Some("198.18.1.9:8080"), "refused not_connect"),
        ];
        for (method, authority, expected) in rows {
            let got = match inbound(&r, method, authority) {
                Ok(plan) => format!(
                    "dial {} ({})",
                    plan.target,
                    plan.destination.map_or("-".to_owned(), |w| w.name.clone())
                ),
                Err(refusal) => format!("refused {}", refusal.reason()),
            };
            assert_eq!(got, expected, "{method} {authority:?}");
        }
        assert_eq!(
            inbound(&r, &connect, Some("198.19.9.9:1")).unwrap_err(),
            Refusal::NotLocalPod("198.19.9.9:1".parse().unwrap())
        );
    }
}
