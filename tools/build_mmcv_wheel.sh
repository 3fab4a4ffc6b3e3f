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
