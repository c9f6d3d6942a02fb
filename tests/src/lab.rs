//! A lab: nodes and pods in network namespaces and cgroups, agents and helper processes.

use std::{
    ffi::OsString,
    fmt::Write as _,
    io::BufReader,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_agent::handover;

mod kubernetes;

pub use kubernetes::ENROLLED_NAMESPACE;

use crate::{
    netns::{self, Placement, ip, ip_in},
    process::{self, EXIT_LIMIT},
    topology::{self, LabSpec},
};

/// What every name a lab makes starts with; the rest is `<pid>-<n>-...`.
const PREFIX: &str = "mesh-lab-";
/// The id of the lab `cargo xtask lab up` keeps; never taken for the lab of a dead process.
const KEPT_ID: &str = "up";
/// The trust domain of every lab's identities.
pub const TRUST_DOMAIN: &str = "lab.mesh";
/// How long a process may take to say it is ready before the test gives up on it.
const READY_WATCHDOG: Duration = Duration::from_secs(60);

static LABS: AtomicU32 = AtomicU32::new(0);

/// A running lab; dropping it removes everything it made.
pub struct Lab {
    pub spec: LabSpec,
    id: String,
    cgroup_mount: PathBuf,
    /// Scratch directory for configs and logs.
    dir: PathBuf,
    netns: Vec<String>,
}

impl Lab {
    /// Builds the lab of `spec`: one namespace per node and pod, joined by veths and bridges,
    /// and a cgroup per node (the agent attaches there) with one per pod and one for the agent.
    pub fn new(spec: LabSpec) -> Result<Self> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        Self::with_id(spec, id)
    }

    /// Builds a lab meant to outlive this process (see [`Lab::keep`]); there is at most one.
    pub fn new_kept(spec: LabSpec) -> Result<Self> {
        let cgroup_mount = mesh_agent::system::cgroup2_mount()?;
        if cgroup_mount.join(format!("{PREFIX}{KEPT_ID}")).exists() {
            bail!("a lab is up already; remove it first (cargo xtask lab down)");
        }
        Self::with_id(spec, KEPT_ID.into())
    }

    /// Leaves the lab and everything running in it in place when this process exits.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// Removes the kept lab, with everything running in it; says whether there was one.
    pub fn remove_kept() -> Result<bool> {
        require_root()?;
        let kept = format!("{PREFIX}{KEPT_ID}");
        let existed = netns::list().iter().any(|n| n.starts_with(&kept));
        sweep(&mesh_agent::system::cgroup2_mount()?, |name| {
            name == kept || name.starts_with(&format!("{kept}-"))
        });
        Ok(existed)
    }

    fn with_id(spec: LabSpec, id: String) -> Result<Self> {
        require_root()?;
        remember_panic_messages();
        ensure_bpffs()?;
        let cgroup_mount = mesh_agent::system::cgroup2_mount()?;
        remove_stale(&cgroup_mount);
        let dir = std::env::temp_dir().join(format!("{PREFIX}{id}"));
        let mut lab = Lab {
            spec,
            id,
            cgroup_mount,
            dir,
            netns: Vec::new(),
        };
        // On error, `lab` is dropped here and removes whatever was made so far.
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let ca = mesh_agent::identity::FileCa::create(&self.ca_dir(), TRUST_DOMAIN)?;
        std::fs::copy(&ca.cert, self.trust_bundle())?;
        std::fs::create_dir_all(self.cgroup_root())?;
        let switch = self.netns_name("switch");
        self.add_netns(&switch)?;
        ip_in(&switch, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&switch, &["link", "set", "br0", "up"])?;

        for node in self.spec.nodes.clone() {
            let k = self.node_index(&node)?;
            let ns = self.netns_name(&node);
            self.add_netns(&ns)?;
            // The node's link to the others, through the switch's bridge.
            plug(
                &switch,
                "br0",
                &format!("n{k}"),
                &ns,
                topology::node_addrs(k),
            )?;
            // The bridge its pods hang on.
            ip_in(&ns, &["link", "add", "pods", "type", "bridge"])?;
            add_addrs(&ns, "pods", topology::pod_addrs(k, 1))?;
            ip_in(&ns, &["link", "set", "pods", "up"])?;
            let node_cgroup = self.node_cgroup(&node);
            for sub in ["agent", "host"] {
                std::fs::create_dir_all(node_cgroup.join(sub))?;
            }
        }

        // Hosts outside the mesh answer the pods (that reach them directly) through their
        // nodes.
        for (i, name) in self.spec.outside.clone().iter().enumerate() {
            let ns = self.netns_name(name);
            self.add_netns(&ns)?;
            let i = u8::try_from(i + 1)?;
            plug(
                &switch,
                "br0",
                &format!("o{i}"),
                &ns,
                topology::outside_addrs(i),
            )?;
            for node in self.spec.nodes.clone() {
                let k = self.node_index(&node)?;
                let (via4, via6) = topology::node_addrs(k);
                let [net4, net6] = topology::pod_cidrs(k);
                ip_in(&ns, &["route", "add", &net4, "via", &via4.to_string()])?;
                ip_in(
                    &ns,
                    &["-6", "route", "add", &net6, "via", &via6.to_string()],
                )?;
            }
            std::fs::create_dir_all(self.cgroup_root().join(format!("outside-{name}")))?;
        }

        // The nodes route between their pod networks, as a cluster network does: traffic the
        // mesh leaves alone (and the benchmark's baseline) goes pod to pod directly.
        for node in self.spec.nodes.clone() {
            let ns = self.netns_name(&node);
            for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] {
                netns::sysctl_in(&ns, key, "1")?;
            }
            for other in self.spec.nodes.iter().filter(|n| **n != node) {
                let m = self.node_index(other)?;
                let (via4, via6) = topology::node_addrs(m);
                let [net4, net6] = topology::pod_cidrs(m);
                ip_in(&ns, &["route", "add", &net4, "via", &via4.to_string()])?;
                ip_in(
                    &ns,
                    &["-6", "route", "add", &net6, "via", &via6.to_string()],
                )?;
            }
        }

        for pod in self.spec.pods.clone() {
            let ns = self.netns_name(&pod.name);
            self.add_netns(&ns)?;
            let k = self.node_index(&pod.node)?;
            let (v4, v6) = self.pod_addrs(&pod.name)?;
            let port = format!("v-{}", v4.octets()[3]);
            plug(&self.netns_name(&pod.node), "pods", &port, &ns, (v4, v6))?;
            let (gw4, gw6) = topology::pod_addrs(k, 1);
            ip_in(&ns, &["route", "add", "default", "via", &gw4.to_string()])?;
            ip_in(
                &ns,
                &["-6", "route", "add", "default", "via", &gw6.to_string()],
            )?;
            // Service addresses exist only as capture targets: a connect the mesh does not
            // capture fails at once rather than waiting for a SYN that no one answers.
            for range in [topology::SERVICE_CIDR_V4, topology::SERVICE_CIDR_V6] {
                ip_in(&ns, &["route", "add", "unreachable", range])?;
            }
            std::fs::create_dir_all(self.pod_cgroup(&pod.name)?)?;
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_owned());
        ip_in(name, &["link", "set", "lo", "up"])?;
        // Many short connections (the benchmark opens tens of thousands within a minute) must
        // not run out of ports to TIME_WAIT: all the ephemeral range, and reuse as clients do.
        netns::sysctl_in(name, "net/ipv4/ip_local_port_range", "1024 65535")?;
        netns::sysctl_in(name, "net/ipv4/tcp_tw_reuse", "1")
    }

    fn node_index(&self, node: &str) -> Result<u8> {
        self.spec
            .node_index(node)
            .with_context(|| format!("no node {node} in the lab"))
    }

    /// The IPv4 and IPv6 address of a pod.
    pub fn pod_addrs(&self, pod: &str) -> Result<(Ipv4Addr, Ipv6Addr)> {
        self.spec
            .pod_addrs(pod)
            .with_context(|| format!("no pod {pod} in the lab"))
    }

    /// The name the agent of `node` goes by (and pins under).
    pub fn agent_node_name(&self, node: &str) -> String {
        format!("{PREFIX}{}-{node}", self.id)
    }

    /// The name of the network namespace of a node or pod.
    pub fn netns_name(&self, part: &str) -> String {
        format!("{PREFIX}{}-{part}", self.id)
    }

    /// The lab's cgroup; everything the lab runs is inside it.
    pub fn cgroup_root(&self) -> PathBuf {
        self.cgroup_mount.join(format!("{PREFIX}{}", self.id))
    }

    fn node_cgroup(&self, node: &str) -> PathBuf {
        self.cgroup_root().join(node)
    }

    fn pod_cgroup(&self, pod: &str) -> Result<PathBuf> {
        let spec = self
            .spec
            .pod_spec(pod)
            .with_context(|| format!("no pod {pod} in the lab"))?;
        let node = self.node_cgroup(&spec.node);
        Ok(if self.spec.kubelet_layout {
            node.join("kubepods")
                .join(format!("pod{}", self.pod_uid(pod)?))
        } else {
            node.join(pod)
        })
    }

    /// The pod's UID, as the Kubernetes API and the kubelet's cgroups know it.
    pub fn pod_uid(&self, pod: &str) -> Result<String> {
        let index = self
            .spec
            .pods
            .iter()
            .position(|p| p.name == pod)
            .with_context(|| format!("no pod {pod} in the lab"))?;
        Ok(format!("00000000-0000-4000-8000-{index:012x}"))
    }

    /// The cgroup path of `dir` as the agent's config writes it: relative to the mount.
    fn cgroup_rel(&self, dir: &Path) -> String {
        let rel = dir.strip_prefix(&self.cgroup_mount).unwrap_or(dir);
        format!("/{}", rel.display())
    }

    /// The lab's own directory (removed with it).
    pub fn scratch_dir(&self) -> &Path {
        &self.dir
    }

    /// Where the lab's CA keeps `ca.crt` and `ca.key`.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The trust bundle the lab's agents follow (at first, the CA's certificate).
    pub fn trust_bundle(&self) -> PathBuf {
        self.ca_dir().join("bundle.pem")
    }

    /// The agent configuration of `node`.
    pub fn agent_config(&self, node: &str) -> Result<String> {
        self.agent_config_for(&self.spec, node)
    }

    /// The agent configuration of `node` if the lab were `spec`: the same nodes and pods
    /// (so the same addresses), with other services or other pods enrolled.
    pub fn agent_config_for(&self, spec: &LabSpec, node: &str) -> Result<String> {
        let pod_addrs = |pod: &str| {
            spec.pod_addrs(pod)
                .with_context(|| format!("no pod {pod} in the lab"))
        };
        let describe = |node: &str| -> Result<String> {
            let k = self.node_index(node)?;
            let (v4, v6) = topology::node_addrs(k);
            let [c4, c6] = topology::pod_cidrs(k);
            let labels = spec
                .node_labels
                .iter()
                .find(|(n, _)| n == node)
                .map_or(String::new(), |(_, l)| format!(", labels: {l}"));
            Ok(format!(
                "{{ name: {}, addresses: [{v4}, \"{v6}\"], pod_cidrs: [{c4}, \"{c6}\"]{labels} }}",
                self.agent_node_name(node)
            ))
        };
        let mut y = String::new();
        writeln!(y, "node: {}", describe(node)?)?;
        writeln!(y, "peers:")?;
        for peer in spec.nodes.iter().filter(|n| *n != node) {
            writeln!(y, "  - {}", describe(peer)?)?;
        }
        let ca = self.ca_dir();
        writeln!(
            y,
            "trust_domain: {TRUST_DOMAIN}\nidentity:\n  ca_cert: {}\n  ca_key: {}\n  trust_bundle: {}\n  certificate_ttl: {}",
            ca.join("ca.crt").display(),
            ca.join("ca.key").display(),
            self.trust_bundle().display(),
            spec.certificate_ttl.as_deref().unwrap_or("1h"),
        )?;
        for setting in &spec.settings {
            writeln!(y, "{setting}")?;
        }
        writeln!(y, "workloads:")?;
        for pod in spec.pods.iter().filter(|p| p.node == node && p.enrolled) {
            let (a4, a6) = pod_addrs(&pod.name)?;
            writeln!(
                y,
                "  - {{ name: {}, namespace: lab, service_account: {}, addresses: [{a4}, \"{a6}\"], cgroup: {} }}",
                pod.name,
                pod.name,
                self.cgroup_rel(&self.pod_cgroup(&pod.name)?)
            )?;
        }
        writeln!(y, "unmeshed_pods:")?;
        for pod in spec.pods.iter().filter(|p| p.node == node && !p.enrolled) {
            let (a4, a6) = pod_addrs(&pod.name)?;
            writeln!(y, "  - {a4}\n  - \"{a6}\"")?;
        }
        writeln!(y, "services:")?;
        for s in &spec.services {
            let addrs: Vec<String> = s.addresses.iter().map(|a| format!("\"{a}\"")).collect();
            let v6_only = s.addresses.iter().all(IpAddr::is_ipv6);
            let mut port = format!("port: {}, target_port: {}", s.port, s.target_port);
            if let Some(protocol) = &s.protocol {
                write!(port, ", protocol: {protocol}")?;
            }
            if let Some(routes) = &s.routes {
                write!(port, ", routes: {routes}")?;
            }
            for field in &s.port_fields {
                write!(port, ", {field}")?;
            }
            writeln!(
                y,
                "  - name: {}\n    namespace: lab\n    addresses: [{}]\n    ports: [{{ {port} }}]",
                s.name,
                addrs.join(", "),
            )?;
            for field in &s.service_fields {
                writeln!(y, "    {field}")?;
            }
            writeln!(y, "    endpoints:")?;
            for e in &s.endpoints {
                let (a4, a6) = pod_addrs(e)?;
                let addr = if v6_only {
                    a6.to_string()
                } else {
                    a4.to_string()
                };
                let pod = spec.pod_spec(e).context("endpoint pod")?;
                let labels = s
                    .labels
                    .iter()
                    .find(|(p, _)| p == e)
                    .map_or(String::new(), |(_, l)| format!(", labels: {l}"));
                writeln!(
                    y,
                    "      - {{ address: \"{addr}\", node: {}{labels} }}",
                    self.agent_node_name(&pod.node)
                )?;
            }
        }
        Ok(y)
    }

    /// The file the agent of `node` runs with; rewriting it makes a running agent reload.
    pub fn agent_config_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.yaml"))
    }

    /// Starts the agent of `node` with its configuration and `extra` arguments of `run`, and
    /// waits until it is ready.
    pub fn start_agent(&self, node: &str, extra: &[&str]) -> Result<Agent> {
        self.start_agent_with_config(node, &self.agent_config(node)?, extra)
    }

    /// Like [`Lab::start_agent`], with the configuration `text`.
    pub fn start_agent_with_config(&self, node: &str, text: &str, extra: &[&str]) -> Result<Agent> {
        let config = self.agent_config_path(node);
        std::fs::write(&config, text)?;
        let mut args: Vec<OsString> = vec!["--config".into(), config.into()];
        args.extend(extra.iter().map(OsString::from));
        self.spawn_agent(node, &args, &[])
    }

    /// Starts the agent of `node` with `run --cgroup <node's> <run_args>` and `env`, and
    /// waits until it is ready.
    fn spawn_agent(
        &self,
        node: &str,
        run_args: &[OsString],
        env: &[(&str, &Path)],
    ) -> Result<Agent> {
        let log = self.agent_logs(node).len() + 1;
        let log = self.dir.join(agent_log_name(node, log));
        let mut cmd = match &self.spec.agent_capabilities {
            None => Command::new(agent_binary()?),
            Some(capabilities) => {
                // Only these in every set, kept across the exec (ambient).
                let set: String = capabilities
                    .iter()
                    .map(|c| format!(",+{}", c.to_lowercase()))
                    .collect();
                let set = format!("-all{set}");
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--inh-caps={set}"))
                    .arg(format!("--ambient-caps={set}"))
                    .arg(format!("--bounding-set={set}"))
                    .arg(agent_binary()?);
                cmd
            }
        };
        let log_level = self
            .spec
            .agent_log_level
            .as_deref()
            .unwrap_or("info,mesh_agent=debug,mesh_ebpf=debug");
        cmd.args(["--log-level", log_level, "run", "--cgroup"])
            .arg(self.agent_cgroup(node))
            .args(run_args)
            .envs(env.iter().copied());
        let child = self.spawn_logged(cmd, node, "agent", &log)?;
        let agent = Agent {
            child,
            log,
            node_name: self.agent_node_name(node),
        };
        agent.wait_for_log("mesh agent ready")?;
        Ok(agent)
    }

    /// Runs the agent binary with `args` in `node`'s agent cgroup, after `prepare` has had
    /// its say on the command, and waits for it to exit.
    pub fn agent_command(
        &self,
        node: &str,
        args: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Result<Output> {
        let mut cmd = Command::new(agent_binary()?);
        cmd.args(args);
        self.placement(node, "agent")?.apply(&mut cmd)?;
        prepare(&mut cmd);
        output(cmd)
    }

    /// What `node`'s agent is given as `run --cgroup`: the node's subtree.
    pub fn agent_cgroup(&self, node: &str) -> String {
        self.cgroup_rel(&self.node_cgroup(node))
    }

    /// The logs of `node`'s agents so far, the first started first.
    pub fn agent_logs(&self, node: &str) -> Vec<PathBuf> {
        (1..)
            .map(|n| self.dir.join(agent_log_name(node, n)))
            .take_while(|log| log.exists())
            .collect()
    }

    /// The path of `name` in the lab's scratch directory (removed with the lab).
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The lines of `file` once `done` says they are enough; fails the test after
    /// [`READY_WATCHDOG`] showing what the file held.
    pub fn wait_for_lines(&self, file: &Path, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(String::from).collect();
            if done(&lines) {
                return lines;
            }
            assert!(
                started.elapsed() < READY_WATCHDOG,
                "{} did not get the lines waited for; it holds:\n{text}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes `text` to a file in the lab's scratch directory and returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.scratch_path(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Everything this lab made that outlives a process: network namespaces, its cgroup
    /// tree, the agents' pins and its scratch directory.
    pub fn footprint(&self) -> Footprint {
        let mut paths = vec![self.cgroup_root(), self.dir.clone()];
        for node in &self.spec.nodes {
            let name = self.agent_node_name(node);
            paths.push(mesh_agent::datapath::pin_dir(&name));
            paths.push(handover::default_socket(&name));
        }
        Footprint {
            netns: self.netns.clone(),
            paths,
        }
    }

    fn spawn_logged(
        &self,
        mut cmd: Command,
        node: &str,
        cgroup: &str,
        log: &Path,
    ) -> Result<Child> {
        let file = std::fs::File::create(log)?;
        cmd.stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null());
        self.placement(node, cgroup)?.apply(&mut cmd)?;
        cmd.spawn().context("cannot start the agent")
    }

    fn placement(&self, node: &str, cgroup: &str) -> Result<Placement> {
        Ok(Placement {
            netns: self.netns_name(node),
            cgroup: self.node_cgroup(node).join(cgroup),
        })
    }

    fn pod_placement(&self, pod: &str) -> Result<Placement> {
        Ok(Placement {
            netns: self.netns_name(pod),
            cgroup: self.pod_cgroup(pod)?,
        })
    }

    /// Takes `node` off the network between the nodes, or puts it back: its port on the
    /// switch goes down, and what is sent to it vanishes without a FIN or a reset, as when a
    /// node dies.
    pub fn set_node_link(&self, node: &str, up: bool) -> Result<()> {
        let k = self.node_index(node)?;
        let state = if up { "up" } else { "down" };
        ip_in(
            &self.netns_name("switch"),
            &["link", "set", &format!("n{k}"), state],
        )
    }

    /// Moves `victim`'s IPv4 address to `thief`, which then uses it as the source of all its
    /// connections: what a pod with NET_ADMIN in its namespace can do on a network without
    /// anti-spoofing.
    pub fn steal_address(&self, thief: &str, victim: &str) -> Result<()> {
        let (stolen, _) = self.pod_addrs(victim)?;
        let thief_node = &self
            .spec
            .pod_spec(thief)
            .with_context(|| format!("no pod {thief}"))?
            .node;
        let (gw, _) = topology::pod_addrs(self.node_index(thief_node)?, 1);
        let victim_ns = self.netns_name(victim);
        let thief_ns = self.netns_name(thief);
        ip_in(
            &victim_ns,
            &["addr", "del", &format!("{stolen}/24"), "dev", "eth0"],
        )?;
        ip_in(
            &thief_ns,
            &["addr", "add", &format!("{stolen}/32"), "dev", "eth0"],
        )?;
        // The node forgets where the address was, as it would once its neighbour entry aged.
        ip_in(
            &self.netns_name(thief_node),
            &["neigh", "flush", &stolen.to_string()],
        )?;
        ip_in(
            &thief_ns,
            &[
                "route",
                "replace",
                "default",
                "via",
                &gw.to_string(),
                "src",
                &stolen.to_string(),
            ],
        )
    }

    /// What the `mesh-testpod` processes of `pod` wrote to their error output.
    pub fn pod_log(&self, pod: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("pod-{pod}.log"))).unwrap_or_default()
    }

    /// Starts `mesh-testpod args` in `pod` and waits until it prints `ready`.
    pub fn spawn(&self, pod: &str, args: &[&str]) -> Result<Running> {
        spawn_ready(
            testpod(args),
            self.pod_placement(pod)?,
            &self.dir.join(format!("pod-{pod}.log")),
        )
    }

    /// An HTTP server in `pod` (see [`http_server_args`]; `extra` arguments of `serve`).
    pub fn serve_http(&self, pod: &str, extra: &[&str]) -> Result<Running> {
        self.spawn(pod, &http_server_args(pod, extra))
    }

    /// Starts `mesh-testpod args` on `node` itself (host network, outside any pod, in a
    /// cgroup of the node's attached subtree that is not enrolled).
    pub fn spawn_on_node(&self, node: &str, args: &[&str]) -> Result<Running> {
        spawn_ready(
            testpod(args),
            self.placement(node, "host")?,
            &self.dir.join(format!("node-{node}.log")),
        )
    }

    /// Starts `program args` on `node` itself (its network namespace, the node's host
    /// cgroup), its output going to `<name>.log` in the scratch directory; stopped when the
    /// returned process is dropped.
    pub fn start_on_node(
        &self,
        node: &str,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> Result<Daemon> {
        self.start_placed(self.placement(node, "host")?, name, program, args)
    }

    /// An iperf3 server in `pod` on `port`, once it listens (its log is
    /// `iperf3-<pod>-<port>.log`).
    pub fn start_iperf3_server(&self, pod: &str, port: u16) -> Result<Daemon> {
        let name = format!("iperf3-{pod}-{port}");
        let port = port.to_string();
        let args = ["-s", "-p", &port, "--forceflush"];
        let server = self.start_in_pod(pod, &name, "iperf3", &args)?;
        let log = self.scratch_path(&format!("{name}.log"));
        self.wait_for_lines(&log, |lines| {
            lines.iter().any(|l| l.starts_with("Server listening"))
        });
        Ok(server)
    }

    /// Like [`Lab::start_on_node`], in `pod`.
    pub fn start_in_pod(
        &self,
        pod: &str,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> Result<Daemon> {
        self.start_placed(self.pod_placement(pod)?, name, program, args)
    }

    pub(crate) fn start_placed(
        &self,
        placement: Placement,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> Result<Daemon> {
        let log = std::fs::File::create(self.scratch_path(&format!("{name}.log")))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        placement.apply(&mut cmd)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {program} (cargo xtask setup installs it)"))?;
        Ok(Daemon { child })
    }

    /// Runs `program args` (a stock client such as iperf3) in `pod` to its end; its status
    /// and output are the caller's to judge.
    pub fn run_program(&self, pod: &str, program: &str, args: &[&str]) -> Result<Output> {
        run_program_at(self.pod_placement(pod)?, program, args)
    }

    /// Like [`Lab::run_program`], on `node` itself.
    pub fn run_program_on_node(&self, node: &str, program: &str, args: &[&str]) -> Result<Output> {
        run_program_at(self.placement(node, "host")?, program, args)
    }

    /// An HTTP/1.1 request of `url` with `method`, from `node` itself (`mesh-testpod get`).
    pub fn http(&self, node: &str, method: &str, url: &str) -> Result<HttpReply> {
        let out = self.run_on_node(node, &["get", "--method", method, "--url", url])?;
        let body = out
            .stdout
            .split_once('\n')
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok(HttpReply {
            status: out.field("status").parse()?,
            content_type: out.field("content_type").to_owned(),
            body,
        })
    }

    /// Runs `mesh-testpod args` on `node` itself to completion; fails if it fails.
    pub fn run_on_node(&self, node: &str, args: &[&str]) -> Result<Output> {
        run_placed(self.placement(node, "host")?, node, args)
    }

    /// Runs `mesh-testpod args` in `pod` to completion; fails if it fails.
    pub fn run(&self, pod: &str, args: &[&str]) -> Result<Output> {
        run_placed(self.pod_placement(pod)?, pod, args)
    }

    /// Like [`Lab::run`], from a cgroup below the pod's, as a Kubernetes container runs.
    pub fn run_in_container(&self, pod: &str, container: &str, args: &[&str]) -> Result<Output> {
        let mut placement = self.pod_placement(pod)?;
        placement.cgroup = placement.cgroup.join(container);
        std::fs::create_dir_all(&placement.cgroup)?;
        run_placed(placement, &format!("{pod}/{container}"), args)
    }

    fn remove(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = netns::remove_cgroup_tree(&self.cgroup_root()) {
            problems.push(format!("{e:#}"));
        }
        for ns in self.netns.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                problems.push(format!("{e:#}"));
            }
        }
        for node in &self.spec.nodes {
            let pins = mesh_agent::datapath::pin_dir(&self.agent_node_name(node));
            if pins.exists()
                && let Err(e) = std::fs::remove_dir_all(&pins)
            {
                problems.push(format!("cannot remove {}: {e}", pins.display()));
            }
            // Left by an agent that was killed.
            let socket = handover::default_socket(&self.agent_node_name(node));
            if let Err(e) = std::fs::remove_file(&socket)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                problems.push(format!("cannot remove {}: {e}", socket.display()));
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            problems.push(format!("cannot remove {}: {e}", self.dir.display()));
        }
        problems
    }
}

