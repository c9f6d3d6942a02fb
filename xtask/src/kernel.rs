//! `cargo xtask test --kernel VERSION`: the capture and data-path end-to-end tests on one of
//! the kernels users run (Debian's packaged 5.10, 6.1 and 6.12), booted under qemu (TCG: nested
//! KVM fails on these machines) from an initramfs that holds the tests, the agent and the stock
//! programs the tests drive. The guest has no network card: the tests make their own namespaces
//! inside it, as they do on the host.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    compile, image, setup,
    shell::{self, Step, Watchdog},
    test::Totals,
};

/// The kernel series that can be booted, each with the Debian suite that packages it.
pub const KERNELS: &[(&str, &str)] = &[
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "bookworm-backports"),
];

/// The end-to-end test targets run in the guest: capture, the data path on one node and across
/// nodes (with its backpressure), aborts, and the agent's lifecycle on its pinned maps.
pub const TEST_TARGETS: &[&str] = &[
    "capture",
    "backpressure",
    "crossnode",
    "aborts",
    "lifecycle",
];

/// Tests of [`TEST_TARGETS`] not run in the guest, and why: counted as skipped.
const NOT_IN_GUEST: &[(&str, &str)] = &[(
    "five_hundred_concurrent_cross_node_connections_are_byte_exact",
    "its 1 GB through TLS outlasts its bound under emulation; capture's thousand concurrent \
     connections run there",
)];

/// Stock programs the tests run, copied with the libraries they link.
const TOOLS: &[&str] = &["ip", "tc", "iperf3", "curl", "setpriv", "tshark", "dumpcap"];

/// What Debian's cloud kernels build as modules and the tests need.
const MODULES: &[&str] = &["veth", "bridge", "sch_netem"];

/// The archive the kernels come from (the one the machine's own apt list names).
const ARCHIVE: &str = "http://deb.debian.org/debian";

/// How long the guest may run before it is stopped and the run fails.
const GUEST_LIMIT: Duration = Duration::from_secs(60 * 60);

/// Boots `version` (a series of [`KERNELS`]) and runs the test `targets` (of
/// [`TEST_TARGETS`]) there; `extra` goes to each test binary (a name filter, `--nocapture`...).
pub fn test(root: &Path, version: &str, targets: &[&str], extra: &[String]) -> Result<Totals> {
    let Some(&(_, suite)) = KERNELS.iter().find(|(series, _)| *series == version) else {
        let series: Vec<&str> = KERNELS.iter().map(|(series, _)| *series).collect();
        bail!(
            "no kernel {version} to boot: choose one of {}",
            series.join(", ")
        );
    };
    setup::vm()?;
    let work = root.join("target/kernels");
    let kernel = fetch(&work, version, suite)?;
    // The agent the container image ships (static, optimised): what users run, and the
    // emulated CPU's time goes to the data path rather than to debug assertions.
    compile::ebpf(root)?;
    let agent = image::static_agent(root)?;
    let tests = build_tests(root, targets)?;
    let initramfs = pack(&work, &kernel, &agent, root, &tests, extra)?;
    let mut totals = boot(&kernel, &initramfs)?;
    if targets.contains(&"crossnode") && extra.is_empty() {
        for (test, why) in NOT_IN_GUEST {
            eprintln!("    not run in the guest: {test} ({why})");
            totals.ignored += 1;
        }
    }
    Ok(totals)
}

/// A kernel package unpacked: its image and its modules.
struct Kernel {
    /// `5.10.0-32-cloud-amd64`: what `uname -r` will say.
    release: String,
    /// The unpacked package.
    dir: PathBuf,
}

impl Kernel {
    fn image(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }
}

