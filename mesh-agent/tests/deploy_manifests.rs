//! Every manifest in `deploy/` parsed into its Kubernetes type and checked against the rest
//! and against the agent: names referenced across them exist, RBAC grants exactly what the
//! agent calls, and the DaemonSet's arguments, ports, probes and mounts are the agent's.

// Test code may unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Secret, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::CustomResourceExt;
use mesh_agent::{
    ca::{CA_ADMIN_PORT, CA_PORT, DEFAULT_AUDIENCE, review::CALLS},
    cli::{CaCommand, Cli, Command},
    config::{Config, Settings},
    discovery::kubernetes::{
        authorization::AuthorizationPolicy,
        egress::ExternalHost,
        policy::TrafficPolicy,
        watch::{RESOURCES, VERBS},
    },
    handover,
    identity::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, CA_SERVICE_ACCOUNT},
    observability::admin::ADMIN_PORT,
    system::BPFFS,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every object in deploy/, by kind, with the file it came from.
#[derive(Default)]
struct Manifests {
    by_kind: BTreeMap<String, Vec<(PathBuf, Value)>>,
}

impl Manifests {
    fn load() -> Self {
        let mut manifests = Self::default();
        let mut files = Vec::new();
        yaml_files(&deploy(), &mut files);
        for file in files {
            // The agent's own config reference, not a Kubernetes object.
            if file.ends_with("agent.example.yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value = Value::deserialize(document)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                let kind = value["kind"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: an object without a kind", file.display()))
                    .to_owned();
                manifests
                    .by_kind
                    .entry(kind)
                    .or_default()
                    .push((file.clone(), value));
            }
        }
        manifests
    }

    /// Every object of `kind`, parsed into `T`.
    fn all<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.by_kind
            .get(kind)
            .into_iter()
            .flatten()
            .map(|(file, value)| {
                serde_yaml::from_value(value.clone())
                    .unwrap_or_else(|e| panic!("{}: {kind}: {e}", file.display()))
            })
            .collect()
    }

    fn named<T: DeserializeOwned + k8s_openapi::Metadata<Ty = ObjectMeta>>(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> T {
        self.all::<T>(kind)
            .into_iter()
            .find(|o| {
                let meta = o.metadata();
                meta.name.as_deref() == Some(name) && meta.namespace.as_deref() == namespace
            })
            .unwrap_or_else(|| panic!("no {kind} {namespace:?}/{name} in deploy/"))
    }

    fn daemonset(&self, name: &str) -> (DaemonSet, PodSpec) {
        let ds: DaemonSet = self.named("DaemonSet", Some("mesh-system"), name);
        let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
        (ds, pod)
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

/// The container's command line as the kubelet runs it: `$(VAR)` from the downward API.
fn command_line(container: &Container, node: &str) -> Vec<String> {
    let env = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME");
    let field = env
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"), "NODE_NAME is the pod's node");
    container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|a| a.replace("$(NODE_NAME)", node))
        .collect()
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let m = Manifests::load();
    let kinds: BTreeSet<&str> = m.by_kind.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "DaemonSet",
            "Deployment",
            "Kustomization",
            "Namespace",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ])
    );
    m.all::<Namespace>("Namespace");
    m.all::<ServiceAccount>("ServiceAccount");
    m.all::<ClusterRole>("ClusterRole");
    m.all::<ClusterRoleBinding>("ClusterRoleBinding");
    m.all::<ConfigMap>("ConfigMap");
    m.all::<Secret>("Secret");
    m.all::<DaemonSet>("DaemonSet");
    m.all::<Deployment>("Deployment");
    m.all::<PodDisruptionBudget>("PodDisruptionBudget");
    m.all::<Service>("Service");
    // The mesh's own resources, as the agent's types define them.
    let crds: Vec<CustomResourceDefinition> = m.all("CustomResourceDefinition");
    assert_eq!(
        crds,
        [
            TrafficPolicy::crd(),
            AuthorizationPolicy::crd(),
            ExternalHost::crd()
        ]
    );
    // The agent's config reference is a valid agent config.
    Config::load(&deploy().join("agent.example.yaml")).unwrap();
}

