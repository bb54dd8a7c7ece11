"""Markdown comparison reports from the results store.

``write_report(store, name)`` writes ``reports/NAME.md`` (the report), ``reports/NAME.csv`` (its
main table, one row per variant and data set) and the plots it embeds under ``reports/NAME_files/``.

Runs are grouped by data set and variant: the runs of one group differ only in their seed (runs
of one variant with different settings, e.g. ``--set module_dim=128``, form separate groups whose
labels name the settings that differ). A group's category is the baseline, the control (the
un-distilled student), or its variant's family from the zoo's tags (``variants.zoo.FAMILIES``).
Accuracies are the test accuracy at the best-validation epoch, in percent: mean over seeds,
sample standard deviation (ddof=1; none for one seed) and a 95% interval. Intervals, p-values and
the per-seed McNemar tests come from :mod:`harness.stats` (a two-level bootstrap over seeds and
test questions, Holm-Bonferroni across the comparisons of a table); this module only gathers the
runs' predictions and renders.

The output depends only on the records (and predictions) it covers and on the bootstrap's seed
and size (named in the header), except the header's ``generated`` line, so a report can be
regenerated and diffed.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import variants
from variants.zoo import FAMILIES
from variants.dualvgr import kept_clips

from . import bill, costs, identity
from . import stats as S
from .env import NUMERIC_ENVIRONMENT
from .evaluate import ABLATIONS
from .stats import Bootstrap, Estimate
from .store import ResultsStore, atomic_write_bytes

#: evaluation-time ablations and their column titles: harness.evaluate.ABLATIONS
#: optional ``record["cost"]`` fields shown in the main table: field -> (column, CSV column, scale)
COST_COLUMNS = {"flops_per_sample": ("GFLOPs", "gflops", 1e-9),
                "latency_ms_median": ("latency ms", "latency_ms", 1.0),
                "peak_mem_mib_train": ("train mem MiB", "peak_mem_train_mib", 1.0),
                "peak_mem_mib_infer": ("infer mem MiB", "peak_mem_infer_mib", 1.0),
                # the training bill (harness.bill): the run's own, and the total to produce the model (a
                # student's includes its teachers' training, once per teacher run, and the teacher caches)
                "train_gflops_own": ("train GFLOPs own", "train_gflops_own", 1.0),
                "train_gflops_total": ("train GFLOPs total", "train_gflops_total", 1.0),
                "train_device_s_total": ("train device-s total", "train_device_s_total", 1.0)}
#: row order: the baseline, the control, then the zoo's families (the baseline family's other members first)
CATEGORIES = ("baseline", "control", *(f for f in FAMILIES if f != "baseline"), "other")
ALPHA = 0.05
CORRECTION = "Holm-Bonferroni"
#: marks an interval or p-value that covers the test questions only (fewer than stats.MIN_SEEDS seeds)
QUESTIONS_ONLY = "†"


# ---------------------------------------------------------------------------------------------
# grouping


@dataclass
class Group:
    """The runs of one variant (one configuration) on one data set, one run per seed."""

    data_id: str
    variant: str
    label: str
    category: str
    runs: list[dict]  # sorted by seed
    superseded: list[str] = field(default_factory=list)  # same-seed duplicates left out
    settings: dict = field(default_factory=dict)  # the configuration, flattened (see _flat)
    missing_seeds: list = field(default_factory=list)  # seeds the grid plans for this configuration, not complete

    @property
    def seeds(self) -> list:
        return [r["seed"] for r in self.runs]

    def values(self, get) -> list[float]:
        out = []
        for r in self.runs:
            try:
                v = get(r)
            except (KeyError, TypeError, IndexError):
                v = None
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out.append(float(v))
        return out

    def acc(self, split: str = "test") -> list[float]:
        return self.values(lambda r: r["metrics"][split]["overall"])


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); the std is None for fewer than two values
    (it is not defined, which is not the same as 0)."""
    if not values:
        return None, None
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _fingerprint(r: dict) -> dict:
    """Everything that defines a run except its seed (and the teachers' run ids, which follow
    from their config and the seed); the free-text description is left out."""
    vc = {k: v for k, v in (r.get("variant_config") or {}).items() if k != "description"}
    return {"variant_config": vc, "train": r.get("train_config") or {}}


def _flat(fp: dict) -> dict:
    out = {}
    vc, train = fp["variant_config"], fp["train"]
    for k, v in (vc.get("model") or {}).items():
        out[k] = v
    for k, v in (vc.get("loss") or {}).items():
        out[f"loss.{k}"] = v
    for d in vc.get("distill") or []:  # one key per loss parameter, as --set names it: similarity.matrix
        known = variants.loss_params(d["name"]) if d["name"] in variants.LOSSES else {}
        out.update({f"{d['name']}.weight": d.get("weight", 1.0),
                    **{f"{d['name']}.{k}": v for k, v in {**known, **(d.get("params") or {})}.items()}})
    for k in sorted(set(vc) - {"model", "loss", "name", "distill"}):
        out[k] = json.dumps(vc[k], sort_keys=True)
    for k, v in train.items():
        out[f"train.{k}"] = v
    return out


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _differing(flats: list[dict]) -> list[str]:
    """The settings whose values are not the same in every configuration."""
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if any(not _same(f.get(k), flats[0].get(k)) for f in flats[1:])]


def _family(variant: str) -> str | None:
    return variants.VARIANTS.get(variant).family if variant in variants.VARIANTS else None


def _category(variant: str, cfg: dict, baseline: str, control: str, used_as_teacher: set) -> str:
    if variant == baseline:
        return "baseline"
    if variant == control:
        return "control"
    if variant in used_as_teacher:
        return "teacher"
    family = _family(variant)
    if family in CATEGORIES:
        return family
    # a variant no longer registered: its record still says whether it was distilled
    return "student" if cfg.get("teachers") or cfg.get("distill") else "other"


def _labels(by_key: dict, fps: dict) -> dict:
    """A label per (data, variant, config): the variant's name, plus the settings that differ
    when the variant ran with several configurations on the data set."""
    configs: dict[tuple, list[str]] = {}
    for d, v, fkey in by_key:
        configs.setdefault((d, v), []).append(fkey)
    labels = {}
    for (d, v), fkeys in configs.items():
        fkeys.sort()
        if len(fkeys) == 1:
            labels[(d, v, fkeys[0])] = v
            continue
        flats = [_flat(fps[k]) for k in fkeys]
        diff = _differing(flats)
        for fkey, f in zip(fkeys, flats):
            parts = [f"{k}={f.get(k)}" for k in diff[:4]] + ([f"+{len(diff) - 4} more"] if len(diff) > 4 else [])
            labels[(d, v, fkey)] = f"{v} [{', '.join(parts)}]"
    return labels