/// Downloads the newest cloud kernel of `version` from `suite` and unpacks it under `work`,
/// through an apt configuration of its own (the machine's apt state is not touched).
fn fetch(work: &Path, version: &str, suite: &str) -> Result<Kernel> {
    let step = Step::start(format!("kernel: Debian's {version} (from {suite})"));
    let apt = work.join("apt");
    for dir in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt.join(dir))?;
    }
    let sources = apt.join("sources.list");
    let lines: String = KERNELS
        .iter()
        .map(|(_, suite)| format!("deb {ARCHIVE} {suite} main\n"))
        .collect();
    fs::write(&sources, lines)?;
    let apt_get = |tool: &str| {
        let mut cmd = Command::new(tool);
        cmd.arg("-q")
            .arg("-o")
            .arg(format!("Dir::Etc::sourcelist={}", sources.display()))
            .args(["-o", "Dir::Etc::sourceparts=-", "-o"])
            .arg(format!("Dir::State::Lists={}", apt.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt.join("cache").display()));
        cmd
    };
    // The meta package of the suite names the kernel package it stands for.
    let versions =
        || shell::output(apt_get("apt-cache").args(["madison", "linux-image-cloud-amd64"]));
    let listed = match versions().filter(|out| out.contains(suite)) {
        Some(out) => out,
        None => {
            shell::run(apt_get("apt-get").arg("update"))?;
            versions().context("apt-cache madison failed after apt-get update")?
        }
    };
    let meta = listed
        .lines()
        .filter_map(|line| line.split('|').nth(1).map(str::trim))
        .find(|v| v.starts_with(&format!("{version}.")))
        .with_context(|| format!("no linux-image-cloud-amd64 {version}.x in {suite}:\n{listed}"))?;
    let shown = shell::output(
        apt_get("apt-cache").args(["show", &format!("linux-image-cloud-amd64={meta}")]),
    )
    .context("apt-cache show failed")?;
    let package = shown
        .lines()
        .find_map(|line| line.strip_prefix("Depends: "))
        .and_then(|deps| {
            deps.split([' ', ','])
                .find(|d| d.starts_with("linux-image-"))
        })
        .with_context(|| format!("linux-image-cloud-amd64 {meta} names no kernel:\n{shown}"))?
        .to_string();
    let release = package.trim_start_matches("linux-image-").to_string();
    let dir = work.join(&release);
    let kernel = Kernel { release, dir };
    if !kernel.image().is_file() {
        let downloads = work.join("downloads");
        fs::create_dir_all(&downloads)?;
        shell::run(
            apt_get("apt-get")
                .current_dir(&downloads)
                .args(["download", &package]),
        )?;
        let deb = fs::read_dir(&downloads)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download left no {package} package"))?;
        shell::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&kernel.dir),
        )?;
    }
    eprintln!("    {}", kernel.image().display());
    step.done();
    Ok(kernel)
}

/// A test target's binary.
struct TestBinary {
    name: String,
    path: PathBuf,
}

/// Builds the test `targets` (and `mesh-testpod`, which they run in pods); returns their
/// binaries.
fn build_tests(root: &Path, targets: &[&str]) -> Result<Vec<TestBinary>> {
    let step = Step::start("build: the end-to-end tests run in the guest");
    let mut cmd = compile::host_cargo(root, root);
    cmd.args(["test", "--package", "mesh-tests", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"]);
    for target in targets {
        cmd.args(["--test", target]);
    }
    eprintln!("    $ {}", shell::describe(&cmd));
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the tests failed: see above");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(path)) = (
            message.pointer("/target/name").and_then(|n| n.as_str()),
            message.get("executable").and_then(|p| p.as_str()),
        ) else {
            continue;
        };
        if targets.contains(&name) && message["profile"]["test"] == true {
            tests.push(TestBinary {
                name: name.to_string(),
                path: PathBuf::from(path),
            });
        }
    }
    if tests.len() != targets.len() {
        bail!(
            "cargo built {} of the {} test targets",
            tests.len(),
            targets.len()
        );
    }
    step.done();
    Ok(tests)
}

