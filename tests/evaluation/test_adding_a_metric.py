"""Adding a metric is one registered :class:`harness.evaluation.metrics.Metric`: the toy metric below, registered
here and nowhere else, appears in the run's record, the store's table and ``ablate.py results``, the
report's main table, notes and CSV, and the regression check."""
from __future__ import annotations

import re

import pandas as pd
import pytest
from typer.testing import CliRunner

import ablate
from harness.execution import grid as G
from harness.evaluation import metrics as M
from harness.execution import regression
from harness.report import write_report
from harness.runs.store import ResultsStore


def _wrong_share(ev: M.Evaluated) -> dict:
    """The toy metric: the share of questions answered wrongly, in percent (100 - accuracy)."""
    return {"toy_wrong": float(100.0 * (~ev.correct).mean())}


TOY = M.Metric(name="toy_wrong", key="toy_wrong", title="toy wrong %", compute=_wrong_share, higher_is_better=False,
               fmt=M.fixed(3), statistics=(M.BOOTSTRAP,), tolerance=0.5, digits=2,
               note="toy wrong %: the share of test questions answered wrongly.")


@pytest.fixture
def toy():
    M.register(TOY)
    yield TOY
    M.METRICS.pop(TOY.name, None)


@pytest.fixture
def measured(toy, tiny, tmp_path):
    """A one-run grid trained through the regression check's measurement, with the toy metric on."""
    p = tmp_path / "g.toml"
    p.write_text('data = "synthetic:tiny"\nvariants = ["dualvgr"]\nseeds = [0]\n'
                 '[train]\nepochs = 1\nbatch_size = 512\n[set]\nmodule_dim = 16\n')
    store = ResultsStore(tmp_path / "results")
    return regression.measure(G.load(p), store), store


def test_registry_rejects_bad_metrics():
    with pytest.raises(ValueError, match="already registered"):
        M.register(M.METRICS["acc"])
    with pytest.raises(ValueError, match="unknown statistics"):
        M.Metric(name="x", key="x", title="x", compute=dict, higher_is_better=True, fmt=M.fixed(), statistics=("t",))
    with pytest.raises(ValueError, match="McNemar"):
        M.Metric(name="x", key="x", title="x", compute=dict, higher_is_better=False, fmt=M.fixed(),
                 statistics=(M.BOOTSTRAP, M.MCNEMAR))
    assert M.METRICS["acc"].statistics == (M.BOOTSTRAP, M.MCNEMAR)
    assert M.METRICS["recon_mse"].statistics == (M.BOOTSTRAP,) and not M.METRICS["recon_mse"].higher_is_better


@pytest.mark.slow
def test_a_toy_metric_reaches_record_results_report_and_regression(measured, tmp_path):
    got, store = measured
    (rec,) = list(store.iter_records())
    m = rec["metrics"]
    for split in (m["val"], m["test"], m["test_last"], *m["ablations"].values()):  # computed wherever metrics are
        assert split["toy_wrong"] == pytest.approx(100.0 - split["overall"])
    wrong = m["test"]["toy_wrong"]

    # the store's table and `ablate.py results`
    assert store.to_frame()["test_toy_wrong"].tolist() == [pytest.approx(wrong)]
    out = CliRunner().invoke(ablate.app, ["results", "--results", str(store.root), "--csv", str(tmp_path / "r.csv")])
    assert out.exit_code == 0, out.output
    assert pd.read_csv(tmp_path / "r.csv")["test_toy_wrong"].tolist() == [pytest.approx(wrong)]

    # the report: a main-table column with its format, its note, a CSV column
    md = write_report(store, "toy", out_dir=tmp_path / "reports").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant | params"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in md.splitlines() if line.startswith("| **dualvgr**"))
    assert row.strip("|").split("|")[cols.index("toy wrong %")].strip() == f"{wrong:.3f}"
    assert "toy wrong %: the share of test questions answered wrongly." in md
    csv = pd.read_csv(tmp_path / "reports" / "toy.csv")
    assert csv["toy_wrong"].tolist() == [pytest.approx(wrong)]
    assert list(csv.columns).index("toy_wrong") < list(csv.columns).index(f"test_acc_{rec['data']['type_names'][0]}")

    # the regression check: measured, blessed with its tolerance, compared
    assert got["dualvgr"]["test_toy_wrong"] == round(wrong, 2)
    expected = regression.bless(got, {}, "toy")
    assert expected["tolerance"]["test_toy_wrong"] == 0.5 and regression.compare(got, expected) == []
    moved = {"dualvgr": {**got["dualvgr"], "test_toy_wrong": got["dualvgr"]["test_toy_wrong"] + 1.0}}
    (row,) = regression.compare(moved, expected)
    assert row["what"] == "test_toy_wrong (tolerance 0.5)" and row["moved"] == "worse"  # lower is better
    assert "| test_toy_wrong (tolerance 0.5) |" in regression.format_rows([row])
    lacking = {**expected, "variants": {"dualvgr": {k: v for k, v in expected["variants"]["dualvgr"].items()
                                                    if k != "test_toy_wrong"}}}
    assert [r["what"] for r in regression.compare(got, lacking)] == ["test_toy_wrong (expected value not finite)"]


@pytest.mark.slow
def test_without_the_toy_metric_nothing_shows_it(tmp_path, measured):
    """Unregistered, the same store's table and report have no such column (what shows it is the registry)."""
    _, store = measured
    M.METRICS.pop(TOY.name, None)
    try:
        assert "test_toy_wrong" not in store.to_frame()
        md = write_report(store, "plain", out_dir=tmp_path / "plain").read_text()
        assert "toy wrong" not in md and "toy_wrong" not in (tmp_path / "plain" / "plain.csv").read_text()
        assert re.search(r"\| test acc \| 95% CI \|", md)
    finally:
        M.register(TOY)  # the fixture removes it
