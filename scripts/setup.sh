#!/usr/bin/env bash
# One-time (idempotent) machine setup for building and running lb, as root:
# Debian's LLVM 22 and rustc-web (a stable rustc with a prebuilt `core` for
# bpfel-unknown-none), buildah (the image), bpf-linker built against that LLVM, the rustup
# toolchain link the build uses, and a mounted bpffs. Skips what is present.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
TOOLCHAIN=deb-1.96
PACKAGES=(llvm-22-dev clang-22 lld-22 libpolly-22-dev bpftool libbpf-dev iproute2 util-linux iputils-ping
          dnsmasq-base bind9-dnsutils curl ethtool
          iptables nftables buildah
          rustc-web cargo-web libstd-rust-web-dev-bpf rust-web-src)

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/setup.sh must run as root (apt, bpffs)" >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
    log "Debian packages present"
fi

if ! command -v cargo >/dev/null; then
    echo "cargo (rustup) not found on PATH" >&2
    exit 1
fi

if bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "bpf-linker $BPF_LINKER_VERSION present"
else
    log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
        --no-default-features --features llvm-22
fi

if rustup toolchain list | grep -q "^$TOOLCHAIN"; then
    log "rustup toolchain $TOOLCHAIN present"
else
    log "linking Debian's rustc as rustup toolchain $TOOLCHAIN"
    rustup toolchain link "$TOOLCHAIN" /usr
fi
rustup run "$TOOLCHAIN" rustc --print target-list | grep -qx bpfel-unknown-none \
    || { echo "rustc-web has no bpfel-unknown-none target" >&2; exit 1; }

if mountpoint -q /sys/fs/bpf; then
    log "bpffs mounted"
else
    log "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi
mkdir -p /var/run/netns
log "ready"
