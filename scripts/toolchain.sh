#!/usr/bin/env bash
# Makes sure the pinned toolchain (rust-toolchain.toml) has what the build needs: the
# wasm32-wasip2 target (host/runtime's build script compiles the guests for it) and rustfmt and
# clippy. rustup installs these with the toolchain when it installs the toolchain itself, but it
# does not add them to a toolchain that is already installed (a fresh machine that ships 1.95.0
# without the wasm target), so both README commands run this first. Idempotent: a second run
# only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v rustup >/dev/null || { echo "toolchain: rustup not found (https://rustup.rs)" >&2; exit 1; }
# Inside the repo rustup resolves the pinned toolchain from rust-toolchain.toml.
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install "$toolchain" --profile minimal
installed=$(rustup target list --installed)
grep -qx wasm32-wasip2 <<<"$installed" || rustup target add wasm32-wasip2
components=$(rustup component list --installed)
for c in rustfmt clippy; do
    grep -q "^$c-" <<<"$components" || rustup component add "$c"
done
rustc --version >&2
