#!/usr/bin/env bash
# Fresh machine → Realm serving the default model (Gemma 3 270M) with a demo tenant.
#
#   scripts/run.sh            # then, in another terminal, the curl lines it prints
#
# Fetches and verifies the model, builds `realm` (release), starts `realm serve` on
# $REALM_LISTEN (default 127.0.0.1:8080) with its data in $REALM_DATA_DIR (default ./realm-data,
# at the repository root), creates the tenant "demo" on first start and prints its API key and
# requests to try. The admin token is $REALM_ADMIN_TOKEN, or one generated once and kept in the
# data directory (mode 600); it also opens /metrics. Ctrl-C stops the server gracefully
# (in-flight streams finish) and exits with the server's status.
# scripts/test-run.sh runs this script in CI exactly so, from a fresh copy with no REALM_*
# variable set but REALM_LISTEN, and sends the requests it prints.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/toolchain.sh
model=$(scripts/fetch-model.sh)
cargo build --release -p realm
data=${REALM_DATA_DIR:-realm-data}
listen=${REALM_LISTEN:-127.0.0.1:8080}
base="http://$listen"
mkdir -p "$data"

if [ -z "${REALM_ADMIN_TOKEN:-}" ]; then
    tokfile="$data/admin-token"
    if [ ! -s "$tokfile" ]; then
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$tokfile")
    fi
    REALM_ADMIN_TOKEN=$(cat "$tokfile")
    export REALM_ADMIN_TOKEN
    admin_shown="\$(cat $(realpath "$tokfile"))"
else
    admin_shown='$REALM_ADMIN_TOKEN'
fi

"${CARGO_TARGET_DIR:-target}/release/realm" serve --listen "$listen" --data-dir "$data" --model "$model" &
pid=$!
# Ctrl-C (or SIGTERM): stop the server gracefully and exit with its status (0 = clean).
stop() {
    trap - INT TERM EXIT
    kill -TERM "$pid" 2>/dev/null || true
    rc=0
    wait "$pid" || rc=$?
    echo "realm serve stopped (exit status $rc)" >&2
    exit "$rc"
}
trap stop INT TERM
trap 'kill -TERM "$pid" 2>/dev/null || true' EXIT

echo "waiting for $base/readyz ..." >&2
for _ in $(seq 1 600); do
    curl -sf "$base/readyz" >/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo "realm serve exited" >&2; exit 1; }
    sleep 0.2
done
curl -sf "$base/readyz" >/dev/null || { echo "not ready after 120 s" >&2; exit 1; }

# The demo tenant's key is shown once by the API; keep it beside the database.
keyfile="$data/demo-key"
admin=(-H "Authorization: Bearer $REALM_ADMIN_TOKEN" -H 'Content-Type: application/json')
if [ ! -s "$keyfile" ]; then
    code=$(curl -s -o "$data/.demo.json" -w '%{http_code}' -X POST "$base/admin/tenants" "${admin[@]}" \
        -d '{"name":"demo"}')
    if [ "$code" = 409 ]; then
        # The tenant exists but its key was lost: rotate it.
        id=$(curl -sf "$base/admin/tenants" "${admin[@]}" | python3 -c \
            'import json,sys; print(next(t["id"] for t in json.load(sys.stdin)["data"] if t["name"] == "demo"))')
        curl -sf -X POST "$base/admin/tenants/$id/keys" "${admin[@]}" -o "$data/.demo.json"
    elif [ "$code" != 201 ]; then
        echo "creating the demo tenant failed (HTTP $code):" >&2
        cat "$data/.demo.json" >&2
        exit 1
    fi
    (umask 077 && python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])' \
        <"$data/.demo.json" >"$keyfile")
    rm -f "$data/.demo.json"
fi
key=$(cat "$keyfile")

# Every line between "Try:" and the blank line after the requests is a command that
# scripts/test-run.sh runs and checks; keep one request per command.
cat >&2 <<EOF

Realm is serving $(basename "$model") on $base (tenant "demo", key in $keyfile).
$(basename "$model" .gguf) is a base model: it continues text well (the completion below) but is
not tuned for chat, so its chat answers are often nonsense; load an instruction-tuned GGUF
(e.g. a gemma-3-*-it file) with --model for real chat.
Try:

  curl -s $base/v1/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"prompt":"Q: What is the capital of France?\nA:","max_tokens":16,"temperature":0}'
  curl -sN $base/v1/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"prompt":"The capital of France is","max_tokens":16,"temperature":0,"stream":true}'
  curl -s $base/v1/chat/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}'
  curl -s $base/v1/usage -H "Authorization: Bearer $key"
  curl -s $base/metrics -H "Authorization: Bearer $admin_shown" | grep '^realm_'

Ctrl-C stops the server.
EOF
wait "$pid"
