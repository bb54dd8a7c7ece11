"""Markdown comparison reports from the results store.

``write_report(store, name)`` writes ``reports/NAME.md`` (the report), ``reports/NAME.csv`` (its
main table, one row per variant and data set) and the plots it embeds under ``reports/NAME_files/``.

Runs are grouped by data set and variant: the runs of one group differ only in their seed (runs
of one variant with different settings, e.g. ``--set module_dim=128``, form separate groups whose
labels name the settings that differ). Accuracies are the test accuracy at the best-validation
epoch, in percent, averaged over seeds (sample standard deviation, ddof=1). Significance is
McNemar's exact test on per-question predictions, pairing runs seed by seed.

The output depends only on the records (and predictions) it covers, except the header's
``generated`` line, so a report can be regenerated and diffed.
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
from scipy.stats import binomtest

from .store import ResultsStore, atomic_write_bytes

#: evaluation-time ablations (harness.runner.ABLATIONS) and their column titles
ABLATIONS = {"shuffle_video": "videos shuffled", "zero_appearance": "appearance zeroed",
             "zero_motion": "motion zeroed"}
#: optional ``record["cost"]`` fields shown in the main table: field -> (column, CSV column, scale)
COST_COLUMNS = {"flops_per_sample": ("GFLOPs", "gflops", 1e-9),
                "latency_ms_median": ("latency ms", "latency_ms", 1.0),
                "peak_mem_mib_train": ("train mem MiB", "peak_mem_train_mib", 1.0),
                "peak_mem_mib_infer": ("infer mem MiB", "peak_mem_infer_mib", 1.0)}
TEST_NAME = "McNemar's exact test"
CATEGORIES = ("baseline", "control", "teacher", "student", "other")
ALPHA = 0.05


# ---------------------------------------------------------------------------------------------
# grouping and summary statistics


@dataclass
class Group:
    """The runs of one variant (one configuration) on one data set, one run per seed."""

    data_id: str
    variant: str
    label: str
    category: str
    runs: list[dict]  # sorted by seed
    superseded: list[str] = field(default_factory=list)  # same-seed duplicates left out

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
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if not values:
        return None, None
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


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
    for k in sorted(set(vc) - {"model", "loss", "name"}):
        out[k] = json.dumps(vc[k], sort_keys=True)
    for k, v in train.items():
        out[f"train.{k}"] = v
    return out


def _category(variant: str, cfg: dict, baseline: str, control: str, used_as_teacher: set) -> str:
    if variant == baseline:
        return "baseline"
    if variant == control:
        return "control"
    if variant.startswith("teacher") or variant in used_as_teacher:
        return "teacher"
    if variant.startswith("student") or cfg.get("teachers") or cfg.get("distill"):
        return "student"
    return "other"


def group_runs(records: list[dict], baseline: str = "dualvgr", control: str = "student") -> dict[str, list[Group]]:
    """``{data_id: [Group, ...]}``, groups in report order: baseline, control, teachers, students,
    others (alphabetically within each); data sets by name then id."""
    used_as_teacher = {t["variant"] for r in records for t in r.get("teachers", [])}
    by_key: dict[tuple, list[dict]] = {}
    fps: dict[str, dict] = {}
    for r in records:
        fp = _fingerprint(r)
        fkey = json.dumps(fp, sort_keys=True, default=str)
        fps[fkey] = fp
        by_key.setdefault((r["data"]["id"], r["variant"], fkey), []).append(r)
    # label the configurations of a variant that has several by the settings that differ
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
        keys = sorted({k for f in flats for k in f})
        diff = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
        for fkey, f in zip(fkeys, flats):
            parts = [f"{k}={f.get(k)}" for k in diff[:4]] + ([f"+{len(diff) - 4} more"] if len(diff) > 4 else [])
            labels[(d, v, fkey)] = f"{v} [{', '.join(parts)}]"
    groups: dict[str, list[Group]] = {}
    for (d, v, fkey), runs in by_key.items():
        by_seed: dict = {}
        for r in sorted(runs, key=lambda r: (r.get("finished_at") or "", r["run_id"])):
            by_seed.setdefault(r["seed"], []).append(r)  # the latest finished run of a seed is kept
        kept = [rs[-1] for _, rs in sorted(by_seed.items(), key=lambda kv: str(kv[0]))]
        kept.sort(key=lambda r: (r["seed"] if isinstance(r["seed"], (int, float)) else math.inf, str(r["seed"])))
        superseded = sorted(r["run_id"] for rs in by_seed.values() for r in rs[:-1])
        cat = _category(v, fps[fkey]["variant_config"], baseline, control, used_as_teacher)
        groups.setdefault(d, []).append(Group(d, v, labels[(d, v, fkey)], cat, kept, superseded))
    for d in groups:
        groups[d].sort(key=lambda g: (CATEGORIES.index(g.category), g.variant, g.label))
    names = {r["data"]["id"]: r["data"].get("name") or r["data"]["id"] for r in records}
    return {d: groups[d] for d in sorted(groups, key=lambda d: (names[d], d))}


def reference(groups: list[Group], variant: str) -> Group | None:
    """The group a variant name refers to: the one with the most runs if it has several configs."""
    cands = [g for g in groups if g.variant == variant]
    return max(cands, key=lambda g: len(g.runs)) if cands else None  # max keeps the first of ties


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


def summarize(g: Group, base: Group | None, ctrl: Group | None, types: list[str]) -> dict:
    """One main-table row (numbers, not strings): also the CSV row."""
    m, s = mean_std(g.acc())
    row = {"data_name": g.runs[0]["data"].get("name"), "data_id": g.data_id, "variant": g.variant,
           "label": g.label, "category": g.category}
    params = g.values(lambda r: r["params"]["total"])
    row["params"] = int(round(float(np.mean(params)))) if params else None
    for key, (_, col, scale) in COST_COLUMNS.items():
        v = _mean(g.values(lambda r, key=key: (r.get("cost") or {}).get(key)))
        row[col] = v * scale if v is not None else None
    row.update({"test_acc_mean": m, "test_acc_std": s, "n_seeds": len(g.runs),
                "seeds": ";".join(str(x) for x in g.seeds)})
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


# ---------------------------------------------------------------------------------------------
# Pareto front and significance


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


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of min(b, c) in b + c at 1/2."""
    return float(binomtest(min(b, c), b + c, 0.5).pvalue) if b + c else 1.0