/// Lays out the guest's root (busybox, the modules, the agent, the tests, the tools and their
/// libraries, `/init`) and packs it as a newc cpio archive; returns the archive.
fn pack(
    work: &Path,
    kernel: &Kernel,
    agent: &Path,
    root: &Path,
    tests: &[TestBinary],
    extra: &[String],
) -> Result<PathBuf> {
    let step = Step::start("initramfs: the guest's root");
    let guest = work.join(format!("{}.root", kernel.release));
    if guest.exists() {
        fs::remove_dir_all(&guest)?;
    }
    for dir in ["bin", "usr/bin", "mesh/deps", "mesh/modules", "etc", "root"] {
        fs::create_dir_all(guest.join(dir))?;
    }
    fs::copy("/bin/busybox", guest.join("bin/busybox"))
        .context("no /bin/busybox (Debian's busybox-static): run `cargo xtask setup` as root")?;
    fs::copy(agent, guest.join("mesh/mesh-agent"))?;
    let mut libraries = BTreeSet::new();
    // The tests without their debug sections: a fifth of the size, and the guest's root is in
    // its memory.
    let own = tests
        .iter()
        .map(|t| (t.path.clone(), format!("mesh/deps/{}", t.name)))
        .chain([(
            root.join("target/debug/mesh-testpod"),
            "mesh/mesh-testpod".into(),
        )]);
    for (binary, place) in own {
        shell::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(&binary)
                .arg(guest.join(&place)),
        )?;
        libraries.extend(linked_libraries(&binary)?);
    }
    for tool in TOOLS {
        let path = which(tool)?;
        fs::copy(&path, guest.join("usr/bin").join(tool))
            .with_context(|| format!("copying {}", path.display()))?;
        libraries.extend(linked_libraries(&path)?);
    }
    for library in &libraries {
        let place = guest.join(library.strip_prefix("/")?);
        fs::create_dir_all(place.parent().context("a library at /")?)?;
        fs::copy(library, &place).with_context(|| format!("copying {}", library.display()))?;
    }
    let modules = copy_modules(kernel, &guest.join("mesh/modules"))?;
    fs::write(guest.join("mesh/modules.order"), modules.join("\n") + "\n")?;
    let skips = NOT_IN_GUEST
        .iter()
        .flat_map(|(test, _)| ["--skip".to_string(), test.to_string()]);
    let args: Vec<String> = extra.iter().cloned().chain(skips).collect();
    fs::write(guest.join("mesh/args"), args.join("\n") + "\n")?;
    fs::write(
        guest.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    fs::write(
        guest.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )?;
    fs::write(guest.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let init = guest.join("init");
    fs::write(&init, INIT)?;
    shell::run(Command::new("chmod").arg("755").arg(&init))?;

    let archive = work.join(format!("{}.initramfs.cpio", kernel.release));
    let out = fs::File::create(&archive)?;
    let list = Command::new("find")
        .arg(".")
        .current_dir(&guest)
        .stdout(Stdio::piped())
        .spawn()?;
    let status = Command::new(guest.join("bin/busybox"))
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&guest)
        .stdin(list.stdout.context("no output from find")?)
        .stdout(out)
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("busybox cpio failed ({status})");
    }
    eprintln!(
        "    {} ({} MiB)",
        archive.display(),
        fs::metadata(&archive)?.len() >> 20
    );
    step.done();
    Ok(archive)
}

/// The guest's init: mounts what the tests need, loads the modules, runs each test binary and
/// says how it ended, then powers the guest off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin HOME=/root MESH_AGENT_BIN=/mesh/mesh-agent RUST_BACKTRACE=1
mount -t proc proc /proc 2>/dev/null || { mkdir -p /proc && mount -t proc proc /proc; }
mkdir -p /sys /dev /tmp /run
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
for module in $(cat /mesh/modules.order); do insmod /mesh/modules/$module || echo "mesh-guest: insmod $module failed"; done
ip link set lo up
echo "mesh-guest: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 / 1024}' /proc/meminfo) MiB"
set -- $(cat /mesh/args)
failed=0
for test in /mesh/deps/*; do
    echo "mesh-guest: running ${test##*/}"
    "$test" --test-threads 1 --include-ignored "$@" || failed=$((failed + 1))
done
echo "mesh-guest: finished, $failed test binaries failed"
sync
poweroff -f
"#;

