"""The report's "Modality reduction" section (TeachText's question: how much of the two-stream accuracy
does a student that reads one stream recover, and at what cost?).

Each one-modality run group (``variants.modality``: its config has a ``modality``) is set beside its
two-stream reference: the group on the same data set trained the same way with both streams, i.e. a
``dualvgr`` group of the same width and depth with the same teachers and distillation losses
(``student`` for ``modality-appearance``, ``student-similarity`` for ``modality-appearance-kd``). The
section gives both accuracies, the fraction recovered (100 x one-stream / two-stream, overall and per
question type, means over seeds) and the costs side by side: parameters, FLOPs per question and CPU
latency as the runs' records measured them. Registered in :data:`harness.report.sections.SECTIONS`
after "Accuracy against cost"; a data set without a one-modality group, or without its reference, has
no such section (or says which reference is missing)."""
from __future__ import annotations

import variants

from harness.report.fmt import fixed, md_table
from harness.report.grouping import Group
from harness.report.sections import SECTIONS, Context

#: what a two-stream reference must share with a one-modality group (model settings)
SAME_MODEL = ("module_dim", "graph_layers", "unit_layers", "task")


def modality(g: Group) -> str | None:
    """The one stream a group's model reads, None for a model of both (or none)."""
    return ((g.runs[0].get("variant_config") or {}).get("model") or {}).get("modality")


def _training(g: Group) -> tuple:
    cfg = g.runs[0].get("variant_config") or {}
    model = cfg.get("model") or {}
    return (tuple(model.get(k) for k in SAME_MODEL), tuple(cfg.get("teachers") or ()),
            tuple(sorted(d.get("name", "") for d in cfg.get("distill") or ())))


def two_stream_reference(g: Group, groups: list[Group]) -> Group | None:
    """The two-stream ``dualvgr`` group trained as ``g`` is (see the module docstring), a student of the zoo
    first (``student`` before ``dualvgr``, which is trained the same way), or None."""
    want = _training(g)
    found = [o for o in groups if (o.runs[0].get("variant_config") or {}).get("arch") == "dualvgr"
             and _training(o) == want]
    return min(found, key=lambda o: (_family(o.variant) != "student", groups.index(o)), default=None)


def _family(variant: str) -> str | None:
    return variants.VARIANTS.get(variant).family if variant in variants.VARIANTS else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return 100.0 * a / b if a is not None and b else None


def _cost(row: dict, key: str, scale: float = 1.0) -> str:
    v = row.get(key)
    return "-" if v is None else f"{v * scale:,.3g}" if key != "params" else f"{int(v):,}"


def _pair(one: dict, two: dict, key: str) -> str:
    """``one / two (x ratio)`` of a cost column."""
    a, b = one.get(key), two.get(key)
    ratio = f" ({a / b:.2f}x)" if a is not None and b else ""
    return f"{_cost(one, key)} / {_cost(two, key)}{ratio}"


def modality_section(ctx: Context) -> list[str]:
    """One row per one-modality group: reads, reference, accuracies, recovered %, per type, costs."""
    rows_of = {g.label: r for g, r in ctx.pairs()}
    ones = [g for g in ctx.groups if modality(g)]
    if not ones:
        return []
    rows, per_type, missing = [], [], []
    for g in ones:
        ref = two_stream_reference(g, ctx.groups)
        if ref is None:
            missing.append(g.label)
            continue
        one, two = rows_of[g.label], rows_of[ref.label]
        rows.append([g.label, modality(g), ref.label, fixed(one["test_acc_mean"]), fixed(two["test_acc_mean"]),
                     fixed(_ratio(one["test_acc_mean"], two["test_acc_mean"]), 1) if two["test_acc_mean"] else "-",
                     f"n={len(g.runs)} / n={len(ref.runs)}", _pair(one, two, "params"), _pair(one, two, "gflops"),
                     _pair(one, two, "latency_ms")])
        per_type.append([g.label] + [fixed(_ratio(one.get(f"test_acc_{t}"), two.get(f"test_acc_{t}")), 1)
                                     for t in ctx.types])
    lines = ["Students that read one feature stream (TeachText's modality reduction: `variants/modality.py`; the "
             "other stream is never read from disk, computed or counted in FLOPs) beside the two-stream model "
             "trained the same way (same width, depth, teachers and distillation losses). Recovered = 100 x "
             "one-stream test accuracy / two-stream test accuracy (means over seeds); costs one-stream / "
             "two-stream (ratio), as the runs' records measured them (FLOPs of one eval forward per question, "
             "CPU latency median).", ""]
    if rows:
        lines += md_table(["one-stream variant", "reads", "two-stream reference", "test acc", "reference acc",
                           "recovered %", "seeds", "params", "GFLOPs", "latency ms"], rows,
                          right={3, 4, 5}) + [""]
        lines += ["Recovered % per question type:", ""]
        lines += md_table(["one-stream variant"] + ctx.types, per_type, right=set(range(1, 1 + len(ctx.types))))
        lines += [""]
    if missing:
        lines += [f"No two-stream reference on this data set for {', '.join(missing)} (a `dualvgr` variant of the "
                  "same width and depth with the same teachers and distillation losses: `student` for the "
                  "labels-only students, `student-similarity` for the distilled ones).", ""]
    return lines


SECTIONS.insert(next(i for i, (t, _) in enumerate(SECTIONS) if t == "Accuracy against cost") + 1,
                ("Modality reduction: one stream against two", modality_section))
