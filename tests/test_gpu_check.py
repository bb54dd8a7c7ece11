"""scripts/gpu_check.py, the one device call, as its CPU dry run (DEVICE=cpu, micro sizes), so that it cannot
rot between the rare occasions a GPU is lent."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_part_is_recorded_and_the_others_go_on():
    p = _script().Parts()
    p.run("boom", lambda: 1 / 0)
    p.run("fine", lambda: {"x": 1})
    p.run("not here", lambda: {"skipped": "no CUDA"})
    p.run("said so", lambda: {"failed": "wrong dtype"})
    assert p.failed == ["boom", "said so"] and p.parts["fine"]["ok"] and p.parts["not here"]["ok"] is None
    assert "ZeroDivisionError" in p.parts["boom"]["error"]


@pytest.mark.capability
@pytest.mark.slow
def test_the_device_script_passes_its_cpu_dry_run(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = out["parts"]
    assert out["failed"] == [] and parts["no_host_sync"]["ok"] is None  # needs CUDA: skipped, saying so
    assert all(parts[n]["ok"] for n in ("environment", "cuda_tests", "lstm_dtype", "bench", "runs"))
    # a precision this CPU cannot run (bf16 LSTMs without AVX-512) is skipped with the reason, not failed;
    # one it can run is measured
    from harness.env import precision_problem

    cannot = {p: precision_problem("cpu", p) for p in ("bf16",) if precision_problem("cpu", p)}
    assert parts["bench"]["result"]["skipped_precisions"] == cannot
    assert parts["lstm_dtype"]["result"].get("bf16", {}).get("skipped") == cannot.get("bf16")
    runs = parts["runs"]["result"]
    assert runs["dualvgr"]["epoch"] == 2 and runs["dualvgr"]["lstm_precision"] == "fp32"
    assert runs["dualvgr"]["runs_sharing_device"] == 1 and runs["student-logits"]["train_samples_per_s"] > 0
    assert runs["resume"]["equal_per_epoch"] == [True, True]  # the CPU is deterministic: resumed == uninterrupted
    assert [r["runs_sharing_device"] for r in runs["jobs2"]["runs"]] == [2, 2]
    # the JSON and the Markdown come from the same measurement
    rows = json.loads((tmp_path / "bench.json").read_text())
    md = (tmp_path / "bench.md").read_text().splitlines()[2:]
    assert len(md) == len(rows) and {r["precision"] for r in rows} == {"fp32", "bf16"} - set(cannot)
    for r, line in zip(rows, md):
        assert line.startswith(f"| {r['variant']} | {r['precision']} | {r['infer_path']} |")
        if r["latency_ms_median"] is not None:
            assert f"{r['latency_ms_median']:,.2f}" in line
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| dualvgr | fp32 | eager |" in table and "1362" in table
