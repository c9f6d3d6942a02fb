//! The lab as a Kubernetes cluster sees it: its nodes, pods and services as API objects, and
//! agents that take them from an [`ApiServer`] instead of a config file.

use std::{ffi::OsString, net::IpAddr};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Agent, Lab, TRUST_DOMAIN};
use crate::{ApiServer, topology};

/// The namespace of the lab's enrolled pods and of its services, labelled to join the mesh.
pub const ENROLLED_NAMESPACE: &str = "lab";
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

    /// Starts the agent of `node` on the cluster `api` serves (`run --kubernetes-node`, the
    /// kubelet's cgroup root being the node's), and waits until it is ready.
    pub fn start_agent_kubernetes(
        &self,
        node: &str,
        api: &ApiServer,
        extra: &[&str],
    ) -> Result<Agent> {
        let settings = self.dir.join(format!("{node}-settings.yaml"));
        let ca = self.ca_dir();
        std::fs::write(
            &settings,
            format!(
                "trust_domain: {TRUST_DOMAIN}\nidentity:\n  ca_cert: {}\n  ca_key: {}\n  \
                 certificate_ttl: {}\n",
                ca.join("ca.crt").display(),
                ca.join("ca.key").display(),
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
