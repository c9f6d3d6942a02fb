//! Captured connections to declared external hosts, by what their port carries: plain HTTP
//! (`proxy::http::egress`, TLS originated where declared), TLS passed through (the
//! ClientHello's SNI names the host: `sni`), or opaque bytes (the host whose address was
//! dialled). The agent connects to the address the app dialled (its own DNS answer), never
//! elsewhere; a connection or request for a host nobody declared is refused under
//! `registry_only` and passed on under `allow_any`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpStream, time::timeout};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    config::egress::{ExternalProtocol, OutboundPolicy, TlsMode},
    observability::{
        access::{Direction, Metered, Record},
        metrics::{ConnectionLabels, Metrics},
    },
    proxy::{copy, dial::CONNECT_TIMEOUT, http::egress::EgressHttp, refusal::Refusal},
    state::{egress::External, routes::LocalWorkload},
    system,
};

pub mod sni;

/// The `hop` label of connections to external hosts.
const HOP: &str = "egress";

/// What carrying a connection to an external host needs.
pub struct Egress {
    pub metrics: Arc<Metrics>,
    pub policy: OutboundPolicy,
    /// How long a passed-through TLS client may take to send its ClientHello.
    pub hello_wait: Duration,
    pub abort: CancellationToken,
}

impl Egress {
    /// Carries `client`'s connection, captured for `external` at `dst`, from `source`.
    pub async fn carry(
        self,
        client: TcpStream,
        external: External,
        source: Option<Arc<LocalWorkload>>,
        dst: SocketAddr,
        mut record: Record,
    ) {
        let port = external.port.clone();
        if port.protocol == ExternalProtocol::Http {
            let labels = self.labels(source.as_deref(), external.dialled.as_str());
            record.connected(labels, dst);
            let client = Metered::new(client);
            let traffic = client.traffic();
            let http = EgressHttp::new(self.metrics.clone(), port, self.policy, dst, source);
            let ended = http.serve(client, &self.abort).await;
            return record.copied(&traffic, ended);
        }
        let host = match port.tls {
            TlsMode::Passthrough => match sni::server_name(&client, self.hello_wait).await {
                sni::Hello::Sni(name) => match port.host(&name) {
                    Some((_, declared)) => Ok(declared.to_string()),
                    None => Err(name),
                },
                _ => Err(String::new()),
            },
            _ => Ok(external.dialled.to_string()),
        };
        let host = match host {
            Ok(host) => host,
            Err(asked) if self.policy == OutboundPolicy::RegistryOnly => {
                self.metrics.egress_refused(source.as_deref(), dst);
                return record.refuse(Refusal::UndeclaredHost { asked, dst });
            }
            // Passed on as dialled, as any undeclared destination is.
            Err(_) => String::new(),
        };
        let upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(e)) => return record.unreachable(format!("{host} at {dst}: {e}")),
            Err(_) => return record.unreachable(format!("{host} at {dst}: no answer in time")),
        };
        for stream in [&client, &upstream] {
            if let Err(e) = stream.set_nodelay(true) {
                debug!("cannot set TCP_NODELAY: {e}");
            }
        }
        record.connected(self.labels(source.as_deref(), &host), dst);
        let mut client = Metered::new(client);
        let mut upstream = upstream;
        let ended = copy::until_done(&mut client, &mut upstream, &self.abort).await;
        if !ended.is_complete() {
            system::reset_on_close(client.get_ref());
            system::reset_on_close(&upstream);
        }
        record.copied(&client.traffic(), ended);
    }

    /// A connection of `source` to the external host declared as `host` (empty: undeclared).
    fn labels(&self, source: Option<&LocalWorkload>, host: &str) -> ConnectionLabels {
        let [source_namespace, source_workload, source_identity] =
            LocalWorkload::label_values(source);
        ConnectionLabels {
            direction: Direction::Outbound.as_str(),
            source_namespace,
            source_workload,
            source_identity,
            destination_service: host.to_owned(),
            destination_namespace: String::new(),
            destination_workload: String::new(),
            hop: HOP,
        }
    }
}

#[cfg(test)]
mod carried;
