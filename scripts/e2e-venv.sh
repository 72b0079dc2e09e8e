#!/usr/bin/env bash
# Makes (once) a Python virtual environment with the pinned `openai` client for the end-to-end
# tests, and prints its python's path.
#
#   scripts/e2e-venv.sh [DIR]      (default: target/e2e-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/e2e-venv}
req=tests/e2e/requirements.txt
stamp="$dir/.requirements"
if ! cmp -s "$req" "$stamp" 2>/dev/null; then
    rm -rf "$dir"
    python3 -m venv "$dir" >&2 || {
        echo "e2e-venv: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
    cp "$req" "$stamp"
fi
echo "$PWD/$dir/bin/python"
