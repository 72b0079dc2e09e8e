#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what it needs (Rust target from rust-toolchain.toml, the default model), then checks
# formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's header says how long the suite has run so far (where a cold run's time goes).
start=$SECONDS
step() { printf '\n== [%dm%02ds] %s ==\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$*" >&2; }

step "toolchain"
# rust-toolchain.toml pins the compiler; the script adds the wasm32-wasip2 target, rustfmt and
# clippy where the installed toolchain lacks them.
scripts/toolchain.sh
cargo --version >&2

step "default model"
scripts/fetch-model.sh >/dev/null

step "cargo fmt --check"
cargo fmt --all -- --check
# The guest SDK and the guests are workspaces of their own (wasm32-wasip2).
cargo fmt --manifest-path guest-sdk/Cargo.toml -- --check
cargo fmt --manifest-path guests/Cargo.toml --all -- --check

# The workspace is linted and tested with the CUDA backend compiled in (`--features realm/cuda`:
# it loads its libraries at run time, so no toolkit is needed to build it); its tests compile
# every kernel in kernels/cuda/ with NVRTC (scripts/nvrtc.sh fetches the library) and check that
# a machine without a GPU gets an error, not a panic. GPU runs: scripts/test-gpu.sh, docs/gpu.md.
features=(--features realm/cuda)

step "cargo clippy"
cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings
# The guests and the SDK (own workspaces; target dir shared with host/runtime/build.rs's guest
# build so their dependencies compile once).
export GUEST_TARGET_DIR=${CARGO_TARGET_DIR:-target}/realm-guests
CARGO_TARGET_DIR=$GUEST_TARGET_DIR cargo clippy --manifest-path guests/Cargo.toml --workspace \
    --target wasm32-wasip2 --all-targets -- -D warnings
CARGO_TARGET_DIR=$GUEST_TARGET_DIR cargo clippy --manifest-path guest-sdk/Cargo.toml \
    --all-targets -- -D warnings

step "NVRTC (compiles the CUDA kernels in the tests; no GPU needed)"
nvrtc_dir=$(scripts/nvrtc.sh)

step "CUDA kernels' per-block arithmetic on the host (scripts/test-cuda-host.sh)"
scripts/test-cuda-host.sh

step "cargo test"
LD_LIBRARY_PATH=$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    cargo test --workspace "${features[@]}" -- --test-threads 2

step "engine tests again at the lower ISA levels (REALM_ISA=scalar, then avx2; same binaries)"
# Kernels are picked at run time and CI's CPU changes between runs: the engine's test binaries
# built above (and run above at this CPU's own level) run again with the dispatcher capped.
engine_tests=$(cargo test --workspace "${features[@]}" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["profile"]["test"] and m["manifest_path"].endswith("/host/engine/Cargo.toml")):
        print(m["executable"])')
[ -n "$engine_tests" ] || { echo "no engine test binaries found" >&2; exit 1; }
# At the scalar level the Gemma 3 270M golden test alone takes minutes (its 262k-entry output
# matrix through the scalar kernels); the scalar kernels are checked against the SIMD ones by the
# property tests and against llama.cpp by the two other golden models, so it runs only natively
# and under avx2.
for isa in scalar avx2; do
    skip=()
    [ "$isa" = scalar ] && skip=(--skip gemma3_270m_matches_llama_cpp)
    for t in $engine_tests; do
        (cd host/engine && REALM_ISA=$isa "$t" --test-threads 2 "${skip[@]}")
    done
done

step "scripts/run.sh as the README says (fresh copy of the tree, no environment set)"
# Builds the release binary (in the copy); the end-to-end steps below use it.
scripts/test-run.sh
release_bin=${CARGO_TARGET_DIR:-target}/fresh-run/target/release/realm

step "realm serve end to end (real binary on a loopback port: curl, the openai client, load)"
REALM_E2E_PYTHON=$(scripts/e2e-venv.sh) REALM_BIN=$release_bin scripts/test-serve.sh

step "hostile-tenant load test (200 streams from 10 tenants, one attacking; real binary)"
REALM_E2E_PYTHON=$(scripts/e2e-venv.sh) REALM_BIN=$release_bin scripts/test-attack.sh

step "fuzzing: a short run of every cargo-fuzz target (docs/fuzzing.md)"
scripts/fuzz.sh --quick 20

step "guest SDK unit tests (host target)"
CARGO_TARGET_DIR=$GUEST_TARGET_DIR cargo test --manifest-path guest-sdk/Cargo.toml

step "fetch-model script against a local package index"
scripts/test-fetch-model.sh

step "all passed"
