"""The metrics a run records, registered: one :class:`Metric` per metric, in :data:`METRICS`.

A metric declares its name, how it is computed from an evaluation's predictions (and the model's
scalar outputs it asks for), whether higher is better, how it is formatted, which statistics apply
to it, and what the regression check and the report say of it. Everything that handles metrics
iterates this registry: the evaluation (:func:`harness.evaluation.evaluate.evaluate`, so the runner's record),
the store's table (:meth:`harness.runs.store.ResultsStore.to_frame`), ``ablate.py results``, the report's
main table, notes and CSV (:mod:`harness.report`) and the regression check
(:mod:`harness.execution.regression`). A new metric is one :func:`register` call::

    register(Metric(name="err", key="err", title="test err", higher_is_better=False,
                    compute=lambda ev: {"err": 100.0 - 100.0 * ev.correct.mean()}, fmt=fixed(2),
                    statistics=(BOOTSTRAP,), tolerance=3.0))

The first metric registered, accuracy (``acc``), is the primary one: the report's intervals,
deltas and significance tests are of it (they need per-question values, which the run's
``predictions_test.csv`` gives for accuracy). The others are shown beside it as means over seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import variants
from variants.tasks import COUNT, NO_COUNT, OPEN_ENDED

from harness.errors import HarnessError

#: the statistics a metric can declare: the two-level bootstrap of harness.stats, McNemar's exact test
BOOTSTRAP, MCNEMAR = "bootstrap", "mcnemar"
#: the splits a record's ``metrics`` holds a value of every metric for (``test`` at the best-validation epoch)
SPLITS = ("val", "test", "test_last")
#: the primary metric: the report's intervals, deltas and significance tests are of it
PRIMARY = "acc"


@dataclass(frozen=True)
class Evaluated:
    """What evaluating a model on one split gives a metric to compute from."""

    pred: np.ndarray  # (N,) predicted answer indices
    answers: np.ndarray  # (N,) true answer indices
    qtypes: np.ndarray  # (N,) question-type indices into type_names
    type_names: list[str]
    outputs: dict[str, float]  # the split's mean of each scalar model output a metric asks for (Metric.outputs)
    task: str = OPEN_ENDED  # what was asked (variants.tasks): a metric may apply to some tasks only

    @property
    def correct(self) -> np.ndarray:
        """(N,) bools: whether each question was answered correctly."""
        return np.asarray(self.pred) == np.asarray(self.answers)


def _always(record: dict) -> bool:
    """Every run should have the metric."""
    return True


@dataclass(frozen=True)
class Metric:
    """One metric. ``name``: its column stem (``test_<name>`` in the store's table and the regression
    check, ``<name>`` in the report's CSV for a metric other than the primary one); ``key``: its key
    in a split's metrics of a record; ``compute``: the entries it adds to a split's metrics (``{}``
    when it does not apply, e.g. no such model output); ``outputs``: the scalar model outputs it
    needs, averaged over the split's questions; ``statistics``: which of :data:`BOOTSTRAP`,
    :data:`MCNEMAR` apply; ``tolerance``: the regression check's default tolerance (None: not
    checked), ``digits``: the decimals its mean is rounded to there; ``applies``: whether a record's
    run should have it (its variant config); ``note`` / ``absent_note``: the report's note when it
    is shown / when runs it applies to lack it (``{labels}``: those rows); ``per_type``: the key of
    its per-question-type breakdown in a split's metrics, if any."""

    name: str
    key: str
    title: str
    compute: Callable[[Evaluated], dict]
    higher_is_better: bool
    fmt: Callable[[float | None], str]
    statistics: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    tolerance: float | None = None
    digits: int | None = None
    applies: Callable[[dict], bool] = _always
    note: str = ""
    absent_note: str = ""
    per_type: str | None = None

    def __post_init__(self):
        """Reject statistics that do not exist or do not apply."""
        unknown = set(self.statistics) - {BOOTSTRAP, MCNEMAR}
        if unknown:
            raise ValueError(f"metric {self.name!r}: unknown statistics {sorted(unknown)} "
                             f"(known: {BOOTSTRAP}, {MCNEMAR})")
        if MCNEMAR in self.statistics and self.name != PRIMARY:
            raise ValueError(f"metric {self.name!r}: McNemar's test runs on per-question right/wrong answers, which "
                             f"a run keeps (predictions_test.csv) for the primary metric {PRIMARY!r} only")


