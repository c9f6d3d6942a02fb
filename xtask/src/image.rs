//! `cargo xtask image`: the agent's container image without a container engine. One layer
//! holding a static `/mesh-agent` (the eBPF object is embedded in it), written as an OCI
//! image layout and as an archive of it, which `ctr images import`, `podman load` and
//! `skopeo copy oci-archive:...` take.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    compile,
    shell::{self, Step},
};

/// The image's name unless told otherwise (the kustomizations in deploy/ use it).
pub const DEFAULT_NAME: &str = "registry.example/mesh/mesh-agent";

/// Where the static agent is built: apart from the host build, whose agent is dynamic.
const TARGET_DIR: &str = "target/static";

/// Builds the image of the agent, named `name` and tagged with the agent's version.
pub fn run(root: &Path, name: &str) -> Result<()> {
    compile::ebpf(root)?;
    let binary = static_agent(root)?;
    let version = agent_version(&binary)?;
    let step = Step::start(format!("image: {name}:{version}"));
    let out = root.join("target/image");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    let rootfs = out.join("rootfs");
    let layout = out.join("oci");
    fs::create_dir_all(&rootfs)?;
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    fs::copy(&binary, rootfs.join("mesh-agent"))?;

    // The layer: the root file system as a reproducible tar, gzipped.
    let layer_tar = out.join("layer.tar");
    tar(&rootfs, &layer_tar)?;
    let diff_id = sha256(&layer_tar)?;
    shell::run(Command::new("gzip").args(["-n", "-9"]).arg(&layer_tar))?;
    let layer = blob_file(&layout, &out.join("layer.tar.gz"))?;

    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/mesh-agent"],"User":"0"}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}}}}"#
    );
    let config = blob(&layout, config.as_bytes())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":{}}}]}}"#,
        config.digest, config.size, layer.digest, layer.size
    );
    let manifest = blob(&layout, manifest.as_bytes())?;
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{version}","io.containerd.image.name":"{name}:{version}"}}}}]}}"#,
        manifest.digest, manifest.size
    );
    fs::write(layout.join("index.json"), index)?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = out.join("mesh-agent.oci.tar");
    tar(&layout, &archive)?;
    eprintln!("    layout:  {}", layout.display());
    eprintln!("    archive: {}", archive.display());
    eprintln!(
        "    import:  ctr -n k8s.io images import {}",
        archive.display()
    );
    eprintln!(
        "    push:    skopeo copy oci-archive:{} docker://{name}:{version}",
        archive.display()
    );
    step.done();
    Ok(())
}

/// Checks the image as a container runtime would take it: skopeo reads the archive back
/// (every digest and size checked), and the agent runs in a root holding nothing else.
pub fn verify(root: &Path) -> Result<()> {
    let step = Step::start("image: read back with skopeo, run alone in its root");
    let out = root.join("target/image");
    let copy = out.join("verified");
    if copy.exists() {
        fs::remove_dir_all(&copy)?;
    }
    shell::run(
        Command::new("skopeo")
            .arg("copy")
            .arg(format!(
                "oci-archive:{}",
                out.join("mesh-agent.oci.tar").display()
            ))
            .arg(format!("dir:{}", copy.display())),
    )?;
    shell::run(
        Command::new("chroot")
            .arg(out.join("rootfs"))
            .args(["/mesh-agent", "--version"]),
    )?;
    step.done();
    Ok(())
}

/// Builds the agent linked statically (glibc's static libraries) and checks it needs no
/// loader: the image holds nothing else.
pub fn static_agent(root: &Path) -> Result<PathBuf> {
    let step = Step::start("image: mesh-agent, static (release)");
    // `cargo rustc` gives the static flags to the agent's own link only, not to build
    // scripts and proc macros; without `--target` its symbols keep the host build's names,
    // which mesh-agent/symbol-order.txt lists.
    shell::run(
        compile::host_cargo(root, root)
            .env("CARGO_TARGET_DIR", root.join(TARGET_DIR))
            .args([
                "rustc",
                "--release",
                "--package",
                "mesh-agent",
                "--bin",
                "mesh-agent",
                "--",
                "-C",
                "target-feature=+crt-static",
                "-C",
                "strip=symbols",
            ]),
    )?;
    let binary = root.join(TARGET_DIR).join("release/mesh-agent");
    if has_interpreter(&fs::read(&binary)?)? {
        bail!(
            "{} is linked dynamically; the image needs a static binary (is libc6-dev installed?)",
            binary.display()
        );
    }
    step.done();
    Ok(binary)
}

/// Whether an ELF file names a program interpreter (a dynamic loader).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let field = |at: usize, len: usize| {
        elf.get(at..at + len)
            .map(|b| {
                b.iter()
                    .rev()
                    .fold(0u64, |n, byte| n << 8 | u64::from(*byte))
            })
            .context("not a 64-bit little-endian ELF file")
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("not a 64-bit little-endian ELF file");
    }
    let (offset, size, count) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..count {
        let at = usize::try_from(offset + i * size)?;
        if field(at, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The version the binary reports (`mesh-agent 0.1.0` → `0.1.0`).
fn agent_version(binary: &Path) -> Result<String> {
    let out = Command::new(binary).arg("--version").output()?;
    let text = String::from_utf8(out.stdout)?;
    text.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("{} --version printed {text:?}", binary.display()))
}

/// Archives the contents of `dir` into `archive`, the same bytes for the same files.
fn tar(dir: &Path, archive: &Path) -> Result<()> {
    shell::run(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .args(["--mtime=@0", "-C"])
            .arg(dir)
            .arg("-cf")
            .arg(archive)
            .arg("."),
    )
}

/// A content-addressed blob of the layout.
struct Blob {
    digest: String,
    size: u64,
}

fn blob(layout: &Path, bytes: &[u8]) -> Result<Blob> {
    let file = layout.join("blobs/new");
    fs::write(&file, bytes)?;
    blob_file(layout, &file)
}

/// Moves `file` into the layout's blobs under its digest.
fn blob_file(layout: &Path, file: &Path) -> Result<Blob> {
    let digest = sha256(file)?;
    let size = fs::metadata(file)?.len();
    fs::rename(file, layout.join("blobs/sha256").join(&digest))?;
    Ok(Blob { digest, size })
}

fn sha256(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(file).output()?;
    let text = String::from_utf8(out.stdout)?;
    text.split_whitespace()
        .next()
        .filter(|d| d.len() == 64)
        .map(str::to_owned)
        .with_context(|| format!("sha256sum {} printed {text:?}", file.display()))
}
