"""Faults as a cluster user meets them (issue 30): each test injects one and checks that it costs
one run, never the grid, that the failure is remembered (``failed.json``, ``results --failed``,
the report) and that the messages name what happened."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import ablate
from harness import executor as E

cli = CliRunner()
run_one = E.run_one  # the real one (tests replace E.run_one)


def _faulty_run_one(spec, results, device="auto", mode="auto"):
    """run_one in a worker, except for the seeds named in $FAULTS_DIR: seed 1 is SIGKILLed (kill -9,
    the OOM killer), seed 2 dies of SIGBUS reading a memory-mapped file truncated under it (a teacher
    output cache truncated by another process). Each fault fires once (its marker file is removed)."""
    marker = Path(os.environ["FAULTS_DIR"]) / f"seed-{spec['seed']}"
    if marker.exists():
        marker.unlink()
        if spec["seed"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        path = marker.with_suffix(".npy")
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1 << 16,))[:] = 1
        arr = np.load(path, mmap_mode="r")
        os.truncate(path, 0)
        float(arr.sum())  # SIGBUS: the pages behind the map are gone
    return run_one(spec, results, device, mode)


def test_a_dead_worker_costs_only_its_run(tmp_path, data_cache, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    for seed in (1, 2):
        (faults / f"seed-{seed}").touch()
    monkeypatch.setenv("FAULTS_DIR", str(faults))
    monkeypatch.setattr(E, "run_one", _faulty_run_one)
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0, 1, 2]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n')
    args = ["--grid", str(grid), "--jobs", "2", "--device", "cpu", "--results", str(tmp_path / "results"),
            "--reports", str(tmp_path / "reports")]
    r = cli.invoke(ablate.app, args)
    assert r.exit_code == 1, r.output
    assert "BrokenProcessPool" not in r.output and "Traceback" not in r.output, r.output
    assert (tmp_path / "reports" / "g.md").is_file()  # the other runs finished and were reported
    failed = {f["seed"]: f for f in map(json.loads, map(Path.read_text, (tmp_path / "results").glob(
        "runs/*/failed.json")))}
    assert sorted(failed) == [1, 2], failed
    assert "killed by signal SIGKILL" in failed[1]["reason"] and "killed by signal SIGBUS" in failed[2]["reason"]
    assert "2 run(s) failed" in r.output
    listed = cli.invoke(ablate.app, ["results", "--results", str(tmp_path / "results"), "--failed"]).output
    assert "SIGKILL" in listed and "SIGBUS" in listed, listed
    report = (tmp_path / "reports" / "g.md").read_text()
    assert "SIGKILL" in report and "SIGBUS" in report  # the report says why two runs are missing
    r = cli.invoke(ablate.app, [*args, "--jobs", "1"])  # the rerun trains the two runs that died, only those
    assert r.exit_code == 0, r.output
    assert "(1 already complete, 2 to run)" in r.output, r.output
    assert not list((tmp_path / "results").glob("runs/*/failed.json"))
