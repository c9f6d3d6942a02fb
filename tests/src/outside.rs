//! Hosts outside the mesh (`LabSpec::outside`): network namespaces beside the nodes, not in
//! any pod CIDR, for third parties the pods call and a DNS server that names them; stock
//! servers run there (openssl's TLS server, dnsmasq).

use std::path::Path;

use anyhow::Result;

use crate::{
    Daemon, Lab, Running,
    lab::{http_server_args, spawn_ready, testpod},
    netns::Placement,
};

impl Lab {
    fn outside_placement(&self, name: &str) -> Placement {
        Placement {
            netns: self.netns_name(name),
            cgroup: self.cgroup_root().join(format!("outside-{name}")),
        }
    }

    /// Like [`Lab::start_on_node`], on the host `name` outside the mesh (its output in
    /// `<log>.log`).
    pub fn start_outside(
        &self,
        name: &str,
        log: &str,
        program: &str,
        args: &[&str],
    ) -> Result<Daemon> {
        self.start_placed(self.outside_placement(name), log, program, args)
    }

    /// Starts `mesh-testpod args` on the host `name` outside the mesh and waits until it
    /// prints `ready`.
    pub fn spawn_outside(&self, name: &str, args: &[&str]) -> Result<Running> {
        let log = self.scratch_path(&format!("outside-{name}.log"));
        spawn_ready(testpod(args), self.outside_placement(name), &log)
    }

    /// An HTTP server on the host `name` outside the mesh (see [`Lab::serve_http`]).
    pub fn serve_http_outside(&self, name: &str) -> Result<Running> {
        self.spawn_outside(name, &http_server_args(name, &[]))
    }

    /// A TLS server on port 443 of the host `name` (openssl's `s_server -www`: answers any
    /// request with a status page), with the certificate and key of `pem`, once it accepts.
    pub fn start_tls_server(&self, name: &str, pem: &Path) -> Result<Daemon> {
        let pem = pem.display().to_string();
        let args = [
            "s_server", "-accept", "443", "-cert", &pem, "-key", &pem, "-www",
        ];
        let server = self.start_outside(name, name, "openssl", &args)?;
        let log = self.scratch_path(&format!("{name}.log"));
        self.wait_for_lines(&log, |lines| lines.iter().any(|l| l.contains("ACCEPT")));
        Ok(server)
    }

    /// A DNS server (dnsmasq) on the host `name` outside the mesh, answering from the hosts
    /// file `hosts` (read again on SIGHUP) with a TTL of one second, and nothing else.
    pub fn start_dns_server(&self, name: &str, hosts: &Path) -> Result<Daemon> {
        let i = self
            .spec
            .outside_index(name)
            .ok_or_else(|| anyhow::anyhow!("no outside host {name} in the lab"))?;
        let (address, _) = crate::topology::outside_addrs(i);
        let args = [
            "--no-daemon".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--user=root".to_owned(),
            "--pid-file=".to_owned(),
            format!("--listen-address={address}"),
            "--bind-interfaces".to_owned(),
            "--local-ttl=1".to_owned(),
            "--log-queries".to_owned(),
            "--log-facility=-".to_owned(),
            format!("--addn-hosts={}", hosts.display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_outside(name, "dnsmasq", "dnsmasq", &args)
    }
}
