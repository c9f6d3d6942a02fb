//! The lab as a Kubernetes cluster sees it: its nodes, pods and services as API objects, and
//! agents that take them from an [`ApiServer`] instead of a config file.

use std::{ffi::OsString, net::IpAddr};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Agent, Lab, TRUST_DOMAIN};
use crate::{ApiServer, topology};

/// The namespace of the lab's enrolled pods and of its services, labelled to join the mesh.
pub const ENROLLED_NAMESPACE: &str = "lab";
/// Where the lab's CA service listens on its node (that node's loopback).
pub const CA_SERVICE: &str = "127.0.0.1:15012";
/// The namespace of the pods that are not enrolled.
const OTHER_NAMESPACE: &str = "outside";

impl Lab {
    /// The lab's Namespaces, Nodes, Pods, Services and EndpointSlices.
    pub fn kubernetes_objects(&self) -> Result<Vec<(&'static str, Value)>> {
        let mut objects = vec![
            (
                "namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ENROLLED_NAMESPACE,
                        "labels": {"mesh.dev/enrolled": "true"}}}),
            ),
            (
                "namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": OTHER_NAMESPACE}}),
            ),
        ];
        for node in &self.spec.nodes {
            let k = self.node_index(node)?;
            let (v4, v6) = topology::node_addrs(k);
            objects.push((
                "nodes",
                json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.agent_node_name(node)},
                "spec": {"podCIDRs": topology::pod_cidrs(k)},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": v4.to_string()},
                    {"type": "InternalIP", "address": v6.to_string()},
                    {"type": "Hostname", "address": node},
                ]}}),
            ));
        }
        for pod in &self.spec.pods {
            objects.push(("pods", self.kubernetes_pod(&pod.name)?));
        }
        for service in &self.spec.services {
            let v6_only = service.addresses.iter().all(IpAddr::is_ipv6);
            objects.push((
                "services",
                json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": service.name, "namespace": ENROLLED_NAMESPACE},
                "spec": {
                    "clusterIP": service.addresses[0].to_string(),
                    "clusterIPs": service.addresses.iter().map(IpAddr::to_string)
                        .collect::<Vec<_>>(),
                    "ports": [{"port": service.port, "targetPort": service.target_port,
                        "protocol": "TCP"}],
                }}),
            ));
            let mut endpoints = Vec::new();
            for e in &service.endpoints {
                let (a4, a6) = self.pod_addrs(e)?;
                let pod = self.spec.pod_spec(e).context("endpoint pod")?;
                let address = if v6_only {
                    a6.to_string()
                } else {
                    a4.to_string()
                };
                endpoints.push(json!({"addresses": [address],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": self.agent_node_name(&pod.node),
                    "targetRef": {"kind": "Pod", "name": e,
                        "namespace": self.pod_namespace(e)?}}));
            }
            objects.push((
                "endpointslices",
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{}-0", service.name),
                        "namespace": ENROLLED_NAMESPACE,
                        "labels": {"kubernetes.io/service-name": service.name}},
                    "addressType": if v6_only { "IPv6" } else { "IPv4" },
                    "ports": [{"port": service.target_port, "protocol": "TCP"}],
                    "endpoints": endpoints}),
            ));
        }
        Ok(objects)
    }

    /// The running Pod object of `pod`, in [`ENROLLED_NAMESPACE`] if it is enrolled.
    pub fn kubernetes_pod(&self, pod: &str) -> Result<Value> {
        let spec = self.spec.pod_spec(pod).context("no such pod")?;
        let (a4, a6) = self.pod_addrs(pod)?;
        Ok(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": self.pod_namespace(pod)?,
                "uid": self.pod_uid(pod)?},
            "spec": {"nodeName": self.agent_node_name(&spec.node),
                "serviceAccountName": pod,
                "containers": [{"name": pod, "image": "mesh-testpod"}]},
            "status": {"phase": "Running", "podIP": a4.to_string(),
                "podIPs": [{"ip": a4.to_string()}, {"ip": a6.to_string()}]}}))
    }

    fn pod_namespace(&self, pod: &str) -> Result<&'static str> {
        let spec = self.spec.pod_spec(pod).context("no such pod")?;
        Ok(if spec.enrolled {
            ENROLLED_NAMESPACE
        } else {
            OTHER_NAMESPACE
        })
    }

    /// The Pod object of `node`'s agent (`mesh-system/mesh-agent-<node>`, UID
    /// `pod-uid-mesh-agent-<node>`, as [`crate::Token::bound`] names it).
    pub fn kubernetes_agent_pod(&self, node: &str) -> Value {
        let name = format!("mesh-agent-{node}");
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "mesh-system", "uid": format!("pod-uid-{name}")},
            "spec": {"nodeName": self.agent_node_name(node), "serviceAccountName": "mesh-agent",
                "hostNetwork": true, "containers": [{"name": "agent", "image": "mesh-agent"}]},
            "status": {"phase": "Running"}})
    }

    /// A token of `node`'s agent for the CA service, as its projected volume holds it.
    pub fn agent_token(&self, node: &str, api: &ApiServer) -> String {
        api.mint(crate::Token::bound(
            "mesh-system",
            "mesh-agent",
            &format!("mesh-agent-{node}"),
            &self.agent_node_name(node),
            mesh_agent::ca::DEFAULT_AUDIENCE,
        ))
    }

    /// Starts the CA service (`mesh-agent ca serve`) on `node`, at [`CA_SERVICE`] there, with
    /// the lab CA's files and the cluster `api` serves; waits until it serves.
    pub fn start_ca_service(&self, node: &str, api: &ApiServer) -> Result<Agent> {
        let ca = self.ca_dir();
        let log = self.dir.join(format!("ca-{node}.log"));
        let mut cmd = std::process::Command::new(super::agent_binary()?);
        cmd.args([
            "--log-level",
            "info",
            "ca",
            "serve",
            "--trust-domain",
            TRUST_DOMAIN,
        ])
        .arg("--ca-cert")
        .arg(ca.join("ca.crt"))
        .arg("--ca-key")
        .arg(ca.join("ca.key"))
        .args(["--listen", CA_SERVICE, "--admin", "127.0.0.1:15014"])
        .env("KUBECONFIG", api.kubeconfig());
        let child = self.spawn_logged(cmd, node, "host", &log)?;
        let service = Agent {
            child,
            log,
            node_name: self.agent_node_name(node),
        };
        service.wait_for_log("CA service ready")?;
        Ok(service)
    }

    /// A test API server serving the lab's objects ([`Lab::kubernetes_objects`]) on `node`'s
    /// loopback.
    pub fn start_api_server(&self, node: &str) -> Result<ApiServer> {
        ApiServer::start(
            Some(&self.netns_name(node)),
            self.scratch_dir(),
            self.kubernetes_objects()?,
            0,
        )
    }

    /// Starts the agent of `node` on the cluster `api` serves (`run --kubernetes-node`, the
    /// kubelet's cgroup root being the node's), and waits until it is ready. Its
    /// certificates come from the lab CA's files.
    pub fn start_agent_kubernetes(
        &self,
        node: &str,
        api: &ApiServer,
        extra: &[&str],
    ) -> Result<Agent> {
        let ca = self.ca_dir();
        let identity = format!(
            "ca_cert: {}\n  ca_key: {}",
            ca.join("ca.crt").display(),
            ca.join("ca.key").display()
        );
        self.start_agent_with_identity(node, api, &identity, extra)
    }

    /// Starts the agent of `node` as [`Self::start_agent_kubernetes`] does, but asking the CA
    /// service on its node for certificates, showing `token`.
    pub fn start_agent_kubernetes_via_ca(
        &self,
        node: &str,
        api: &ApiServer,
        token: &str,
    ) -> Result<Agent> {
        let token_file = self.dir.join(format!("{node}-ca-token"));
        std::fs::write(&token_file, token)?;
        let identity = format!(
            "ca_service: {{ address: \"{CA_SERVICE}\", token: {} }}\n  trust_bundle: {}",
            token_file.display(),
            self.trust_bundle().display()
        );
        self.start_agent_with_identity(node, api, &identity, &[])
    }

    fn start_agent_with_identity(
        &self,
        node: &str,
        api: &ApiServer,
        identity: &str,
        extra: &[&str],
    ) -> Result<Agent> {
        let settings = self.dir.join(format!("{node}-settings.yaml"));
        std::fs::write(
            &settings,
            format!(
                "trust_domain: {TRUST_DOMAIN}\nidentity:\n  {identity}\n  certificate_ttl: {}\n",
                self.spec.certificate_ttl.as_deref().unwrap_or("1h"),
            ),
        )?;
        let mut args: Vec<OsString> = vec![
            "--config".into(),
            settings.into(),
            "--kubernetes-node".into(),
            self.agent_node_name(node).into(),
            "--kubelet-cgroup-root".into(),
            self.cgroup_rel(&self.node_cgroup(node)).into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        self.spawn_agent(node, &args, &[("KUBECONFIG", api.kubeconfig())])
    }
}
