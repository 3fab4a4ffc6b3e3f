#!/usr/bin/env bash
# Build full mmcv 2.1.0 (with its compiled ops, CPU only) once, into a cache folder
# outside the repository, and reuse it afterwards. PyPI has only mmcv's sdist; on
# 2 cores the build takes about 18 minutes. See ../shared/ENVIRONMENT.md.
set -euo pipefail
cache="${1:?usage: build_mmcv_wheel.sh CACHE_DIR}"
wheel_dir="$cache/wheels"
mkdir -p "$cache"
exec 9>"$cache/mmcv-build.lock"
flock 9  # one build at a time; a second caller waits, then finds the wheel
if ls "$wheel_dir"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  echo "mmcv wheel cached: $(ls "$wheel_dir"/mmcv-2.1.0-*.whl)"
  exit 0
fi
mkdir -p "$wheel_dir"
# A prebuilt wheel of this same recipe (mmcv 2.1.0, CPU ops, torch 2.13.0, CPython 3.11) may
# sit next to the checkout in ../shared/wheels (or in $MMCV_PREBUILT_DIR): copy it when the
# interpreter matches and its sha256 matches SHA256SUMS; otherwise build.
prebuilt_dir="${MMCV_PREBUILT_DIR:-$(cd "$(dirname "$0")/.." && pwd)/../shared/wheels}"
pytag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
for whl in "$prebuilt_dir"/mmcv-2.1.0-"$pytag"-"$pytag"-linux_x86_64.whl; do
  [ -f "$whl" ] && [ -f "$prebuilt_dir/SHA256SUMS" ] || continue
  want=$(awk -v n="$(basename "$whl")" '$2 == n {print $1}' "$prebuilt_dir/SHA256SUMS")
  have=$(sha256sum "$whl" | awk '{print $1}')
  if [ -n "$want" ] && [ "$want" = "$have" ]; then
    cp "$whl" "$wheel_dir/.$(basename "$whl").part"
    mv "$wheel_dir/.$(basename "$whl").part" "$wheel_dir/$(basename "$whl")"
    echo "mmcv wheel copied from $whl (sha256 verified)"
    exit 0
  fi
  echo "prebuilt $whl does not match its SHA256SUMS entry; building instead" >&2
done
build_venv="$cache/mmcv-build-venv"
if [ ! -x "$build_venv/bin/python" ]; then
  python3 -m venv "$build_venv"
fi
"$build_venv/bin/pip" install -q torch==2.13.0 "setuptools>=77.0.3,<80" wheel numpy
tmp=$(mktemp -d "$cache/mmcv-build.XXXXXX")
echo "building mmcv 2.1.0 from source into $wheel_dir (one time, ~18 min on 2 cores)"
env -u FORCE_CUDA MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" \
  "$build_venv/bin/pip" wheel --no-deps --no-build-isolation mmcv==2.1.0 -w "$tmp"
mv "$tmp"/mmcv-2.1.0-*.whl "$wheel_dir"/
rm -rf "$tmp"
ls "$wheel_dir"/mmcv-2.1.0-*.whl