/// Joins `netns` to `bridge` in `host`: a veth whose end in `host` is `port` and whose end in
/// `netns` is `eth0`, with `addrs`.
fn plug(
    host: &str,
    bridge: &str,
    port: &str,
    netns: &str,
    addrs: (Ipv4Addr, Ipv6Addr),
) -> Result<()> {
    ip_in(
        host,
        &[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ],
    )?;
    ip_in(host, &["link", "set", port, "master", bridge, "up"])?;
    add_addrs(netns, "eth0", addrs)?;
    ip_in(netns, &["link", "set", "eth0", "up"])
}

/// Gives `dev` in `netns` its IPv4 (/24) and IPv6 (/64) address.
fn add_addrs(netns: &str, dev: &str, (v4, v6): (Ipv4Addr, Ipv6Addr)) -> Result<()> {
    ip_in(netns, &["addr", "add", &format!("{v4}/24"), "dev", dev])?;
    ip_in(
        netns,
        &["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"],
    )
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.spec.nodes {
                for log in self.agent_logs(node) {
                    if let Ok(text) = std::fs::read_to_string(&log) {
                        eprintln!(
                            "--- agent log {} ---\n{text}--- end of agent log ---",
                            log.display()
                        );
                    }
                }
            }
        }
        for problem in self.remove() {
            eprintln!("lab clean-up: {problem}");
        }
        if let Some(message) = PANIC_MESSAGE.take()
            && std::thread::panicking()
        {
            eprintln!("--- why the test failed (said again after the logs) ---\n{message}");
        }
    }
}

