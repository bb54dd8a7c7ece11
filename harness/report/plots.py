"""The report's plots, drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
change) and returned as PNG bytes: accuracy against a cost with the Pareto front, per-type bars,
training curves."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.runs import record as R
from harness.report.grouping import Group, mean_std

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd"]


def _png(fig: Figure) -> bytes:
    """A figure as PNG bytes (no software metadata: the bytes depend on the figure only)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def label_layout(points: list[dict]) -> list[tuple[tuple[float, float], list[str], int]]:
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
    for (x, acc), labels, k in label_layout(points):
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
    """Per-type test accuracy bars, one per group, with the std over seeds."""
    cols = types + ["all"]
    fig = Figure(figsize=(min(13.0, max(7.0, 1.0 + 0.2 * len(cols) * max(1, len(groups)))), 4.8))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(cols))
    for i, g in enumerate(groups):
        ms = [mean_std(g.values(lambda r, t=t: R.per_type(r).get(t))) for t in types]
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


#: what a training-curves plot can show: the history key -> the y axis label
CURVES = {"val_acc": "validation accuracy (%), mean over seeds",
          "val_mse": "validation MSE (lower is better), mean over seeds"}


def plot_curves(groups: list[Group], colors: dict, title: str, key: str = "val_acc") -> bytes:
    """The training curves (:func:`curves_figure`) as PNG bytes."""
    return _png(curves_figure(groups, colors, title, key))


def curves_figure(groups: list[Group], colors: dict, title: str, key: str = "val_acc") -> Figure:
    """Validation accuracy (``key`` val_acc; a count's val_mse) per epoch, one line per group (mean over
    its seeds)."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for g in groups:
        per_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for i, h in enumerate(r.get("history", [])):
                if h.get(key) is not None:
                    per_epoch.setdefault(int(h.get("epoch", i)), []).append(float(h[key]))
        if not per_epoch:
            continue
        ep = sorted(per_epoch)
        ax.plot([e + 1 for e in ep], [np.mean(per_epoch[e]) for e in ep], marker="." if len(ep) < 40 else None,
                color=colors[g.label], label=g.label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ticks at whole epochs (1-based, as `run` prints them)
    ax.set_ylabel(CURVES[key])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
