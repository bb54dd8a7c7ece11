"""Two sets of runs of the same variants compared run by run (fp32 against bf16, before against
after a change): ``ablate.py compare``."""
from __future__ import annotations

import pandas as pd

from .. import stats as S
from ..stats import Bootstrap, Estimate
from ..store import ResultsStore
from .fmt import QUESTIONS_ONLY, _f, _fmt_mcnemar, _md_table, fmt_ci, fmt_p
from .grouping import group_runs
from .statistics import ALPHA, CORRECTION, _Predictions, correct_table

def _pairs(sides: dict, key) -> tuple[list[str], list[str], list]:
    """Run ids of side a and side b paired by seed for one (data, variant label), and the seeds."""
    a = {r["seed"]: r["run_id"] for r in sides["a"][key].runs}
    b = {r["seed"]: r["run_id"] for r in sides["b"][key].runs}
    seeds = [s for s in a if s in b]
    return [a[s] for s in seeds], [b[s] for s in seeds], seeds


def _compare_row(table: S.CorrectTable, variant: str, data: str, ids_a, ids_b, seeds, name_a, name_b) -> dict:
    """One row of the comparison: both sides' accuracy, the paired difference B - A, McNemar per seed."""
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
    """The comparison table in Markdown, with what its columns mean and the devices."""
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
