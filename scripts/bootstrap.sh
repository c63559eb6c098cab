#!/usr/bin/env bash
# Installs everything edgelb needs to build and test, skipping what is already there.
#
# Why a shell script and not xtask: the repository pins its host toolchain in
# rust-toolchain.toml, and with RUSTUP_AUTO_INSTALL=0 every cargo command fails until that
# toolchain exists. So the toolchains have to be installed before cargo runs at all.
#
# What it installs (versions verified on Debian 12, kernel 6.18):
#   - apt (as root): llvm-22-dev and the libraries bpf-linker links against, iproute2, ethtool
#   - rustup toolchains: 1.99.1 (host, pinned) and nightly-2026-08-05 + rust-src (eBPF; the last
#     nightly on LLVM 22, which is what bpf-linker 0.13 built against llvm-22 understands)
#   - bpf-linker 0.13.0 built against /usr/lib/llvm-22
set -euo pipefail

HOST_TOOLCHAIN=1.99.1
EBPF_TOOLCHAIN=nightly-2026-08-05
BPF_LINKER_VERSION=0.13.0
LLVM_PREFIX=/usr/lib/llvm-22
# A C toolchain (rustc links through cc; llvm-sys compiles C and links libstdc++), bpf-linker's
# LLVM, and what the testbed runs: ip, ethtool, sysctl (procps); nsenter and mount come with
# util-linux, which every Debian has.
APT_PACKAGES=(build-essential llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev iproute2 ethtool procps)

say() { printf '[bootstrap] %s\n' "$*" >&2; }

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# rustup must not try to update itself in a fresh rustup home (no network but the registries).
export RUSTUP_SELF_UPDATE=disable 2>/dev/null || true

missing_apt=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_apt+=("$p")
done
if ((${#missing_apt[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        say "missing Debian packages: ${missing_apt[*]}"
        say "run as root, or: sudo apt-get install -y ${missing_apt[*]}"
        exit 1
    fi
    say "apt-get install ${missing_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
else
    say "Debian packages present"
fi

if ! command -v rustup >/dev/null; then
    # Debian 12 has no rustup package.
    say "rustup not found: install it first (it installs into ~/.cargo and ~/.rustup), e.g."
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none"
    say "then open a new shell (or: . ~/.cargo/env) and run this again"
    exit 1
fi
rustup set auto-self-update disable >/dev/null 2>&1 || true

have_toolchain() { rustup toolchain list 2>/dev/null | grep -q "^$1"; }

has_components() {
    local tc=$1; shift
    local installed
    installed=$(rustup component list --toolchain "$tc" --installed 2>/dev/null) || return 1
    for c in "$@"; do grep -q "^$c" <<<"$installed" || return 1; done
}

if have_toolchain "$HOST_TOOLCHAIN" && has_components "$HOST_TOOLCHAIN" clippy rustfmt; then
    say "toolchain $HOST_TOOLCHAIN with clippy, rustfmt present"
else
    say "rustup toolchain install $HOST_TOOLCHAIN (minimal + clippy, rustfmt)"
    rustup toolchain install "$HOST_TOOLCHAIN" --profile minimal -c clippy -c rustfmt --no-self-update
fi

if have_toolchain "$EBPF_TOOLCHAIN" && has_components "$EBPF_TOOLCHAIN" rust-src clippy; then
    say "toolchain $EBPF_TOOLCHAIN with rust-src, clippy present"
else
    say "rustup toolchain install $EBPF_TOOLCHAIN (minimal + rust-src, clippy)"
    rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal -c rust-src -c clippy --no-self-update
fi

if command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    say "bpf-linker $BPF_LINKER_VERSION present"
else
    say "cargo install bpf-linker@$BPF_LINKER_VERSION against $LLVM_PREFIX (takes a few minutes)"
    LLVM_PREFIX="$LLVM_PREFIX" cargo +"$HOST_TOOLCHAIN" install "bpf-linker@$BPF_LINKER_VERSION" \
        --locked --no-default-features --features llvm-22
fi
say "done"
