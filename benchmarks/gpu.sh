#!/bin/bash
# The GPU benchmark (benchmarks/gpu.py) on one H100/H200 in under 8 minutes, with the packages its image lacks.
#
# The GPU machine has torch, transformers, peft and accelerate, but not trl, datasets (with pyarrow, pandas...),
# bitsandbytes or liger-kernel, and it reaches no package registry: their wheels travel with the working tree, at
# most 64 MiB at a time. pyarrow (55 MB) and bitsandbytes (43 MB) do not fit together, so the wheels travel in
# three batches, each installed into benchmarks/wheels/site (kept on the machine between calls):
#
#   here:  bash benchmarks/gpu.sh download        # every wheel, into benchmarks/wheels/all/ (GPU_PYTHON=3.12)
#   here:  bash benchmarks/gpu.sh stage base      # one batch (base | pyarrow | bitsandbytes) into
#                                                 #   benchmarks/wheels/batch/, and its size
#   GPU:   bash benchmarks/gpu.sh install         # with benchmarks/wheels/batch carried; once per batch
#   GPU:   bash benchmarks/gpu.sh run OUT         # writes OUT/gpu.json and OUT/gpu.md
#
# `install` also prints the machine's Python and which packages it already has, so a batch it does not need
# can be skipped. benchmarks/wheels/ is ignored by git.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
site="$here/wheels/site"
all="$here/wheels/all"
batch="$here/wheels/batch"
python=${PYTHON:-python3}
gpu_python=${GPU_PYTHON:-3.12}

download() {
  local platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
                  --platform manylinux2014_x86_64)
  mkdir -p "$all/base" "$all/pyarrow" "$all/bitsandbytes"
  for version in 3.10 3.11 3.12; do  # small and Python-specific: every likely Python
    pip download -q --no-deps --only-binary=:all: --python-version "$version" "${platform[@]}" -d "$all/base" \
      "trl==1.16.*" "datasets==5.2.*" "liger-kernel==0.8.*" dill multiprocess xxhash fsspec pytz tzdata \
      python-dateutil six "pandas<3"
  done
  pip download -q --no-deps --only-binary=:all: --python-version "$gpu_python" "${platform[@]}" -d "$all/pyarrow" pyarrow
  pip download -q --no-deps --only-binary=:all: --python-version "$gpu_python" "${platform[@]}" -d "$all/bitsandbytes" \
    "bitsandbytes==0.50.*"
  du -sh "$all"/*
}

stage() {
  rm -rf "$batch" && mkdir -p "$batch"
  cp "$all/$1"/*.whl "$batch/"
  du -sh "$batch"
}

install() {
  "$python" -c 'import sys; print("python", sys.version.split()[0])'
  mkdir -p "$site"
  for wheel in "$batch"/*.whl; do
    [ -e "$wheel" ] || continue
    name=$(basename "$wheel" | cut -d- -f1)
    module=$(echo "$name" | tr '[:upper:]' '[:lower:]')
    [ "$module" = python_dateutil ] && module=dateutil
    if PYTHONPATH="$site" "$python" -c "import $module" 2>/dev/null; then
      echo "have $name"
      continue
    fi
    "$python" -m pip install -q --no-index --no-deps --target "$site" --find-links "$batch" "$name" \
      && echo "installed $name" || echo "could not install $name (no wheel for this Python?)"
  done
}

run() {
  local out=${1:-${OUT:-$repo/gpu-results}}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}" "$python" "$here/gpu.py" --out "$out"
}

case "${1:-run}" in
  download) download ;;
  stage) stage "${2:?base, pyarrow or bitsandbytes}" ;;
  install) install ;;
  run) shift || true; run "$@" ;;
  *) echo "usage: gpu.sh download | stage BATCH | install | run [OUT]" >&2; exit 2 ;;
esac