#[test]
fn names_referenced_across_manifests_exist() {
    let m = Manifests::load();
    // Every namespaced object is in a namespace deploy/ makes.
    let namespaces: BTreeSet<String> = m
        .all::<Namespace>("Namespace")
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    for (kind, objects) in &m.by_kind {
        for (file, value) in objects {
            if let Some(ns) = value["metadata"]["namespace"].as_str() {
                assert!(
                    namespaces.contains(ns),
                    "{}: {kind} in namespace {ns}, which deploy/ does not make",
                    file.display()
                );
            }
        }
    }

    // Kustomizations name files that exist, and the image every DaemonSet runs.
    let mut images = BTreeSet::new();
    for (file, k) in &m.by_kind["Kustomization"] {
        let dir = file.parent().unwrap();
        for resource in k["resources"].as_sequence().unwrap() {
            let path = dir.join(resource.as_str().unwrap());
            assert!(
                path.exists(),
                "{}: {} is missing",
                file.display(),
                path.display()
            );
        }
        for image in k["images"].as_sequence().into_iter().flatten() {
            images.insert(image["name"].as_str().unwrap().to_owned());
        }
    }
    for ds in m.all::<DaemonSet>("DaemonSet") {
        let pod = ds.spec.unwrap().template.spec.unwrap();
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            let image = c.image.as_deref().unwrap();
            assert!(
                images.contains(image) || image.contains('/'),
                "image {image} is neither set by a kustomization nor a full reference"
            );
        }
    }

    // The agent's DaemonSet: its selector, service account, ConfigMap and Secret.
    let (ds, pod) = m.daemonset("mesh-agent");
    let spec = ds.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let account = pod.service_account_name.as_deref().unwrap();
    let _: ServiceAccount = m.named("ServiceAccount", Some("mesh-system"), account);
    // The agents run as the identity their peers expect of them.
    assert_eq!(
        (ds.metadata.namespace.as_deref(), account),
        (Some(AGENT_NAMESPACE), AGENT_SERVICE_ACCOUNT)
    );
    for volume in pod.volumes.iter().flatten() {
        if let Some(cm) = &volume.config_map {
            let _: ConfigMap = m.named("ConfigMap", Some("mesh-system"), &cm.name);
        }
        if let Some(secret) = &volume.secret {
            let name = secret.secret_name.as_deref().unwrap();
            let _: Secret = m.named("Secret", Some("mesh-system"), name);
        }
    }

    // The binding ties that account to the role.
    let binding: ClusterRoleBinding = m.named("ClusterRoleBinding", None, "mesh-agent");
    let _: ClusterRole = m.named("ClusterRole", None, &binding.role_ref.name);
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", account, Some("mesh-system"))
    );

    // The scrape Service selects the agents' pods; the ServiceMonitor selects the Service
    // and names its port.
    let service: Service = m.named("Service", Some("mesh-system"), "mesh-agent-admin");
    let service_spec = service.spec.unwrap();
    let service_selector = service_spec.selector.unwrap();
    assert!(
        service_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    );
    let port = &service_spec.ports.unwrap()[0];
    assert_eq!(port.port, i32::from(ADMIN_PORT));
    let (_, monitor) = &m.by_kind["ServiceMonitor"][0];
    let service_labels = service.metadata.labels.unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            service_labels.get(k.as_str().unwrap()).map(String::as_str),
            v.as_str()
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        port.name.as_deref()
    );
    assert_eq!(
        monitor["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
}

/// What the ClusterRole `name` grants: (API group, resource, verb).
fn granted(m: &Manifests, name: &str) -> BTreeSet<(String, String, String)> {
    let role: ClusterRole = m.named("ClusterRole", None, name);
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

#[test]
fn rbac_grants_exactly_what_the_agent_and_the_ca_call() {
    let m = Manifests::load();
    let ca_calls: BTreeSet<(String, String, String)> = CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(granted(&m, "mesh-ca"), ca_calls);
    let binding: ClusterRoleBinding = m.named("ClusterRoleBinding", None, "mesh-ca");
    assert_eq!(binding.role_ref.name, "mesh-ca");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (CA_SERVICE_ACCOUNT, Some(AGENT_NAMESPACE))
    );
    let granted = granted(&m, "mesh-agent");
    let called: BTreeSet<(String, String, String)> = RESOURCES
        .iter()
        .flat_map(|(group, resource)| {
            VERBS
                .iter()
                .map(|verb| (group.to_string(), resource.to_string(), verb.to_string()))
        })
        .collect();
    assert_eq!(granted, called);
}

#[test]
fn the_agents_arguments_ports_probes_and_mounts_are_the_agents() {
    let m = Manifests::load();
    let (ds, pod) = m.daemonset("mesh-agent");
    assert_eq!(pod.host_network, Some(true));
    let agent = &pod.containers[0];

    // The arguments parse as the agent's command line.
    let cli =
        Cli::try_parse_from(command_line(agent, "worker-1")).unwrap_or_else(|e| panic!("{e}"));
    let Command::Run {
        config: _,
        kubernetes_node,
        keep_pins,
        grace_period,
        ..
    } = cli.command
    else {
        panic!("the DaemonSet does not run `mesh-agent run`");
    };
    assert_eq!(kubernetes_node.unwrap().as_str(), "worker-1");
    assert!(keep_pins, "a rolling update keeps the programs attached");
    let termination = pod.termination_grace_period_seconds.unwrap();
    assert!(
        termination > i64::try_from(grace_period).unwrap(),
        "the kubelet waits longer than the agent's own grace period"
    );

    // --config is the ConfigMap's settings, which the agent accepts: they name the CA
    // service, a token for its audience from a projected volume, and the trust bundle from
    // its ConfigMap. No Secret (so no CA key) is mounted on the node.
    let mounts = agent.volume_mounts.clone().unwrap();
    let volumes = pod.volumes.clone().unwrap();
    let mount_of = |path: &Path| {
        mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()))
    };
    let volume = |name: &str| volumes.iter().find(|v| v.name == name).unwrap().clone();
    let settings = agent_settings(&m);
    let identity = &settings.identity;
    assert_eq!((&identity.ca_cert, &identity.ca_key), (&None, &None));
    let service = identity.ca_service.as_ref().unwrap();
    assert_eq!(
        service.address,
        format!("mesh-ca.mesh-system.svc:{CA_PORT}")
    );
    let token_mount = mount_of(&service.token);
    let sources = volume(&token_mount.name)
        .projected
        .unwrap()
        .sources
        .unwrap();
    let token = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(token.audience.as_deref(), Some(DEFAULT_AUDIENCE));
    assert_eq!(
        service.token.strip_prefix(&token_mount.mount_path).unwrap(),
        Path::new(&token.path)
    );
    let bundle = identity.trust_bundle.as_ref().unwrap();
    let bundle_mount = mount_of(bundle);
    assert!(
        bundle_mount.sub_path.is_none(),
        "a subPath would hide the ConfigMap's updates"
    );
    let cm = volume(&bundle_mount.name).config_map.unwrap();
    let cm: ConfigMap = m.named("ConfigMap", Some("mesh-system"), &cm.name);
    let key = bundle.strip_prefix(&bundle_mount.mount_path).unwrap();
    assert!(cm.data.unwrap().contains_key(key.to_str().unwrap()));
    for v in &volumes {
        assert!(
            v.secret.is_none(),
            "the DaemonSet mounts the Secret {:?}",
            v.name
        );
        let projected = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
        assert!(
            projected.clone().all(|s| s.secret.is_none()),
            "{} projects a Secret",
            v.name
        );
    }

    // Updates start the new agent beside the old one, which hands its listeners over (in the
    // host's /run/mesh): no host ports are declared (on the host network every port is one),
    // or the scheduler would keep the surge pod off the node.
    let spec = ds.spec.unwrap();
    let rolling = spec.update_strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        (rolling.max_surge, rolling.max_unavailable),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
    );
    assert_eq!(
        agent.ports, None,
        "host ports keep the surge pod off the node"
    );
    let run = mount_of(Path::new(handover::RUN_DIR));
    assert_eq!(run.mount_path, handover::RUN_DIR);
    assert_eq!(volume(&run.name).host_path.unwrap().path, handover::RUN_DIR);

    // Probes and scrape annotations are the agent's.
    assert_probes_on(agent, &IntOrString::Int(i32::from(ADMIN_PORT)));
    let annotations = spec.template.metadata.unwrap().annotations.unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], ADMIN_PORT.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // Capabilities, not privileged; the host's bpffs and cgroup v2 root where the agent
    // looks for them.
    let security = agent.security_context.clone().unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    assert_eq!(caps.add.unwrap(), ["BPF", "NET_ADMIN", "SYS_ADMIN"]);
    for path in [BPFFS, "/sys/fs/cgroup"] {
        let mount = mount_of(Path::new(path));
        assert_eq!(mount.mount_path, path);
        let host = volume(&mount.name).host_path.unwrap();
        assert_eq!(host.path, path, "the host's own {path}");
    }
}

