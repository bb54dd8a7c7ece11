"""The run record (``record.json``), typed: what the runner writes and every reader reads.

The types are ``TypedDict``s, so a record is the same plain dict, written as the same JSON, as
before they existed (stored records stay readable; :data:`RECORD_VERSION` is unchanged); the
accessors below are how readers (the store's table, the report, the regression check, a student's
record of its teachers) reach into one, instead of string paths into nested dicts. A value a
record lacks (an older record, a metric that does not apply) reads as None.

Which metrics a split holds is :mod:`harness.evaluation.metrics`' registry; :func:`metric` reads one.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, TypedDict

from variants.tasks import MC_LOSSES, MULTIPLE_CHOICE, OPEN_ENDED

from harness.evaluation import metrics as M

#: the version of the record's layout, written into every record
RECORD_VERSION = 1


class SplitMetrics(TypedDict, total=False):
    """One split's metrics: what each registered metric computes (accuracy's ``overall``,
    ``per_type``, ``counts``, ``n``; ``recon_mse`` for a model that reconstructs its input...)."""

    overall: float
    per_type: dict[str, float]
    counts: dict[str, int]
    n: int
    recon_mse: float


class Metrics(TypedDict, total=False):
    """``test`` at the best-validation epoch, ``test_last`` at the last epoch; the ablations at the best."""

    selection: str
    best_epoch: int  # 0-based
    val: SplitMetrics
    test: SplitMetrics
    test_last: SplitMetrics
    ablations: dict[str, SplitMetrics]


class DataRef(TypedDict, total=False):
    """The data set a run trained on."""

    spec: str
    id: str
    name: str
    type_names: list[str]
    sizes: dict[str, int]
    streaming: bool


class TeacherRef(TypedDict):
    """A teacher run a student used."""

    variant: str
    run_id: str
    params: int
    test_acc: float


class Record(TypedDict, total=False):
    """A complete run's record (the fields the harness reads; a record may hold more)."""

    run_id: str
    status: str
    record_version: int
    variant: str
    variant_config: dict[str, Any]
    train_config: dict[str, Any]
    seed: int
    spec: dict[str, Any]
    data: DataRef
    metrics: Metrics
    epochs_run: int
    history: list[dict[str, Any]]
    train_time_s: float
    train_samples_per_s: float | None
    cost: dict[str, Any]
    teacher_runs: list[str]
    weights: dict[str, dict]
    teachers: list[TeacherRef]
    identity: dict[str, Any]
    code: dict[str, Any]
    environment: dict[str, Any]  # torch, threads, CPU model/ISA, TF32 flags, CUDA/cuDNN versions, determinism
    lstm_precision: str  # what the LSTMs computed in (bf16 on CUDA runs them in fp32/TF32)
    runs_sharing_device: int  # runs that trained on this device at once (local workers)
    params: dict[str, Any]
    git_commit: str | None
    torch_version: str
    clips: dict[str, int]
    python_version: str
    device: str
    device_name: str
    started_at: str
    finished_at: str
    host: str
    wall_time_s: float
    training_compute: dict[str, Any]


class TestMetricsSealed(RuntimeError):
    """Test metrics were read while they are sealed (a search selecting on validation accuracy): a bug
    in the reader, never a user error, so it is not a HarnessError and no command catches it."""


_SEALED: list[str] = []  # why test metrics are sealed now, innermost last (this process)


@contextmanager
def sealed_test(why: str) -> Iterator[None]:
    """Within the block, reading a test split (``test``, ``test_last``, an ablation) through these
    accessors raises TestMetricsSealed naming ``why``: what :mod:`harness.search.optimize` wraps its search in."""
    _SEALED.append(why)
    try:
        yield
    finally:
        _SEALED.pop()


def split_metrics(rec: Record, split: str) -> SplitMetrics:
    """A split's metrics (``val``, ``test``, ``test_last``, or an ablation's name); {} when absent.
    Any split but ``val`` is sealed within :func:`sealed_test`."""
    if _SEALED and split != "val":
        raise TestMetricsSealed(f"the {split!r} metrics of run {rec.get('run_id')} were read while sealed "
                                f"({_SEALED[-1]})")
    m = rec.get("metrics") or {}
    return (m.get(split) if split in m else (m.get("ablations") or {}).get(split)) or {}


