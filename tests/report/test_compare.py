"""``ablate.py compare``: each data set's task metric (a count's MSE, lower is better; accuracy with
McNemar), rows labelled by data set, and a partial grid named as such. Records are written for the
run ids the grids plan (nothing trains)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import ablate
from harness.data import dataset as D
from harness.execution import grid as G
from harness.runs import identity
from harness import stats as S
from harness.training.plan import plan
from harness.report import compare_runs
from harness.runs.store import ResultsStore
from harness.files import atomic_write_bytes

N = 400
runner = CliRunner()


def _write_run(store: ResultsStore, p, info: D.DataInfo, pred: np.ndarray, answer: np.ndarray,
               code: dict | None = None) -> None:
    """A complete record of plan ``p`` and its predictions_test.csv (metrics consistent with them)."""
    correct = pred == answer
    test = {"overall": 100.0 * correct.mean(), "per_type": {"how": 100.0 * correct.mean()},
            "counts": {"how": len(pred)}, "n": len(pred)}
    if info.task == "count":
        test["mse"] = float(((pred - answer) ** 2).mean())
    store.write_record({
        "run_id": p.run_id, "status": "complete", "variant": p.cfg.name, "variant_config": p.cfg.to_dict(),
        "train_config": p.train, "seed": p.spec.seed, "metrics": {"best_epoch": 0, "test": test},
        "data": {"id": info.data_id, "name": info.name, "spec": info.spec, "type_names": ["how"]},
        "history": [], "teachers": [], "teacher_runs": [], "device_name": "cpu (test)", "torch_version": "2",
        "finished_at": "2026-01-01T00:00:00+00:00", "code": code or identity.code_record()})
    qid = np.arange(N) + 1000
    df = pd.DataFrame({"question_id": qid, "video_id": qid, "qtype": "how", "answer": answer, "pred_best": pred,
                       "correct_best": correct})
    atomic_write_bytes(store.run_dir(p.run_id) / "predictions_test.csv", df.to_csv(index=False).encode())


@pytest.fixture(scope="module")
def count_info(data_cache):
    return D.describe("synthetic:tiny-count", generate=True)


def _grid(tmp_path, name: str, epochs: int, seeds=(0, 1), data="synthetic:tiny-count"):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'data = "{data}"\nvariants = ["dualvgr"]\nseeds = {list(seeds)}\n'
                    f"[train]\nepochs = {epochs}\n")
    return path


def test_compare_of_count_grids_uses_mse_and_names_a_partial_grid(tmp_path, count_info):
    """Grid A answers more counts exactly but misses by 4 elsewhere (MSE 6.4); grid B misses by one
    more often (MSE 0.7): exact-match accuracy favours A, the task's metric B."""
    store = ResultsStore(tmp_path / "results")
    g1, g2, g3 = _grid(tmp_path, "g1", 2), _grid(tmp_path, "g2", 3), _grid(tmp_path, "g3", 4)
    answer = np.random.default_rng(0).integers(1, 11, N)
    off = np.arange(N)
    pa = np.where(off % 10 < 6, answer, np.where(answer > 5, answer - 4, answer + 4))  # 60% exact, MSE 6.4
    pb = np.where(off % 10 < 3, answer, np.where(answer > 5, answer - 1, answer + 1))  # 30% exact, MSE 0.7
    for g, pred in ((g1, pa), (g2, pb)):
        for s in G.load(str(g)).runs:
            _write_run(store, plan(s, count_info), count_info, pred, answer)
    r = runner.invoke(ablate.app, ["compare", "--grid", str(g1), "--grid", str(g2), "--results", str(store.root)])
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if line.startswith("| variant"))
    assert "g1 MSE" in header and "g2 MSE" in header and "McNemar" not in header and "acc" not in header
    row = next(line for line in r.output.splitlines() if line.startswith("| dualvgr"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["dualvgr", "0, 1", "6.400", "0.700", "-5.700"], row
    assert cells[-1] == "g2", row  # the lower MSE, significantly
    assert "lower is better" in r.output
    # g3 plans the same seeds with 4 epochs and has run none of them: not finished, not "only in g1"
    part = runner.invoke(ablate.app, ["compare", "--grid", str(g1), "--grid", str(g3), "--results", str(store.root)])
    assert part.exit_code == 1 and "only in g1" not in part.output, part.output
    assert "g3 is partial: 2 planned runs not finished" in part.output
    assert "`dualvgr` seeds 0, 1: not finished in g3" in part.output
    # half of g3 finished: seed 0 compared, seed 1 named as not finished
    _write_run(store, plan(G.load(str(g3)).runs[0], count_info), count_info, pb, answer)
    half = runner.invoke(ablate.app, ["compare", "--grid", str(g1), "--grid", str(g3), "--results", str(store.root)])
    assert half.exit_code == 0 and "| dualvgr | 0 | 6.400 | 0.700 |" in half.output, half.output
    assert "g3 is partial: 1 planned run not finished" in half.output
    assert "`dualvgr` seed 1: not finished in g3" in half.output and "only in" not in half.output


def test_compare_of_accuracy_grids_keeps_accuracy_and_mcnemar(tmp_path, tiny):
    store = ResultsStore(tmp_path / "results")
    g1, g2 = _grid(tmp_path, "g1", 2, data="synthetic:tiny"), _grid(tmp_path, "g2", 3, data="synthetic:tiny")
    answer = np.random.default_rng(0).integers(1, 11, N)
    for g, share in ((g1, 6), (g2, 7)):
        for s in G.load(str(g)).runs:
            pred = np.where(np.arange(N) % 10 < share, answer, answer + 1)
            _write_run(store, plan(s, tiny), tiny.info, pred, answer)
    r = runner.invoke(ablate.app, ["compare", "--grid", str(g1), "--grid", str(g2), "--results", str(store.root)])
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if line.startswith("| variant"))
    assert "g1 acc" in header and "McNemar per seed" in header and "MSE" not in header
    assert "| dualvgr | 0, 1 | 60.00 | 70.00 | +10.00 |" in r.output
    assert "0: 40/0, p=" in r.output and "is partial" not in r.output


def _acc_and_count_runs(store: ResultsStore, side: str, shift: int) -> list[str]:
    """A run per data set (an accuracy set, a count set) and seed, written for ``side``."""
    ids = []
    answer = np.random.default_rng(1).integers(1, 11, N)
    for data, task in (({"id": "acc-1", "name": "accset"}, "open-ended"),
                       ({"id": "cnt-1", "name": "countset"}, "count")):
        for seed in (0, 1):
            pred = np.where(np.arange(N) % 10 < 5 + shift, answer, answer + 1 + shift)
            correct = pred == answer
            rid = f"{side}-{data['id']}-{seed}"
            test = {"overall": 100.0 * correct.mean(), "per_type": {}, "n": N}
            model = {"task": task} if task == "count" else {}
            if task == "count":
                test["mse"] = float(((pred - answer) ** 2).mean())
            store.write_record({"run_id": rid, "status": "complete", "variant": "dualvgr", "seed": seed,
                                "variant_config": {"name": "dualvgr", "model": model}, "train_config": {},
                                "metrics": {"best_epoch": 0, "test": test}, "data": {**data, "type_names": ["how"]},
                                "finished_at": "2026-01-01T00:00:00+00:00"})
            qid = np.arange(N) + 1000
            df = pd.DataFrame({"question_id": qid, "qtype": "how", "answer": answer, "pred_best": pred,
                               "correct_best": correct})
            atomic_write_bytes(store.run_dir(rid) / "predictions_test.csv", df.to_csv(index=False).encode())
            ids.append(rid)
    return ids


def test_compare_over_several_data_sets_labels_rows_and_keeps_each_metric(tmp_path):
    store = ResultsStore(tmp_path / "results")
    a, b = _acc_and_count_runs(store, "a", 0), _acc_and_count_runs(store, "b", 1)
    df, md = compare_runs(store, a, b, "A", "B")
    assert list(df["data_name"]) == ["accset", "countset"] and list(df["metric"]) == ["acc", "mse"]
    acc, cnt = df.iloc[0], df.iloc[1]
    assert acc["acc_A"] == pytest.approx(50.0) and acc["acc_B"] == pytest.approx(60.0)
    assert acc["delta_mean"] == pytest.approx(10.0) and len(acc["mcnemar"]) == 2
    # the count: half off by one (MSE 0.5) against 40% off by two (MSE 1.6); B - A = +1.1, worse
    assert cnt["mse_A"] == pytest.approx(0.5) and cnt["mse_B"] == pytest.approx(1.6)
    assert cnt["delta_mean"] == pytest.approx(1.1) and cnt["mcnemar"] == []
    assert list(df["p_holm"]) == pytest.approx(S.holm(list(df["p"])))
    heads = [line for line in md if line.startswith("| data |")]
    assert len(heads) == 2 and "A acc" in heads[0] and "A MSE" in heads[1]
    assert any(line.startswith("| accset | dualvgr | 0, 1 | 50.00 | 60.00 | +10.00 |") for line in md), md
    assert any(line.startswith("| countset | dualvgr | 0, 1 | 0.500 | 1.600 | +1.100 |") and line.endswith("| A |")
               for line in md), md


def test_compare_says_when_a_sides_code_is_not_the_checkouts_and_which_files_changed(tmp_path, count_info):
    store = ResultsStore(tmp_path / "results")
    g1, g2 = _grid(tmp_path, "g1", 2, seeds=(0,)), _grid(tmp_path, "g2", 3, seeds=(0,))
    answer = np.random.default_rng(0).integers(1, 11, N)
    mine = identity.code_record()
    old = {"fingerprint": "0ldc0de00000", "digests": {**mine["digests"], "harness/model/step.py": "0" * 12}}
    for g, code in ((g1, old), (g2, None)):
        for s in G.load(str(g)).runs:
            _write_run(store, plan(s, count_info), count_info, answer + 1, answer, code=code)
    r = runner.invoke(ablate.app, ["compare", "--grid", str(g1), "--grid", str(g2), "--results", str(store.root)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    changed = "`harness/model/step.py`"
    assert f"Code 0ldc0de00000 is not this checkout's ({mine['fingerprint']}); changed: {changed}." in text
    assert f"g2 reads runs of code {mine['fingerprint']} (1 run)." in text
