#!/usr/bin/env bash
# Runs every target of every cargo-fuzz project under host/*/fuzz for SECONDS each (default 30),
# starting from the committed seed corpus. Fails (exit 1) when any target crashes, panics, leaks
# or goes past libFuzzer's memory limit, printing the input that did it.
#
# Installs what it needs when absent: a nightly toolchain (sanitizers need it) and cargo-fuzz,
# pinned. The first build compiles each project with sanitizer instrumentation into target/fuzz/
# (minutes; the projects share it); later runs reuse it. See docs/fuzzing.md.
#
#   scripts/fuzz.sh            # 30 s per target
#   scripts/fuzz.sh 300        # 5 minutes per target
#   scripts/fuzz.sh --quick 20 # CI's smoke run: unoptimised builds (`cargo fuzz --dev`), which
#                              # compile in a fraction of the time, of the engine's targets only.
#                              # The runtime's host_calls target would need a second, instrumented
#                              # build of wasmtime (7 min) to run a handful of inputs in 20 s; CI
#                              # runs its harness on random inputs in `cargo test` instead
#                              # (host/runtime/tests/host_calls_random.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=()
if [ "${1:-}" = --quick ]; then
    mode=(--dev)
    shift
fi
SECS="${1:-30}"
if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [ "$SECS" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [--quick] [SECONDS per target]" >&2
    exit 2
fi
CARGO_FUZZ_VERSION=0.13.2

step() { printf '\n== %s ==\n' "$*" >&2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    step "installing a nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if [ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    step "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# One target dir for every fuzz project (under the workspace's): the runtime project reuses the
# engine project's instrumented build of the engine and their common dependencies.
tdir=$(realpath -m "${CARGO_TARGET_DIR:-target}/fuzz")
failed=()
summary=()
for dir in host/*/fuzz; do
    [ -f "$dir/Cargo.toml" ] || continue
    if [ ${#mode[@]} -gt 0 ] && [ "$dir" = host/runtime/fuzz ]; then
        step "skipping $dir in --quick mode (its harness runs in cargo test: tests/host_calls_random.rs)"
        continue
    fi
    targets=$(cargo +nightly fuzz list --fuzz-dir "$dir")
    step "build $dir ($(echo $targets))"
    cargo +nightly fuzz build "${mode[@]}" --fuzz-dir "$dir" --target-dir "$tdir"
    for target in $targets; do
        step "fuzz $dir $target for ${SECS}s"
        mkdir -p "$dir/corpus/$target"
        log=$(mktemp)
        artifacts="$dir/artifacts/$target"
        mkdir -p "$artifacts"
        # libFuzzer also writes `slow-unit-*` files (an input over -report_slow_units seconds:
        # the first one pays for lazy set-up); only these prefixes are findings.
        findings() { find "$artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' \
            -o -name 'timeout-*' \) "$@"; }
        before=$(findings | wc -l)
        set +e
        cargo +nightly fuzz run "${mode[@]}" --fuzz-dir "$dir" --target-dir "$tdir" "$target" -- \
            -max_total_time="$SECS" -print_final_stats=1 >"$log" 2>&1
        rc=$?
        set -e
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        summary+=("$dir $target: ${runs:-?} executions in ${SECS}s, exit $rc")
        if [ "$rc" -ne 0 ] || [ "$(findings | wc -l)" -ne "$before" ]; then
            failed+=("$dir $target")
            tail -n 60 "$log" >&2
            for f in $(findings -newer "$log"); do
                echo "-- artifact $f ($(wc -c <"$f") bytes); reproduce with:" >&2
                echo "   cargo +nightly fuzz run --fuzz-dir $dir $target $f" >&2
                od -A x -t x1z "$f" | head -n 40 >&2
            done
        else
            grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs)' "$log" | tail -n 1 >&2 || true
        fi
        rm -f "$log"
    done
done

step "summary"
printf '%s\n' "${summary[@]}" >&2
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
