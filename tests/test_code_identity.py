"""Runs computed by other code: a grid reuses them only when the user lets it (and says so); the
regression check never does, and never blesses them."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from harness import grid as G
from harness import identity
from harness import regression as R
from harness.executor import GridResult, run_grid
from harness.store import ResultsStore

OLD = "0ldc0de00000"


@pytest.fixture
def grid(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('data = "synthetic:tiny"\nvariants = ["student-logits"]\nseeds = [0]\n'
                 '[train]\nepochs = 1\nbatch_size = 512\n')
    return G.load(p)


@pytest.mark.slow
def test_runs_of_other_code_are_reused_only_by_choice_and_never_by_the_regression_check(tiny, tmp_path, grid,
                                                                                         monkeypatch):
    store = ResultsStore(tmp_path / "results")
    current = identity.code_fingerprint()
    with monkeypatch.context() as m:  # the store of an older checkout
        m.setattr(identity, "code_fingerprint", lambda: OLD)
        run_grid(grid, store, console=Console(file=io.StringIO()))
    assert {identity.code_of(r) for r in store.records()} == {OLD}
    out = io.StringIO()
    res = run_grid(grid, store, console=Console(file=out, width=200))
    assert res.skipped == 1 and "2 complete run(s) were computed by other code" in out.getvalue()
    assert "reused" in out.getvalue()
    measured = R.measure(grid, store, console=Console(file=io.StringIO()))  # teacher and student trained again
    assert set(measured) == {"student-logits", "teacher-g4"}
    assert {identity.code_of(r) for r in store.records()} == {current}
    assert len(store.records()) == 2


def test_the_regression_check_refuses_a_run_of_other_code(tmp_path, grid, monkeypatch):
    store = ResultsStore(tmp_path / "results")
    store.write_record({"run_id": "student-logits-x", "variant": "student-logits", "code": {"fingerprint": OLD},
                        "metrics": {"test": {"overall": 50.0}}, "params": {"total": 1}})
    monkeypatch.setattr(R, "run_grid", lambda *a, **k: GridResult(["student-logits-x"], ["student-logits-x"], [], 1))
    with pytest.raises(R.RegressionError, match=f"computed by code {OLD}, not this checkout's"):
        R.measure(grid, store)
