#!/usr/bin/env bash
# The whole GPU measurement and check, in one call (docs/performance.md):
#   bash scripts/gpu-perf.sh [OUT_DIR]            DEVICE=cuda by default; msvd sizes (synthetic:msvd, generated once)
#   DEVICE=cpu bash scripts/gpu-perf.sh /tmp/dry  the CPU dry run (micro sizes, under a minute; tests/test_gpu_check.py)
# Installs the wheels carried in .whl/ (scripts/gpu-wheels.sh downloads them) when the python lacks what the
# harness imports, then runs scripts/gpu_check.py, which writes gpu_check.json, gpu_check.md, bench.json and
# bench.md to OUT_DIR (default results/gpu-check-<UTC time>) and exits non-zero if any part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${1:-results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
if ! "$PY" -c "import fvcore, iopath, submitit" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    SITE="${VQAKD_SITE:-/tmp/vqakd-site}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "error: $PY lacks fvcore/iopath/submitit and .whl/ holds no wheels (run scripts/gpu-wheels.sh where pip works)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --out "$OUT"
