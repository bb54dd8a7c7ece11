"""Inference costs: measured once per configuration and device, serially, after training; the
same figure for every run of the same architecture (issue: costs measured under load)."""
from __future__ import annotations

import json

import pytest

from harness import costs
from harness.runner import RunSpec, train
from harness.store import ResultsStore

FAST = dict(epochs=1, batch_size=512)


@pytest.mark.slow
def test_one_measurement_per_configuration_shared_by_its_runs(tiny, tmp_path):
    store = ResultsStore(tmp_path)
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


def test_a_disturbed_timing_is_flagged(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    rec = train(RunSpec("question-only", seed=2, **FAST), store, data=tiny, device="cpu", progress=False)
    costs.measure_missing(store, [rec["run_id"]], "cpu")
    (path,) = (tmp_path / "costs").glob("*.json")
    c = json.loads(path.read_text())
    c.update(latency_ms_median=1.0, latency_ms_p90=3.0, spread=3.0)
    path.write_text(json.dumps(c))
    (shown,) = costs.attach(store, [rec])
    assert shown["cost"]["measured"]["disturbed"] is True
    # the report says when and where, and marks the figure
    from harness.report import write_report

    md = write_report(store, "t", run_ids=[rec["run_id"]], out_dir=tmp_path / "reports").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| question-only |"))
    assert "| 1.000 ‡ |" in row, row
    assert f"latency and inference memory measured {c['measured_at']} on {c['device_name']} on host {c['host']}" in md
    assert "‡: p90/median above 1.5 (question-only)" in md


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
