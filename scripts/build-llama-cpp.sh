#!/usr/bin/env bash
# Builds llama.cpp (the reference we measure against, never a dependency of Realm) for
# comparisons: llama-bench, llama-batched-bench, llama-eval-callback (per-op tensor dumps) and
# tests/llama-cpp/reflogits.cpp (top-20 logits of a token-id prompt, with the settings
# llama-cpp-python uses). The source is the copy vendored in llama-cpp-python 0.3.36, the version
# that produced tests/fixtures/refs, fetched from the Python package registry.
#
# Usage: scripts/build-llama-cpp.sh [DIR]   (default: target/llama-cpp; ~20 min on 2 cores)
# Then:  DIR/bin/llama-bench -m models/gemma-3-270m-q4_k_m.gguf -t 2 -p 128,512 -n 64
#        DIR/bin/reflogits models/gemma-3-270m-q4_k_m.gguf 2,236935,236787
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/target/llama-cpp}
mkdir -p "$dir"
cd "$dir"
python3 -m pip install --quiet cmake ninja scikit-build-core
if [ ! -d llama_cpp_python-0.3.36 ]; then
  python3 -m pip download --quiet --no-deps --no-build-isolation llama-cpp-python==0.3.36 -d .
  tar xzf llama_cpp_python-0.3.36.tar.gz
fi
src=$dir/llama_cpp_python-0.3.36/vendor/llama.cpp
cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$src/build" --target llama-bench llama-batched-bench llama-eval-callback
mkdir -p bin
for t in llama-bench llama-batched-bench llama-eval-callback; do ln -sf "$src/build/bin/$t" bin/$t; done
g++ -O2 -std=c++17 "$root/tests/llama-cpp/reflogits.cpp" -I"$src/include" -I"$src/ggml/include" \
  -L"$src/build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$src/build/bin" -o bin/reflogits
echo "built: $dir/bin" >&2
