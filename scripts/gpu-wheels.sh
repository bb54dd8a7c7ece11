#!/usr/bin/env bash
# Wheels for the device machine's python (3.12, linux x86_64; /work/.library/device/README.md): what the harness
# imports and that image lacks (KINDS.md's package list): fvcore and its yacs, iopath, termcolor; submitit. av
# (video decoding, harness.data.prepare only: not used by scripts/gpu_check.py, 30+ MB) only with WITH_AV=1.
# fvcore and iopath publish no wheels (source only): they are pure Python, so a wheel is built here.
#   bash scripts/gpu-wheels.sh        -> .whl/*.whl (git-ignored); carry .whl to the device machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PYVER="${PYVER:-3.12}"
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
binary() {  # NAME==VERSION: a wheel for the device's python
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      "${PLAT[@]}" -d .whl "$1"
}
built() {  # NAME==VERSION: pure Python published as source only: build its wheel here
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$1" 2>/dev/null || "$PY" -m pip wheel -q --no-deps -w .whl "$1"
}
binary "yacs==0.1.8"
binary "termcolor==2.4.0"
binary "submitit==1.5.4"
built "fvcore==0.1.5.post20221221"
built "iopath==0.1.10"
if [ "${WITH_AV:-0}" = 1 ]; then binary "av==14.4.0"; fi
ls -l .whl
