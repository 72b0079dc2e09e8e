#!/usr/bin/env bash
# End-to-end test of `realm serve`: starts the real binary on a loopback port, drives it with
# curl (health, admin API, tenant auth, OpenAI-shaped errors, metrics behind the admin token,
# OpenAPI), stops it with SIGTERM (graceful shutdown must exit 0), restarts it on the same data
# directory and checks that the tenant and its key survived. With a model (REALM_TEST_MODEL, default: the tiny fixture model;
# empty = none) it also lists models and runs one chat completion, plain and streamed; and with
# REALM_E2E_PYTHON (a Python that has the `openai` package: scripts/e2e-venv.sh makes one) it runs
# tests/e2e/openai_client.py (the official client) and tests/e2e/load.py (concurrent streaming
# clients across tenants, zero errors). A guest is uploaded and invoked with curl, and SIGTERM
# with a stream in flight must let that stream finish.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${REALM_BIN:-${CARGO_TARGET_DIR:-target}/debug/realm}
[ -x "$bin" ] || cargo build -p realm
data=$(mktemp -d)
log=$(mktemp)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; rm -rf "$data" "$log"; }
trap cleanup EXIT
fail() { echo "test-serve: $*" >&2; echo "--- server log:" >&2; cat "$log" >&2; exit 1; }

export REALM_ADMIN_TOKEN=e2e-admin-token-0123456789
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
model=${REALM_TEST_MODEL-tests/fixtures/models/tiny-llama-mixed.gguf}
model_args=()
[ -n "$model" ] && model_args=(--model "$model" --threads 1)

start() {
    "$bin" serve --listen "127.0.0.1:$port" --data-dir "$data" "${model_args[@]}" >>"$log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do
        curl -fsS "$base/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    fail "server did not become ready"
}
stop() {
    kill -TERM "$pid"
    wait "$pid" || fail "graceful shutdown exited with $?"
    pid=
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
admin=(-H "Authorization: Bearer $REALM_ADMIN_TOKEN" -H 'Content-Type: application/json')

start
[ "$(curl -fsS "$base/healthz")" = ok ] || fail healthz
created=$(curl -fsS -X POST "$base/admin/tenants" "${admin[@]}" -d '{"name":"e2e"}')
key=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])' <<<"$created")
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$created")
[ "$(code -X POST "$base/admin/tenants" "${admin[@]}" -d '{"name":"e2e"}')" = 409 ] || fail "duplicate tenant"
[ "$(code "$base/v1/usage")" = 401 ] || fail "missing key"
[ "$(code -H "Authorization: Bearer $key" "$base/v1/usage")" = 200 ] || fail "tenant key"
err=$(curl -s -H "Authorization: Bearer rk-bad" "$base/v1/usage")
python3 -c 'import json,sys; e=json.load(sys.stdin)["error"]; assert e["type"]=="authentication_error", e' <<<"$err" || fail "error shape"
# /metrics names tenants: the admin token (or REALM_METRICS_TOKEN) opens it, nothing else does.
[ "$(code "$base/metrics")" = 401 ] || fail "metrics without a token"
[ "$(code -H "Authorization: Bearer $key" "$base/metrics")" = 401 ] || fail "metrics with a tenant key"
curl -fsS -H "Authorization: Bearer $REALM_ADMIN_TOKEN" "$base/metrics" \
    | grep -q "realm_http_requests_total{tenant=\"$id\"" || fail metrics
curl -fsS "$base/openapi.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert "/admin/tenants" in d["paths"]' || fail openapi
curl -fsS -D - -o /dev/null "$base/healthz" | grep -qi '^x-request-id:' || fail "request id"
if [ -n "$model" ]; then
    name=$(basename "$model" .gguf)
    tenant=(-H "Authorization: Bearer $key" -H 'Content-Type: application/json')
    curl -fsS "$base/v1/models" "${tenant[@]}" | grep -q "\"id\":\"$name\"" || fail "model not listed"
    req='{"messages":[{"role":"user","content":"Hello"}],"max_tokens":4,"temperature":0}'
    resp=$(curl -fsS -X POST "$base/v1/chat/completions" "${tenant[@]}" -d "$req") || fail "chat completion"
    python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["object"] == "chat.completion", r
assert r["choices"][0]["message"]["role"] == "assistant", r
assert r["choices"][0]["finish_reason"] in ("length", "stop"), r
assert r["usage"]["completion_tokens"] <= 4 and r["usage"]["prompt_tokens"] > 0, r
' <<<"$resp" || fail "chat completion shape: $resp"
    sreq='{"messages":[{"role":"user","content":"Hello"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}'
    sse=$(curl -fsSN -X POST "$base/v1/chat/completions" "${tenant[@]}" -d "$sreq") || fail "streamed chat completion"
    [ "$(grep '^data:' <<<"$sse" | tail -n1)" = "data: [DONE]" ] || fail "stream did not end with [DONE]: $sse"
    grep '^data: {' <<<"$sse" | tail -n1 | grep -q '"completion_tokens"' || fail "stream without usage: $sse"
    if [ -n "${REALM_E2E_PYTHON:-}" ]; then
        "$REALM_E2E_PYTHON" tests/e2e/openai_client.py "$base" "$REALM_ADMIN_TOKEN" "$name" \
            || fail "openai client checks"
        "$REALM_E2E_PYTHON" tests/e2e/load.py "$base" "$REALM_ADMIN_TOKEN" "$name" \
            ${REALM_LOAD_ARGS:-} || fail "load test"
    fi
    # A guest component uploaded with curl, then invoked (JSON in, JSON out).
    tb=${CARGO_TARGET_DIR:-target}/realm-guests/wasm32-wasip2/release/testbed.wasm
    [ -f "$tb" ] || fail "missing $tb (cargo build -p realm builds the guests)"
    curl -fsS -X POST "$base/v1/guests?name=tb" -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/wasm' --data-binary @"$tb" >/dev/null || fail "guest upload"
    out=$(curl -fsS -X POST "$base/v1/guests/tb/invoke" "${tenant[@]}" -d '{"op":"echo","text":"hi"}')
    [ "$out" = '{"text":"hi"}' ] || fail "guest invoke: $out"
    # SIGTERM with a stream in flight: the stream still finishes (EOS banned so that it runs
    # long enough to be cut short if shutdown did not wait for it).
    inflight=$(mktemp)
    lreq='{"messages":[{"role":"user","content":"Hello"}],"max_tokens":300,"temperature":0,"stream":true,"logit_bias":{"2":-100}}'
    curl -sN -X POST "$base/v1/chat/completions" "${tenant[@]}" -d "$lreq" >"$inflight" &
    cpid=$!
    for _ in $(seq 200); do grep -q '^data: {' "$inflight" && break; sleep 0.05; done
    stop
    wait "$cpid" || fail "in-flight stream failed during shutdown"
    [ "$(grep '^data:' "$inflight" | tail -n1)" = "data: [DONE]" ] \
        || fail "in-flight stream cut at shutdown: $(tail -c 300 "$inflight")"
    grep -q '"finish_reason":"length"' "$inflight" || fail "in-flight stream did not run to max_tokens"
    rm -f "$inflight"
fi
[ -n "$pid" ] && stop

start
[ "$(code -H "Authorization: Bearer $key" "$base/v1/usage")" = 200 ] || fail "key lost across restart"
curl -fsS "$base/admin/tenants/$id" "${admin[@]}" | grep -q '"name":"e2e"' || fail "tenant lost across restart"
stop
echo "test-serve: ok" >&2
