#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, driven through the `realm` binary (built with
# `cargo build --release -p realm --features cuda`; the GPU machine needs no Rust toolchain, no
# CUDA toolkit beyond the driver and NVRTC, and no test binaries):
#   1. `realm gpu info` twice with an empty kernel cache: the first start compiles the kernels
#      with NVRTC, the second must load them from the cache;
#   2. `realm gpu check`: every tensor type's matrix products by every path (f32 mat-vec, int8
#      mat-vec, cuBLAS gemm) at batch 1..16 and larger sizes against the CPU's reference (exit 1
#      if any is off);
#   3. models on the CUDA backend: `realm eval --backend cuda` on the fixture models against
#      llama.cpp's reference logits (tests/fixtures/refs, the golden tests' tolerances), the
#      largest GPU-vs-CPU logit difference per model (fixtures and synthetic Gemma 3, Qwen 2 and
#      Llama models of every quantization mix), and `realm bench --backend cuda` on a synthetic
#      Gemma 3 270M — each with the reference kernel set (the default) and the fast one
#      (`REALM_CUDA_KERNELS=fast`: int8 mat-vec, cuBLAS prefill, CUDA graphs, warp attention).
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

step "kernel check: every tensor type and path, batch 1..16 and larger, against the CPU reference"
"$bin" gpu check

work=$(mktemp -d)
trap 'rm -rf "$cache" "$work"' EXIT
fail=0
evaluate() { # model, prompts file, cpu|cuda|cuda-fast -> JSON lines on stdout
    case $3 in
    cuda-fast) REALM_CUDA_KERNELS=fast "$bin" eval "$1" --prompts-file "$2" --top 200 --greedy 64 --backend cuda ;;
    *) "$bin" eval "$1" --prompts-file "$2" --top 200 --greedy 64 --backend "$3" ;;
    esac
}
sets=(cuda cuda-fast)

step "models on the CUDA backend against llama.cpp's reference logits"
for spec in tiny-llama-mixed:0.25:10 tiny-qwen2-gpt2vocab:0.5:25; do
    IFS=: read -r m tol min <<<"$spec"
    refs=tests/fixtures/refs/$m.jsonl
    evaluate "tests/fixtures/models/$m.gguf" "$refs" cpu >"$work/$m.cpu.jsonl"
    for set in "${sets[@]}"; do
        evaluate "tests/fixtures/models/$m.gguf" "$refs" "$set" >"$work/$m.$set.jsonl"
        scripts/compare-eval.py "$refs" "$work/$m.$set.jsonl" --tol "$tol" --min-greedy "$min" \
            --label "$m $set vs llama.cpp" || fail=1
        scripts/compare-eval.py "$work/$m.cpu.jsonl" "$work/$m.$set.jsonl" --tol "$tol" \
            --label "$m $set vs cpu" || fail=1
    done
done

step "synthetic models: CUDA against the CPU backend, every architecture and quantization mix"
# Random weights make logits chaotic (8-bit activation rounding on the CPU, f32 on the GPU), so
# these report the difference and fail only past a loose bound that a wrong kernel exceeds.
prompts=$work/prompts.jsonl
printf '%s\n' '{"prompt_tokens": [1, 17, 300, 42, 99, 7, 250, 3, 11, 400, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35]}' \
    '{"prompt_tokens": [5, 6, 7]}' >"$prompts"
for preset in tiny-gemma3 tiny-qwen2 tiny-llama; do
    for quant in q4_k_m q8_0 q4_0 q6_k f16 f32; do
        f=$work/$preset-$quant.gguf
        "$bin" synth --preset "$preset" --quant "$quant" -o "$f" >/dev/null
        evaluate "$f" "$prompts" cpu >"$work/a.jsonl" 2>/dev/null
        for set in "${sets[@]}"; do
            evaluate "$f" "$prompts" "$set" >"$work/b.jsonl" 2>/dev/null
            scripts/compare-eval.py "$work/a.jsonl" "$work/b.jsonl" --tol 1.0 \
                --label "$preset $quant $set vs cpu" || fail=1
        done
    done
done

step "synthetic Gemma 3 270M (the real shape: 256-wide heads, window 512): CUDA against the CPU past the window"
"$bin" synth --preset gemma3-270m --quant q4_k_m -o "$work/g.gguf" >/dev/null
python3 -c 'import json; print(json.dumps({"prompt_tokens": [2] + [1000 + (i * 7919) % 200000 for i in range(700)]}))' >"$work/long.jsonl"
evaluate "$work/g.gguf" "$work/long.jsonl" cpu >"$work/a.jsonl" 2>/dev/null
for set in "${sets[@]}"; do
    evaluate "$work/g.gguf" "$work/long.jsonl" "$set" >"$work/b.jsonl" 2>/dev/null
    scripts/compare-eval.py "$work/a.jsonl" "$work/b.jsonl" --tol 1.0 \
        --label "gemma3-270m (synthetic) 701-token prompt, $set vs cpu" || fail=1
done

step "speed: synthetic Gemma 3 270M (Q4_K_M) on the CUDA backend"
"$bin" bench "$work/g.gguf" --backend cuda --prompt-tokens 128 --gen-tokens 64 --runs 3 || fail=1
"$bin" bench "$work/g.gguf" --backend cuda --prompt-tokens 512 --gen-tokens 0 --runs 3 || fail=1
REALM_CUDA_KERNELS=fast "$bin" bench "$work/g.gguf" --backend cuda --prompt-tokens 512 \
    --gen-tokens 128 --runs 3 || fail=1
"$bin" bench "$work/g.gguf" --backend cpu --threads 16 --prompt-tokens 128 --gen-tokens 64 --runs 3 || fail=1

[ "$fail" = 0 ] || { echo "test-gpu: FAILED" >&2; exit 1; }
echo "test-gpu: ok" >&2
