//! Embeds the eBPF object that `cargo xtask build-ebpf` produced, and lays out release
//! builds' code with `symbol-order.txt` (`cargo xtask hot-text`).

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = std::env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
        });
    if !object.is_file() {
        panic!(
            "the eBPF object {} is missing: build it with `cargo xtask build-ebpf` \
             (or build everything with `cargo xtask build`)",
            object.display()
        );
    }
    println!("cargo::rerun-if-changed={}", object.display());
    println!("cargo::rustc-env=MESH_EBPF_OBJECT={}", object.display());

    // The functions the agent runs, placed together: fewer of the binary's pages resident.
    // Functions missing from it (new code, another build's symbol hashes) are laid out as
    // before, without a warning each. Relative relocations packed (DT_RELR, glibc 2.36): the
    // loader reads 15 KB of them at start instead of 909 KB.
    let order = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    println!("cargo::rerun-if-changed={}", order.display());
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        println!(
            "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering,-z,pack-relative-relocs",
            order.display()
        );
    }
}
