//! Builds the eBPF programs (lb-ebpf) with the pinned nightly and bpf-linker, via aya-build, so
//! the objects embedded in `edgelb` always come from the sources in this tree.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The nightly that builds lb-ebpf: the last one on LLVM 22, matching bpf-linker 0.13's LLVM.
/// scripts/bootstrap.sh installs it.
const EBPF_TOOLCHAIN: &str = "nightly-2026-08-05";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=../lb-common/src");
    let meta = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().context("lb-ebpf manifest has no parent")?;
    aya_build::build_ebpf(
        [Package { name: "lb-ebpf", root_dir: root.as_str(), ..Default::default() }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