#: name -> metric, in registration order (the first is the primary metric)
METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric to the registry (a name or record key already taken is an error)."""
    if metric.name in METRICS or any(m.key == metric.key for m in METRICS.values()):
        raise ValueError(f"metric {metric.name!r} (record key {metric.key!r}) is already registered")
    METRICS[metric.name] = metric
    return metric


def primary() -> Metric:
    """The primary metric (accuracy): the one with intervals, deltas and significance tests."""
    return METRICS[PRIMARY]


def secondary() -> list[Metric]:
    """Every registered metric but the primary one, in registration order."""
    return [m for m in METRICS.values() if m.name != PRIMARY]


def compute_all(ev: Evaluated) -> dict:
    """A split's metrics, as a record stores them: every registered metric's entries."""
    out: dict = {}
    for m in METRICS.values():
        out.update(m.compute(ev))
    return out


def needed_outputs() -> set[str]:
    """The scalar model outputs some registered metric needs."""
    return {o for m in METRICS.values() for o in m.outputs}


def task_metric(task: str) -> Metric:
    """The metric that ranks runs of ``task`` and selects their epoch (``Task.metric``)."""
    return METRICS[variants.task(task).metric]


def selection_score(task: str, split_metrics: dict) -> float:
    """A split's value of ``task``'s metric, oriented so that higher is better (the runner keeps the
    epoch with the highest: the best validation accuracy, the lowest validation MSE of a count)."""
    m = task_metric(task)
    value = float(split_metrics[m.key])
    return value if m.higher_is_better else -value


def fixed(nd: int = 2) -> Callable[[float | None], str]:
    """A formatter: ``nd`` decimals, ``-`` for a missing value."""
    return lambda x: "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def significant(n: int = 4) -> Callable[[float | None], str]:
    """A formatter: ``n`` significant digits, ``-`` for a missing value."""
    return lambda x: "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{n}g}"


def accuracy_by_type(correct, qtypes, type_names: list[str]) -> dict:
    """``correct``: (N,) bools; ``qtypes``: (N,) indices into ``type_names``.

    Returns ``{"overall": acc, "per_type": {name: acc}, "counts": {name: n}, "n": N}`` with
    accuracies in percent; types with no question are left out (not reported as 0).
    """
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    qtypes = np.asarray(qtypes, dtype=np.int64).reshape(-1)
    if correct.shape != qtypes.shape:
        raise ValueError(f"correct has {correct.shape[0]} entries, qtypes {qtypes.shape[0]}")
    n = int(correct.shape[0])
    out = {"overall": float(100.0 * correct.mean()) if n else float("nan"), "per_type": {},
           "counts": {}, "n": n}
    for i, name in enumerate(type_names):
        sel = qtypes == i
        k = int(sel.sum())
        if k:
            out["per_type"][name] = float(100.0 * correct[sel].mean())
            out["counts"][name] = k
    return out


class NonFiniteCount(HarnessError, ValueError):
    """Count predictions read from non-finite outputs (:data:`variants.tasks.NO_COUNT`): no MSE averages them."""


def squared_error_by_type(pred, answers, qtypes, type_names: list[str]) -> dict:
    """A count's squared errors: ``{"mse": mean, "mse_per_type": {name: mean}}`` (types with no
    question left out), HCRN's figure: the rounded, clamped prediction against the true count. A
    prediction read from a NaN or infinite output (``NO_COUNT``) has no error to average: refused
    (:class:`NonFiniteCount`, naming how many and the first question)."""
    pred = np.asarray(pred).reshape(-1)
    bad = np.flatnonzero(pred == NO_COUNT)
    if bad.size:
        raise NonFiniteCount(f"{bad.size} of {pred.size} count outputs are not finite (NaN or Inf; the first at "
                             f"question {int(bad[0])} of the split): they have no count, and an MSE over them "
                             f"would be meaningless; the model diverged or its weights are damaged")
    err = (pred.astype(np.float64) - np.asarray(answers, dtype=np.float64)) ** 2
    qtypes = np.asarray(qtypes, dtype=np.int64).reshape(-1)
    per = {name: float(err[qtypes == i].mean()) for i, name in enumerate(type_names) if (qtypes == i).any()}
    return {"mse": float(err.mean()) if err.size else float("nan"), "mse_per_type": per}


def _count_task(record: dict) -> bool:
    """Whether a run answers count questions (its model's task)."""
    return (((record.get("variant_config") or {}).get("model") or {}).get("task")) == COUNT


def _recon(ev: Evaluated) -> dict:
    """The reconstruction error, for a model that gives one."""
    return {"recon_mse": ev.outputs["recon_loss"]} if "recon_loss" in ev.outputs else {}


def _reconstructs(record: dict) -> bool:
    """Whether a run's model reconstructs its input (an autoencoder: decoders in its config)."""
    return (((record.get("variant_config") or {}).get("model") or {}).get("decoder_hidden") or 0) > 0


register(Metric(
    name=PRIMARY, key="overall", title="test acc", higher_is_better=True, fmt=fixed(2), per_type="per_type",
    compute=lambda ev: accuracy_by_type(ev.correct, ev.qtypes, ev.type_names),
    statistics=(BOOTSTRAP, MCNEMAR), tolerance=3.0, digits=2))
register(Metric(
    name="recon_mse", key="recon_mse", title="recon MSE", higher_is_better=False, fmt=significant(4),
    compute=_recon, outputs=("recon_loss",), statistics=(BOOTSTRAP,), applies=_reconstructs,
    note="recon MSE: the test-set reconstruction error of autoencoder variants (`metrics.test.recon_mse`, mean "
         "over seeds).",
    absent_note="autoencoder variants ({labels}) have no reconstruction error in their records."))
register(Metric(
    name="mse", key="mse", title="test MSE", higher_is_better=False, fmt=fixed(3), per_type="mse_per_type",
    compute=lambda ev: squared_error_by_type(ev.pred, ev.answers, ev.qtypes, ev.type_names) if ev.task == COUNT else {},
    statistics=(BOOTSTRAP,), applies=_count_task, tolerance=1.0, digits=3,
    note="test MSE: a count's mean squared error (HCRN: the prediction rounded and clamped to 1-10; lower is "
         "better), mean over seeds; the count section gives its intervals and paired tests.",
    absent_note="count runs ({labels}) have no MSE in their records."))