def _keep_latest(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """One run per seed (the latest finished), sorted by seed; and the run ids left out."""
    by_seed: dict = {}
    for r in sorted(runs, key=lambda r: (r.get("finished_at") or "", r["run_id"])):
        by_seed.setdefault(r["seed"], []).append(r)
    kept = [rs[-1] for rs in by_seed.values()]
    kept.sort(key=lambda r: (r["seed"] if isinstance(r["seed"], (int, float)) else math.inf, str(r["seed"])))
    return kept, sorted(r["run_id"] for rs in by_seed.values() for r in rs[:-1])


def _clips_label(fp: dict) -> str:
    """' (2 of 4 clips)' for a node-sparse configuration: keep_ratio is rounded to whole clips."""
    model = fp["variant_config"].get("model", {})
    ratio, n = model.get("keep_ratio", 1.0), model.get("num_clips")
    return f" ({kept_clips(ratio, n)} of {n} clips)" if ratio < 1.0 and n else ""


def group_runs(records: list[dict], baseline: str = "dualvgr", control: str = "student") -> dict[str, list[Group]]:
    """``{data_id: [Group, ...]}``, groups in report order (:data:`CATEGORIES`, alphabetically
    within each); data sets by name then id."""
    used_as_teacher = {t["variant"] for r in records for t in r.get("teachers", [])}
    by_key: dict[tuple, list[dict]] = {}
    fps: dict[str, dict] = {}
    for r in records:
        fp = _fingerprint(r)
        fkey = json.dumps(fp, sort_keys=True, default=str)
        fps[fkey] = fp
        by_key.setdefault((r["data"]["id"], r["variant"], fkey), []).append(r)
    labels = _labels(by_key, fps)
    groups: dict[str, list[Group]] = {}
    for (d, v, fkey), runs in by_key.items():
        kept, superseded = _keep_latest(runs)
        cat = _category(v, fps[fkey]["variant_config"], baseline, control, used_as_teacher)
        groups.setdefault(d, []).append(Group(d, v, labels[(d, v, fkey)] + _clips_label(fps[fkey]), cat, kept,
                                              superseded, _flat(fps[fkey])))
    for d in groups:
        groups[d].sort(key=lambda g: (CATEGORIES.index(g.category), g.variant, g.label))
    names = {r["data"]["id"]: r["data"].get("name") or r["data"]["id"] for r in records}
    return {d: groups[d] for d in sorted(groups, key=lambda d: (names[d], d))}


def reference(groups: list[Group], variant: str) -> Group | None:
    """The group a variant name refers to. When the variant ran with several configurations: the
    one with the registered defaults in every setting that differs between them (a grid's
    ``[axes]``), else the one with the most runs (the first of ties)."""
    cands = [g for g in groups if g.variant == variant]
    if len(cands) > 1 and variant in variants.VARIANTS:
        default = _flat({"variant_config": variants.get_config(variant).to_dict(), "train": {}})
        diff = [k for k in _differing([g.settings for g in cands]) if not k.startswith("train.")]
        match = [g for g in cands if all(_same(g.settings.get(k), default.get(k)) for k in diff)]
        if len(match) == 1:
            return match[0]
    return max(cands, key=lambda g: len(g.runs)) if cands else None


def type_names(groups: list[Group]) -> list[str]:
    """Question types in the data set's order, those with test questions only."""
    names: list[str] = []
    for g in groups:
        for r in g.runs:
            for t in r["data"].get("type_names", []):
                if t not in names:
                    names.append(t)
    present = {t for g in groups for r in g.runs for t in r["metrics"]["test"].get("per_type", {})}
    return [t for t in names if t in present] + sorted(present - set(names))


# ---------------------------------------------------------------------------------------------
# predictions and statistics (the arithmetic is harness.stats')


class _Predictions:
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


def correct_table(preds, run_ids: list[str], types: list[str], boot: Bootstrap) -> tuple[S.CorrectTable, list[str]]:
    """The runs' correct answers aligned on the test questions (those most runs have; a run with
    other questions or no predictions is left out and listed), as a CorrectTable with a cell per
    question type that has questions, and ``all``."""
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
    return S.CorrectTable({r: f["correct"].to_numpy() for r, f in usable.items()}, cells, boot), missing


def _compare(table: S.CorrectTable, g: Group, ref: Group) -> Comparison:
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
                  boot: Bootstrap) -> SectionStats:
    """Every accuracy cell of every group, and every group against each reference (Holm across
    the comparisons of one reference)."""
    table, missing = correct_table(preds, [r["run_id"] for g in groups for r in g.runs], types, boot)
    cells: dict[str, dict[str, Estimate | None]] = {}
    for g in groups:
        ids = [r["run_id"] for r in g.runs]
        ok = bool(ids) and all(i in table for i in ids)
        cells[g.label] = {c: table.estimate(ids, c) if ok and c in table.cells else None for c in ["all", *types]}
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


def summarize(g: Group, base: Group | None, ctrl: Group | None, types: list[str],
              cells: dict[str, Estimate | None] | None = None) -> dict:
    """One main-table row (numbers, not strings): also the CSV row. ``cells``: the group's
    estimates from :func:`section_stats` (intervals), if computed."""
    m, s = mean_std(g.acc())
    row = {"data_name": g.runs[0]["data"].get("name"), "data_id": g.data_id, "variant": g.variant,
           "label": g.label, "category": g.category}
    params = g.values(lambda r: r["params"]["total"])
    row["params"] = int(round(float(np.mean(params)))) if params else None
    for key, (_, col, scale) in COST_COLUMNS.items():
        v = _mean(g.values(lambda r, key=key: (r.get("cost") or {}).get(key)))
        row[col] = v * scale if v is not None else None
    row.update({"test_acc_mean": m, "test_acc_std": s, "n_seeds": len(g.runs),
                "seeds": ";".join(str(x) for x in g.seeds), "seeds_missing": ";".join(map(str, g.missing_seeds))})
    est = (cells or {}).get("all")
    row.update({"test_acc_ci_lo": est and est.lo, "test_acc_ci_hi": est and est.hi,
                "ci_covers_seeds": est.seed_level if est else None})
    bm = _mean(base.acc()) if base is not None else None
    cm = _mean(ctrl.acc()) if ctrl is not None else None
    row["delta_baseline"] = m - bm if m is not None and bm is not None else None
    row["delta_control"] = m - cm if m is not None and cm is not None else None
    teachers = []
    for r in g.runs:
        for t in r.get("teachers", []) or [{"variant": v} for v in r.get("variant_config", {}).get("teachers", [])]:
            if t["variant"] not in teachers:
                teachers.append(t["variant"])
    row["teachers"] = ",".join(teachers)
    row["recon_mse"] = _mean(g.values(lambda r: r["metrics"]["test"].get("recon_mse")))
    for t in types:
        row[f"test_acc_{t}"] = _mean(g.values(lambda r, t=t: r["metrics"]["test"]["per_type"].get(t)))
    row["run_ids"] = ";".join(r["run_id"] for r in g.runs)
    return row