thread_local! {
    /// What the last panic on this thread said, to be said again after the agents' logs
    /// (which a CI summary's tail would otherwise show alone).
    static PANIC_MESSAGE: std::cell::Cell<Option<String>> = const { std::cell::Cell::new(None) };
}

/// Has every panic's message kept in [`PANIC_MESSAGE`] as well as printed as before.
fn remember_panic_messages() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let print = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info
                .location()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            let payload = info.payload();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            PANIC_MESSAGE.set(Some(format!("panicked{location}:\n{text}")));
            print(info);
        }));
    });
}

/// What a lab made, to check that it is gone.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub netns: Vec<String>,
    pub paths: Vec<PathBuf>,
}

impl Footprint {
    /// The parts that still exist.
    pub fn remains(&self) -> Vec<String> {
        let live = netns::list();
        self.netns
            .iter()
            .filter(|n| live.contains(n))
            .map(|n| format!("network namespace {n}"))
            .chain(
                self.paths
                    .iter()
                    .filter(|p| p.exists())
                    .map(|p| p.display().to_string()),
            )
            .collect()
    }
}

/// A running agent.
pub struct Agent {
    child: Child,
    log: PathBuf,
    /// The node name it was configured with (and pins under).
    pub node_name: String,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent's log contains `text`; fails if the agent exits first.
    pub fn wait_for_log(&self, text: &str) -> Result<()> {
        self.wait_for_log_times(text, 1)
    }

