#!/usr/bin/env bash
# Realm's CUDA backend against llama.cpp (CUDA) on the same GPU, one after the other, on
# random-weight Q4_K_M models of real shapes (`realm synth`: a pass's speed does not depend on the
# weights' values). Run on the GPU machine, with a stripped `realm` built here
# (`cargo build --release -p realm --features cuda`) and, for the llama.cpp side, the source
# tarball `scripts/llama-cpp-cuda.sh pack` makes here (the GPU machine has no package registry).
#
#   REALM_BIN=/tmp/realm scripts/bench-gpu.sh [--realm-only] [--llama SRC.tgz] [MODELS...]
#
# Realm runs its fast kernel set (REALM_CUDA_KERNELS=fast unless set otherwise; see docs/gpu.md).
# MODELS: synth presets (default: llama-3.1-8b llama-3.2-1b gemma3-270m). Work files (models,
# the llama.cpp build) go to $BENCH_DIR (default /tmp/realm-bench) and are reused when present.
# For each model: pp512 and tg128 (Realm: median of 3 runs; llama-bench: mean of 3), decode
# without CUDA graphs (REALM_CUDA_GRAPHS=0) to show what they save, and for the Llama shapes the
# batched figures (pp128 + tg128 per sequence, 1/4/16/64 sequences: llama-batched-bench's S_TG
# against Realm's engine loop). Record the figures in docs/benchmarks.md with device and date.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${REALM_BIN:-target/release/realm}
dir=${BENCH_DIR:-/tmp/realm-bench}
llama_src="" realm_only=0 models=()
while [ $# -gt 0 ]; do
    case $1 in
    --llama) llama_src=$(realpath "$2"); shift 2 ;;
    --realm-only) realm_only=1; shift ;;
    -*) echo "bench-gpu: unknown option $1" >&2; exit 2 ;;
    *) models+=("$1"); shift ;;
    esac
done
[ ${#models[@]} -gt 0 ] || models=(llama-3.1-8b llama-3.2-1b gemma3-270m)
mkdir -p "$dir"
export REALM_CUDA_KERNELS=${REALM_CUDA_KERNELS:-fast}
step() { printf '\n== [%s] %s ==\n' "$(date -u +%T)" "$*"; }

step "device (kernel set: $REALM_CUDA_KERNELS)"
"$bin" gpu info
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

llama=""
if [ "$realm_only" = 0 ] && [ -n "$llama_src" ]; then
    llama=$dir/llama
    if [ ! -x "$llama/bin/llama-bench" ]; then
        step "building llama.cpp (CUDA, sm_90)"
        scripts/llama-cpp-cuda.sh build "$llama_src" "$llama"
    fi
    libdir=$(dirname "$(readlink -f "$llama/bin/llama-bench")")
    export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

for m in "${models[@]}"; do
    f=$dir/$m-q4_k_m.gguf
    if [ ! -f "$f" ]; then
        step "synthesizing $m (Q4_K_M)"
        "$bin" synth --preset "$m" --quant q4_k_m -o "$f.tmp" >/dev/null && mv "$f.tmp" "$f"
    fi
    ls -l "$f"
    step "$m: Realm (cuda) pp512, tg128"
    "$bin" bench "$f" --backend cuda --prompt-tokens 512 --gen-tokens 128 --runs 3
    step "$m: Realm (cuda) tg128 without CUDA graphs"
    REALM_CUDA_GRAPHS=0 "$bin" bench "$f" --backend cuda --prompt-tokens 0 --gen-tokens 128 --runs 3
    if [ -n "$llama" ]; then
        step "$m: llama.cpp pp512, tg128"
        "$llama/bin/llama-bench" -m "$f" -ngl 99 -fa 1 -p 512 -n 128 -r 3 2>&1 | grep -E '^\|'
    fi
    case $m in
    llama-*)
        step "$m: Realm (cuda) batched: pp128 + tg128 per sequence, 1/4/16/64 sequences"
        "$bin" bench "$f" --backend cuda --concurrency 1,4,16,64 --prompt-tokens 128 \
            --gen-tokens 128 --runs 1
        if [ -n "$llama" ]; then
            step "$m: llama.cpp batched"
            "$llama/bin/llama-batched-bench" -m "$f" -ngl 99 -fa 1 -c 49152 -b 2048 -ub 512 \
                -npp 128 -ntg 128 -npl 1,4,16,64 2>&1 | grep -E '^\|'
        fi ;;
    esac
done
step "done"
