//! Embeds the eBPF object that `cargo xtask build-ebpf` produced.

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
}
