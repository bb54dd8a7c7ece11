"""Runs computed by other code: a grid reuses them only when the user lets it (and says so); the
regression check never does, and never blesses them."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from harness.execution import grid as G
from harness.runs import identity
from harness.execution import regression as R
from harness.execution.grid import run_grid
from harness.execution.schedule import GridResult
from harness.runs.store import ResultsStore

OLD = "0ldc0de00000"


@pytest.fixture
def grid(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('data = "synthetic:tiny"\nvariants = ["student-logits"]\nseeds = [3]\n'  # the shared store's runs
                 '[train]\nepochs = 1\nbatch_size = 512\n')
    return G.load(p)


@pytest.mark.slow
def test_runs_of_other_code_are_reused_only_by_choice_and_never_by_the_regression_check(tmp_path, grid, shared_store):
    """The store of an older checkout: the grid's teacher and student copied from the shared store (the same
    specs), their records stamped with another code fingerprint (as training under it would have written them)."""
    store, _ = shared_store.copy(tmp_path / "results", "student-logits")
    current = identity.code_fingerprint()
    for r in store.records():
        store.write_record({**r, "code": {**r["code"], "fingerprint": OLD}})
    assert {identity.code_of(r) for r in store.records()} == {OLD}
    out = io.StringIO()
    res = run_grid(grid, store, console=Console(file=out, width=200))
    assert res.skipped == 1 and "2 complete runs were computed by other code" in out.getvalue()
    assert "reused" in out.getvalue()
    measured = R.measure(grid, store, console=Console(file=io.StringIO()))  # teacher and student trained again
    assert set(measured) == {"student-logits", "teacher-g4"}
    assert {identity.code_of(r) for r in store.records()} == {current}
    assert len(store.records()) == 2
    assert all(r["code"] == identity.code_record() for r in store.records())  # each file's digest kept
    kept = store.root / "other-code" / OLD  # the old runs are kept, not overwritten
    assert sorted(p.name for p in kept.iterdir()) == sorted(r["run_id"] for r in store.records())


def test_the_regression_check_refuses_a_run_of_other_code(tmp_path, grid, monkeypatch):
    store = ResultsStore(tmp_path / "results")
    store.write_record({"run_id": "student-logits-x", "variant": "student-logits", "code": {"fingerprint": OLD},
                        "metrics": {"test": {"overall": 50.0}}, "params": {"total": 1}})
    monkeypatch.setattr(R, "run_grid", lambda *a, **k: GridResult(["student-logits-x"], ["student-logits-x"], [], 1))
    with pytest.raises(R.RegressionError, match=f"computed by code {OLD}, not this checkout's"):
        R.measure(grid, store)


def test_the_regression_check_keeps_the_runs_of_other_code_it_trains_again(tiny, tmp_path, monkeypatch):
    """``python -m harness.execution.regression --results DIR`` over a store of other code: the run is trained
    again with this code, and the old run (record and files) is kept in DIR/other-code/<fingerprint>,
    which the check names; before, the new record overwrote it in place."""
    import json

    from typer.testing import CliRunner

    from harness.execution import executor
    from harness.training.plan import plan

    path = tmp_path / "qo.toml"
    path.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n[train]\nepochs = 1\n')
    g = G.load(path)
    store = ResultsStore(tmp_path / "results")
    rid = plan(g.runs[0], tiny).run_id
    old = {"run_id": rid, "variant": "question-only", "code": {"fingerprint": OLD}, "params": {"total": 7},
           "metrics": {"test": {"overall": 40.0}}}
    store.write_record(old)
    (store.run_dir(rid) / "predictions_test.csv").write_text("question_id\n1\n")
    current = identity.code_fingerprint()

    def trained(spec, st, data=None, **kw):  # what training with this code records
        rec = {**old, "code": {"fingerprint": current}, "metrics": {"test": {"overall": 50.0}}}
        st.write_record(rec)
        return rec

    monkeypatch.setattr(executor, "train", trained)
    monkeypatch.setattr(R, "EXPECTED_DIR", tmp_path)
    (tmp_path / "qo_expected.json").write_text(json.dumps(
        {"grid": "qo", "variants": {"question-only": {"test_acc": 50.0, "params": 7}}}))
    res = CliRunner().invoke(R.app, ["--grid", str(path), "--results", str(store.root)])
    assert res.exit_code == 0, res.output
    kept = store.root / "other-code" / OLD / rid
    assert json.loads((kept / "record.json").read_text()) == old and (kept / "predictions_test.csv").is_file()
    assert f"trained again; theirs kept in {kept.parent}" in "".join(res.output.split("\n"))
    assert [identity.code_of(r) for r in store.records()] == [current]
    # a record's fingerprint is input: one that is not a plain name never becomes a path
    store.write_record({**old, "code": {"fingerprint": "../../escape"}})
    assert store.keep_other_code(rid) == store.root / "other-code" / "unknown" / rid


def test_the_regression_check_without_an_expected_file_says_so(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setattr(R, "measure", lambda g, store: {"question-only": {"test_acc": 50.0}})
    monkeypatch.setattr(R, "EXPECTED_DIR", tmp_path)
    path = tmp_path / "nothing.toml"
    path.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n')
    res = CliRunner().invoke(R.app, ["--grid", str(path), "--results", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: {tmp_path / 'nothing_expected.json'}: no expected results for grid nothing" in res.output
