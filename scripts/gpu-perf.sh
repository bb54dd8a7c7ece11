#!/usr/bin/env bash
# The whole measurement behind docs/performance.md, in one call:
#   bash scripts/gpu-perf.sh [OUT_DIR]        (DEVICE=cuda CONFIG=msvd DATA=synthetic:msvd by default)
# On a CPU-only machine, for a dry run: DEVICE=cpu CONFIG=tiny DATA=synthetic:tiny BATCHES=1,32 bash scripts/gpu-perf.sh
# Writes JSON records (bench.py) and Markdown tables to OUT_DIR (default results/perf-<UTC time>), and the epoch
# timings of real training runs (the runner's records: train samples/s, peak memory, wall time) to OUT_DIR/epochs.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/perf-$(date -u +%Y%m%dT%H%M%SZ)}"
DEVICE="${DEVICE:-cuda}"
CONFIG="${CONFIG:-msvd}"
DATA="${DATA:-synthetic:msvd}"
BATCHES="${BATCHES:-1,32,256}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
"$PY" -c "import torch, platform; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or 'cpu')" | tee "$OUT/device.txt"
for prec in fp32 bf16; do
  "$PY" bench.py --variant dualvgr --variant teacher-g4 --config "$CONFIG" --device "$DEVICE" --batch-size "$BATCHES" \
      --precision "$prec" --format json --out "$OUT/bench-$prec.json" --results "$OUT" > /dev/null
  "$PY" bench.py --variant dualvgr --variant teacher-g4 --config "$CONFIG" --device "$DEVICE" --batch-size "$BATCHES" \
      --precision "$prec" --format markdown --no-flops --no-store > "$OUT/bench-$prec.md"
done
# one training epoch, data loading included (features resident on the device), as the runner does it
for prec in fp32 bf16; do
  "$PY" ablate.py run dualvgr --data "$DATA" --epochs 1 --batch-size 256 --precision "$prec" --device "$DEVICE" \
      --results "$OUT/runs" --force > "$OUT/epoch-$prec.log" 2>&1
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from harness.store import ResultsStore
out = sys.argv[1]
rows = [{k: r.get(k) for k in ("run_id", "train_time_s", "train_samples_per_s", "wall_time_s", "device_name")}
        | {"precision": r["train_config"].get("precision", "fp32"), "peak_mem_mib_train": r["cost"].get("peak_mem_mib_train")}
        for r in ResultsStore(f"{out}/runs").iter_records()]
json.dump(rows, open(f"{out}/epochs.json", "w"), indent=1)
for r in rows:
    print(r)
PYEOF
echo "written: $OUT"
