#!/usr/bin/env bash
# Brings a bare Debian 12 machine to the point where `cargo xtask …` works:
# LLVM 22 (bpf-linker must link against the same LLVM major as rustc), the pinned
# toolchain with rust-src (eBPF needs build-std=core), bpf-linker, iproute2, iperf3, ping,
# stunnel4 and nftables (benchmark baselines), podman and runc (`cargo xtask image` and the
# image test: Debian's default runtime, crun, refuses a hybrid cgroup layout; runc does not),
# and the reference CNI plugins (containernetworking-plugins: the testbed wires pods with them);
# from PyPI, kubernetes-validate, jsonschema and PyYAML (the manifest and schema checks).
# Idempotent: every step checks first, so a rerun on a ready machine takes seconds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
toolchain="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$here/rust-toolchain.toml")"
llvm_major=22
log() { printf '[bootstrap] %s\n' "$*" >&2; }

need_pkgs=()
for p in "llvm-${llvm_major}-dev" "clang-${llvm_major}" bpftool iproute2 iperf3 iputils-ping stunnel4 nftables g++ libpolly-${llvm_major}-dev zlib1g-dev libzstd-dev podman runc containernetworking-plugins; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
else
  log "Debian packages present"
fi

if ! command -v rustup >/dev/null; then
  log "rustup is missing; install it from your distribution or rustup.rs first" ; exit 1
fi
if ! rustup toolchain list | grep -q "^${toolchain}-"; then
  log "installing Rust toolchain ${toolchain} with rust-src"
  rustup toolchain install "$toolchain" --profile minimal -c rust-src -c rustfmt -c clippy --no-self-update
elif ! rustup component list --toolchain "$toolchain" --installed | grep -q '^rust-src'; then
  rustup component add --toolchain "$toolchain" rust-src
else
  log "toolchain ${toolchain} present"
fi

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$cargo_bin/bpf-linker" --version 2>/dev/null | grep -q .; then
  log "building bpf-linker against LLVM ${llvm_major} (about a minute)"
  PATH="/usr/lib/llvm-${llvm_major}/bin:$PATH" cargo "+${toolchain}" install bpf-linker --locked \
    --no-default-features --features "llvm-${llvm_major}"
else
  log "bpf-linker present"
fi
# Manifest validation in the tests (offline JSON schemas of the Kubernetes API).
if ! command -v kubernetes-validate >/dev/null; then
  log "installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate
else
  log "kubernetes-validate present"
fi
# The policy objects' schema check in the tests (tests/schema_check.py: PyYAML and jsonschema;
# kubernetes-validate usually brings both).
if ! python3 -c 'import jsonschema, yaml' 2>/dev/null; then
  py_pkgs=()
  python3 -c 'import jsonschema' 2>/dev/null || py_pkgs+=(jsonschema)
  python3 -c 'import yaml' 2>/dev/null || py_pkgs+=(pyyaml)
  log "installing ${py_pkgs[*]} (PyPI)"
  python3 -m pip install --quiet "${py_pkgs[@]}"
else
  log "jsonschema and PyYAML present"
fi
log "ready"
