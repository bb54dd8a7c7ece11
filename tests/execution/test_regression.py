"""CI regression check on the tiny set (detectron2-style quick schedules): the `ci` grid's
numbers must match tests/golden/ci_expected.json (and the `ci-tasks` grid's, multiple choice and count,
tests/golden/ci-tasks_expected.json) — test accuracy within its tolerance, parameter
counts and MACs per sample exactly. A failure prints a table of what moved; if the change is
intended, rewrite the file with `python -m harness.execution.regression --grid ci --update`."""
import json

import pytest

from harness.execution import grid as G
from harness.errors import HarnessError
from harness.execution import regression as R
from harness.runs.store import ResultsStore


@pytest.mark.capability
@pytest.mark.slow
@pytest.mark.parametrize("grid", ["ci", "ci-tasks"])  # open-ended; multiple choice and count
def test_ci_grid_matches_expected_results(tiny, tmp_path, grid):
    g = G.load(grid)
    measured = R.measure(g, ResultsStore(tmp_path / "results"))
    expected = json.loads(R.expected_path(grid).read_text())
    rows = R.compare(measured, expected)
    assert not rows, "numbers moved outside tolerance:\n" + R.format_rows(rows) + "\n" + R.machine_note(expected)


def test_compare_reports_what_moved():
    expected = {"tolerance_acc": 2.0, "variants": {"a": {"test_acc": 50.0, "params": 10, "macs_per_sample": 100},
                                                   "b": {"test_acc": 60.0, "params": 20, "macs_per_sample": 200}}}
    measured = {"a": {"test_acc": 51.5, "params": 10, "macs_per_sample": 100},
                "b": {"test_acc": 57.0, "params": 21, "macs_per_sample": 200},
                "c": {"test_acc": 1.0, "params": 1, "macs_per_sample": 1}}
    rows = R.compare(measured, expected)
    assert {(r["variant"], r["what"]) for r in rows} == {("b", "test_acc (tolerance 2.0)"),
                                                         ("b", "params (tolerance 0.0)"), ("c", "variant")}
    assert "| b | params (tolerance 0.0) | 20 | 21 | changed |" in R.format_rows(rows)
    assert {r["moved"] for r in rows if r["what"].startswith("test_acc")} == {"worse"}  # 60 -> 57: accuracy fell


EXPECTED = {"tolerance": {"test_acc": 2.0}, "variants": {
    "a": {"test_acc": 50.0, "params": 10, "macs_per_sample": 100},
    "b": {"test_acc": 60.0, "params": 20, "macs_per_sample": 200, "tolerance": {"test_acc": 5.0}},
    "c": {"test_acc": 70.0, "params": 30, "macs_per_sample": 300}}}


def test_nan_and_out_of_tolerance_values_fail():
    measured = {"a": {"test_acc": float("nan"), "params": 10, "macs_per_sample": 100},  # planted NaN
                "b": {"test_acc": 64.0, "params": 20, "macs_per_sample": 200},  # within b's own tolerance 5
                "c": {"test_acc": 72.5, "params": 30, "macs_per_sample": float("inf")}}  # out of 2.0; inf MACs
    rows = R.compare(measured, EXPECTED)
    assert {(r["variant"], r["what"]) for r in rows} == {("a", "test_acc (measured value not finite)"),
                                                         ("c", "test_acc (tolerance 2.0)"),
                                                         ("c", "macs_per_sample (measured value not finite)")}
    # the same values within tolerance pass: the check is what fails, not the fixture
    ok = {"a": {"test_acc": 51.9, "params": 10, "macs_per_sample": 100},
          "b": {"test_acc": 55.5, "params": 20, "macs_per_sample": 200},
          "c": {"test_acc": 68.1, "params": 30, "macs_per_sample": 300}}
    assert R.compare(ok, EXPECTED) == []
    # a NaN in the expected file fails too (it would otherwise bless any value)
    bad_expected = {"variants": {"a": {"test_acc": float("nan"), "params": 10, "macs_per_sample": 100}}}
    assert [r["what"] for r in R.compare({"a": ok["a"]}, bad_expected)] == ["test_acc (expected value not finite)"]


def test_tolerance_per_metric_and_per_variant():
    assert R.tolerance(EXPECTED, "a", "test_acc") == 2.0
    assert R.tolerance(EXPECTED, "b", "test_acc") == 5.0
    assert R.tolerance(EXPECTED, "a", "params") == 0.0  # the default: exact
    assert R.tolerance({"tolerance_acc": 4.0, "variants": {}}, "x", "test_acc") == 4.0  # the older key
    # params must match exactly unless a tolerance says otherwise
    expected = {"tolerance": {"params": 5}, "variants": {"a": {"test_acc": 50.0, "params": 10,
                                                               "macs_per_sample": 100}}}
    assert R.compare({"a": {"test_acc": 50.0, "params": 14, "macs_per_sample": 100}}, expected) == []
    assert len(R.compare({"a": {"test_acc": 50.0, "params": 16, "macs_per_sample": 100}}, expected)) == 1


def test_update_refuses_to_bless_non_finite_metrics():
    measured = {"a": {"test_acc": 50.0, "params": 10, "macs_per_sample": 100},
                "b": {"test_acc": float("nan"), "params": 20, "macs_per_sample": 200}}
    with pytest.raises(R.RegressionError, match=r"b: test_acc=nan"):
        R.bless(measured, EXPECTED, "ci")
    with pytest.raises(R.RegressionError, match=r"a: macs_per_sample=inf"):
        R.bless({"a": {"test_acc": 50.0, "params": 10, "macs_per_sample": float("inf")}}, {}, "ci")
    # finite values are written, keeping the old tolerances (file-wide and per variant)
    new = R.bless({"b": {"test_acc": 61.0, "params": 20, "macs_per_sample": 200}}, EXPECTED, "ci")
    assert new["tolerance"]["test_acc"] == 2.0 and new["variants"]["b"]["tolerance"] == {"test_acc": 5.0}
    assert R.compare({"b": {"test_acc": 65.0, "params": 20, "macs_per_sample": 200}}, new) == []
    assert isinstance(R.RegressionError("x"), HarnessError)


@pytest.mark.parametrize("grid", ["ci", "ci-tasks"])
def test_the_expected_file_says_where_it_was_made(grid):
    """Kernels round differently on AVX2 and AVX-512 CPUs: the file names its CPU, and a failed check on
    another kind of CPU says so."""
    made = json.loads(R.expected_path(grid).read_text())["made_on"]
    assert made["cpu"] and made["cpu_capability"] in {"AVX2", "AVX512", "DEFAULT", "ZVECTOR", "VSX"} and made["torch"]
    blessed = R.bless({"a": {"test_acc": 50.0, "params": 10, "macs_per_sample": 100}}, {}, grid)
    assert blessed["made_on"] == R.made_on() and R.machine_note(blessed) == ""
    here = R.made_on()["cpu_capability"]
    elsewhere = {**blessed, "made_on": {**blessed["made_on"], "cpu_capability": "AVX2" if here != "AVX2" else "AVX512"}}
    note = R.machine_note(elsewhere)
    assert here in note and elsewhere["made_on"]["cpu_capability"] in note and blessed["made_on"]["cpu"] in note
    assert "does not say" in R.machine_note({"variants": {}})
