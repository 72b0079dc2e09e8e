#!/usr/bin/env bash
# Fresh machine → Realm serving the default model (Gemma 3 270M) with a demo tenant.
#
#   scripts/run.sh            # then, in another terminal, the curl line it prints
#
# Fetches and verifies the model, builds `realm` (release), starts `realm serve` on
# $REALM_LISTEN (default 127.0.0.1:8080) with its data in $REALM_DATA_DIR (default ./realm-data),
# creates the tenant "demo" on first start and prints its API key and a request to try. The admin
# token is $REALM_ADMIN_TOKEN, or one generated once and kept in the data directory (mode 600).
# Ctrl-C stops the server gracefully (in-flight streams finish).
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
fi

"${CARGO_TARGET_DIR:-target}/release/realm" serve --listen "$listen" --data-dir "$data" --model "$model" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' INT TERM EXIT

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

cat >&2 <<EOF

Realm is serving $(basename "$model") on $base (tenant "demo", key in $keyfile).
Try:

  curl -s $base/v1/chat/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}'
  curl -sN $base/v1/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d '{"prompt":"The capital of France is","max_tokens":16,"temperature":0,"stream":true}'
  curl -s $base/v1/usage -H "Authorization: Bearer $key"
  curl -s $base/metrics | grep realm_

Ctrl-C stops the server.
EOF
wait "$pid"
