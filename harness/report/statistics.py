"""Statistics glue of the report: each run's test predictions, the accuracy cells and comparisons
of a data set (the arithmetic is :mod:`harness.stats`'), the main table's rows (numbers, also the
CSV's) and the Pareto front."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.evaluation import metrics as M
from harness.runs import record as R
from harness import stats as S
from harness.stats import Bootstrap, Estimate
from harness.runs.store import ResultsStore
from harness.report.grouping import Group, mean_or_none, mean_std, type_groups

#: optional ``record["cost"]`` fields shown in the main table: field -> (column, CSV column, scale)
COST_COLUMNS = {"flops_per_sample": ("GFLOPs", "gflops", 1e-9),
                "latency_ms_median": ("latency ms", "latency_ms", 1.0),
                "peak_mem_mib_train": ("train mem MiB", "peak_mem_train_mib", 1.0),
                "peak_mem_mib_infer": ("infer mem MiB", "peak_mem_infer_mib", 1.0),
                # the training bill (harness.measurement.bill): the run's own, and the total to produce the model (a
                # student's includes its teachers' training, once per teacher run, and the teacher caches)
                "train_gflops_own": ("train GFLOPs own", "train_gflops_own", 1.0),
                "train_gflops_total": ("train GFLOPs total", "train_gflops_total", 1.0),
                "train_device_s_total": ("train device-s total", "train_device_s_total", 1.0)}

ALPHA = 0.05
CORRECTION = "Holm-Bonferroni"



class Predictions:
    """Per-run test predictions (question_id -> correct at the best-validation epoch, and the
    question's type), cached."""

    def __init__(self, store: ResultsStore):
        self.store, self.cache = store, {}

    def __call__(self, run_id: str) -> pd.DataFrame | None:
        if run_id not in self.cache:
            path = self.store.run_dir(run_id) / "predictions_test.csv"
            df = None
            if path.is_file():
                raw = pd.read_csv(path)
                if "correct_best" in raw:
                    ok = raw["correct_best"].astype(str).str.lower().isin(["true", "1", "1.0"])
                else:
                    ok = raw["pred_best"] == raw["answer"]
                df = pd.DataFrame({"correct": ok.to_numpy(bool),
                                   "qtype": raw["qtype"].astype(str).to_numpy() if "qtype" in raw else "?"},
                                  index=raw["question_id"].astype(str).to_numpy())
                # a count's squared error (HCRN's MSE; meaningless but harmless for other tasks)
                df["sqerr"] = ((raw["pred_best"].astype(float) - raw["answer"].astype(float)) ** 2).to_numpy()
                df = df[~df.index.duplicated()].sort_index()
            self.cache[run_id] = df
        return self.cache[run_id]


@dataclass
class Comparison:
    """One variant against a reference: runs paired by seed, statistics from harness.stats."""

    label: str
    seeds: list
    delta: Estimate | None = None  # points, variant - reference, with p
    p_holm: float | None = None
    mcnemar: list[tuple] = field(default_factory=list)  # (seed, b, c, p)
    why: str | None = None  # why there is no comparison, or what was left out


@dataclass
class SectionStats:
    """A data set's statistics: per group label and cell (``all``, a question type) the accuracy
    estimate, and per reference name the comparisons of every other group with it."""

    boot: Bootstrap
    cells: dict[str, dict[str, Estimate | None]]
    comparisons: dict[str, list[Comparison]]
    missing: list[str]  # runs without usable predictions (left out of the statistics)


#: the per-question values a data set's statistics are of: its task metric -> (predictions column, table)
VALUES = {"acc": ("correct", S.CorrectTable), "mse": ("sqerr", S.ValueTable)}


def correct_table(preds, run_ids: list[str], types: list[str], boot: Bootstrap,
                  metric: str = M.PRIMARY) -> tuple[S.CorrectTable, list[str]]:
    """The runs' correct answers (a count's squared errors: ``metric`` mse) aligned on the test
    questions (those most runs have; a run with other questions or no predictions is left out and
    listed), as a CorrectTable (ValueTable) with a cell per question type that has questions, and ``all``."""
    have = {r: f for r in run_ids if (f := preds(r)) is not None}
    sets: dict[tuple, list[str]] = {}
    for r, f in have.items():
        sets.setdefault(tuple(f.index), []).append(r)
    usable = {r: have[r] for r in max(sets.values(), key=len)} if sets else {}
    missing = [r for r in run_ids if r not in usable]
    ref = next(iter(usable.values()), None)
    cells = {"all": np.ones(0 if ref is None else len(ref), bool)}
    if ref is not None:
        cells.update({t: m for t in types if (m := (ref["qtype"] == t).to_numpy()).any()})
        cells.update({g: ref["qtype"].isin(members).to_numpy() for g, members in type_groups(types).items()})
    column, table = VALUES[metric]
    return table({r: f[column].to_numpy() for r, f in usable.items()}, cells, boot), missing


def _compare(table: S.CorrectTable, g: Group, ref: Group) -> Comparison:
    """A group against a reference, its runs paired by seed (those with usable predictions)."""
    ref_by_seed = {r["seed"]: r for r in ref.runs}
    pairs = [(r, ref_by_seed[r["seed"]]) for r in g.runs if r["seed"] in ref_by_seed]
    if not pairs:
        return Comparison(g.label, [], why=f"no shared seeds ({g.label}: {', '.join(map(str, g.seeds))}; "
                                           f"{ref.label}: {', '.join(map(str, ref.seeds))})")
    lost = [x["run_id"] for pr in pairs for x in pr if x["run_id"] not in table]
    pairs = [(a, b) for a, b in pairs if a["run_id"] in table and b["run_id"] in table]
    why = ("predictions missing or on other questions for " + ", ".join(f"`{m}`" for m in lost)) if lost else None
    if not pairs:
        return Comparison(g.label, [], why=why)
    ids, ref_ids = [a["run_id"] for a, _ in pairs], [b["run_id"] for _, b in pairs]
    seeds = [a["seed"] for a, _ in pairs]
    mc = [(s, *t) for s, t in zip(seeds, table.mcnemar(ids, ref_ids))]
    return Comparison(g.label, seeds, table.compare(ids, ref_ids), mcnemar=mc,
                      why=why and why + " (those seeds left out)")


def section_stats(preds, groups: list[Group], types: list[str], refs: dict[str, Group | None],
                  boot: Bootstrap, metric: str = M.PRIMARY) -> SectionStats:
    """Every cell of ``metric`` (accuracy; a count's MSE) of every group, and every group against
    each reference (Holm across the comparisons of one reference)."""
    table, missing = correct_table(preds, [r["run_id"] for g in groups for r in g.runs], types, boot, metric)
    cells: dict[str, dict[str, Estimate | None]] = {}
    for g in groups:
        ids = [r["run_id"] for r in g.runs]
        ok = bool(ids) and all(i in table for i in ids)
        cells[g.label] = {c: table.estimate(ids, c) if ok and c in table.cells else None
                          for c in ["all", *types, *type_groups(types)]}
    comparisons: dict[str, list[Comparison]] = {}
    for name, ref in refs.items():
        if ref is None:
            continue
        comps = [_compare(table, g, ref) for g in groups if g is not ref]
        adjusted = S.holm([c.delta.p if c.delta else None for c in comps])
        for c, p in zip(comps, adjusted):
            c.p_holm = p
        comparisons[name] = comps
    return SectionStats(boot, cells, comparisons, missing)


@dataclass
class CompressedRow:
    """One group's runs evaluated by one compression method (:mod:`harness.compression.compress`), each paired
    with the same run in fp32: ``pairs`` (fp32 record, compressed record) by seed, the compressed
    accuracy (``acc``) and the paired comparison with fp32 (``cmp``: same questions, same seeds)."""

    group: Group
    method: str
    pairs: list[tuple[dict, dict]]
    acc: Estimate | None = None
    cmp: Comparison | None = None


def compressed_rows(preds, groups: list[Group], types: list[str], boot: Bootstrap,
                    metric: str = M.PRIMARY) -> list[CompressedRow]:
    """Every (group, method) with compressed evaluations (``record["compressed"]``, attached by the
    writer), its estimate of ``metric`` (accuracy; a count's MSE) and its comparison with fp32 (Holm
    across the rows; McNemar's test for accuracy only)."""
    from harness.compression.compress import key

    rows = [CompressedRow(g, m, [(r, r["compressed"][m]) for r in g.runs if m in r.get("compressed", {})])
            for g in groups for m in dict.fromkeys(m for r in g.runs for m in r.get("compressed", {}))]
    ids = [i for row in rows for r, _ in row.pairs for i in (r["run_id"], key(r["run_id"], row.method))]
    table, _ = correct_table(preds, list(dict.fromkeys(ids)), types, boot, metric)
    for row in rows:
        ok = [(r["run_id"], key(r["run_id"], row.method), r["seed"]) for r, _ in row.pairs
              if r["run_id"] in table and key(r["run_id"], row.method) in table]
        label = f"{row.group.label} {row.method}"
        if not ok:
            row.cmp = Comparison(label, [], why="predictions missing or on other questions")
            continue
        fp32, comp, seeds = (list(x) for x in zip(*ok))
        row.acc = table.estimate(comp)
        row.cmp = Comparison(label, seeds, table.compare(comp, fp32),
                             mcnemar=[(s, *t) for s, t in zip(seeds, table.mcnemar(comp, fp32))],
                             why=None if len(ok) == len(row.pairs) else "some seeds without predictions left out")
    for row, p in zip(rows, S.holm([r.cmp.delta.p if r.cmp.delta else None for r in rows])):
        row.cmp.p_holm = p
    return rows


def summarize(g: Group, base: Group | None, ctrl: Group | None, types: list[str],
              cells: dict[str, Estimate | None] | None = None) -> dict:
    """One main-table row (numbers, not strings): also the CSV row. ``cells``: the group's
    estimates from :func:`section_stats` (intervals), if computed. The primary metric (accuracy)
    with its spread, interval and deltas; every other registered metric as its mean over seeds."""
    m, s = mean_std(g.acc())
    row = {"data_name": R.data_field(g.runs[0], "name"), "data_id": g.data_id, "variant": g.variant,
           "label": g.label, "category": g.category}
    params = g.values(R.params_total)
    row["params"] = int(round(float(np.mean(params)))) if params else None
    for key, (_, col, scale) in COST_COLUMNS.items():
        v = mean_or_none(g.values(lambda r, key=key: R.cost(r, key)))
        row[col] = v * scale if v is not None else None
    row.update({"test_acc_mean": m, "test_acc_std": s, "n_seeds": len(g.runs),
                "seeds": ";".join(str(x) for x in g.seeds), "seeds_missing": ";".join(map(str, g.missing_seeds))})
    est = (cells or {}).get("all")
    row.update({"test_acc_ci_lo": est and est.lo, "test_acc_ci_hi": est and est.hi,
                "ci_covers_seeds": est.seed_level if est else None})
    bm = mean_or_none(base.acc()) if base is not None else None
    cm = mean_or_none(ctrl.acc()) if ctrl is not None else None
    row["delta_baseline"] = m - bm if m is not None and bm is not None else None
    row["delta_control"] = m - cm if m is not None and cm is not None else None
    row["teachers"] = ",".join(dict.fromkeys(t for r in g.runs for t in R.teacher_variants(r)))
    for metric in M.secondary():
        row[metric.name] = mean_or_none(g.metric(metric.name))
    for t in types:
        row[f"test_acc_{t}"] = mean_or_none(g.values(lambda r, t=t: R.per_type(r).get(t)))
    row["run_ids"] = ";".join(r["run_id"] for r in g.runs)
    return row


def comparison_columns(row: dict, stats: SectionStats, label: str) -> None:
    """Add each reference's comparison (interval, p, Holm p) of group ``label`` to a CSV row."""
    for name, key in (("baseline", "baseline"), ("control", "control")):
        c = next((c for c in stats.comparisons.get(name, []) if c.label == label), None)
        d = c.delta if c else None
        row.update({f"delta_{key}_ci_lo": d and d.lo, f"delta_{key}_ci_hi": d and d.hi, f"p_{key}": d and d.p,
                    f"p_{key}_holm": c.p_holm if c else None})




def pareto_front(costs: list[float | None], accs: list[float | None]) -> list[bool]:
    """For each point, whether it is on the Pareto front (max accuracy, min cost): no other point
    has a cost <= and an accuracy >= with one of them strict. Points without a cost are not."""
    ok = [c is not None and a is not None and not (math.isnan(c) or math.isnan(a)) for c, a in zip(costs, accs)]
    out = []
    for i, (ci, ai) in enumerate(zip(costs, accs)):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[j] and costs[j] <= ci and accs[j] >= ai and (costs[j] < ci or accs[j] > ai)
                        for j in range(len(costs)) if j != i)
        out.append(not dominated)
    return out
