#!/usr/bin/env bash
# nvrtc.sh — a CUDA kernel compiler (NVRTC) for machines without the CUDA toolkit.
#
# Usage: LD_LIBRARY_PATH=$(scripts/nvrtc.sh) cargo test --features realm-engine/cuda ...
#
# NVRTC compiles CUDA C to GPU code without a GPU. The `cuda` feature loads it at run time; CI
# has no CUDA toolkit, so this script fetches the `nvidia-cuda-nvrtc` wheel (pinned version and
# sha256) from the Python package registry with pip, unpacks libnvrtc.so.13 and its builtins
# library into ${CARGO_TARGET_DIR:-target}/nvrtc/<version>/ (once; later runs reuse them), and
# prints that directory on stdout. Progress goes to stderr.
#
# The version matches the GPU machine's toolkit (CUDA 13.0), so what CI compiles is what runs
# there. pip uses its normal configuration (index, proxies); no index is named here.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=13.0.88
WHEEL=nvidia_cuda_nvrtc-$VERSION-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl
SHA256=ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
dir=$(realpath -m "${CARGO_TARGET_DIR:-target}/nvrtc/$VERSION")
if [ -f "$dir/libnvrtc.so.13" ] && [ -f "$dir/libnvrtc-builtins.so.13.0" ]; then
    echo "$dir"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "nvrtc: downloading nvidia-cuda-nvrtc $VERSION (~90 MB)" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    "nvidia-cuda-nvrtc==$VERSION" -d "$tmp" >&2
got=$(sha256sum "$tmp/$WHEEL" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
    echo "nvrtc: $WHEEL has sha256 $got, expected $SHA256" >&2
    exit 1
fi
mkdir -p "$dir.tmp"
python3 - "$tmp/$WHEEL" "$dir.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cu13/lib/libnvrtc-builtins.so.13.0"):
        with z.open(name) as src, open(f"{sys.argv[2]}/{name.rsplit('/', 1)[1]}", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
rm -rf "$dir" && mv "$dir.tmp" "$dir"
echo "nvrtc: $dir" >&2
echo "$dir"
