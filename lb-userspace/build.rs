//! Builds the eBPF programs (lb-ebpf) with the pinned nightly and bpf-linker, via aya-build, so
//! the objects embedded in `edgelb` always come from the sources in this tree; and says which
//! git commit the tree is (`EDGELB_GIT_COMMIT`, for `edgelb::build`).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

#[path = "src/build/git.rs"]
mod git;

/// The nightly that builds lb-ebpf: the last one on LLVM 22, matching bpf-linker 0.13's LLVM.
/// scripts/bootstrap.sh installs it.
const EBPF_TOOLCHAIN: &str = "nightly-2026-08-05";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=../lb-common/src");
    commit();
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

/// Says the tree's commit to the crate (`EDGELB_GIT_COMMIT`, [`git::describe`]), and has cargo
/// run this script again when it may have changed: HEAD moved (a commit, a checkout), or this
/// crate's sources were edited, which makes the tree dirty or clean again. Never fails the
/// build: a tree git cannot describe is `unknown`.
fn commit() {
    println!("cargo::rerun-if-env-changed=EDGELB_GIT_COMMIT");
    // This crate's sources: an edit makes `-dirty` true (or false again). They are compiled
    // again after an edit anyway; what it adds is this script's run, whose eBPF build is then
    // a no-op.
    println!("cargo::rerun-if-changed=src");
    // The manifests and the lock change the binary too (a dependency's version or features).
    println!("cargo::rerun-if-changed=Cargo.toml");
    println!("cargo::rerun-if-changed=../Cargo.toml");
    println!("cargo::rerun-if-changed=../Cargo.lock");
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default();
    let root = std::path::Path::new(&manifest).parent().unwrap_or(std::path::Path::new("."));
    let given = std::env::var("EDGELB_GIT_COMMIT").ok();
    let described = git::describe(root, given.as_deref(), &|args| {
        let out = std::process::Command::new("git").arg("-C").arg(root).args(args).output().ok()?;
        let said = String::from_utf8_lossy(&out.stderr);
        // Not a checkout (a tarball) is what `unknown` is for; any other refusal (a checkout
        // owned by another user: "detected dubious ownership") is the packager's to know.
        if !out.status.success()
            && args == ["rev-parse", "--show-toplevel"]
            && !said.contains("not a git repository")
        {
            let said = said.trim().replace('\n', " ");
            println!(
                "cargo::warning=git {} failed, so this build says commit `unknown`: {said} (set EDGELB_GIT_COMMIT to name it)",
                args.join(" ")
            );
        }
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    });
    for path in &described.watch {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    println!("cargo::rustc-env=EDGELB_GIT_COMMIT={}", described.commit);
}
