//! Rebuild the eBPF objects when bpf-linker changes (a different LLVM makes different code).
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo::rerun-if-changed={}", linker.display());
    }
}
