"""Two sets of runs of the same variants compared run by run (fp32 against bf16, before against
after a change): ``ablate.py compare``."""
from __future__ import annotations

import pandas as pd

from harness.evaluation import metrics as M
from harness.runs import record as R
from harness import stats as S
from harness.stats import Bootstrap, Estimate
from harness.runs.store import ResultsStore
from harness.report.fmt import QUESTIONS_ONLY, fixed, fmt_mcnemar, md_table, fmt_ci, fmt_p
from harness.report.count import METRIC as COUNT_METRIC
from harness.report.count import ND as COUNT_ND
from harness.report.grouping import group_runs
from harness.report.statistics import ALPHA, CORRECTION, Predictions, correct_table

def _pairs(sides: dict, key) -> tuple[list[str], list[str], list]:
    """Run ids of side a and side b paired by seed for one (data, variant label), and the seeds."""
    a = {r["seed"]: r["run_id"] for r in sides["a"][key].runs}
    b = {r["seed"]: r["run_id"] for r in sides["b"][key].runs}
    seeds = [s for s in a if s in b]
    return [a[s] for s in seeds], [b[s] for s in seeds], seeds


def _compare_row(table: S.CorrectTable, variant: str, data: str, data_name: str, metric: str, ids_a, ids_b,
                 seeds, name_a, name_b) -> dict:
    """One row of the comparison: both sides' value of the data set's task ``metric`` (accuracy, a
    count's MSE), the paired difference B - A, McNemar per seed (right / wrong answers only)."""
    d = table.compare(ids_b, ids_a)
    val_a, val_b = table.estimate(ids_a), table.estimate(ids_b)
    return {"variant": variant, "data": data, "data_name": data_name, "metric": metric, "pairs": len(seeds),
            "seeds": list(seeds),
            f"{metric}_{name_a}": val_a.mean, f"{metric}_{name_b}": val_b.mean, "delta_mean": d.mean,
            "delta_std": d.std, "ci_lo": d.lo, "ci_hi": d.hi, "ci_covers_seeds": d.seed_level, "p": d.p,
            "mcnemar": [(s, *t) for s, t in zip(seeds, table.mcnemar(ids_b, ids_a))]}