/// Copies [`MODULES`] and the modules they depend on, uncompressed, into `dir`; returns
/// their file names in load order. (Debian's kernel packages carry no modules.dep: that is
/// made when one is installed. Each module names what it depends on in its `.modinfo`.)
fn copy_modules(kernel: &Kernel, dir: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    walk(&kernel.modules().join("kernel"), &mut files)?;
    let mut order = Vec::new();
    for name in MODULES {
        add_module(name, &files, dir, &mut order)?;
    }
    Ok(order)
}

/// Adds module `name` after what it depends on.
fn add_module(name: &str, files: &[PathBuf], dir: &Path, order: &mut Vec<String>) -> Result<()> {
    let file = format!("{name}.ko");
    if order.contains(&file) {
        return Ok(());
    }
    let source = files
        .iter()
        .find(|path| module_name(path) == name)
        .with_context(|| format!("the kernel has no module {name}"))?;
    let target = dir.join(&file);
    if source.extension().is_some_and(|e| e == "xz") {
        let status = Command::new("xz")
            .arg("-dc")
            .arg(source)
            .stdout(fs::File::create(&target)?)
            .status()?;
        if !status.success() {
            bail!("xz -d {} failed ({status})", source.display());
        }
    } else {
        fs::copy(source, &target).with_context(|| format!("copying {}", source.display()))?;
    }
    let bytes = fs::read(&target)?;
    for needed in modinfo(&bytes, "depends")
        .split(',')
        .filter(|d| !d.is_empty())
    {
        add_module(needed, files, dir, order)?;
    }
    order.push(file);
    Ok(())
}

/// A field of a module's `.modinfo` (NUL-separated `key=value` strings).
fn modinfo(module: &[u8], key: &str) -> String {
    let field = format!("\0{key}=");
    module
        .windows(field.len())
        .position(|w| w == field.as_bytes())
        .map(|at| {
            let value = &module[at + field.len()..];
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            String::from_utf8_lossy(&value[..end]).into_owned()
        })
        .unwrap_or_default()
}

/// A module's name from its file: `sch_netem` from `sch_netem.ko.xz` (dashes read as
/// underscores, as the kernel does).
fn module_name(path: &Path) -> String {
    let file = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// Every file below `dir`.
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// The shared libraries `binary` loads (its interpreter among them), as `ldd` finds them.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// Where `program` is on this machine's PATH.
fn which(program: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("no {program} on this machine: run `cargo xtask setup` as root"))
}

/// Boots the kernel with the initramfs, passes the guest's console through, and adds up the
/// tests' `test result:` lines.
fn boot(kernel: &Kernel, initramfs: &Path) -> Result<Totals> {
    let step = Step::start(format!(
        "guest: {} under qemu (TCG), running the tests",
        kernel.release
    ));
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        // Without CMPXCHG16B: QEMU 10.0's TCG corrupts 6.12's SLUB fast path with it (a double
        // fault in kmem_cache_alloc within seconds of boot); SLUB then takes its locked path.
        "max,cx16=off",
        "-smp",
        "2",
        "-m",
        "4096",
    ])
    .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
    .arg(kernel.image())
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", "console=ttyS0 panic=-1 loglevel=5"]);
    eprintln!("    $ {}", shell::describe(&qemu));
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64 (install it: cargo xtask setup)")?;
    let watchdog = Watchdog::start("the guest", GUEST_LIMIT, child.id());
    let stdout = child.stdout.take().context("no output from qemu")?;
    let mut totals = Totals::default();
    let mut failed_binaries = None;
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).trim_end().to_string();
        println!("{line}");
        totals.add(&line);
        if let Some(end) = line.strip_prefix("mesh-guest: finished, ") {
            failed_binaries = end
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok());
        }
    }
    let status = child.wait()?;
    watchdog.stop();
    let Some(failed_binaries) = failed_binaries else {
        bail!("the guest stopped ({status}) before its tests finished: see its console above");
    };
    if failed_binaries > 0 && totals.failed == 0 {
        bail!(
            "{failed_binaries} test binaries failed in the guest before any test failed: see its console above"
        );
    }
    step.done();
    Ok(totals)
}
