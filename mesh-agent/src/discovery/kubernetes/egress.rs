//! ExternalHost (`mesh.dev/v1alpha1`): an external host (or a wildcard family of them) that
//! enrolled pods may call, declared in any namespace for the whole mesh (as Istio's
//! ServiceEntry with its default export), and the label of `mesh-system` that sets the
//! outbound policy. An object the agent cannot use is reported with its field and its last
//! good version stays (`last_good`); one that declares a name or a port another object
//! declared first (by namespace, then name) otherwise is left out.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Namespace;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::last_good::LastGood;
use crate::{
    config::egress::{
        self, Egress, ExternalHost as Host, ExternalPort, ExternalProtocol, OutboundPolicy, TlsMode,
    },
    identity::AGENT_NAMESPACE,
};

/// The label of `mesh-system` that sets the mesh's outbound policy: `registry-only` refuses
/// what is neither the mesh's nor declared; anything else (or none) lets it out.
pub const OUTBOUND_POLICY_LABEL: &str = "mesh.dev/outbound-policy";

/// An external host that enrolled pods may call.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "ExternalHost",
    plural = "externalhosts",
    shortname = "exthost",
    namespaced,
    doc = "An external host (or, by a *. name, a family of them) that the mesh's pods may call: its names, ports and what crosses them; the mesh agents resolve its names and capture its addresses, originate TLS to it or pass the pods' TLS through."
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalHostSpec {
    /// Exact DNS names, or `*.example.com`.
    pub names: Vec<String>,
    pub ports: Vec<PortSpec>,
    /// PEM CA certificates that TLS originated to it is verified against; the system's
    /// roots if not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// The labels of the nodes its traffic leaves from (the agent sees the Nodes'
    /// `mesh.dev/` and topology labels); other nodes send it there through the mesh's
    /// tunnel. None: it leaves from every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub egress_nodes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    pub port: u16,
    /// TCP (opaque bytes, the default) or HTTP.
    #[serde(default)]
    pub protocol: ProtocolSpec,
    /// Originate (the agent opens TLS to the host; HTTP only) or Passthrough (the pod's own
    /// TLS, told apart by SNI; TCP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// With Originate, the host's TLS port (443 if not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProtocolSpec {
    #[default]
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum TlsSpec {
    Originate,
    Passthrough,
}

/// As k8s-openapi's types describe themselves, for the watch; a test checks them against
/// the derived CRD.
impl k8s_openapi::Resource for ExternalHost {
    const API_VERSION: &'static str = "mesh.dev/v1alpha1";
    const GROUP: &'static str = "mesh.dev";
    const KIND: &'static str = "ExternalHost";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "externalhosts";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

/// The mesh's egress from the cluster: the hosts of `objects` (each object's current version
/// if good, else its last good one) and the outbound policy from `mesh-system`'s label.
pub fn egress(
    objects: &[Arc<ExternalHost>],
    namespaces: &[Arc<Namespace>],
    last_good: &LastGood<Host>,
    refused: &mut Vec<String>,
) -> Egress {
    let mut sorted = objects.to_vec();
    sorted.sort_by(|a, b| {
        let key = |o: &ExternalHost| (o.metadata.namespace.clone(), o.metadata.name.clone());
        key(a).cmp(&key(b))
    });
    let named = last_good.convert(&sorted, |_, _, o| host(&o.spec), refused);
    let mut egress = Egress {
        outbound_policy: outbound_policy(namespaces),
        ..Egress::default()
    };
    // One by one: an object that clashes with those before it is left out.
    for host in named {
        egress.hosts.push(host);
        if let Err(why) = egress::check(&egress)
            && let Some(host) = egress.hosts.pop()
        {
            refused.push(format!(
                "ExternalHost declaring {}: {why} (left out)",
                host.names[0]
            ));
        }
    }
    egress
}

fn outbound_policy(namespaces: &[Arc<Namespace>]) -> OutboundPolicy {
    let registry_only = namespaces.iter().any(|ns| {
        ns.metadata.name.as_deref() == Some(AGENT_NAMESPACE)
            && ns
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(OUTBOUND_POLICY_LABEL))
                .is_some_and(|v| v == "registry-only")
    });
    match registry_only {
        true => OutboundPolicy::RegistryOnly,
        false => OutboundPolicy::AllowAny,
    }
}

/// The host `spec` declares, or why it cannot (`spec.<field>: reason`).
fn host(spec: &ExternalHostSpec) -> Result<Host, String> {
    let names = spec
        .names
        .iter()
        .enumerate()
        .map(|(i, h)| h.parse().map_err(|e| format!("spec.names[{i}]: {e}")))
        .collect::<Result<Vec<_>, String>>()?;
    let ports = spec
        .ports
        .iter()
        .map(|p| ExternalPort {
            port: p.port,
            protocol: match p.protocol {
                ProtocolSpec::Tcp => ExternalProtocol::Tcp,
                ProtocolSpec::Http => ExternalProtocol::Http,
            },
            tls: match p.tls {
                None => TlsMode::None,
                Some(TlsSpec::Originate) => TlsMode::Originate,
                Some(TlsSpec::Passthrough) => TlsMode::Passthrough,
            },
            target_port: p.target_port,
        })
        .collect();
    let host = Host {
        names,
        ports,
        ca_certificates: spec.ca_certificates.clone(),
        egress_nodes: spec.egress_nodes.clone(),
    };
    let alone = Egress {
        hosts: vec![host],
        ..Egress::default()
    };
    egress::check(&alone).map_err(|why| {
        // The config's words for the resource's.
        let why = why.trim_start_matches("hosts[0].");
        format!(
            "spec.{}",
            why.replace("ca_certificates", "caCertificates")
                .replace("target_port", "targetPort")
        )
    })?;
    let [host] = <[Host; 1]>::try_from(alone.hosts).map_err(|_| "spec: no host".to_owned())?;
    Ok(host)
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;
    use crate::discovery::kubernetes::model::tests::fixture;

    #[test]
    fn objects_and_the_mesh_label_make_the_egress() {
        let mut namespaces: Vec<Arc<Namespace>> = fixture("namespaces.yaml");
        let mesh_system: Namespace = serde_yaml::from_str(
            "metadata: { name: mesh-system, labels: { mesh.dev/outbound-policy: registry-only } }",
        )
        .unwrap();
        namespaces.push(Arc::new(mesh_system));
        let mut refused = Vec::new();
        let egress = egress(
            &fixture("externalhosts.yaml"),
            &namespaces,
            &LastGood::default(),
            &mut refused,
        );
        assert_eq!(egress.outbound_policy, OutboundPolicy::RegistryOnly);
        let names: Vec<&str> = egress
            .hosts
            .iter()
            .flat_map(|h| &h.names)
            .map(|n| n.as_str())
            .collect();
        assert_eq!(names, ["api.courier.example", "*.sms.example"]);
        let courier = &egress.hosts[0];
        assert_eq!(courier.ports[0].tls, TlsMode::Originate);
        assert_eq!(courier.ports[0].target_port(), 8443);
        assert!(courier.ca_certificates.is_some());
        assert_eq!(
            refused,
            [
                "ExternalHost shop/bad-port: spec.ports[0].tls: the agent originates TLS for HTTP only: give the port protocol http (left out)",
                "ExternalHost declaring api.courier.example: hosts[2].names[0]: api.courier.example is declared by hosts[0] too (left out)",
            ]
        );
    }

    #[test]
    fn the_crd_names_what_the_watch_reads() {
        let crd = ExternalHost::crd();
        assert_eq!(crd.spec.names.plural, "externalhosts");
        assert_eq!(crd.spec.group, "mesh.dev");
    }
}
