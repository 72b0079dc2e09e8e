#!/usr/bin/env bash
# CI test of the README's first command: `scripts/run.sh` from a fresh copy of the tree (the
# tracked and untracked-but-not-ignored files: no target/, no realm-data/, no models) with no
# environment set but REALM_LISTEN (a free loopback port) and what the toolchain needs (PATH,
# HOME, CARGO_HOME, RUSTUP_HOME). It waits for the printout, runs every request printed under
# "Try:" and checks each answer, then presses Ctrl-C (SIGINT to run.sh's process group) and checks
# that run.sh and the server exited cleanly.
#
#   scripts/test-run.sh [COPY_DIR]     (default: $CARGO_TARGET_DIR or target, /fresh-run;
#                                       refreshed from the tree each run)
#
# The default model is hard-linked into the copy (fetch-model.sh still verifies its sha256), so
# that no second download happens. The copy builds its own release binary:
# COPY_DIR/target/release/realm, which scripts/test.sh then gives to the later end-to-end steps.
set -euo pipefail
cd "$(dirname "$0")/.."

copy=${1:-${CARGO_TARGET_DIR:-target}/fresh-run}
model=$(scripts/fetch-model.sh)

# A fresh copy: everything but its target/ is replaced (kept so that a local rerun builds
# incrementally; CI's run is cold), so no data directory or other state survives.
mkdir -p "$copy"
copy=$(realpath "$copy")
find "$copy" -mindepth 1 -maxdepth 1 ! -name target -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard \
    | python3 -c 'import os, sys; sys.stdout.buffer.write(b"".join(
        p + b"\0" for p in sys.stdin.buffer.read().split(b"\0") if p and os.path.lexists(p)))' \
    | tar --null -T - -cf - | tar -xf - -C "$copy"
mkdir -p "$copy/models"
ln -f "$model" "$copy/models/" 2>/dev/null || cp "$model" "$copy/models/"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
pid=
cleanup() {
    [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT
fail() { echo "test-run: $*" >&2; echo "--- run.sh output:" >&2; cat "$log" >&2; exit 1; }

env_keep=(PATH="$PATH" HOME="$HOME")
for v in CARGO_HOME RUSTUP_HOME TMPDIR; do
    [ -n "${!v:-}" ] && env_keep+=("$v=${!v}")
done
start=$(date +%s)
# Job control: run.sh gets its own process group (as in a terminal), so that SIGINT reaches it
# and the server as Ctrl-C would.
set -m
(cd "$copy" && exec env -i "${env_keep[@]}" REALM_LISTEN="127.0.0.1:$port" scripts/run.sh) \
    >"$log" 2>&1 &
pid=$!
set +m

# The build is cold in CI: allow it 40 minutes.
for _ in $(seq 4800); do
    grep -q '^Ctrl-C stops the server' "$log" && break
    kill -0 "$pid" 2>/dev/null || fail "run.sh exited before its printout"
    sleep 0.5
done
grep -q '^Ctrl-C stops the server' "$log" || fail "no printout after 40 minutes"
echo "test-run: run.sh ready after $(($(date +%s) - start)) s (build, model check, start)" >&2
grep -q 'is a base model' "$log" || fail "the printout does not say the model is a base model"

# The printed commands: the lines after "Try:" up to the next blank line, with
# backslash-continued lines joined.
mapfile -t cmds < <(python3 -c '
import sys
lines = open(sys.argv[1]).read().split("\n")
start = next(i for i, l in enumerate(lines) if l.strip() == "Try:") + 2
cmd = ""
for l in lines[start:]:
    if not l.strip():
        break
    cmd += l.strip()
    if cmd.endswith("\\"):
        cmd = cmd[:-1] + " "
    else:
        print(cmd)
        cmd = ""
' "$log")
[ "${#cmds[@]}" -ge 5 ] || fail "expected at least 5 printed requests, got ${#cmds[@]}"
first_is_completion=0
for c in "${cmds[@]}"; do
    case "$c" in *"/v1/completions"*) first_is_completion=1 ;; esac
    break
done
[ "$first_is_completion" = 1 ] || fail "the first request printed is not a completion: ${cmds[0]}"

for c in "${cmds[@]}"; do
    # Run in the copy (the metrics command reads the admin token file there).
    out=$(cd "$copy" && bash -c "set -o pipefail; $c") || fail "printed request failed: $c"$'\n'"$out"
    case "$c" in
    *'"stream":true'*)
        [ "$(grep '^data:' <<<"$out" | tail -n1)" = "data: [DONE]" ] \
            || fail "streamed completion did not end with [DONE]: $out"
        text=$(grep '^data: {' <<<"$out" | python3 -c '
import json, sys
print("".join(c["text"] for l in sys.stdin for c in json.loads(l[6:])["choices"]))')
        [ -n "$text" ] || fail "streamed completion without text: $out"
        ;;
    *"/v1/completions"*)
        python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["object"] == "text_completion", r
t = r["choices"][0]["text"]
assert t.strip(), r
# Greedy Gemma 3 270M answers " The capital of France is Paris." (as llama.cpp does:
# tests/fixtures/refs/gemma-3-270m-q4_k_m.jsonl).
assert "Paris" in t, t
print("test-run: completion:", repr(t), file=sys.stderr)
' <<<"$out" || fail "completion answer: $out"
        ;;
    *"/v1/chat/completions"*)
        python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["object"] == "chat.completion", r
m = r["choices"][0]["message"]
assert m["role"] == "assistant" and isinstance(m["content"], str), r
assert r["choices"][0]["finish_reason"] in ("stop", "length"), r
' <<<"$out" || fail "chat answer: $out"
        ;;
    *"/v1/usage"*)
        python3 -c '
import json, sys
u = json.load(sys.stdin)
assert u["requests"] >= 3 and u["tokens_out"] > 0, u
' <<<"$out" || fail "usage answer: $out"
        ;;
    *"/metrics"*)
        grep -q '^realm_http_requests_total{' <<<"$out" || fail "metrics answer: $out"
        ;;
    *) fail "a printed request this test does not know how to check: $c" ;;
    esac
done
# Unauthenticated, /metrics stays closed.
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/metrics")" = 401 ] \
    || fail "/metrics answered without a token"

# Ctrl-C: SIGINT to run.sh's process group (run.sh and the server), as a terminal sends it.
kill -INT -- "-$pid"
rc=0
wait "$pid" || rc=$?
pid=
[ "$rc" = 0 ] || fail "run.sh exited with $rc after Ctrl-C"
grep -q 'realm serve stopped (exit status 0)' "$log" || fail "the server did not stop cleanly"
# The readiness polls are not logged at INFO/WARN (one line per poll flooded the console).
polls=$(grep -c '/readyz' "$log" || true)
[ "$polls" -le 3 ] || fail "$polls log lines mention /readyz"
echo "test-run: ok ($(basename "$copy")/target/release/realm)" >&2
