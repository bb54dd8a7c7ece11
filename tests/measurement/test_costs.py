"""Inference costs: measured once per configuration and device, serially, after training; the
same figure for every run of the same architecture (issue: costs measured under load)."""
from __future__ import annotations

import json

import pytest

from harness.measurement import costs
from harness.training.plan import RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore

FAST = dict(epochs=1, batch_size=512)


@pytest.mark.slow
def test_one_measurement_per_configuration_shared_by_its_runs(tiny, shared_store, tmp_path):
    store, _ = shared_store.copy(tmp_path, "dualvgr", "question-only")  # seed 0 of each: complete, not retrained
    recs = [train(RunSpec(v, seed=s, **FAST), store, data=tiny, device="cpu", progress=False)
            for v, s in (("dualvgr", 0), ("dualvgr", 1), ("question-only", 0))]
    assert all(r["cost"].get("latency_ms_median") is None for r in recs)  # not timed during training
    calls = []
    real = costs.measure_one

    def counted(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    costs.measure_one = counted
    try:
        n = costs.measure_missing(store, [r["run_id"] for r in recs], "cpu")
        assert n == 2 and sorted(calls) == ["dualvgr", "question-only"]  # two seeds of dualvgr: one measurement
        assert costs.measure_missing(store, [r["run_id"] for r in recs], "cpu") == 0  # stored: not again
    finally:
        costs.measure_one = real
    shown = costs.attach(store, recs)
    lat = [r["cost"]["latency_ms_median"] for r in shown]
    assert lat[0] == lat[1] is not None and lat[2] is not None
    m = shown[0]["cost"]["measured"]
    assert m["device_name"] == recs[0]["device_name"] and m["at"] and m["spread"] >= 1.0
    stored = [json.loads(p.read_text()) for p in (tmp_path / "costs").glob("*.json")]
    assert {s["arch"] for s in stored} == {"dualvgr", "question-only"} and all(s["reps"] >= 20 for s in stored)


def test_a_disturbed_timing_is_flagged(shared_store, tmp_path):
    store, recs = shared_store.copy(tmp_path, "question-only")
    rec = recs["question-only"]
    costs.measure_missing(store, [rec["run_id"]], "cpu")
    (path,) = (tmp_path / "costs").glob("*.json")
    c = json.loads(path.read_text())
    c.update(latency_ms_median=1.0, latency_ms_p90=3.0, spread=3.0, load_average=[0.1, 0.1])
    path.write_text(json.dumps(c))
    (shown,) = costs.attach(store, [rec])
    assert shown["cost"]["measured"]["disturbed"] is True
    # the report says when and where, and marks the figure
    from harness.report import write_report

    md = write_report(store, "t", run_ids=[rec["run_id"]], out_dir=tmp_path / "reports").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| question-only |"))
    assert "| 1.000 ‡ |" in row, row
    assert f"latency and inference memory measured {c['measured_at']} on {c['device_name']} on host {c['host']}" in md
    assert "**‡: latency measured on a busy machine, not what the model costs on an idle one** (question-only: " \
           "p90/median 3.00; busy: p90/median above 1.5, or a load average above the cores" in md


def test_costs_are_keyed_by_the_threads_used_and_record_the_load(tmp_path, monkeypatch):
    import torch

    import variants
    from harness.env import device_name

    cfg = variants.get_config("question-only", question_vocab=50, answer_vocab=10, module_dim=16, word_dim=8,
                              vision_dim=8, num_clips=2, num_frames=2)
    store = ResultsStore(tmp_path)
    store.write_record({"run_id": "q-1", "variant": "question-only", "variant_config": cfg.to_dict(),
                        "device_name": device_name("cpu")})
    monkeypatch.setitem(costs.REPS, "cpu", 5)
    threads = torch.get_num_threads()
    try:
        assert costs.measure_missing(store, ["q-1"], "cpu") == 1
        assert costs.measure_missing(store, ["q-1"], "cpu") == 0
        torch.set_num_threads(threads + 1)
        assert costs.read(store, store.read_record("q-1")) is None  # another thread count: not that figure
        assert costs.measure_missing(store, ["q-1"], "cpu") == 1
    finally:
        torch.set_num_threads(threads)
    (shown,) = costs.attach(store, [store.read_record("q-1")])
    m = shown["cost"]["measured"]
    assert m["threads"] == threads and len(m["load_average"]) == 2


def _complete_run(store: ResultsStore, grid_path, tiny) -> dict:
    """A complete record (and its predictions) of the one run ``grid_path`` plans on the tiny set."""
    import numpy as np
    import pandas as pd

    from harness.execution import grid as G
    from harness.runs import identity
    from harness.env import device_name
    from harness.training.plan import plan

    p = plan(G.load(str(grid_path)).runs[0], tiny)
    n = 200
    answer = np.arange(n) % 7
    test = {"overall": 50.0, "per_type": {"what": 50.0}, "counts": {"what": n}, "n": n}
    rec = {"run_id": p.run_id, "status": "complete", "variant": p.cfg.name, "variant_config": p.cfg.to_dict(),
           "train_config": p.train, "seed": p.spec.seed, "metrics": {"best_epoch": 0, "test": test},
           "data": {"id": tiny.info.data_id, "name": tiny.info.name, "spec": tiny.info.spec, "type_names": ["what"]},
           "history": [], "teachers": [], "teacher_runs": [], "device_name": device_name("cpu"), "device": "cpu",
           "torch_version": "2", "finished_at": "2026-01-01T00:00:00+00:00", "code": identity.code_record()}
    store.write_record(rec)
    pred = np.where(np.arange(n) % 2 == 0, answer, answer + 1)
    pd.DataFrame({"question_id": np.arange(n), "qtype": "what", "answer": answer, "pred_best": pred,
                  "correct_best": pred == answer}).to_csv(store.run_dir(p.run_id) / "predictions_test.csv", index=False)
    return rec


def test_a_report_marks_latency_of_a_busy_machine_and_names_only_repository_paths(tiny, tmp_path, monkeypatch):
    """``ablate.py report``: a latency timed steadily (p90/median 1.1) while the load average exceeded the
    cores is marked and said loudly; a report written inside the repository names no path outside it
    (the results folder is a placeholder, explained), and a path inside it relative to its root."""
    import re

    import torch
    from typer.testing import CliRunner

    import ablate
    from harness.report import header

    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    monkeypatch.setattr(header, "REPO", repo)
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n')
    store = ResultsStore(tmp_path / "scratch" / "results")
    rec = _complete_run(store, grid, tiny)
    store.write_data_info(tiny.info.to_dict())
    cfg = rec["variant_config"]
    cores = int(re.search(r"(\d+) cores", rec["device_name"]).group(1))
    key = costs.cost_key(cfg["model"], cfg["arch"], rec["device_name"], torch.get_num_threads())
    (store.root / "costs").mkdir()
    (store.root / "costs" / f"{key}.json").write_text(json.dumps({
        "latency_ms_median": 742.5, "latency_ms_p90": 816.0, "latency_ms_p99": 900.0, "spread": 1.1, "reps": 50,
        "peak_mem_mib_infer": None, "measured_at": "2026-12-03T07:54:41+00:00", "device": "cpu",
        "device_name": rec["device_name"], "host": "vm", "threads": 2, "load_average": [cores + 2.0, cores + 2.1]}))
    r = CliRunner().invoke(ablate.app, ["report", "--grid", str(grid), "--results", str(store.root),
                                        "--reports", str(repo / "reports")])
    assert r.exit_code == 0, r.output
    md = (repo / "reports" / "g.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| **question-only**")
               or line.startswith("| question-only |"))
    assert "| 742.500 ‡ |" in row, row
    assert (f"**‡: latency measured on a busy machine, not what the model costs on an idle one** (question-only: "
            f"load average {cores + 2.0:.2f} on {cores} cores;") in md
    assert str(tmp_path) not in md  # neither the results folder nor the reports folder is named absolutely
    assert ("Reports are regenerated by `python ablate.py report --grid GRID --results RESULTS --reports reports`; "
            "do not edit. GRID: a path outside the repository, not named here. RESULTS: a path outside the "
            "repository, not named here.") in md
    # written outside the repository, a report names its folders as given
    r = CliRunner().invoke(ablate.app, ["report", "--grid", str(grid), "--results", str(store.root),
                                        "--reports", str(tmp_path / "elsewhere")])
    assert r.exit_code == 0, r.output
    assert f"--results {store.root} " in (tmp_path / "elsewhere" / "g.md").read_text()
