#!/usr/bin/env bash
# The CUDA kernels' per-block arithmetic on the host, without a GPU (CI): compiles
# tests/cuda-host/*.cpp, which include kernels/cuda/*.cu with host versions of the few CUDA
# built-ins they use, and runs them (each compares a fast kernel's pieces with the reference
# kernel's dequantization). Needs a C++17 compiler for x86-64 with F16C (any CPU of the last
# decade); the warp and grid code is checked on a GPU by `realm gpu check`.
set -euo pipefail
cd "$(dirname "$0")/.."
cxx=${CXX:-c++}
command -v "$cxx" >/dev/null || { echo "test-cuda-host: no C++ compiler ($cxx; Debian: apt-get install g++)" >&2; exit 1; }
out=${CARGO_TARGET_DIR:-target}/cuda-host
mkdir -p "$out"
for src in tests/cuda-host/*.cpp; do
    exe=$out/$(basename "$src" .cpp)
    "$cxx" -std=c++17 -O1 -mf16c -Wall -Wno-unknown-pragmas -Wno-unused-function -Wno-unused-variable \
        -o "$exe" "$src"
    "$exe"
done
