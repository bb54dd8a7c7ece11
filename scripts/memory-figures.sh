#!/usr/bin/env bash
# The memory figures of the notes (issue "One source per fact"), measured on this machine, CPU only:
#   1. a one-epoch question-only grid on synthetic:msvd (2.2 GB of features it does not read): peak RSS and time;
#   2. `ablate.py report` on that grid (reads only the results store);
#   3. a dualvgr grid (2 seeds, 1 epoch) on synthetic:small with --jobs 1 and --jobs 2: summed RSS against summed PSS
#      of the process tree (memory-mapped features are shared: N workers hold one copy).
# Usage: bash scripts/memory-figures.sh [WORKDIR]   (default /tmp/vqakd-memory; the synthetic sets go to
# $VQAKD_DATA_DIR, else WORKDIR/data; about 5 minutes on 2 idle cores, plus generating msvd once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${1:-/tmp/vqakd-memory}
mkdir -p "$W"
export VQAKD_DATA_DIR=${VQAKD_DATA_DIR:-$W/data}
"$PY" -c "from harness import data as D; [D.describe(s) for s in ('synthetic:msvd', 'synthetic:small')]"
echo "feature bytes: $(du -cb "$VQAKD_DATA_DIR"/synthetic/msvd-seed0/*.h5 | tail -1 | cut -f1) (msvd)," \
     "$(du -cb "$VQAKD_DATA_DIR"/synthetic/small-seed0/*.h5 | tail -1 | cut -f1) (small)"
printf 'data = "synthetic:msvd"\nvariants = ["question-only"]\nseeds = [0]\n[train]\nepochs = 1\n' > "$W/qo-msvd.toml"
printf 'data = "synthetic:small"\nvariants = ["dualvgr"]\nseeds = [0, 1]\n[train]\nepochs = 1\n' > "$W/small2.toml"
rm -rf "$W/results" "$W/reports"
common=(--results "$W/results" --reports "$W/reports" --device cpu)
peak() { /usr/bin/time -f "time -v: %e s wall, max RSS %M kB" "$PY" scripts/peak-memory.py -- "$@"; }
echo "== 1. question-only, 1 epoch, synthetic:msvd"
peak "$PY" ablate.py --grid "$W/qo-msvd.toml" "${common[@]}" > /dev/null
echo "== 2. ablate.py report on that grid"
peak "$PY" ablate.py report --grid "$W/qo-msvd.toml" --results "$W/results" --reports "$W/reports" > /dev/null
for jobs in 1 2; do
  echo "== 3. dualvgr x 2 seeds, 1 epoch, synthetic:small, --jobs $jobs"
  rm -rf "$W/results"
  peak "$PY" ablate.py --grid "$W/small2.toml" --jobs "$jobs" "${common[@]}" > /dev/null
done
