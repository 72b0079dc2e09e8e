#!/usr/bin/env bash
# Sets up a fresh machine and runs Realm's main job on the default model.
# Today that is the engine itself: fetch Gemma 3 270M, build `realm` in release mode, evaluate
# the reference prompts against llama.cpp's outputs and benchmark prefill/decode. (When the HTTP
# service lands, this script starts `realm serve` with a demo tenant instead.)
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(scripts/fetch-model.sh)
cargo build --release -p realm
echo "== realm eval (compare with tests/fixtures/refs/gemma-3-270m-q4_k_m.jsonl) ==" >&2
./target/release/realm eval "$model" --prompts-file tests/fixtures/refs/gemma-3-270m-q4_k_m.jsonl --top 5 --greedy 16
echo "== realm bench ==" >&2
./target/release/realm bench "$model" --prompt-tokens 128 --gen-tokens 64 --runs 3