def compare_runs(store: ResultsStore, ids_a: list[str], ids_b: list[str], name_a: str = "A",
                 name_b: str = "B", boot: Bootstrap | None = None,
                 planned: tuple[dict, dict] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Pair the runs of two sets by data set, variant label and seed, and compare them on each data
    set's task metric (:func:`harness.evaluation.metrics.task_metric`: test accuracy; a count's test MSE, lower
    is better): one row per variant (means over the paired seeds; the paired difference B - A with
    its two-level bootstrap interval and p-value; for accuracy, McNemar's exact test per paired
    seed) and a row ``all`` per data set taking every pair as a unit; Holm-Bonferroni across the
    rows. ``planned``: per side, run id -> (variant, seed) of every run the side plans; those not
    complete are named as not finished (the side is partial). Returns the table and the Markdown."""
    boot, sides, devices, metrics, names = boot or Bootstrap(), {}, set(), {}, {}
    for side, ids in (("a", ids_a), ("b", ids_b)):
        recs = [store.read_record(r) for r in dict.fromkeys(ids) if store.is_complete(r)]
        devices |= {f"{r.get('device_name') or r.get('device') or '?'}, torch {r.get('torch_version', '?')}"
                    for r in recs}
        for r in recs:
            metrics.setdefault(R.data_id(r), M.task_metric(R.task(r)).name)
            names.setdefault(R.data_id(r), R.data_name(r))
        sides[side] = {(d, g.label): g for d, gs in group_runs(recs).items() for g in gs}
    preds, rows = Predictions(store), []
    unfinished = _unfinished(store, planned, name_a, name_b)
    unpaired = _unpaired(sides, name_a, name_b, unfinished)
    for data in dict.fromkeys(d for d, _ in sides["a"]):
        keys = [k for k in sides["a"] if k[0] == data and k in sides["b"]]
        paired = {k: _pairs(sides, k) for k in keys}
        metric = metrics.get(data, M.PRIMARY)
        table, _ = correct_table(preds, [i for a, b, _ in paired.values() for i in a + b], [], boot, metric)
        pooled: list[list] = [[], [], []]
        first = len(rows)
        for (d, label), (a, b, seeds) in paired.items():
            keep = [(x, y, s) for x, y, s in zip(a, b, seeds) if x in table and y in table]
            unpaired += [f"`{label}` seed {s}: predictions missing or on other questions"
                         for x, y, s in zip(a, b, seeds) if x not in table or y not in table]
            if keep:
                a, b, seeds = (list(v) for v in zip(*keep))
                rows.append(_compare_row(table, label, d, names[d], metric, a, b, seeds, name_a, name_b))
                for acc, v in zip(pooled, (a, b, [f"{label}/{s}" for s in seeds])):
                    acc += v
        if len(rows) - first > 1:  # several variants: every pair of the data set as one unit
            rows.append(_compare_row(table, "all", data, names[data], metric, *pooled, name_a, name_b))
    for r, p in zip(rows, S.holm([r["p"] for r in rows])):
        r["p_holm"] = p
    md = _compare_markdown(rows, name_a, name_b, devices, boot)
    partial = [f"{name} is partial: {len(u)} planned run{'s' if len(u) > 1 else ''} not finished "
               f"({', '.join(sorted(u))})" for name, u in unfinished.items() if u]
    return pd.DataFrame(rows), md + ([""] + [p + "." for p in partial] if partial else []) + (
        ["", f"Not compared ({len(unpaired)}): " + "; ".join(unpaired) + "."] if unpaired else [])


def _unfinished(store: ResultsStore, planned: tuple[dict, dict] | None, name_a: str,
                name_b: str) -> dict[str, dict[str, tuple]]:
    """Per side name, run id -> (variant, seed) of the planned runs that are not complete."""
    return {name: {r: vs for r, vs in p.items() if not store.is_complete(r)}
            for name, p in zip((name_a, name_b), planned or ({}, {}))}


def _unpaired(sides: dict, name_a: str, name_b: str, unfinished: dict | None = None) -> list[str]:
    """What one set has and the other lacks (a variant, or some of a variant's seeds): left out of
    the comparison, and said so; a run the other set plans but has not finished is "not finished"
    there (``unfinished``: side name -> run id -> (variant, seed))."""
    out = []
    for side, other, name, other_name in (("a", "b", name_a, name_b), ("b", "a", name_b, name_a)):
        waiting = {vs for vs in (unfinished or {}).get(other_name, {}).values()}
        for key, g in sides[side].items():
            seeds = g.seeds if key not in sides[other] else [s for s in g.seeds if s not in sides[other][key].seeds]
            late = [s for s in seeds if (g.variant, s) in waiting]
            lone = [s for s in seeds if s not in late]
            if late:
                out.append(f"`{g.label}` seed{'s' if len(late) > 1 else ''} {', '.join(map(str, late))}: "
                           f"not finished in {other_name}")
            if lone and key not in sides[other] and not late:
                out.append(f"`{g.label}` only in {name} (seeds {', '.join(map(str, g.seeds))})")
            elif lone:
                out.append(f"`{g.label}` seed{'s' if len(lone) > 1 else ''} {', '.join(map(str, lone))} only in {name}")
    return out


def _paired_seeds(row: dict) -> str:
    """The "paired seeds" cell: the seeds, as in the report's significance table; for the pooled
    ``all`` row (its pairs are variant/seed units), how many pairs it takes."""
    if all(isinstance(s, int) for s in row["seeds"]):
        return ", ".join(map(str, row["seeds"]))
    return f"{row['pairs']} pairs (the rows above)"


def _compare_markdown(rows: list[dict], name_a: str, name_b: str, devices: set, boot: Bootstrap) -> list[str]:
    """The comparison in Markdown: a table per task metric (accuracy; a count's MSE), a ``data`` column
    when the rows cover several data sets, what the columns mean, and the devices."""
    several = len({r["data"] for r in rows}) > 1
    md: list[str] = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        mine = [r for r in rows if r["metric"] == metric]
        md += ([""] if md else []) + (_mse_table if metric == COUNT_METRIC else _acc_table)(mine, name_a, name_b,
                                                                                              several, boot)
    return md + ["", "Devices: " + "; ".join(sorted(devices)) + "."]


def _delta_cells(r: dict, nd: int, ci_nd: int) -> list[str]:
    """Δ, its std, interval, p and Holm p of a row."""
    e = Estimate(r["delta_mean"], r["delta_std"], r["ci_lo"], r["ci_hi"], r["p"], r["pairs"], r["ci_covers_seeds"])
    return [fixed(r["delta_mean"], nd, sign=True), fixed(r["delta_std"], nd), fmt_ci(e, sign=True, nd=ci_nd),
            fmt_p(r["p"]), fmt_p(r["p_holm"]) + (" *" if r["p_holm"] < ALPHA else "")]


def _lead(r: dict, several: bool) -> list[str]:
    return ([r["data_name"]] if several else []) + [r["variant"], _paired_seeds(r)]


def _boot_note(boot: Bootstrap, what: str) -> str:
    return (f"95% CI and p: the two-level bootstrap of `harness/stats.py` ({boot.resamples} resamples, seed "
            f"{boot.seed}; test questions resampled with the same ids for both sets, the seed level from Student's "
            f"t) of the paired {what}; {QUESTIONS_ONLY}: fewer than {S.MIN_SEEDS} paired seeds, the interval covers "
            f"the test questions only. `all`: every paired run of the data set as one unit (variants and seeds). "
            f"p (Holm): {CORRECTION} across the rows of every table (* below {ALPHA}).")


def _acc_table(rows: list[dict], name_a: str, name_b: str, several: bool, boot: Bootstrap) -> list[str]:
    """The accuracy rows: both sides' test accuracy, the paired difference, McNemar per seed."""
    lead = (["data"] if several else []) + ["variant", "paired seeds"]
    md = md_table(lead + [f"{name_a} acc", f"{name_b} acc", f"Δ ({name_b} - {name_a})", "Δ std", "95% CI", "p",
                           "p (Holm)", "McNemar per seed: b/c, p"],
                   [_lead(r, several) + [fixed(r[f"acc_{name_a}"]), fixed(r[f"acc_{name_b}"]), *_delta_cells(r, 2, 1),
                                         fmt_mcnemar(r["mcnemar"])] for r in rows],
                   right=set(range(len(lead) - 1, len(lead) + 7)))
    return md + ["", f"Test accuracy (%) at the best-validation epoch, means over the seeds both sets have; higher "
                     f"is better. Δ: the paired difference {name_b} - {name_a} (mean and sample std over the paired "
                     f"seeds). " + _boot_note(boot, "correct answers") + " McNemar per seed: each "
                     f"paired seed's exact test on its own (b: questions {name_b} answers correctly and {name_a} "
                     "does not, c the reverse), not pooled, not corrected."]


def _mse_table(rows: list[dict], name_a: str, name_b: str, several: bool, boot: Bootstrap) -> list[str]:
    """The count rows: both sides' test MSE (lower is better), the paired difference; no McNemar."""
    nd = COUNT_ND
    lead = (["data"] if several else []) + ["variant", "paired seeds"]
    md = md_table(lead + [f"{name_a} MSE", f"{name_b} MSE", f"Δ MSE ({name_b} - {name_a})", "Δ std", "95% CI",
                           "p", "p (Holm)", "better"],
                   [_lead(r, several) + [fixed(r[f"{COUNT_METRIC}_{name_a}"], nd),
                                         fixed(r[f"{COUNT_METRIC}_{name_b}"], nd),
                                         *_delta_cells(r, nd, nd), _better(r, name_a, name_b)] for r in rows],
                   right=set(range(len(lead) - 1, len(lead) + 7)))
    return md + ["", f"Count: test MSE of the count at the epoch with the lowest validation MSE, means over the "
                     f"seeds both sets have; lower is better, so a negative Δ means {name_b} counts better. Δ: the "
                     f"paired difference {name_b} - {name_a} (mean and sample std over the paired seeds). "
                     + _boot_note(boot, "squared errors") + " better: the side with the lower MSE "
                     f"where p (Holm) is below {ALPHA}, else no difference shown. McNemar's test, which needs right / "
                     "wrong answers, does not apply to a count."]


def _better(r: dict, name_a: str, name_b: str) -> str:
    """Which side has the lower MSE, where the Holm-corrected difference is significant."""
    if r["p_holm"] is None or r["p_holm"] >= ALPHA:
        return "-"
    return name_b if r["delta_mean"] < 0 else name_a