    /// Waits until the agent's log contains `text` `times` times.
    pub fn wait_for_log_times(&self, text: &str, times: usize) -> Result<()> {
        let started = Instant::now();
        while self.log().matches(text).count() < times {
            if !alive(self.pid()) {
                bail!("the agent exited before logging {text:?}:\n{}", self.log());
            }
            if started.elapsed() > READY_WATCHDOG {
                bail!("the agent did not log {text:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> Result<()> {
        signal(self.pid(), libc::SIGTERM)
    }

    /// Kills the agent at once (SIGKILL), as a crash would, and reaps it.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Waits for the agent to exit (at most [`EXIT_LIMIT`]; then it is killed).
    pub fn wait(mut self) -> Result<ExitStatus> {
        process::wait_within(&mut self.child, EXIT_LIMIT)
            .with_context(|| format!("the agent did not exit:\n{}", self.log()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = signal(self.pid(), libc::SIGTERM);
            for _ in 0..500 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What an HTTP request of [`Lab::http`] got back.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// A program other than the mesh's own, running on a node until dropped.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to end, at most `limit` (then it is killed and this fails).
    pub fn wait_within(&mut self, limit: Duration) -> Result<ExitStatus> {
        process::wait_within(&mut self.child, limit)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A helper process that runs until it ends or is dropped.
pub struct Running {
    child: Child,
    /// Its output after `ready`, until [`Running::wait_output`] takes it.
    stdout: Option<BufReader<ChildStdout>>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end (at most [`EXIT_LIMIT`]; then it is killed) and returns
    /// what it printed after `ready`.
    pub fn wait_output(mut self) -> Result<Output> {
        let stdout = self.stdout.take().map(process::read_to_end);
        let status = process::wait_within(&mut self.child, EXIT_LIMIT)
            .context("mesh-testpod did not finish")?;
        Ok(Output {
            status,
            stdout: process::collect(stdout, EXIT_LIMIT),
            stderr: String::new(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether an error output says a connection was reset (a read, or the first write after the
/// reset) or, for a later write, that the pipe is broken.
pub fn says_reset(log: &str) -> bool {
    log.contains("Connection reset by peer") || log.contains("Broken pipe")
}

/// A finished process: its status and output; `key=value` words of stdout are its fields.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The value of `key=value` in the output; panics with the output if it is missing.
    pub fn field(&self, key: &str) -> &str {
        let prefix = format!("{key}=");
        self.stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {key}= in output: {}", self.stdout))
    }
}

fn run_placed(placement: Placement, place: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = testpod(args);
    placement.apply(&mut cmd)?;
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "mesh-testpod {} in {place} failed ({}): {}",
            args.join(" "),
            out.status,
            out.stderr
        );
    }
    Ok(out)
}

fn run_program_at(placement: Placement, program: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    placement.apply(&mut cmd)?;
    output(cmd)
}

/// Runs `cmd` to its end, at most [`EXIT_LIMIT`] (then it is killed and this fails).
fn output(mut cmd: Command) -> Result<Output> {
    let (status, stdout, stderr) =
        process::run(&mut cmd).with_context(|| format!("{} did not finish", shown(&cmd)))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A command as a person would type it.
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `mesh-testpod serve` on 8080 (echoing on 9), answering with `x-pod: <name>`, and `extra`.
/// The log of the `n`th agent started on `node`: `agent-n1.log`, then `agent-n1.2.log`...
fn agent_log_name(node: &str, n: usize) -> String {
    match n {
        1 => format!("agent-{node}.log"),
        n => format!("agent-{node}.{n}.log"),
    }
}

pub(crate) fn http_server_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "serve",
        "--listen",
        "[::]:9",
        "--http",
        "[::]:8080",
        "--name",
        name,
    ];
    args.extend(extra);
    args
}

pub(crate) fn testpod(args: &[&str]) -> Command {
    let mut cmd = Command::new(testpod_binary());
    cmd.args(args);
    cmd
}

/// `mesh-testpod`, which cargo builds beside the test executables (`target/<profile>/`,
/// one level above `deps/`).
fn testpod_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("mesh-testpod"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mesh-testpod"))
}

/// Starts `cmd` at `placement`, its error output appended to `log`, and waits for `ready`.
pub(crate) fn spawn_ready(mut cmd: Command, placement: Placement, log: &Path) -> Result<Running> {
    placement.apply(&mut cmd)?;
    let errors = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdout(Stdio::piped())
        .stdin(Stdio::null())
        .stderr(errors);
    let mut child = cmd.spawn().context("cannot start mesh-testpod")?;
    let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut running = Running {
        child,
        stdout: None,
    };
    let (first, stdout) = process::first_line(stdout, READY_WATCHDOG).with_context(|| {
        format!(
            "mesh-testpod did not get ready: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    running.stdout = Some(stdout);
    if first.trim() != "ready" {
        bail!(
            "mesh-testpod did not get ready (said {first:?}): {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(running)
}

/// The agent binary under test: `MESH_AGENT_BIN`, or the workspace's debug build.
fn agent_binary() -> Result<PathBuf> {
    let path = std::env::var_os("MESH_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mesh-agent"),
        PathBuf::from,
    );
    if !path.is_file() {
        bail!(
            "no agent binary at {}: run the tests with `cargo xtask test`, which builds it",
            path.display()
        );
    }
    Ok(path)
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the end-to-end tests need root (sudo -E cargo xtask test)");
    }
    Ok(())
}

fn ensure_bpffs() -> Result<()> {
    if mesh_agent::system::require_bpffs().is_err() {
        let (status, _, stderr) = process::run(Command::new("mount").args([
            "-t",
            "bpf",
            "bpf",
            mesh_agent::system::BPFFS,
        ]))?;
        if !status.success() {
            bail!(
                "cannot mount bpffs at {}: {stderr}",
                mesh_agent::system::BPFFS
            );
        }
    }
    Ok(())
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn signal(pid: u32, sig: i32) -> Result<()> {
    let pid = i32::try_from(pid)?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Removes what labs of test processes that no longer run left behind.
fn remove_stale(cgroup_mount: &Path) {
    sweep(cgroup_mount, |name| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !alive(pid))
    });
}

/// Removes every cgroup (and what runs in it), network namespace, pin directory and scratch
/// directory whose name `doomed` picks.
fn sweep(cgroup_mount: &Path, doomed: impl Fn(&str) -> bool) {
    let names_in = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in names_in(cgroup_mount).into_iter().filter(|n| doomed(n)) {
        let _ = netns::remove_cgroup_tree(&cgroup_mount.join(name));
    }
    for name in netns::list().into_iter().filter(|n| doomed(n)) {
        let _ = ip(&["netns", "del", &name]);
    }
    let pins = Path::new(mesh_agent::system::BPFFS).join("mesh");
    for name in names_in(&pins).into_iter().filter(|n| doomed(n)) {
        let _ = std::fs::remove_dir_all(pins.join(name));
    }
    for name in names_in(&std::env::temp_dir())
        .into_iter()
        .filter(|n| doomed(n))
    {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(name));
    }
}