/// The container's readiness probe asks `/ready`, its liveness probe `/healthz`, both on
/// `port`.
fn assert_probes_on(container: &Container, port: &IntOrString) {
    for (probe, path) in [
        (container.readiness_probe.as_ref(), "/ready"),
        (container.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe.unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(&get.port, port);
    }
}

/// The agents' settings, from the ConfigMap the DaemonSet mounts at --config.
fn agent_settings(m: &Manifests) -> Settings {
    let (_, pod) = m.daemonset("mesh-agent");
    let agent = &pod.containers[0];
    let cli = Cli::try_parse_from(command_line(agent, "worker-1")).unwrap();
    let Command::Run { config, .. } = cli.command else {
        panic!("the DaemonSet does not run `mesh-agent run`");
    };
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == config.to_str().unwrap())
        .unwrap();
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let cm = volume.config_map.as_ref().unwrap();
    let cm: ConfigMap = m.named("ConfigMap", Some("mesh-system"), &cm.name);
    let key = mount.sub_path.as_deref().unwrap();
    // Tests run side by side: a file of this call's own.
    let file = std::env::temp_dir().join(format!(
        "mesh-settings-{}-{:x}.yaml",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&file, &cm.data.unwrap()[key]).unwrap();
    let settings = Settings::load(&file);
    std::fs::remove_file(&file).unwrap();
    settings.unwrap()
}

#[test]
fn the_ca_service_runs_twice_holds_the_key_and_is_reachable_where_agents_ask() {
    let m = Manifests::load();
    let deployment: Deployment = m.named("Deployment", Some("mesh-system"), "mesh-ca");
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    let selects = |selector: &BTreeMap<String, String>| {
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(selects(spec.selector.match_labels.as_ref().unwrap()));
    let pdb: PodDisruptionBudget = m.named("PodDisruptionBudget", Some("mesh-system"), "mesh-ca");
    let pdb = pdb.spec.unwrap();
    assert!(selects(
        pdb.selector.unwrap().match_labels.as_ref().unwrap()
    ));
    assert_eq!(
        serde_json::to_value(pdb.min_available.unwrap()).unwrap(),
        serde_json::json!(1)
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(CA_SERVICE_ACCOUNT)
    );
    let ca = &pod.containers[0];
    let args: Vec<String> = ca
        .command
        .iter()
        .flatten()
        .chain(ca.args.iter().flatten())
        .cloned()
        .collect();
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
    let Command::Ca {
        command:
            CaCommand::Serve {
                ca_cert,
                ca_key,
                trust_domain,
                listen,
                admin,
                audience,
                ..
            },
    } = cli.command
    else {
        panic!("the Deployment does not run `mesh-agent ca serve`");
    };
    // It signs for the agents' trust domain, for tokens minted for it.
    let settings = agent_settings(&m);
    assert_eq!(trust_domain, settings.trust_domain.as_str());
    assert_eq!(audience, DEFAULT_AUDIENCE);
    // Its Secret holds the key and certificate where it reads them.
    let mounts = ca.volume_mounts.clone().unwrap();
    for file in [&ca_cert, &ca_key] {
        let mount = mounts
            .iter()
            .find(|m| file.starts_with(&m.mount_path))
            .unwrap();
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        let secret = volume
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .as_deref()
            .unwrap();
        let secret: Secret = m.named("Secret", Some("mesh-system"), secret);
        let key = file
            .strip_prefix(&mount.mount_path)
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            secret.string_data.unwrap().contains_key(key),
            "the CA Secret has no {key}"
        );
    }
    // Its ports; the Service the agents ask sends to the CA's port.
    let port = |name: &str| {
        ca.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap()
            .container_port
    };
    assert_eq!(
        (listen.port(), port("https")),
        (CA_PORT, i32::from(CA_PORT))
    );
    assert_eq!(
        (admin.port(), port("admin")),
        (CA_ADMIN_PORT, i32::from(CA_ADMIN_PORT))
    );
    let service: Service = m.named("Service", Some("mesh-system"), "mesh-ca");
    let service = service.spec.unwrap();
    assert!(selects(service.selector.as_ref().unwrap()));
    let service_port = &service.ports.unwrap()[0];
    assert_eq!(service_port.port, i32::from(CA_PORT));
    assert_eq!(
        serde_json::to_value(service_port.target_port.as_ref().unwrap()).unwrap(),
        serde_json::json!("https")
    );
    assert_probes_on(ca, &IntOrString::String("admin".into()));
}

#[test]
fn the_cleanup_unloads_this_node_from_the_hosts_bpffs() {
    let m = Manifests::load();
    let (_, pod) = m.daemonset("mesh-agent-cleanup");
    let unload = &pod.init_containers.unwrap()[0];
    let cli =
        Cli::try_parse_from(command_line(unload, "worker-1")).unwrap_or_else(|e| panic!("{e}"));
    let Command::Unload { node } = cli.command else {
        panic!("the cleanup does not run `mesh-agent unload`");
    };
    assert_eq!(node, "worker-1");
    let mount = unload.volume_mounts.as_ref().unwrap();
    assert_eq!(mount[0].mount_path, BPFFS);
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == mount[0].name);
    assert_eq!(volume.unwrap().host_path.unwrap().path, BPFFS);
}