class _Predictions:
    """Per-run test predictions (question_id -> correct at the best-validation epoch), cached."""

    def __init__(self, store: ResultsStore):
        self.store, self.cache = store, {}

    def __call__(self, run_id: str) -> pd.Series | None:
        if run_id not in self.cache:
            path = self.store.run_dir(run_id) / "predictions_test.csv"
            s = None
            if path.is_file():
                df = pd.read_csv(path)
                if "correct_best" in df:
                    ok = df["correct_best"].astype(str).str.lower().isin(["true", "1", "1.0"])
                else:
                    ok = df["pred_best"] == df["answer"]
                s = pd.Series(ok.to_numpy(bool), index=df["question_id"].astype(str).to_numpy())
                s = s[~s.index.duplicated()]
            self.cache[run_id] = s
        return self.cache[run_id]


def paired_test(preds, a: Group, ref: Group) -> dict:
    """McNemar's exact test of ``a`` against ``ref``: runs paired seed by seed (seeds both have),
    questions paired on question_id, discordant counts pooled over the paired seeds.
    ``b``: questions ``a`` answers correctly and ``ref`` does not; ``c``: the reverse."""
    ref_by_seed = {r["seed"]: r for r in ref.runs}
    shared = [r["seed"] for r in a.runs if r["seed"] in ref_by_seed]
    out = {"seeds": shared, "b": 0, "c": 0, "n": 0, "p": None, "missing": [], "delta": None}
    if not shared:
        return out
    paired, deltas = [], []
    for r in a.runs:
        if r["seed"] not in ref_by_seed:
            continue
        rr = ref_by_seed[r["seed"]]
        pa, pr = preds(r["run_id"]), preds(rr["run_id"])
        if pa is None or pr is None:
            out["missing"] += [x["run_id"] for x, p in ((r, pa), (rr, pr)) if p is None]
            continue
        qa, qr = pa.align(pr, join="inner")
        out["b"] += int((qa & ~qr).sum())
        out["c"] += int((~qa & qr).sum())
        out["n"] += int(len(qa))
        paired.append(r["seed"])
        deltas.append(r["metrics"]["test"]["overall"] - rr["metrics"]["test"]["overall"])
    out["seeds"] = paired
    if paired:
        out["p"] = mcnemar_p(out["b"], out["c"])
        out["delta"] = float(np.mean(deltas))
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
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


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
    and labels of points at the same cost stacked downwards in order of accuracy so they do not overlap."""
    merged: dict[tuple[float, float], list[str]] = {}
    for p in points:
        merged.setdefault((round(p["x"], 12), round(p["acc"], 6)), []).append(p["label"])
    out = []
    by_x: dict[float, int] = {}
    for (x, acc), labels in sorted(merged.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        k = by_x.get(x, 0)
        by_x[x] = k + 1
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
    ax.set_ylabel("validation accuracy (%), mean over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# the report


def _is_autoencoder(g: Group) -> bool:
    model = g.runs[0].get("variant_config", {}).get("model", {})
    return "autoencoder" in g.variant or (model.get("decoder_hidden") or 0) > 0


def _header(name: str, records: list[dict], missing: list[str], grid_file, baseline: str, control: str,
            superseded: list[str]) -> list[str]:
    lines = [f"# {name}", "",
             f"Reports are regenerated by `python ablate.py report --grid {name}`; do not edit.", ""]
    gf = "-"
    if grid_file:
        p = Path(grid_file)
        try:  # a path relative to the working directory reads the same on every machine
            shown = p.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            shown = p
        gf = f"`{shown}`"
        if p.is_file():
            gf += f" (sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:12]})"
    datasets = sorted({(r["data"].get("name") or r["data"]["id"], r["data"]["id"]) for r in records})
    started = [r["started_at"] for r in records if r.get("started_at")]
    finished = [r["finished_at"] for r in records if r.get("finished_at")]
    def key(s: str):
        try:
            return datetime.fromisoformat(s).astimezone(timezone.utc).isoformat()
        except ValueError:
            return s
    span = f"{min(started, key=key) if started else '-'} .. {max(finished, key=key) if finished else '-'}"
    runs = f"{len(records)} complete"
    if missing:
        runs += f"; {len(missing)} requested but not complete, left out: " + ", ".join(f"`{m}`" for m in missing)
    if superseded:
        runs += (f"; {len(superseded)} superseded by a later run of the same variant, settings and seed, "
                 "left out: " + ", ".join(f"`{m}`" for m in superseded))
    lines += [
        f"- generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- grid: `{name}`; grid file: {gf}",
        "- data sets: " + (", ".join(f"{n} (`{i}`)" for n, i in datasets) or "-"),
        f"- runs: {runs}",
        f"- runs' dates: {span} (earliest start .. latest finish)",
        "- git commits: " + (", ".join(f"`{c}`" for c in _uniq(r.get("git_commit") for r in records)) or "-"),
        "- devices: " + (", ".join(_uniq(r.get("device_name") for r in records)) or "-"),
        "- torch: " + (", ".join(_uniq(r.get("torch_version") for r in records)) or "-"),
        f"- baseline: `{baseline}`; control (the un-distilled student): `{control}`",
        "",
        "Accuracies are test accuracies (%) at the epoch with the best validation accuracy, mean ± sample "
        "standard deviation (ddof=1) over seeds; deltas are differences of means in percentage points. "
        "The list of runs behind every number is at the end.",
        "",
    ]
    return lines


def _section(preds, files_dir: Path, data_id: str, groups: list[Group], baseline: str,
             control: str, multi: bool, written: dict[str, bytes]) -> tuple[list[str], list[dict]]:
    r0 = groups[0].runs[0]
    dname = r0["data"].get("name") or data_id
    h2, h3 = "##", "###"
    lines = [f"{h2} Data set: {dname} (`{data_id}`)", ""]
    sizes = r0["data"].get("sizes") or {}
    if sizes:
        lines += ["Questions: " + ", ".join(f"{k} {v:,}" for k, v in sorted(sizes.items())) + ".", ""]
    types = type_names(groups)
    base, ctrl = reference(groups, baseline), reference(groups, control)
    rows = [summarize(g, base, ctrl, types) for g in groups]
    colors = {g.label: _COLORS[i % len(_COLORS)] for i, g in enumerate(groups)}
    suffix = f"-{_slug(data_id)}" if multi else ""  # one set of plots per data set

    # -- main table
    has_recon = any(r["recon_mse"] is not None for r in rows)
    headers = ["variant", "params"] + [c[0] for c in COST_COLUMNS.values()] + ["test acc", "n seeds",
                                                                                 f"Δ {baseline}", f"Δ {control}"]
    headers += (["recon MSE"] if has_recon else []) + ["teachers"]
    table = []
    for g, r in zip(groups, rows):
        cells = [f"**{g.label}**" if g in (base, ctrl) else g.label,
                 f"{r['params']:,}" if r["params"] is not None else "-"]
        for _, col, _ in COST_COLUMNS.values():
            cells.append(_g(r[col]) if col == "gflops" else _f(r[col], 3 if col == "latency_ms" else 1))
        cells += [fmt_acc(r["test_acc_mean"], r["test_acc_std"]), f"n={r['n_seeds']}",
                  "ref" if g is base else _f(r["delta_baseline"], sign=True),
                  "ref" if g is ctrl else _f(r["delta_control"], sign=True)]
        if has_recon:
            cells.append(_g(r["recon_mse"]))
        cells.append(r["teachers"] or "-")
        table.append(cells)
    lines += [f"{h3} Main table", ""]
    lines += _md_table(headers, table, right=set(range(1, len(headers) - 1)))
    lines.append("")
    notes = []
    if base is None:
        notes.append(f"the baseline `{baseline}` has no run on this data set: no Δ {baseline}.")
    if ctrl is None:
        notes.append(f"the control `{control}` has no run on this data set: no Δ {control}.")
    if all(r[c[1]] is None for r in rows for c in COST_COLUMNS.values()):
        notes.append("no record has cost measurements (`cost`: FLOPs, latency, peak memory): shown as -.")
    else:
        notes.append("GFLOPs: forward FLOPs per sample / 1e9; latency: median eval forward at batch 1; memory: "
                     "peak during a training step / inference (from the records' `cost`, mean over seeds; "
                     "- where not measured).")
    ae = [g.label for g, r in zip(groups, rows) if _is_autoencoder(g)]
    if has_recon:
        notes.append("recon MSE: the test-set reconstruction error of autoencoder variants "
                     "(`metrics.test.recon_mse`, mean over seeds).")
    elif ae:
        notes.append("autoencoder variants (" + ", ".join(ae) + ") have no reconstruction error in their records.")
    if any(g.label != g.variant for g in groups):
        notes.append("a variant run with several settings has one row per setting, labelled with the settings "
                     "that differ.")
    lines += [f"Notes: {' '.join(notes)}", ""] if notes else []

    # -- per question type
    lines += [f"{h3} Accuracy per question type", "",
              "Test accuracy (%) per question type, mean over seeds; the last row is the number of test questions.",
              ""]
    pt_rows = []
    for g, r in zip(groups, rows):
        pt_rows.append([g.label] + [_f(r[f"test_acc_{t}"]) for t in types] + [_f(r["test_acc_mean"])])
    counts = groups[0].runs[0]["metrics"]["test"]
    pt_rows.append(["questions"] + [str(counts.get("counts", {}).get(t, "-")) for t in types]
                   + [str(counts.get("n", "-"))])
    lines += _md_table(["variant"] + types + ["all"], pt_rows)
    lines.append("")

    # -- evaluation-time ablations
    lines += [f"{h3} Evaluation-time ablations", "",
              "Test accuracy (%) when the model is evaluated with the videos shuffled across questions, the "
              "appearance features zeroed, or the motion features zeroed (mean over seeds).", ""]
    ab_rows = []
    for g, r in zip(groups, rows):
        cells = [g.label, _f(r["test_acc_mean"])]
        for key in ABLATIONS:
            cells.append(_f(_mean(g.values(lambda x, key=key: x["metrics"]["ablations"][key]["overall"]))))
        ab_rows.append(cells)
    lines += _md_table(["variant", "test"] + list(ABLATIONS.values()), ab_rows)
    lines.append("")

    # -- significance
    lines += [f"{h3} Significance", "",
              f"{TEST_NAME} (two-sided; `scipy.stats.binomtest` of min(b, c) successes in b + c trials at 1/2) on "
              "per-question test predictions at the best-validation epoch. The two variants' runs are paired seed "
              "by seed (seeds both have) and questions by question_id; b counts questions the variant answers "
              "correctly and the reference does not, c the reverse, pooled over the paired seeds. Δ is the mean "
              f"accuracy difference over the paired seeds. p-values are not corrected for multiple comparisons "
              f"(* p < {ALPHA}).", ""]
    for refname, ref in ((baseline, base), (control, ctrl)):
        shown = f" (runs of `{ref.label}`)" if ref is not None and ref.label != refname else ""
        lines += [f"Against `{refname}`{shown}:", ""]
        others = [g for g in groups if g is not ref]
        if ref is None:
            lines += [f"`{refname}` has no run on this data set: no comparison.", ""]
            continue
        if not others:
            lines += ["no other variant.", ""]
            continue
        srows, impossible = [], []
        for g in others:
            t = paired_test(preds, g, ref)
            if not t["seeds"]:
                why = (f"no shared seeds ({g.label}: {', '.join(map(str, g.seeds))}; {ref.label}: "
                       f"{', '.join(map(str, ref.seeds))})")
                if t["missing"]:
                    why = "predictions missing for " + ", ".join(f"`{m}`" for m in t["missing"])
                impossible.append(f"{g.label}: {why}")
                srows.append([g.label, "-", "-", "-", "-", "-", "not paired"])
                continue
            star = " *" if t["p"] < ALPHA else ""
            srows.append([g.label, ", ".join(map(str, t["seeds"])), f"{t['n']:,}", _f(t["delta"], sign=True),
                          str(t["b"]), str(t["c"]), fmt_p(t["p"]) + star])
            if t["missing"]:
                impossible.append(f"{g.label}: predictions missing for " + ", ".join(f"`{m}`" for m in t["missing"])
                                  + " (those seeds left out)")
        lines += _md_table(["variant", "paired seeds", "questions", "Δ", "b", "c", "p"], srows)
        lines.append("")
        if impossible:
            lines += ["Pairing impossible or partial: " + "; ".join(impossible) + ".", ""]

    # -- accuracy against cost
    lines += [f"{h3} Accuracy against cost", ""]
    for key, (col_title, col, _) in COST_COLUMNS.items():
        if key not in ("flops_per_sample", "latency_ms_median"):
            continue
        what = "GFLOPs per sample" if col == "gflops" else "latency (ms, batch 1)"
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

    # -- per type and training curves
    fname = f"per_type{suffix}.png"
    written[fname] = plot_per_type(groups, types, colors, f"{dname}: test accuracy per question type")
    lines += [f"{h3} Per-type accuracy (plot)", "",
              f"![accuracy per question type]({quote(files_dir.name)}/{quote(fname)})", ""]
    fname = f"training_curves{suffix}.png"
    written[fname] = plot_curves(groups, colors, f"{dname}: validation accuracy per epoch (mean over seeds)")
    lines += [f"{h3} Training curves", "", f"![training curves]({quote(files_dir.name)}/{quote(fname)})", ""]
    return lines, rows


def write_report(store: ResultsStore, name: str, run_ids: list[str] | None = None, out_dir: str | Path = "reports",
                 baseline: str = "dualvgr", control: str = "student", grid_file: str | None = None) -> Path:
    """Write ``out_dir/NAME.md``, ``out_dir/NAME.csv`` (the main table, one row per variant and data
    set) and the plots in ``out_dir/NAME_files/``; returns the Markdown's path. ``run_ids=None``:
    every complete run in the store; requested runs that are not complete are listed and left out."""
    out_dir = Path(out_dir)
    if run_ids is None:
        records = list(store.iter_records())
        missing: list[str] = []
    else:
        ids = list(dict.fromkeys(run_ids))
        missing = [r for r in ids if not store.is_complete(r)]
        records = [store.read_record(r) for r in ids if store.is_complete(r)]
    records.sort(key=lambda r: r["run_id"])
    sections = group_runs(records, baseline, control)
    superseded = sorted(x for gs in sections.values() for g in gs for x in g.superseded)
    kept = sorted((r for gs in sections.values() for g in gs for r in g.runs), key=lambda r: r["run_id"])
    files_dir = out_dir / f"{name}_files"
    lines = _header(name, kept, missing, grid_file, baseline, control, superseded)
    preds = _Predictions(store)
    written: dict[str, bytes] = {}
    all_rows: list[dict] = []
    if not sections:
        lines += ["No complete run.", ""]
    for data_id, groups in sections.items():
        sec, rows = _section(preds, files_dir, data_id, groups, baseline, control, len(sections) > 1,
                             written)
        lines += sec
        all_rows += rows

    # -- the runs behind the numbers
    lines += ["## Runs", ""]
    run_rows = []
    for gs in sections.values():
        for g in gs:
            for r in g.runs:
                m = r["metrics"]
                run_rows.append([f"`{r['run_id']}`", g.label, r["data"].get("name") or r["data"]["id"], str(r["seed"]),
                                 _f(m["test"]["overall"]), _f(m["val"]["overall"]),
                                 f"{m['best_epoch'] + 1}/{r.get('epochs_run', len(r.get('history', [])))}",
                                 ",".join(r.get("teacher_runs", [])) or "-", str(r.get("device_name") or "-"),
                                 f"`{r.get('git_commit') or '-'}`", str(r.get("finished_at") or "-")])
    lines += _md_table(["run", "variant", "data", "seed", "test acc", "val acc", "best epoch", "teacher runs",
                        "device", "commit", "finished"], run_rows, right={3, 4, 5, 6})
    lines.append("")

    # -- write: plots first, then the table, then the Markdown that links them
    for fname, data in sorted(written.items()):
        atomic_write_bytes(files_dir / fname, data)
    if files_dir.is_dir():
        for old in files_dir.glob("*.png"):
            if old.name not in written:
                old.unlink()
    cols = ["data_name", "data_id", "variant", "label", "category", "params"] + [c[1] for c in COST_COLUMNS.values()]
    cols += ["test_acc_mean", "test_acc_std", "n_seeds", "seeds", "delta_baseline", "delta_control", "teachers",
             "recon_mse"]
    df = pd.DataFrame(all_rows)
    extra = [c for c in df.columns if c not in cols]
    df = df.reindex(columns=cols + extra) if len(df) else pd.DataFrame(columns=cols)
    atomic_write_bytes(out_dir / f"{name}.csv", df.to_csv(index=False).encode())
    md = out_dir / f"{name}.md"
    atomic_write_bytes(md, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return md


# ---------------------------------------------------------------------------------------------
# two sets of runs of the same variants: fp32 against bf16, before against after a change


def compare_runs(store: ResultsStore, ids_a: list[str], ids_b: list[str], name_a: str = "A",
                 name_b: str = "B") -> tuple[pd.DataFrame, list[str]]:
    """Pair the runs of two sets by data set, variant label and seed, and compare their test
    accuracy: one row per variant (means over the paired seeds, the mean and sample std of the
    per-seed differences B - A, McNemar's exact test on per-question predictions pooled over the
    paired seeds) and a last row ``all`` pooling every pair. Returns the table and the Markdown."""
    sides, devices = {}, set()
    for side, ids in (("a", ids_a), ("b", ids_b)):
        recs = [store.read_record(r) for r in dict.fromkeys(ids) if store.is_complete(r)]
        devices |= {f"{r.get('device_name') or r.get('device') or '?'}, torch {r.get('torch_version', '?')}" for r in recs}
        sides[side] = {(d, g.variant): g for d, gs in group_runs(recs).items() for g in gs}
    preds = _Predictions(store)
    rows, pooled, tot = [], {"a": [], "b": []}, {"b": 0, "c": 0, "n": 0}

    def row(variant: str, data: str, acc_a: list[float], acc_b: list[float], t: dict) -> dict:
        d = np.subtract(acc_b, acc_a)
        return {"variant": variant, "data": data, "pairs": len(d), f"acc_{name_a}": float(np.mean(acc_a)),
                f"acc_{name_b}": float(np.mean(acc_b)), "delta_mean": float(d.mean()),
                "delta_std": float(d.std(ddof=1)) if len(d) > 1 else None, "b": t["b"], "c": t["c"], "p": t["p"]}

    for key in [k for k in sides["a"] if k in sides["b"]]:
        ga, gb = sides["a"][key], sides["b"][key]
        t = paired_test(preds, gb, ga)  # b: questions B answers correctly and A does not
        if not t["seeds"]:
            continue
        acc = {s: {r["seed"]: r["metrics"]["test"]["overall"] for r in g.runs} for s, g in (("a", ga), ("b", gb))}
        acc_a, acc_b = ([acc[s][seed] for seed in t["seeds"]] for s in ("a", "b"))
        pooled["a"] += acc_a
        pooled["b"] += acc_b
        for k in tot:
            tot[k] += t[k]
        rows.append(row(ga.label, key[0], acc_a, acc_b, t))
    if rows:
        rows.append(row("all", "", pooled["a"], pooled["b"], {**tot, "p": mcnemar_p(tot["b"], tot["c"])}))
    df = pd.DataFrame(rows)
    md = _md_table(["variant", "paired seeds", f"{name_a} acc", f"{name_b} acc", f"Δ ({name_b} - {name_a})",
                    "Δ std", "b", "c", "McNemar p"],
                   [[r["variant"], str(r["pairs"]), _f(r[f"acc_{name_a}"]), _f(r[f"acc_{name_b}"]),
                     _f(r["delta_mean"], sign=True), _f(r["delta_std"]), str(r["b"]), str(r["c"]), fmt_p(r["p"])]
                    for r in rows], right={1, 2, 3, 4, 5, 6, 7, 8})
    md += ["", f"Test accuracy (%) at the best-validation epoch, means over the seeds both sets have; Δ: mean and "
               f"sample std of the per-seed differences; b: questions {name_b} answers correctly and {name_a} does "
               f"not, c the reverse, pooled over the paired seeds; McNemar's exact two-sided test.",
           "", "Devices: " + "; ".join(sorted(devices)) + "."]
    return df, md
