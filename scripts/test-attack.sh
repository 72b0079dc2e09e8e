#!/usr/bin/env bash
# The hostile-tenant load test (issue 11) against the real `realm serve` binary on a loopback
# port: 200 concurrent streaming clients from 10 tenants, one of which attacks (guests/hostile
# and plain HTTP; see tests/e2e/attack_load.py), first without and then with the attacker.
#
#   scripts/test-attack.sh            # CI mode: 15 s per phase; zero 5xx and zero dropped
#                                     # well-behaved streams, or it fails; prints the TTFT ratio
#   scripts/test-attack.sh --bench    # benchmark mode: 60 s per phase, figures as JSON in
#                                     # target/attack-bench.json (docs/benchmarks.md)
#
# Environment: REALM_BIN (default target/release/realm, built if missing), REALM_E2E_PYTHON
# (a Python with tests/e2e/requirements.txt: scripts/e2e-venv.sh, made if unset),
# REALM_TEST_MODEL (default: the default model, fetched if missing), REALM_ATTACK_ARGS (more
# arguments for attack_load.py).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=ci
[ "${1:-}" = --bench ] && mode=bench
target=${CARGO_TARGET_DIR:-target}
bin=${REALM_BIN:-$target/release/realm}
[ -x "$bin" ] || cargo build --release -p realm
py=${REALM_E2E_PYTHON:-$(scripts/e2e-venv.sh)}
model=${REALM_TEST_MODEL:-$(scripts/fetch-model.sh)}
# The attacker's guest (not embedded in the host, so the host build does not build it).
guests=$target/realm-guests
CARGO_TARGET_DIR=$guests cargo build --quiet --release --locked --target wasm32-wasip2 \
    --manifest-path guests/Cargo.toml -p hostile
hostile=$guests/wasm32-wasip2/release/hostile.wasm

data=$(mktemp -d)
log=$(mktemp)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; rm -rf "$data" "$log"; }
trap cleanup EXIT
fail() { echo "test-attack: $*" >&2; echo "--- server log (last 60 lines):" >&2; tail -n 60 "$log" >&2; exit 1; }

export REALM_ADMIN_TOKEN=attack-admin-token-0123456789
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
"$bin" serve --listen "127.0.0.1:$port" --data-dir "$data" --model "$model" >>"$log" 2>&1 &
pid=$!
for _ in $(seq 600); do
    curl -fsS "$base/readyz" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || fail "the server exited while starting"
    sleep 0.2
done
curl -fsS "$base/readyz" >/dev/null 2>&1 || fail "the server did not become ready"

if [ "$mode" = bench ]; then
    args=(--duration 60 --max-tokens 16 --json "$target/attack-bench.json")
else
    args=(--duration 15 --max-tokens 8)
fi
"$py" tests/e2e/attack_load.py "$base" "$REALM_ADMIN_TOKEN" "$(basename "$model" .gguf)" \
    "$hostile" --server-pid "$pid" "${args[@]}" ${REALM_ATTACK_ARGS:-} \
    || fail "the hostile-tenant load test failed"

kill -0 "$pid" 2>/dev/null || fail "the server died"
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
[ "$rc" = 0 ] || fail "graceful shutdown exited with $rc"
echo "test-attack: ok" >&2