def metric(rec: Record, split: str = "test", name: str = M.PRIMARY) -> float | None:
    """A registered metric's value on a split (default: test accuracy at the best-validation epoch)."""
    return split_metrics(rec, split).get(M.METRICS[name].key)


def test_figure(rec: Record) -> str:
    """The run's test figure in its task's metric, for a line of text: ``test acc 45.20``, ``test MSE 2.860``."""
    m = M.task_metric(task(rec))
    return f"{m.title} {m.fmt(metric(rec, 'test', m.name))}"


def per_type(rec: Record, split: str = "test", name: str = M.PRIMARY) -> dict[str, float]:
    """A metric's per-question-type breakdown on a split ({} when it has none)."""
    key = M.METRICS[name].per_type
    return dict(split_metrics(rec, split).get(key) or {}) if key else {}


def task(rec: Record) -> str:
    """The task the run's model answers (variants.tasks; open-ended for records before tasks)."""
    return (((rec.get("variant_config") or {}).get("model") or {}).get("task")) or OPEN_ENDED


def mc_loss(rec: Record) -> str | None:
    """The multiple-choice loss a multiple-choice run trained with (``mc_loss``, :data:`variants.tasks.MC_LOSSES`):
    its config's, or ``ce`` for a record from before the setting (cross entropy was the only one); None for a run of
    another task."""
    if task(rec) != MULTIPLE_CHOICE:
        return None
    return (((rec.get("variant_config") or {}).get("loss") or {}).get("mc_loss")) or "ce"


def task_loss(rec: Record) -> str:
    """What the run's task loss was, in words (``HCRN's summed max-margin hinge (mc_loss = hinge)``)."""
    name = mc_loss(rec)
    if name is not None:
        return f"{MC_LOSSES[name][2] if name in MC_LOSSES else 'unknown'} (mc_loss = {name})"
    return "mean squared error to the count" if task(rec) == "count" else "cross entropy over the answers"


def best_epoch(rec: Record) -> int | None:
    """The best-validation epoch, 0-based."""
    return (rec.get("metrics") or {}).get("best_epoch")


def data_id(rec: Record) -> str | None:
    """The id of the data set the run trained on."""
    return (rec.get("data") or {}).get("id")


def data_name(rec: Record) -> str | None:
    """The data set's name, else its id."""
    d = rec.get("data") or {}
    return d.get("name") or d.get("id")


def data_field(rec: Record, key: str):
    """A field of the record's data set (``name``, ``spec``...), None when not recorded."""
    return (rec.get("data") or {}).get(key)


def type_names(rec: Record) -> list[str]:
    """The data set's question types, in its order."""
    return list((rec.get("data") or {}).get("type_names") or [])


def data_spec(rec: Record) -> str | None:
    """The data spec the run was given (a path, or ``synthetic:NAME``)."""
    return (rec.get("data") or {}).get("spec")


def split_sizes(rec: Record) -> dict[str, int]:
    """Questions per split of the run's data set ({} when not recorded)."""
    return dict((rec.get("data") or {}).get("sizes") or {})


def params_total(rec: Record) -> int | None:
    """The model's parameter count."""
    return (rec.get("params") or {}).get("total")


def cost(rec: Record, key: str) -> Any:
    """A field of the record's ``cost`` (FLOPs, MACs, memory...; latency once attached)."""
    return (rec.get("cost") or {}).get(key)


def teacher_variants(rec: Record) -> list[str]:
    """The variants of the teacher runs the student used (else those its config names)."""
    refs = rec.get("teachers") or [{"variant": v} for v in (rec.get("variant_config") or {}).get("teachers", [])]
    return [t["variant"] for t in refs]


def teacher_ref(rec: Record) -> TeacherRef:
    """What a student's record says of a teacher run it used. Its test accuracy is copied into the
    record as written outside a search (records do not depend on who trains them), so this one read
    passes a seal: it is written, never compared or selected on."""
    m = (rec.get("metrics") or {}).get("test") or {}
    return TeacherRef(variant=rec["variant"], run_id=rec["run_id"], params=params_total(rec),
                      test_acc=m.get(M.METRICS[M.PRIMARY].key))