def _comparison_columns(row: dict, stats: SectionStats, label: str) -> None:
    """Add each reference's comparison (interval, p, Holm p) of group ``label`` to a CSV row."""
    for name, key in (("baseline", "baseline"), ("control", "control")):
        c = next((c for c in stats.comparisons.get(name, []) if c.label == label), None)
        d = c.delta if c else None
        row.update({f"delta_{key}_ci_lo": d and d.lo, f"delta_{key}_ci_hi": d and d.hi, f"p_{key}": d and d.p,
                    f"p_{key}_holm": c.p_holm if c else None})


# ---------------------------------------------------------------------------------------------
# Pareto front


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


# ---------------------------------------------------------------------------------------------
# formatting


def _f(x, nd: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _g(x, sig: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{sig}g}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}"


def fmt_acc(mean: float | None, std: float | None) -> str:
    """``mean ± std``; the mean alone when the std is undefined (one seed)."""
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_ci(e: Estimate | None, sign: bool = False) -> str:
    """``[lo, hi]``, marked † when the interval covers the test questions only (few seeds)."""
    if e is None or e.lo is None:
        return "-"
    return f"[{_f(e.lo, 1, sign)}, {_f(e.hi, 1, sign)}]" + ("" if e.seed_level else QUESTIONS_ONLY)


def fmt_cell(e: Estimate | None, mean: float | None) -> str:
    """An accuracy cell: ``mean ± std [lo, hi]`` (the record's mean when there is no estimate)."""
    if e is None:
        return _f(mean)
    return f"{fmt_acc(e.mean, e.std)} {fmt_ci(e)}"


def _md_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    right = right if right is not None else set(range(1, len(headers)))
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "data"


def _uniq(values) -> list[str]:
    return sorted({str(v) for v in values if v not in (None, "")})


