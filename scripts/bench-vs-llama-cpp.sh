#!/usr/bin/env bash
# Realm against llama.cpp on the same model, same cores, one after the other.
#
#   scripts/bench-vs-llama-cpp.sh [MODEL] [LLAMA_BIN_DIR] [CORES]
#
# MODEL defaults to a synthetic Gemma 3 270M (`realm synth --preset gemma3-270m`: the published
# file's shapes and Q4_K_M type mix), LLAMA_BIN_DIR to what scripts/build-llama-cpp.sh builds,
# CORES (for taskset) to "0,1". Figures go to stdout; record them in docs/benchmarks.md with the
# machine and date.
set -euo pipefail
cd "$(dirname "$0")/.."
realm=${REALM_BIN:-target/release/realm}
[ -x "$realm" ] || cargo build --release -p realm
model=${1:-}
bin=${2:-target/llama-cpp/bin}
cores=${3:-0,1}
if [ -z "$model" ]; then
    model=target/bench/gemma3-270m-synth.gguf
    [ -f "$model" ] || { mkdir -p target/bench; "$realm" synth --preset gemma3-270m -o "$model"; }
fi
for tool in llama-batched-bench llama-bench; do
    [ -x "$bin/$tool" ] || { echo "missing $bin/$tool (run scripts/build-llama-cpp.sh)" >&2; exit 1; }
done
# The tools sit beside their shared libraries (bin/ may hold symlinks to them).
libdir=$(dirname "$(readlink -f "$bin/llama-bench")")
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
pin=(taskset -c "$cores")
echo "== $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) cores $cores"
echo "== llama.cpp batched (pp32 tg32)"
"${pin[@]}" "$bin/llama-batched-bench" -m "$model" -c 4096 -b 2048 -ub 512 -npp 32 -ntg 32 \
    -npl 1,2,4,8,16 -t 2 2>&1 | grep -E '^\|'
echo "== Realm concurrent (pp32 tg32)"
"${pin[@]}" "$realm" bench "$model" --threads 2 --concurrency 1,2,4,8,16 --prompt-tokens 32 \
    --gen-tokens 32 --runs 2
echo "== llama.cpp single"
"${pin[@]}" "$bin/llama-bench" -m "$model" -t 2 -p 128,512 -n 64 -r 3 2>&1 | grep -E '^\|'
echo "== Realm single"
"${pin[@]}" "$realm" bench "$model" --threads 2 --prompt-tokens 128 --gen-tokens 64 --runs 3
"${pin[@]}" "$realm" bench "$model" --threads 2 --prompt-tokens 512 --gen-tokens 0 --runs 3
