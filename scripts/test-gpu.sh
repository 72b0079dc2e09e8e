#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, driven through the `realm` binary (built with
# `cargo build --release -p realm --features cuda`; the GPU machine needs no Rust toolchain, no
# CUDA toolkit beyond the driver and NVRTC, and no test binaries):
#   1. `realm gpu info` twice with an empty kernel cache: the first start compiles the kernels
#      with NVRTC, the second must load them from the cache;
#   2. `realm gpu check`: every tensor type's matrix kernel at batch 1..16 and a prefill size
#      against the CPU's reference (exit 1 if any is off).
# Without a GPU it says so and exits 0 (CI has none; the kernels still compile there: the engine
# test `kernels_compile_with_nvrtc` with scripts/nvrtc.sh).
#
#   REALM_BIN=path/to/realm scripts/test-gpu.sh      # default target/release/realm
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${REALM_BIN:-${CARGO_TARGET_DIR:-target}/release/realm}
step() { printf '\n== %s ==\n' "$*" >&2; }

info=$("$bin" gpu info)
echo "$info"
case $info in
"no GPU support"* | "no usable GPU"*)
    echo "test-gpu: skipped: no usable GPU here" >&2
    exit 0 ;;
esac
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export REALM_CUDA_CACHE=$cache
step "kernel cache: first start compiles, second loads"
first=$("$bin" gpu info)
second=$("$bin" gpu info)
echo "$first"; echo "$second"
grep -q "compiled now" <<<"$first" || { echo "test-gpu: the first start did not compile" >&2; exit 1; }
grep -q "from the cache" <<<"$second" || { echo "test-gpu: the second start did not use the cache" >&2; exit 1; }

step "kernel check: every tensor type, batch 1..16 and 67, against the CPU reference"
"$bin" gpu check
echo "test-gpu: ok" >&2