# ---------------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas directly: no pyplot, no global backend change)


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd"]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _label_layout(points: list[dict]) -> list[tuple[tuple[float, float], list[str], int]]:
    """One label per position (variants with the same cost and accuracy share it, joined by "="),
    and labels of points at the same cost and close accuracies (within 4% of the accuracy range)
    stacked downwards in order of accuracy so they do not overlap; a point further down starts
    its own stack."""
    merged: dict[tuple[float, float], list[str]] = {}
    for p in points:
        merged.setdefault((round(p["x"], 12), round(p["acc"], 6)), []).append(p["label"])
    accs = [acc for _, acc in merged]
    close = 0.04 * (max(accs) - min(accs)) if accs else 0.0
    out = []
    last: dict[float, tuple[float, int]] = {}  # x -> (accuracy of the previous label, its stack position)
    for (x, acc), labels in sorted(merged.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        prev = last.get(x)
        k = prev[1] + 1 if prev is not None and prev[0] - acc <= close else 0
        last[x] = (acc, k)
        out.append(((x, acc), labels, k))
    return out


def plot_cost(points: list[dict], xlabel: str, title: str) -> bytes:
    """Accuracy against a cost; ``points``: label, x, acc, std, front (bool), color."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for p in points:
        ax.errorbar(p["x"], p["acc"], yerr=p["std"] or 0.0, fmt="o", color=p["color"], capsize=3, ms=6)
    for (x, acc), labels, k in _label_layout(points):
        ax.annotate(" = ".join(labels), (x, acc), textcoords="offset points", xytext=(6, 4 - 9 * k), fontsize=7)
    front = sorted((p for p in points if p["front"]), key=lambda p: (p["x"], p["acc"]))
    if front:
        ax.step([p["x"] for p in front], [p["acc"] for p in front], where="post", color="black", ls="--",
                lw=1, alpha=0.6)
        ax.scatter([p["x"] for p in front], [p["acc"] for p in front], s=170, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="Pareto front", zorder=3)
        ax.legend(loc="best", fontsize=8)
    xs = [p["x"] for p in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 30:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_per_type(groups: list[Group], types: list[str], colors: dict, title: str) -> bytes:
    cols = types + ["all"]
    fig = Figure(figsize=(min(13.0, max(7.0, 1.0 + 0.2 * len(cols) * max(1, len(groups)))), 4.8))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(cols))
    for i, g in enumerate(groups):
        ms = [mean_std(g.values(lambda r, t=t: r["metrics"]["test"]["per_type"].get(t))) for t in types]
        ms.append(mean_std(g.acc()))
        means = [m if m is not None else 0.0 for m, _ in ms]
        stds = [s if s is not None else 0.0 for _, s in ms]
        ax.bar(x - 0.4 + (i + 0.5) * width, means, width, yerr=stds if any(stds) else None, capsize=2,
               color=colors[g.label],
               label=g.label, error_kw={"lw": 0.8})
    ax.set_xticks(x, cols)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_curves(groups: list[Group], colors: dict, title: str) -> bytes:
    return _png(curves_figure(groups, colors, title))


def curves_figure(groups: list[Group], colors: dict, title: str) -> Figure:
    """Validation accuracy per epoch, one line per group (mean over its seeds)."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for g in groups:
        per_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for i, h in enumerate(r.get("history", [])):
                if h.get("val_acc") is not None:
                    per_epoch.setdefault(int(h.get("epoch", i)), []).append(float(h["val_acc"]))
        if not per_epoch:
            continue
        ep = sorted(per_epoch)
        ax.plot([e + 1 for e in ep], [np.mean(per_epoch[e]) for e in ep], marker="." if len(ep) < 40 else None,
                color=colors[g.label], label=g.label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ticks at whole epochs (1-based, as `run` prints them)
    ax.set_ylabel("validation accuracy (%), mean over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ---------------------------------------------------------------------------------------------
# the report, one function per section


def _is_autoencoder(g: Group) -> bool:
    model = g.runs[0].get("variant_config", {}).get("model", {})
    return "autoencoder" in g.variant or (model.get("decoder_hidden") or 0) > 0


def _grid_file(grid_file) -> str:
    if not grid_file:
        return "-"
    p = Path(grid_file)
    try:  # a path relative to the working directory reads the same on every machine
        shown = p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = p
    return f"`{shown}`" + (f" (sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:12]})" if p.is_file() else "")


def _date_span(records: list[dict]) -> str:
    def key(s: str):
        try:
            return datetime.fromisoformat(s).astimezone(timezone.utc).isoformat()
        except ValueError:
            return s
    started = [r["started_at"] for r in records if r.get("started_at")]
    finished = [r["finished_at"] for r in records if r.get("finished_at")]
    return f"{min(started, key=key) if started else '-'} .. {max(finished, key=key) if finished else '-'}"


def _header(name: str, records: list[dict], missing: list[str], grid_file, baseline: str, control: str,
            superseded: list[str], boot: Bootstrap, command: str | None = None,
            partial: list[str] | None = None) -> list[str]:
    datasets = sorted({(r["data"].get("name") or r["data"]["id"], r["data"]["id"]) for r in records})
    runs = f"{len(records)} complete"
    if missing:
        runs = f"{len(records)} of {len(records) + len(missing)} complete"
        runs += f"; {len(missing)} requested but not complete, left out: " + ", ".join(missing)
    if superseded:
        runs += (f"; {len(superseded)} superseded by a later run of the same variant, settings and seed, "
                 "left out: " + ", ".join(f"`{m}`" for m in superseded))
    return [
        f"# {name}", "", f"Reports are regenerated by `{command or f'python ablate.py report --grid {name}'}`; "
                         f"do not edit.", "",
        *(partial or []),
        f"- generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- grid: `{name}`; grid file: {_grid_file(grid_file)}",
        "- data sets: " + (", ".join(f"{n} (`{i}`)" for n, i in datasets) or "-"),
        f"- runs: {runs}",
        f"- runs' dates: {_date_span(records)} (earliest start .. latest finish)",
        "- git commits: " + (", ".join(f"`{c}`" for c in _uniq(r.get("git_commit") for r in records)) or "-"),
        "- devices: " + (", ".join(_uniq(r.get("device_name") for r in records)) or "-"),
        "- torch: " + (", ".join(_uniq(r.get("torch_version") for r in records)) or "-"),
        *_code_lines(records),
        f"- baseline: `{baseline}`; control (the un-distilled student): `{control}`",
        f"- statistics: two-level bootstrap over seeds and test questions (`harness/stats.py`), "
        f"{boot.resamples} resamples, generator seed {boot.seed}, {boot.confidence:.0%} intervals; "
        f"{CORRECTION} across the comparisons of each table",
        "",
        "Accuracies are test accuracies (%) at the epoch with the best validation accuracy: mean ± sample "
        "standard deviation (ddof=1) over seeds (no ± for one seed) and a 95% interval [lo, hi] from the "
        "two-level bootstrap: test questions resampled (the same question ids for every run), the seed level "
        f"from Student's t with n - 1 degrees of freedom. With fewer than {S.MIN_SEEDS} seeds the seed variance "
        f"is not estimated: such intervals and p-values, marked {QUESTIONS_ONLY}, cover the sampling of the test "
        "questions only (they say whether these trained runs differ beyond the noise of the test set, not "
        "whether training again with other seeds would). Deltas are differences of means in percentage points. "
        "The list of runs behind every number is at the end.",
        "",
    ]


#: marks the runs of a report whose runs come from more than one code fingerprint
OTHER_CODE = "§"


def _several_codes(records: list[dict]) -> bool:
    return len({identity.code_of(r) for r in records}) > 1


def _code_lines(records: list[dict]) -> list[str]:
    """The code that computed the runs (``harness.identity`` fingerprints), and the environment facts
    that can change numbers (``harness.env.environment``) where the runs differ in them."""
    code = "- code: " + identity.describe_code(records)
    if _several_codes(records):
        code += (f"; **runs from more than one code fingerprint** (each run's code in the runs table, marked "
                 f"{OTHER_CODE}): differences between rows may come from the code")
    envs = [r.get("environment") or {} for r in records]
    differ = [k for k in NUMERIC_ENVIRONMENT if len({json.dumps(e.get(k), default=str) for e in envs}) > 1]
    if not differ and envs and envs[0]:
        env = "- environment: " + ", ".join(f"{k} {envs[0].get(k)}" for k in ("threads", "cpu", "cpu_capability")) \
            + ", the same for every run"
    elif not differ:
        env = "- environment: not recorded"
    else:
        env = "- environment differs between runs (can change numbers): " + "; ".join(
            f"{k}: " + ", ".join(_uniq(str(e.get(k, "not recorded")) for e in envs)) for k in differ)
    return [code, env]


def _main_table(groups, rows, base, ctrl, baseline, control, cells) -> list[str]:
    has_recon = any(r["recon_mse"] is not None for r in rows)
    headers = (["variant", "params"] + [c[0] for c in COST_COLUMNS.values()]
               + ["test acc", "95% CI", "n seeds", f"Δ {baseline}", f"Δ {control}"]
               + (["recon MSE"] if has_recon else []) + ["teachers"])
    table = []
    for g, r in zip(groups, rows):
        cells_ = [f"**{g.label}**" if g in (base, ctrl) else g.label,
                  f"{r['params']:,}" if r["params"] is not None else "-"]
        for _, col, _ in COST_COLUMNS.values():
            cells_.append(_g(r[col]) if "gflops" in col else _f(r[col], 3 if col == "latency_ms" else 1))
            if col == "latency_ms" and r[col] is not None and any(m["disturbed"] for m in _cost_measurements([g])):
                cells_[-1] += f" {DISTURBED}"
        cells_ += [fmt_acc(r["test_acc_mean"], r["test_acc_std"]), fmt_ci(cells[g.label]["all"]), _fmt_n(g),
                   "ref" if g is base else _f(r["delta_baseline"], sign=True),
                   "ref" if g is ctrl else _f(r["delta_control"], sign=True)]
        cells_ += [_g(r["recon_mse"])] if has_recon else []
        table.append(cells_ + [r["teachers"] or "-"])
    return _md_table(headers, table, right=set(range(1, len(headers) - 1))) + [""]


def _fmt_n(g: Group) -> str:
    if not g.missing_seeds:
        return f"n={len(g.runs)}"
    return (f"n={len(g.runs)} of {len(g.runs) + len(g.missing_seeds)} (seed{'s' if len(g.missing_seeds) > 1 else ''} "
            f"{', '.join(map(str, g.missing_seeds))} missing)")


#: marks a latency whose measurement was disturbed (p90 / median above harness.costs.SPREAD_FLAG)
DISTURBED = "‡"


def _cost_measurements(groups) -> list[dict]:
    """When, where and how steadily the groups' latency and inference memory were measured
    (``cost.measured`` of :func:`harness.costs.attach`), one entry per run that has one."""
    return [m for g in groups for r in g.runs if (m := (r.get("cost") or {}).get("measured"))]


def _cost_note(groups) -> list[str]:
    ms = _cost_measurements(groups)
    if not ms:
        return []
    at = sorted(m["at"] for m in ms)
    where = sorted({f"{m['device_name']} on host {m['host']}" for m in ms})
    spreads = [m["spread"] for m in ms if m["spread"] is not None]
    note = (f"latency and inference memory measured {at[0]}" + (f" .. {at[-1]}" if at[-1] != at[0] else "")
            + f" on {'; '.join(where)} ({max(m['reps'] for m in ms)} timed forwards each)")
    threads = sorted({m["threads"] for m in ms if m.get("threads") is not None})
    loads = [x for m in ms for x in (m.get("load_average") or []) if x is not None]
    if threads:
        note += f" with {', '.join(map(str, threads))} thread(s)"
    if loads:
        note += f", load average {min(loads):.2f} .. {max(loads):.2f} (other work on the machine)"
    if spreads:
        note += f"; p90/median {min(spreads):.2f} .. {max(spreads):.2f}"
    bad = sorted({g.label for g in groups if any(m["disturbed"] for m in _cost_measurements([g]))})
    if bad:
        note += (f"; {DISTURBED}: p90/median above {costs.SPREAD_FLAG} ({', '.join(bad)}): other work disturbed the "
                 f"timing; to measure again on an idle machine, delete its file in results/costs/ and run the grid "
                 f"again (complete runs are not retrained)")
    return [note + "."]


def _main_notes(groups, rows, base, ctrl, baseline, control, stats: SectionStats) -> list[str]:
    notes = []
    if base is None:
        notes.append(f"the baseline `{baseline}` has no run on this data set: no Δ {baseline}.")
    if ctrl is None:
        notes.append(f"the control `{control}` has no run on this data set: no Δ {control}.")
    if all(r[c[1]] is None for r in rows for k, c in COST_COLUMNS.items() if not k.startswith("train_")):
        notes.append("no record has cost measurements (`cost`: FLOPs, latency, peak memory): shown as -.")
    else:
        notes.append("GFLOPs: forward FLOPs per sample / 1e9; latency: median eval forward at batch 1, measured "
                     "once per architecture and device, alone, after training (harness.costs); memory: "
                     "peak during a training step / inference (mean over seeds; - where not measured).")
        notes += _cost_note(groups)
        notes.append("training cost (harness.bill): GFLOPs are counted (3 forwards per training sample: backward "
                     "as 2 forwards; one forward per validation question per epoch; a student's teacher forwards "
                     "or teacher-cache builds), device-seconds measured; 'total' is what it took to produce the "
                     "model: a student's own training plus each distinct teacher run's training, once, and the "
                     "cache builds.")
    few = [g.label for g in groups if len(g.runs) < S.MIN_SEEDS]
    if few:
        notes.append(f"n seeds < {S.MIN_SEEDS}: seed variance not estimated ({', '.join(few)}); their intervals "
                     f"({QUESTIONS_ONLY}) cover the test questions only.")
    if stats.missing:
        notes.append("runs without usable test predictions, left out of the intervals and tests: "
                     + ", ".join(f"`{m}`" for m in stats.missing) + ".")
    ae = [g.label for g in groups if _is_autoencoder(g)]
    if any(r["recon_mse"] is not None for r in rows):
        notes.append("recon MSE: the test-set reconstruction error of autoencoder variants "
                     "(`metrics.test.recon_mse`, mean over seeds).")
    elif ae:
        notes.append("autoencoder variants (" + ", ".join(ae) + ") have no reconstruction error in their records.")
    if any(g.label != g.variant for g in groups):
        notes.append("a variant run with several settings has one row per setting, labelled with the settings "
                     "that differ; the baseline and the control are the rows with the variant's registered settings.")
    return [f"Notes: {' '.join(notes)}", ""] if notes else []


def _per_type_table(groups, rows, types, cells) -> list[str]:
    lines = ["Test accuracy (%) per question type: mean ± std over seeds [95% interval]; the last row is the "
             "number of test questions.", ""]
    pt_rows = [[g.label] + [fmt_cell(cells[g.label].get(t), r[f"test_acc_{t}"]) for t in types]
               + [fmt_cell(cells[g.label].get("all"), r["test_acc_mean"])] for g, r in zip(groups, rows)]
    counts = groups[0].runs[0]["metrics"]["test"]
    pt_rows.append(["questions"] + [str(counts.get("counts", {}).get(t, "-")) for t in types]
                   + [str(counts.get("n", "-"))])
    return lines + _md_table(["variant"] + types + ["all"], pt_rows) + [""]


def _ablation_table(groups, rows) -> list[str]:
    lines = ["Test accuracy (%) when the model is evaluated with the videos shuffled across questions, the "
             "appearance features zeroed, or the motion features zeroed (mean over seeds).", ""]
    ab_rows = []
    for g, r in zip(groups, rows):
        cells = [g.label, _f(r["test_acc_mean"])]
        for key in ABLATIONS:
            cells.append(_f(_mean(g.values(lambda x, key=key: x["metrics"]["ablations"][key]["overall"]))))
        ab_rows.append(cells)
    return lines + _md_table(["variant", "test"] + list(ABLATIONS.values()), ab_rows) + [""]


def _fmt_mcnemar(mc: list[tuple]) -> str:
    return "; ".join(f"{seed}: {b}/{c}, p={fmt_p(p)}" for seed, b, c, p in mc) or "-"


def _significance_table(comps: list[Comparison]) -> list[str]:
    rows, notes = [], []
    for c in comps:
        if c.delta is None:
            rows.append([c.label, "-", "-", "-", "-", "-", "not paired"])
            notes.append(f"{c.label}: {c.why}")
            continue
        star = " *" if c.p_holm is not None and c.p_holm < ALPHA else ""
        mark = "" if c.delta.seed_level else QUESTIONS_ONLY
        rows.append([c.label, ", ".join(map(str, c.seeds)), _f(c.delta.mean, sign=True), fmt_ci(c.delta, sign=True),
                     fmt_p(c.delta.p) + mark, fmt_p(c.p_holm) + mark + star, _fmt_mcnemar(c.mcnemar)])
        if c.why:
            notes.append(f"{c.label}: {c.why}")
    lines = _md_table(["variant", "paired seeds", "Δ", "95% CI", "p", "p (Holm)", "McNemar per seed: b/c, p"],
                      rows, right={1, 2, 3, 4, 5}) + [""]
    return lines + (["Pairing impossible or partial: " + "; ".join(notes) + ".", ""] if notes else [])


def _significance(groups, refs: dict[str, Group | None], names: dict[str, str], stats: SectionStats) -> list[str]:
    b = stats.boot
    lines = [f"Each variant against the reference, runs paired seed by seed (the seeds both have) and questions by "
             f"question_id. Δ: mean over the paired seeds of the test-accuracy difference (points, variant - "
             f"reference). 95% CI and p: the two-level bootstrap ({b.resamples} resamples, seed {b.seed}) of the "
             f"paired difference; p is two-sided for Δ = 0 and never below {fmt_p(b.p_floor)}. p (Holm): "
             f"{CORRECTION} correction across all comparisons of the table (* below {ALPHA}). McNemar per seed: "
             "McNemar's exact two-sided test of each paired seed on its own (b: questions only the variant answers "
             "correctly, c: only the reference), not pooled over seeds and not corrected.", ""]
    for key, refname in names.items():
        ref = refs[key]
        shown = f" (runs of `{ref.label}`)" if ref is not None and ref.label != refname else ""
        lines += [f"Against `{refname}`{shown}:", ""]
        if ref is None:
            lines += [f"`{refname}` has no run on this data set: no comparison.", ""]
        elif len(groups) < 2:
            lines += ["no other variant.", ""]
        else:
            lines += _significance_table(stats.comparisons[key])
    return lines


def _cost_section(groups, rows, colors, files_dir: Path, suffix: str, dname: str, written: dict) -> list[str]:
    lines = []
    for key, (_, col, _) in COST_COLUMNS.items():
        if key not in ("flops_per_sample", "latency_ms_median", "train_gflops_total"):
            continue
        what = {"gflops": "GFLOPs per sample", "latency_ms": "latency (ms, batch 1)",
                "train_gflops_total": "training GFLOPs to produce the model"}[col]
        have = [(g, r) for g, r in zip(groups, rows) if r[col] is not None and r["test_acc_mean"] is not None]
        if not have:
            lines += [f"Accuracy against {what}: not plotted, no record has `cost.{key}`.", ""]
            continue
        front = pareto_front([r[col] for _, r in have], [r["test_acc_mean"] for _, r in have])
        pts = [{"label": g.label, "x": r[col], "acc": r["test_acc_mean"], "std": r["test_acc_std"], "front": f,
                "color": colors[g.label]} for (g, r), f in zip(have, front)]
        fname = f"acc_vs_{col}{suffix}.png"
        written[fname] = plot_cost(pts, what, f"{dname}: test accuracy against {what}")
        lines += [f"![accuracy against {what}]({quote(files_dir.name)}/{quote(fname)})", "",
                  f"Pareto front ({what}; max accuracy, min cost): "
                  + ", ".join(p["label"] for p in sorted(pts, key=lambda p: p["x"]) if p["front"]) + "."]
        left = [g.label for g, r in zip(groups, rows) if r[col] is None]
        if left:
            lines.append(f"Not plotted (no `cost.{key}`): " + ", ".join(left) + ".")
        lines.append("")
    return lines


def _plot_sections(groups, types, colors, files_dir: Path, suffix: str, dname: str, written: dict) -> list[str]:
    fname = f"per_type{suffix}.png"
    written[fname] = plot_per_type(groups, types, colors, f"{dname}: test accuracy per question type")
    lines = ["### Per-type accuracy (plot)", "", f"![accuracy per question type]({quote(files_dir.name)}/{quote(fname)})",
             ""]
    fname = f"training_curves{suffix}.png"
    written[fname] = plot_curves(groups, colors, f"{dname}: validation accuracy per epoch (mean over seeds)")
    return lines + ["### Training curves", "", f"![training curves]({quote(files_dir.name)}/{quote(fname)})", ""]


def _section(preds, files_dir: Path, data_id: str, groups: list[Group], baseline: str, control: str,
             multi: bool, written: dict[str, bytes], boot: Bootstrap) -> tuple[list[str], list[dict]]:
    """One data set: its tables, statistics and plots (plots go into ``written``)."""
    r0 = groups[0].runs[0]
    dname = r0["data"].get("name") or data_id
    sizes = r0["data"].get("sizes") or {}
    lines = [f"## Data set: {dname} (`{data_id}`)", ""]
    lines += ["Questions: " + ", ".join(f"{k} {v:,}" for k, v in sorted(sizes.items())) + ".", ""] if sizes else []
    types = type_names(groups)
    base, ctrl = reference(groups, baseline), reference(groups, control)
    refs = {"baseline": base, "control": ctrl}
    stats = section_stats(preds, groups, types, refs, boot)
    rows = [summarize(g, base, ctrl, types, stats.cells[g.label]) for g in groups]
    for g, row in zip(groups, rows):
        _comparison_columns(row, stats, g.label)
    colors = {g.label: _COLORS[i % len(_COLORS)] for i, g in enumerate(groups)}
    suffix = f"-{_slug(data_id)}" if multi else ""  # one set of plots per data set
    lines += ["### Main table", ""] + _main_table(groups, rows, base, ctrl, baseline, control, stats.cells)
    lines += _main_notes(groups, rows, base, ctrl, baseline, control, stats)
    lines += ["### Accuracy per question type", ""] + _per_type_table(groups, rows, types, stats.cells)
    lines += ["### Evaluation-time ablations", ""] + _ablation_table(groups, rows)
    lines += ["### Significance", ""] + _significance(groups, refs, {"baseline": baseline, "control": control}, stats)
    lines += ["### Accuracy against cost", ""] + _cost_section(groups, rows, colors, files_dir, suffix, dname, written)
    lines += _plot_sections(groups, types, colors, files_dir, suffix, dname, written)
    return lines, rows


def _runs_table(sections: dict[str, list[Group]]) -> list[str]:
    run_rows = []
    several = _several_codes([r for gs in sections.values() for g in gs for r in g.runs])
    for gs in sections.values():
        for g in gs:
            for r in g.runs:
                m = r["metrics"]
                mark = f" {OTHER_CODE} code `{identity.code_of(r) or 'unknown'}`" if several else ""
                run_rows.append([f"`{r['run_id']}`{mark}", g.label, r["data"].get("name") or r["data"]["id"], str(r["seed"]),
                                 _f(m["test"]["overall"]), _f(m["val"]["overall"]),
                                 f"{m['best_epoch'] + 1}/{r.get('epochs_run', len(r.get('history', [])))}",
                                 ",".join(r.get("teacher_runs", [])) or "-", str(r.get("device_name") or "-"),
                                 f"`{r.get('git_commit') or '-'}`", str(r.get("finished_at") or "-")])
    return ["## Runs", ""] + _md_table(["run", "variant", "data", "seed", "test acc", "val acc", "best epoch",
                                       "teacher runs", "device", "commit", "finished"], run_rows,
                                      right={3, 4, 5, 6}) + [""]


#: the main CSV's leading columns (per-type accuracies, intervals and tests follow)
CSV_COLUMNS = ["data_name", "data_id", "variant", "label", "category", "params", *(c[1] for c in COST_COLUMNS.values()),
               "test_acc_mean", "test_acc_std", "test_acc_ci_lo", "test_acc_ci_hi", "ci_covers_seeds", "n_seeds",
               "seeds", "seeds_missing", "delta_baseline", "delta_baseline_ci_lo", "delta_baseline_ci_hi", "p_baseline",
               "p_baseline_holm", "delta_control", "delta_control_ci_lo", "delta_control_ci_hi", "p_control",
               "p_control_holm", "teachers", "recon_mse"]


def mark_missing(sections: dict[str, list[Group]], planned: list[dict], missing: list[str]) -> list[str]:
    """Set each group's ``missing_seeds`` from the plans of the missing runs (a missing run belongs
    to the group holding a complete run of the same variant and label); return the header's
    partial-report lines: how many runs are missing, the configurations with no complete run and
    the seeds with none. No lines when nothing planned is missing."""
    by_id = {p["run_id"]: p for p in planned}
    lost = [by_id[m] for m in missing if m in by_id]
    if not lost:
        return []
    config_of = {p["run_id"]: (p["variant"], p["label"]) for p in planned}
    groups = {config_of[r["run_id"]]: g for gs in sections.values() for g in gs for r in g.runs
              if r["run_id"] in config_of}
    absent: dict[tuple, list] = {}
    for p in lost:
        g = groups.get((p["variant"], p["label"]))
        if g is not None:
            g.missing_seeds = sorted({*g.missing_seeds, p["seed"]}, key=str)
        else:
            absent.setdefault((p["variant"], p["label"]), []).append(p["seed"])
    done_seeds = {p["seed"] for p in planned if p["run_id"] not in set(missing)}
    no_seed = sorted({p["seed"] for p in lost} - done_seeds, key=str)
    lines = [f"**Partial report: {len(lost)} of the {len(planned)} planned runs are not complete** (run the grid "
             f"again to finish them; complete runs are not redone)."]
    if absent:
        lines.append(f"- configurations with no complete run ({len(absent)}, not in any table): " + ", ".join(
            f"`{label}` (seeds {', '.join(map(str, seeds))})" for (_, label), seeds in absent.items()))
    short = [g for gs in sections.values() for g in gs if g.missing_seeds]
    if short:
        lines.append(f"- rows missing seeds ({len(short)}; their n says which): " + ", ".join(
            f"`{g.label}`" for g in short))
    if no_seed:
        lines.append(f"- seeds with no complete run at all: {', '.join(map(str, no_seed))}")
    return lines + [""]


def _write_outputs(out_dir: Path, name: str, files_dir: Path, written: dict, rows: list[dict], lines: list[str]) -> Path:
    """Plots first, then the table, then the Markdown that links them (each atomically)."""
    for fname, data in sorted(written.items()):
        atomic_write_bytes(files_dir / fname, data)
    if files_dir.is_dir():
        for old in files_dir.glob("*.png"):
            if old.name not in written:
                old.unlink()
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in CSV_COLUMNS]
    df = df.reindex(columns=CSV_COLUMNS + extra) if len(df) else pd.DataFrame(columns=CSV_COLUMNS)
    atomic_write_bytes(out_dir / f"{name}.csv", df.to_csv(index=False).encode())
    md = out_dir / f"{name}.md"
    atomic_write_bytes(md, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return md


def _missing(store: ResultsStore, run_id: str) -> str:
    """A requested run that is not complete, for the header: its id, and why when it failed."""
    failure = store.read_failure(run_id)
    reason = str(failure.get("reason", "?")).splitlines()[0][:300] if failure else None
    return f"`{run_id}`" + (f" (failed: {reason})" if reason else "")


def write_report(store: ResultsStore, name: str, run_ids: list[str] | None = None, out_dir: str | Path = "reports",
                 baseline: str = "dualvgr", control: str = "student", grid_file: str | None = None,
                 boot: Bootstrap | None = None, command: str | None = None,
                 planned: list[dict] | None = None) -> Path:
    """Write ``out_dir/NAME.md``, ``out_dir/NAME.csv`` (the main table, one row per variant and data
    set) and the plots in ``out_dir/NAME_files/``; returns the Markdown's path. ``run_ids=None``:
    every complete run in the store; requested runs that are not complete are listed and left out.
    ``boot``: the bootstrap's size and seed (default: harness.stats'). ``command``: the command that
    regenerates the report, as the header shows it (default: ``python ablate.py report --grid NAME``).
    A requested run that failed is listed with the reason its ``failed.json`` gives. ``planned``: what
    each requested run is (``{"run_id", "variant", "label", "seed"}``, e.g. from a grid's plans): then
    a report missing some of them says so in its header (the configurations and seeds with no complete
    run) and in each row that lacks seeds."""
    out_dir, boot = Path(out_dir), boot or Bootstrap()
    if run_ids is None:
        records = list(store.iter_records())
        missing: list[str] = []
    else:
        ids = list(dict.fromkeys(run_ids))
        missing = [r for r in ids if not store.is_complete(r)]
        records = [store.read_record(r) for r in ids if store.is_complete(r)]
    records.sort(key=lambda r: r["run_id"])
    records = costs.attach(store, records)  # latency / inference memory measured alone, never during training
    for r in records:  # the training bill: the run's own, and the total with its teachers
        r["cost"].update(bill.bill_row(bill.training_bill(store, r)))
    sections = group_runs(records, baseline, control)
    superseded = sorted(x for gs in sections.values() for g in gs for x in g.superseded)
    kept = sorted((r for gs in sections.values() for g in gs for r in g.runs), key=lambda r: r["run_id"])
    files_dir = out_dir / f"{name}_files"
    partial = mark_missing(sections, planned or [], missing)
    lines = _header(name, kept, [_missing(store, r) for r in missing], grid_file, baseline, control, superseded,
                    boot, command, partial)
    preds, written, all_rows = _Predictions(store), {}, []
    if not sections:
        lines += ["No complete run.", ""]
    for data_id, groups in sections.items():
        sec, rows = _section(preds, files_dir, data_id, groups, baseline, control, len(sections) > 1, written, boot)
        lines += sec
        all_rows += rows
    lines += _runs_table(sections)
    return _write_outputs(out_dir, name, files_dir, written, all_rows, lines)


# ---------------------------------------------------------------------------------------------
# two sets of runs of the same variants: fp32 against bf16, before against after a change


def _pairs(sides: dict, key) -> tuple[list[str], list[str], list]:
    """Run ids of side a and side b paired by seed for one (data, variant label), and the seeds."""
    a = {r["seed"]: r["run_id"] for r in sides["a"][key].runs}
    b = {r["seed"]: r["run_id"] for r in sides["b"][key].runs}
    seeds = [s for s in a if s in b]
    return [a[s] for s in seeds], [b[s] for s in seeds], seeds


def _compare_row(table: S.CorrectTable, variant: str, data: str, ids_a, ids_b, seeds, name_a, name_b) -> dict:
    d = table.compare(ids_b, ids_a)
    acc_a, acc_b = table.estimate(ids_a), table.estimate(ids_b)
    return {"variant": variant, "data": data, "pairs": len(seeds), "seeds": list(seeds), f"acc_{name_a}": acc_a.mean,
            f"acc_{name_b}": acc_b.mean, "delta_mean": d.mean, "delta_std": d.std, "ci_lo": d.lo, "ci_hi": d.hi,
            "ci_covers_seeds": d.seed_level, "p": d.p,
            "mcnemar": [(s, *t) for s, t in zip(seeds, table.mcnemar(ids_b, ids_a))]}


def compare_runs(store: ResultsStore, ids_a: list[str], ids_b: list[str], name_a: str = "A",
                 name_b: str = "B", boot: Bootstrap | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Pair the runs of two sets by data set, variant label and seed, and compare their test
    accuracy: one row per variant (means over the paired seeds; the paired difference B - A with
    its two-level bootstrap interval and p-value; McNemar's exact test per paired seed) and a row
    ``all`` per data set taking every pair as a unit; Holm-Bonferroni across the rows. Returns the
    table and the Markdown."""
    boot, sides, devices = boot or Bootstrap(), {}, set()
    for side, ids in (("a", ids_a), ("b", ids_b)):
        recs = [store.read_record(r) for r in dict.fromkeys(ids) if store.is_complete(r)]
        devices |= {f"{r.get('device_name') or r.get('device') or '?'}, torch {r.get('torch_version', '?')}" for r in recs}
        sides[side] = {(d, g.label): g for d, gs in group_runs(recs).items() for g in gs}
    preds, rows = _Predictions(store), []
    unpaired = _unpaired(sides, name_a, name_b)
    for data in dict.fromkeys(d for d, _ in sides["a"]):
        keys = [k for k in sides["a"] if k[0] == data and k in sides["b"]]
        paired = {k: _pairs(sides, k) for k in keys}
        table, _ = correct_table(preds, [i for a, b, _ in paired.values() for i in a + b], [], boot)
        pooled: list[list] = [[], [], []]
        first = len(rows)
        for (d, label), (a, b, seeds) in paired.items():
            keep = [(x, y, s) for x, y, s in zip(a, b, seeds) if x in table and y in table]
            unpaired += [f"`{label}` seed {s}: predictions missing or on other questions"
                         for x, y, s in zip(a, b, seeds) if x not in table or y not in table]
            if keep:
                a, b, seeds = (list(v) for v in zip(*keep))
                rows.append(_compare_row(table, label, d, a, b, seeds, name_a, name_b))
                for acc, v in zip(pooled, (a, b, [f"{label}/{s}" for s in seeds])):
                    acc += v
        if len(rows) - first > 1:  # several variants: every pair of the data set as one unit
            rows.append(_compare_row(table, "all", data, *pooled, name_a, name_b))
    for r, p in zip(rows, S.holm([r["p"] for r in rows])):
        r["p_holm"] = p
    md = _compare_markdown(rows, name_a, name_b, devices, boot)
    return pd.DataFrame(rows), md + (["", f"Not compared ({len(unpaired)}): " + "; ".join(unpaired) + "."]
                                     if unpaired else [])


def _unpaired(sides: dict, name_a: str, name_b: str) -> list[str]:
    """What one set has and the other lacks (a variant, or some of a variant's seeds): left out of
    the comparison, and said so."""
    out = []
    for side, other, name, other_name in (("a", "b", name_a, name_b), ("b", "a", name_b, name_a)):
        for key, g in sides[side].items():
            if key not in sides[other]:
                out.append(f"`{g.label}` only in {name} (seeds {', '.join(map(str, g.seeds))})")
                continue
            lone = [s for s in g.seeds if s not in sides[other][key].seeds]
            if lone:
                out.append(f"`{g.label}` seed{'s' if len(lone) > 1 else ''} {', '.join(map(str, lone))} only in {name}")
    return out


def _paired_seeds(row: dict) -> str:
    """The "paired seeds" cell: the seeds, as in the report's significance table; for the pooled
    ``all`` row (its pairs are variant/seed units), how many pairs it takes."""
    if all(isinstance(s, int) for s in row["seeds"]):
        return ", ".join(map(str, row["seeds"]))
    return f"{row['pairs']} pairs (the rows above)"


def _compare_markdown(rows: list[dict], name_a: str, name_b: str, devices: set, boot: Bootstrap) -> list[str]:
    md = _md_table(["variant", "paired seeds", f"{name_a} acc", f"{name_b} acc", f"Δ ({name_b} - {name_a})",
                    "Δ std", "95% CI", "p", "p (Holm)", "McNemar per seed: b/c, p"],
                   [[r["variant"], _paired_seeds(r), _f(r[f"acc_{name_a}"]), _f(r[f"acc_{name_b}"]),
                     _f(r["delta_mean"], sign=True), _f(r["delta_std"]),
                     fmt_ci(Estimate(r["delta_mean"], r["delta_std"], r["ci_lo"], r["ci_hi"], r["p"], r["pairs"],
                                     r["ci_covers_seeds"]), sign=True),
                     fmt_p(r["p"]), fmt_p(r["p_holm"]) + (" *" if r["p_holm"] < ALPHA else ""), _fmt_mcnemar(r["mcnemar"])]
                    for r in rows], right={1, 2, 3, 4, 5, 6, 7, 8})
    return md + ["", f"Test accuracy (%) at the best-validation epoch, means over the seeds both sets have. Δ: the "
                     f"paired difference {name_b} - {name_a} (mean and sample std over the paired seeds); 95% CI and p: "
                     f"the two-level bootstrap of `harness/stats.py` ({boot.resamples} resamples, seed {boot.seed}; "
                     f"test questions resampled with the same ids for both sets, the seed level from Student's t); "
                     f"{QUESTIONS_ONLY}: fewer than {S.MIN_SEEDS} paired seeds, the interval covers the test "
                     f"questions only. `all`: every paired run of the data set as one unit (variants and seeds). "
                     f"p (Holm): {CORRECTION} across the rows (* below {ALPHA}). McNemar per seed: each paired seed's "
                     f"exact test on its own (b: questions {name_b} answers correctly and {name_a} does not, c the "
                     "reverse), not pooled, not corrected.",
               "", "Devices: " + "; ".join(sorted(devices)) + "."]
