"""Regression checks on tiny feature sets (in the style of detectron2's quick-schedule checks):
run a grid, compare each variant's test accuracy, parameter count and MACs per sample with an
expected-results file, each within its tolerance, and print a table of what moved.

    python -m harness.execution.regression --grid ci   # check (what tests/execution/test_regression.py does)
    python -m harness.execution.regression --grid ci --update        # re-measure and rewrite the expected file

The check measures the code of this checkout: by default in a store of its own per code
fingerprint (``results/regression/<fingerprint>``, see :func:`harness.runs.identity.code_fingerprint`),
and with ``--results R`` it reuses only R's runs computed by this code (the others are trained
again, after being moved to ``R/other-code/<their fingerprint>/<run id>``, kept, as the check says).
A run computed by other code is never compared or blessed (:class:`RegressionError`).

The expected file (``tests/golden/<grid>_expected.json``)::

    {"grid": "ci",
     "tolerance": {"test_acc": 3.0, "params": 0, "macs_per_sample": 0},   # per metric (defaults below)
     "variants": {"dualvgr": {"test_acc": 70.5, "params": 223748, "macs_per_sample": 1634304},
                  "sparse-node": {"test_acc": 66.4, ..., "tolerance": {"test_acc": 5.0}}}}   # per variant

The file also says where its values were made (``made_on``: CPU model, its instruction-set capability
and the torch version): kernels differ between CPUs (AVX-512 and AVX2 round differently, so a trained
accuracy moves by a few tenths of a point), and the accuracy tolerance is chosen to cover that; a check
that fails on another CPU says so beside the table.

As detectron2's ``EXPECTED_RESULTS`` (metric, value, tolerance), a tolerance can be given per metric
for the whole file and per variant and metric; the older ``"tolerance_acc"`` key is read as the
file's ``test_acc`` tolerance. A measured or expected value that is not a finite number (NaN, inf,
missing) is always a failure (``abs(nan - x) > tol`` is False, so a plain comparison would pass it),
and ``--update`` refuses to write such a value as the new expectation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from harness import env
from harness.console import plural
from harness.execution import grid as G
from harness.runs import identity
from harness.evaluation import metrics as M
from harness.runs import record as R
from harness.errors import HarnessError
from harness.execution.grid import run_grid
from harness.runs.store import ResultsStore
from harness.files import atomic_write_json

EXPECTED_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden"
#: what is checked besides the registered metrics (exact by default: counted, not measured)
COUNTS_TOLERANCE = {"params": 0, "macs_per_sample": 0}


def default_tolerance() -> dict[str, float]:
    """The numbers checked and their tolerance when the expected file gives none: every registered
    metric with a tolerance (:mod:`harness.evaluation.metrics`; ``test_acc``: 3 points), as ``test_<name>``,
    then the parameter count and MACs per sample."""
    return {**{f"test_{m.name}": m.tolerance for m in M.METRICS.values() if m.tolerance is not None},
            **COUNTS_TOLERANCE}


class RegressionError(HarnessError):
    """The regression check cannot run or cannot bless a result (failed runs, non-finite metrics)."""


def expected_path(grid_name: str) -> Path:
    return EXPECTED_DIR / f"{grid_name}_expected.json"


def measure(grid: G.Grid, store: ResultsStore, console=None) -> dict[str, dict]:
    """Run the grid (complete runs are reused only when this checkout's code computed them) and
    collect, per variant (per variant and data set, ``VARIANT on DATA``, for a grid of several data
    sets, e.g. one per task), :func:`summarize` of its runs."""
    res = run_grid(grid, store, console=console, reuse_other_code=False)
    if res.failed:
        raise RegressionError("runs failed: " + "; ".join(f"{f['variant']}: {f['reason']}" for f in res.failed))
    code = identity.code_fingerprint()
    by_variant: dict[str, list[dict]] = {}
    for rid in res.run_ids:
        rec = store.read_record(rid)
        if identity.code_of(rec) != code:
            raise RegressionError(f"run {rid} was computed by code {identity.code_of(rec)}, not this checkout's "
                                  f"({code}): not compared")
        key = rec["variant"] if len(grid.datasets) == 1 else f"{rec['variant']} on {rec['data']['spec']}"
        by_variant.setdefault(key, []).append(rec)
    return {v: summarize(recs) for v, recs in sorted(by_variant.items())}


def summarize(recs: list[dict]) -> dict:
    """One variant's numbers from its runs' records: each checked metric's test mean over the seeds
    (rounded to the metric's digits; None when a run lacks it), the parameter count, MACs per sample."""
    out = {}
    for m in M.METRICS.values():
        if m.tolerance is None or not m.applies(recs[0]):
            continue
        vals = [R.metric(r, "test", m.name) for r in recs]
        mean = sum(vals) / len(vals) if vals and None not in vals else None
        out[f"test_{m.name}"] = round(mean, m.digits) if mean is not None and m.digits is not None else mean
    return {**out, "params": R.params_total(recs[0]), "macs_per_sample": R.cost(recs[0], "macs_per_sample")}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def tolerance(expected: dict, variant: str, metric: str) -> float:
    """The variant's own tolerance for the metric, else the file's, else :func:`default_tolerance`."""
    own = (expected["variants"].get(variant) or {}).get("tolerance") or {}
    file_wide = dict(expected.get("tolerance") or {})
    if "tolerance_acc" in expected:
        file_wide.setdefault("test_acc", expected["tolerance_acc"])
    return float(own.get(metric, file_wide.get(metric, default_tolerance()[metric])))


def _direction(metric: str, m: float, e: float) -> str:
    """Whether a registered metric that moved got ``better`` or ``worse`` (its ``higher_is_better``);
    ``changed`` for the counts (parameters, MACs), which have no better side."""
    reg = next((x for x in M.METRICS.values() if f"test_{x.name}" == metric), None)
    if reg is None:
        return "changed"
    return "better" if (m > e) == reg.higher_is_better else "worse"


def _check(variant: str, metric: str, m, e, tol: float) -> dict | None:
    """The row for one number of one variant when it moved or is not finite, else None."""
    row = {"variant": variant, "expected": e, "measured": m}
    if not _finite(m):
        return {**row, "what": f"{metric} (measured value not finite)"}
    if not _finite(e):
        return {**row, "what": f"{metric} (expected value not finite)"}
    if abs(m - e) > tol:
        return {**row, "what": f"{metric} (tolerance {tol})", "moved": _direction(metric, m, e)}
    return None


def compare(measured: dict, expected: dict) -> list[dict]:
    """Rows for every number that moved: outside its tolerance, not finite on either side, or a
    variant missing on either side."""
    rows = []
    for v in sorted(set(measured) | set(expected["variants"])):
        m, e = measured.get(v), expected["variants"].get(v)
        if m is None or e is None:
            rows.append({"variant": v, "what": "variant", "expected": e and "present", "measured": m and "present"})
            continue
        for metric in default_tolerance():
            if metric not in e and m.get(metric) is None:
                continue  # neither side has it (e.g. MACs not measured in either)
            row = _check(v, metric, m.get(metric), e.get(metric), tolerance(expected, v, metric))
            if row:
                rows.append(row)
    return rows


def bless(measured: dict, old: dict, grid_name: str, acc_tolerance: float | None = None) -> dict:
    """The new expected file from a measurement, keeping the old file's tolerances; refuses
    (:class:`RegressionError`) a measurement with a metric that is not a finite number."""
    bad = [f"{v}: {k}={x!r}" for v, ms in sorted(measured.items()) for k, x in ms.items()
           if k in default_tolerance() and x is not None and not _finite(x)]
    bad += [f"{v}: test_acc={ms.get('test_acc')!r}" for v, ms in sorted(measured.items()) if ms.get("test_acc") is None]
    if bad:
        raise RegressionError(f"not writing {expected_path(grid_name)}: metrics are not finite numbers ("
                              + "; ".join(bad) + ")")
    tol = {**default_tolerance(), **(old.get("tolerance") or {})}
    if "tolerance_acc" in old and "test_acc" not in (old.get("tolerance") or {}):
        tol["test_acc"] = old["tolerance_acc"]
    if acc_tolerance is not None:
        tol["test_acc"] = acc_tolerance
    variants = {}
    for v, ms in sorted(measured.items()):
        variants[v] = dict(ms)
        own = ((old.get("variants") or {}).get(v) or {}).get("tolerance")
        if own:
            variants[v]["tolerance"] = own
    return {"grid": grid_name, "tolerance": tol, "made_on": made_on(),
            "note": "test metrics: mean over the grid's seeds on the CPU named in made_on; the tolerances cover "
                    "other CPUs' kernels (AVX2 against AVX-512); params and MACs exact; tolerances per metric "
                    "(and per variant where a variant has its own); rewrite with "
                    "python -m harness.execution.regression "
                    f"--grid {grid_name} --update", "variants": variants}


def made_on() -> dict:
    """Where a measurement is made: the facts of :func:`harness.env.environment` that change kernels' rounding."""
    facts = env.environment("cpu")
    return {k: facts[k] for k in ("cpu", "cpu_capability", "torch")}


def machine_note(expected: dict) -> str:
    """A line for a failed check run elsewhere than the expected file was made ('' on the same kind of CPU)."""
    then, now = expected.get("made_on"), made_on()
    if not then:
        return "the expected file does not say on which CPU it was made"
    if (then.get("cpu_capability"), then.get("torch")) == (now["cpu_capability"], now["torch"]):
        return ""
    return (f"the expected values were made on {then.get('cpu')} ({then.get('cpu_capability')}, torch "
            f"{then.get('torch')}); this machine is {now['cpu']} ({now['cpu_capability']}, torch {now['torch']})")


def format_rows(rows: list[dict]) -> str:
    """The rows of :func:`compare` as a Markdown table (``moved``: better or worse, by the metric's direction)."""
    lines = ["| variant | what | expected | measured | moved |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['what']} | {r['expected']} | {r['measured']} | {r.get('moved', '-')} |"
              for r in rows]
    return "\n".join(lines)


app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@app.command()
def main(grid: str = typer.Option("ci", help="Grid name or file."),
         results: Optional[str] = typer.Option(None, help="Results store directory; only its runs computed by "
                                               "this checkout's code are reused, the others trained again and "
                                               "theirs kept in RESULTS/other-code/<fingerprint> [default: "
                                               "results/regression/<code fingerprint>, a store of its own]."),
         update: bool = typer.Option(False, help="Rewrite the expected-results file from this run."),
         tolerance_acc: Optional[float] = typer.Option(None, "--tolerance", help="With --update: the file's "
                                                       "accuracy tolerance in points [the old file's, else 3.0].")):
    try:
        g = G.load(grid)
        code = identity.code_fingerprint()
        typer.echo(f"measuring the code of this checkout (fingerprint {code})")
        measured = measure(g, ResultsStore(results or Path("results") / "regression" / code))
        path = expected_path(g.name)
        if update:
            old = json.loads(path.read_text()) if path.exists() else {}
            atomic_write_json(path, {**bless(measured, old, g.name, tolerance_acc), "code": code})
            typer.echo(f"wrote {path} from runs of code {code} (this checkout's)")
            return
    except HarnessError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if not path.is_file():
        typer.echo(f"error: {path}: no expected results for grid {g.name} (--update writes them from this run)",
                   err=True)
        raise typer.Exit(2)
    expected = json.loads(path.read_text())
    rows = compare(measured, expected)
    if rows:
        note = machine_note(expected)
        typer.echo("numbers moved outside tolerance:\n" + format_rows(rows) + (f"\n({note})" if note else ""))
        raise typer.Exit(1)
    typer.echo(f"{'the' if len(measured) == 1 else 'all'} {plural(len(measured), 'variant')} "
               f"match{'es' if len(measured) == 1 else ''} {path} (code {identity.code_fingerprint()})")


if __name__ == "__main__":
    app()
