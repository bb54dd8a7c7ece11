"""The Markdown sections of a data set's part of the report. Each section is a function of one
:class:`Context` (the data set's groups, their main-table rows, references, statistics and plot
sinks) returning its lines; :data:`SECTIONS` lists them in report order with their titles, and
:func:`data_section` iterates it. A new section is one function and one entry there."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from harness.measurement import costs
from harness.evaluation import metrics as M
from harness.runs import record as R
from harness import stats as S
from harness.evaluation.evaluate import ABLATIONS
from harness.report.fmt import (QUESTIONS_ONLY, fixed, fmt_mcnemar, fmt_sig, md_table, slug, fmt_acc, fmt_cell,
    fmt_ci, fmt_p)
from harness.report.grouping import Group, mean_or_none, mean_std, reference, type_groups, type_names
from harness.report.plots import COLORS, plot_cost, plot_curves, plot_per_type
from harness.report.statistics import (ALPHA, COST_COLUMNS, CORRECTION, Comparison, CompressedRow, SectionStats,
    comparison_columns, compressed_rows, pareto_front, section_stats, summarize)

#: the references every variant is compared with: key -> what the report calls it
REFERENCES = {"baseline": "baseline", "control": "control"}


@dataclass
class Context:
    """One data set's part of the report: what every section reads. ``rows``: the main table's rows
    (:func:`summarize`, one per group, also the CSV's); ``refs`` / ``names``: per reference key
    (``baseline``, ``control``) its group (None: no run on this data set) and its variant name;
    ``written``: plot file name -> PNG bytes, written with the report."""

    data_id: str
    dname: str
    groups: list[Group]
    rows: list[dict]
    types: list[str]
    refs: dict[str, Group | None]
    names: dict[str, str]
    stats: SectionStats
    colors: dict[str, str]
    files_dir: Path
    suffix: str
    written: dict[str, bytes]
    #: the metric that ranks this data set's runs (its task's, harness.evaluation.metrics): which sections it gets
    metric: str = M.PRIMARY
    preds: Callable | None = None  # run id (or compressed evaluation key) -> its test predictions

    @property
    def base(self) -> Group | None:
        """The baseline's group, None without a run on this data set."""
        return self.refs["baseline"]

    @property
    def ctrl(self) -> Group | None:
        """The control's group, None without a run on this data set."""
        return self.refs["control"]

    def pairs(self):
        """(group, row) of every group, in report order."""
        return zip(self.groups, self.rows)

    def link(self, fname: str) -> str:
        """The Markdown path of a plot file."""
        return f"{quote(self.files_dir.name)}/{quote(fname)}"


def _shown_metrics(ctx: Context) -> list[M.Metric]:
    """The registered metrics besides accuracy that some row of the data set has."""
    return [m for m in M.secondary() if any(r.get(m.name) is not None for r in ctx.rows)]


def _main_table(ctx: Context) -> list[str]:
    """Params, costs, test accuracy with its interval and deltas, the other metrics, teachers."""
    shown = _shown_metrics(ctx)
    headers = (["variant", "params"] + [c[0] for c in COST_COLUMNS.values()]
               + ["test acc", "95% CI", "n seeds", f"Δ {ctx.names['baseline']}", f"Δ {ctx.names['control']}"]
               + [m.title for m in shown] + ["teachers"])
    table = []
    for g, r in ctx.pairs():
        cells = [f"**{g.label}**" if g in (ctx.base, ctx.ctrl) else g.label,
                 f"{r['params']:,}" if r["params"] is not None else "-"]
        for _, col, _ in COST_COLUMNS.values():
            cells.append(fmt_sig(r[col]) if "gflops" in col else latency_cell(g, r[col]) if col == "latency_ms"
                         else fixed(r[col], 1))
        cells += [fmt_acc(r["test_acc_mean"], r["test_acc_std"]), fmt_ci(ctx.stats.cells[g.label]["all"]), fmt_n(g),
                  "ref" if g is ctx.base else fixed(r["delta_baseline"], sign=True),
                  "ref" if g is ctx.ctrl else fixed(r["delta_control"], sign=True)]
        cells += [m.fmt(r[m.name]) for m in shown]
        table.append(cells + [r["teachers"] or "-"])
    return md_table(headers, table, right=set(range(1, len(headers) - 1))) + [""] + _main_notes(ctx)


def fmt_n(g: Group) -> str:
    """The ``n seeds`` cell, naming the seeds a partial report lacks."""
    if not g.missing_seeds:
        return f"n={len(g.runs)}"
    return (f"n={len(g.runs)} of {len(g.runs) + len(g.missing_seeds)} (seed{'s' if len(g.missing_seeds) > 1 else ''} "
            f"{', '.join(map(str, g.missing_seeds))} missing)")



#: marks a latency measured on a busy machine (harness.measurement.costs.busy: p90 / median, or the load average)
DISTURBED = "‡"


def latency_cell(g, ms: float | None) -> str:
    """A group's batch-1 latency (ms), marked :data:`DISTURBED` when it was measured on a busy machine."""
    busy = ms is not None and any(m["disturbed"] for m in _cost_measurements([g]))
    return fixed(ms, 3) + (f" {DISTURBED}" if busy else "")


def _cost_measurements(groups) -> list[dict]:
    """When, where and how steadily the groups' latency and inference memory were measured
    (``cost.measured`` of :func:`harness.measurement.costs.attach`), one entry per run that has one."""
    return [m for g in groups for r in g.runs if (m := R.cost(r, "measured"))]


def cost_note(groups) -> list[str]:
    """When, where, with how many threads and how steadily latency and inference memory were measured;
    latencies measured on a busy machine (:func:`latency_cell`'s mark) said so loudly, with why."""
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
    bad = {g.label: why for g in groups for m in _cost_measurements([g]) if (why := m.get("busy") or (
        m["disturbed"] and f"p90/median above {costs.SPREAD_FLAG}"))}
    if bad:
        note += (f". **{DISTURBED}: latency measured on a busy machine, not what the model costs on an idle one** ("
                 + "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())) + f"; busy: p90/median above "
                 f"{costs.SPREAD_FLAG}, or a load average above the cores when the timing began); to measure again "
                 f"on an idle machine, delete its file in results/costs/ and run the grid again (complete runs are "
                 f"not retrained)")
    return [note + "."]


def _cost_notes(ctx: Context) -> list[str]:
    """What the cost columns are, or that no record has them."""
    if all(r[c[1]] is None for r in ctx.rows for k, c in COST_COLUMNS.items() if not k.startswith("train_")):
        return ["no record has cost measurements (`cost`: FLOPs, latency, peak memory): shown as -."]
    return ["GFLOPs: forward FLOPs per sample / 1e9; latency: median eval forward at batch 1, measured "
            "once per architecture and device, alone, after training (harness.measurement.costs); memory: "
            "peak during a training step / inference (mean over seeds; - where not measured).",
            *cost_note(ctx.groups),
            "training cost (harness.measurement.bill): GFLOPs are counted (3 forwards per training sample: backward "
            "as 2 forwards; one forward per validation question per epoch; a student's teacher forwards "
            "or teacher-cache builds), device-seconds measured; 'total' is what it took to produce the "
            "model: a student's own training plus each distinct teacher run's training, once, and the "
            "cache builds."]


def _metric_notes(ctx: Context) -> list[str]:
    """Each other registered metric's note where it is shown; else, where runs it applies to
    (``Metric.applies``: their variant config) lack it, its absent note naming them."""
    notes, shown = [], _shown_metrics(ctx)
    for m in M.secondary():
        if m in shown:
            notes += [m.note] if m.note else []
        elif m.absent_note and (lack := [g.label for g in ctx.groups if m.applies(g.runs[0])]):
            notes.append(m.absent_note.format(labels=", ".join(lack)))
    return notes


def _main_notes(ctx: Context) -> list[str]:
    """The notes under the main table: references missing, costs, few seeds, metrics, labels."""
    notes = [f"the {what} `{ctx.names[key]}` has no run on this data set: no Δ {ctx.names[key]}."
             for key, what in REFERENCES.items() if ctx.refs[key] is None]
    notes += _cost_notes(ctx)
    few = [g.label for g in ctx.groups if len(g.runs) < S.MIN_SEEDS]
    if few:
        notes.append(f"n seeds < {S.MIN_SEEDS}: seed variance not estimated ({', '.join(few)}); their intervals "
                     f"({QUESTIONS_ONLY}) cover the test questions only.")
    if ctx.stats.missing:
        notes.append("runs without usable test predictions, left out of the intervals and tests: "
                     + ", ".join(f"`{m}`" for m in ctx.stats.missing) + ".")
    notes += _metric_notes(ctx)
    if any(g.label != g.variant for g in ctx.groups):
        notes.append("a variant run with several settings has one row per setting, labelled with the settings "
                     "that differ; the baseline and the control are the rows with the variant's registered settings.")
    return [f"Notes: {' '.join(notes)}", ""] if notes else []


def _per_type_table(ctx: Context) -> list[str]:
    """Accuracy per question type, each cell with its std and interval; the question counts."""
    lines = ["Test accuracy (%) per question type: mean ± std over seeds [95% interval]; the last row is the "
             "number of test questions.", ""]
    cells, tg = ctx.stats.cells, type_groups(ctx.types)
    pt_rows = [[g.label] + [fmt_cell(cells[g.label].get(t), r[f"test_acc_{t}"]) for t in ctx.types]
               + [fmt_cell(cells[g.label].get(k), None) for k in tg]
               + [fmt_cell(cells[g.label].get("all"), r["test_acc_mean"])] for g, r in ctx.pairs()]
    counts = R.split_metrics(ctx.groups[0].runs[0], "test").get("counts", {})
    pt_rows.append(["questions"] + [str(counts.get(t, "-")) for t in ctx.types]
                   + [str(sum(counts.get(t, 0) for t in members)) for members in tg.values()]
                   + [str(R.split_metrics(ctx.groups[0].runs[0], "test").get("n", "-"))])
    if tg:  # NExT-QA's groups, from the per-question predictions
        lines[0] += " " + "; ".join(f"{k}: {' + '.join(v)}" for k, v in tg.items()) + "."
    return lines + md_table(["variant"] + ctx.types + list(tg) + ["all"], pt_rows) + [""]


def _ablation_table(ctx: Context) -> list[str]:
    """Test accuracy under each evaluation-time ablation (harness.evaluation.evaluate.ABLATIONS)."""
    lines = ["Test accuracy (%) when the model is evaluated with the videos shuffled across questions, the "
             "appearance features zeroed, or the motion features zeroed (mean over seeds).", ""]
    ab_rows = []
    for g, r in ctx.pairs():
        ab_rows.append([g.label, fixed(r["test_acc_mean"])]
                       + [fixed(mean_or_none(g.values(lambda x, key=key: R.metric(x, key)))) for key in ABLATIONS])
    return lines + md_table(["variant", "test"] + list(ABLATIONS.values()), ab_rows) + [""]


def significance_table(comps: list[Comparison], mcnemar: bool = True, nd: int = 2, ci_nd: int = 1) -> list[str]:
    """One reference's comparisons as a table, with why pairing was impossible or partial
    (``mcnemar``: with the per-seed McNemar column; ``nd`` / ``ci_nd``: decimals of Δ / its interval)."""
    rows, notes = [], []
    for c in comps:
        if c.delta is None:
            rows.append([c.label, "-", "-", "-", "-", "-", "not paired"][:7 if mcnemar else 6])
            notes.append(f"{c.label}: {c.why}")
            continue
        star = " *" if c.p_holm is not None and c.p_holm < ALPHA else ""
        mark = "" if c.delta.seed_level else QUESTIONS_ONLY
        rows.append([c.label, ", ".join(map(str, c.seeds)), fixed(c.delta.mean, nd, sign=True),
                     fmt_ci(c.delta, sign=True, nd=ci_nd),
                     fmt_p(c.delta.p) + mark, fmt_p(c.p_holm) + mark + star]
                    + ([fmt_mcnemar(c.mcnemar)] if mcnemar else []))
        if c.why:
            notes.append(f"{c.label}: {c.why}")
    headers = (["variant", "paired seeds", "Δ", "95% CI", "p", "p (Holm)"]
               + (["McNemar per seed: b/c, p"] if mcnemar else []))
    lines = md_table(headers, rows, right={1, 2, 3, 4, 5}) + [""]
    return lines + (["Pairing impossible or partial: " + "; ".join(notes) + ".", ""] if notes else [])


def _significance(ctx: Context) -> list[str]:
    """Every variant against each reference: paired differences, intervals, Holm and McNemar."""
    b = ctx.stats.boot
    lines = [f"Each variant against the reference, runs paired seed by seed (the seeds both have) and questions by "
             f"question_id. Δ: mean over the paired seeds of the test-accuracy difference (points, variant - "
             f"reference). 95% CI and p: the two-level bootstrap ({b.resamples} resamples, seed {b.seed}) of the "
             f"paired difference; p is two-sided for Δ = 0 and never below {fmt_p(b.p_floor)}. p (Holm): "
             f"{CORRECTION} correction across all comparisons of the table (* below {ALPHA}). McNemar per seed: "
             "McNemar's exact two-sided test of each paired seed on its own (b: questions only the variant answers "
             "correctly, c: only the reference), not pooled over seeds and not corrected.", ""]
    for key, refname in ctx.names.items():
        ref = ctx.refs[key]
        shown = f" (runs of `{ref.label}`)" if ref is not None and ref.label != refname else ""
        lines += [f"Against `{refname}`{shown}:", ""]
        if ref is None:
            lines += [f"`{refname}` has no run on this data set: no comparison.", ""]
        elif len(ctx.groups) < 2:
            lines += ["no other variant.", ""]
        else:
            lines += significance_table(ctx.stats.comparisons[key])
    return lines


#: the costs accuracy is plotted against: record cost field -> what the axis says
COST_PLOTS = {"flops_per_sample": "GFLOPs per sample", "latency_ms_median": "latency (ms, batch 1)",
              "train_gflops_total": "training GFLOPs to produce the model"}


def _cost_plot(ctx: Context, key: str, what: str) -> list[str]:
    """Accuracy against one cost, with the Pareto front."""
    col = COST_COLUMNS[key][1]
    have = [(g, r) for g, r in ctx.pairs() if r[col] is not None and r["test_acc_mean"] is not None]
    if not have:
        return [f"Accuracy against {what}: not plotted, no record has `cost.{key}`.", ""]
    front = pareto_front([r[col] for _, r in have], [r["test_acc_mean"] for _, r in have])
    pts = [{"label": g.label, "x": r[col], "acc": r["test_acc_mean"], "std": r["test_acc_std"], "front": f,
            "color": ctx.colors[g.label]} for (g, r), f in zip(have, front)]
    fname = f"acc_vs_{col}{ctx.suffix}.png"
    ctx.written[fname] = plot_cost(pts, what, f"{ctx.dname}: test accuracy against {what}")
    lines = [f"![accuracy against {what}]({ctx.link(fname)})", "",
             f"Pareto front ({what}; max accuracy, min cost): "
             + ", ".join(p["label"] for p in sorted(pts, key=lambda p: p["x"]) if p["front"]) + "."]
    left = [g.label for g, r in ctx.pairs() if r[col] is None]
    if left:
        lines.append(f"Not plotted (no `cost.{key}`): " + ", ".join(left) + ".")
    return lines + [""]


def _cost_section(ctx: Context) -> list[str]:
    """Accuracy against each cost of :data:`COST_PLOTS`."""
    return [line for key, what in COST_PLOTS.items() for line in _cost_plot(ctx, key, what)]


def _per_type_plot(ctx: Context) -> list[str]:
    """Per-type accuracy bars."""
    fname = f"per_type{ctx.suffix}.png"
    title = f"{ctx.dname}: test accuracy per question type"
    ctx.written[fname] = plot_per_type(ctx.groups, ctx.types, ctx.colors, title)
    return [f"![accuracy per question type]({ctx.link(fname)})", ""]


def _curves_plot(ctx: Context) -> list[str]:
    """Validation accuracy per epoch."""
    fname = f"training_curves{ctx.suffix}.png"
    title = f"{ctx.dname}: validation accuracy per epoch (mean over seeds)"
    ctx.written[fname] = plot_curves(ctx.groups, ctx.colors, title)
    return [f"![training curves]({ctx.link(fname)})", ""]


def median_or_none(values) -> float | None:
    values = sorted(v for v in values if v is not None)
    return None if not values else (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2


def cpu_ms(recs: list[dict], batch: str, path: str) -> float | None:
    """Median over compressed evaluations of one path's CPU latency at a batch size."""
    return median_or_none([(c.get("cpu", {}).get("latency", {}).get(batch, {}).get(path) or {}).get("latency_ms_median")
                    for c in recs])


def _fp32_row(g: Group, r: dict, ctx: Context, crows: list[CompressedRow]) -> list[str]:
    """A group's fp32 row: its accuracy cell, its size, and the fp32 latency timed beside its compressed models."""
    comp = [c for row in crows if row.group is g for _, c in row.pairs]
    size = median_or_none([c["size"]["fp32_bytes"] for c in comp])
    return [g.label, "fp32 (eager)", fmt_n(g), fmt_acc(r["test_acc_mean"], r["test_acc_std"]),
            fmt_ci(ctx.stats.cells[g.label]["all"]), "ref", "-", "-", "-", "-", "-",
            fixed(size / 1e6, 3) if size else "-", fixed(cpu_ms(comp, "1", "fp32")), fixed(cpu_ms(comp, "32", "fp32")),
            "1.00"]


def _compressed_row(row: CompressedRow) -> list[str]:
    c, comp = row.cmp, [x for _, x in row.pairs]
    accs = [x["metrics"]["test"]["overall"] for x in comp]
    d = c.delta
    mark = "" if d is None or d.seed_level else QUESTIONS_ONLY
    star = " *" if c.p_holm is not None and c.p_holm < ALPHA else ""
    speed = [x["cpu"]["latency"]["1"]["fp32"]["latency_ms_median"] / x["cpu"]["latency"]["1"]["compressed"]
             ["latency_ms_median"] for x in comp]
    return ["", row.method, f"n={len(comp)}", fmt_acc(*mean_std(accs)), fmt_ci(row.acc),
            fixed(d.mean, sign=True) if d else "-", fmt_ci(d, sign=True) if d else "-",
            (fmt_p(c.p_holm) + mark + star) if d else "-", fmt_mcnemar(c.mcnemar) if d else "-",
            fixed(100 * mean_or_none([x["agreement"]["prediction_agreement"] for x in comp])),
            fmt_sig(max(x["agreement"]["max_abs_logit_diff"] for x in comp), 2),
            fixed(median_or_none([x["size"]["bytes"] for x in comp]) / 1e6, 3),
            fixed(cpu_ms(comp, "1", "compressed")), fixed(cpu_ms(comp, "32", "compressed")),
            fixed(median_or_none(speed))]


def _compressed_intro(ctx: Context, crows: list[CompressedRow]) -> list[str]:
    """What the compressed rows are, how they were compared and timed, and when and where."""
    from harness.compression.compress import METHODS

    comp = [c for row in crows for _, c in row.pairs]
    methods = "; ".join(f"`{m}`: {METHODS[m].description}" if m in METHODS else f"`{m}`"
                        for m in dict.fromkeys(row.method for row in crows))
    threads = sorted({c["cpu"]["threads"] for c in comp})
    loads = [x for c in comp for x in c["cpu"].get("load_average", []) if x is not None]
    at = sorted(c["finished_at"] for c in comp)
    b = ctx.stats.boot
    return [f"Each run evaluated after training, without retraining (`harness.compression.compress`; {methods}), "
            f"on the CPU "
            f"with the same evaluation code as the run. Δ fp32: the paired difference (points) against the same "
            f"runs in fp32 (same seeds, same test questions; two-level bootstrap, {b.resamples} resamples), p "
            f"{CORRECTION}-corrected across this table (* below {ALPHA}), McNemar's exact test per seed (b: "
            "questions only the compressed model answers correctly, c: only fp32). agrees % / max |Δ logit|: "
            "the compressed model's predictions (argmax) and scores against the fp32 model's on every test question. "
            "Size: the file on disk (fp32: the "
            "run's best.pt state dict; dynamic-int8: its quantised state dict; onnx: the .onnx file; ort-*: the "
            "quantised .onnx file). CPU ms: median "
            "latency at batch 1 and 32 on random inputs shaped like the data, fp32 eager and each compressed model "
            "timed in turn in the same process, 3 rounds (speed-up: their ratio at batch 1, median over runs); "
            f"{'/'.join(map(str, threads))} thread(s), load average {fixed(min(loads), 1) if loads else '-'}.."
            f"{fixed(max(loads), 1) if loads else '-'}, measured {at[0]} .. {at[-1]}: latencies of a shared machine "
            "are noisy, medians are shown.", ""]


def _compressed_notes(crows: list[CompressedRow]) -> list[str]:
    """Rows that lose more than a point, and fp32 models that no longer reproduce their recorded predictions."""
    notes = []
    for row in crows:
        d = row.cmp.delta if row.cmp else None
        if d is not None and d.mean < -1.0:
            notes.append(f"{row.group.label} loses {-d.mean:.2f} points under {row.method} (95% CI "
                         f"{fmt_ci(d, sign=True)}).")
        if row.cmp and row.cmp.why:
            notes.append(f"{row.group.label} {row.method}: {row.cmp.why}.")
        for r, c in row.pairs:
            rep = c["agreement"].get("fp32_reproduced")
            if rep is not None and rep < 1.0:
                notes.append(f"{r['run_id']}: the fp32 model evaluated now agrees with its recorded test predictions "
                             f"on {100 * rep:.1f}% of questions (other CPU kernels or threads than its training's).")
    return ([f"Notes: {' '.join(dict.fromkeys(notes))}", ""] if notes
            else ["No compressed model loses more than 1 point against its fp32 run.", ""])


def _compressed_per_type(ctx: Context, crows: list[CompressedRow]) -> list[str]:
    """Per-type test accuracy and the evaluation-time ablations of each path (means over seeds)."""
    rows = []
    for g, r in ctx.pairs():
        mine = [row for row in crows if row.group is g]
        if not mine:
            continue
        rows.append([g.label, "fp32"] + [fixed(r[f"test_acc_{t}"]) for t in ctx.types] + [fixed(r["test_acc_mean"])]
                    + [fixed(mean_or_none(g.values(lambda x, key=key: R.metric(x, key)))) for key in ABLATIONS])
        for row in mine:
            ms = [c["metrics"] for _, c in row.pairs]
            rows.append(["", row.method] + [fixed(mean_or_none([m["test"]["per_type"][t] for m in ms
                                                      if t in m["test"]["per_type"]])) for t in ctx.types]
                        + [fixed(mean_or_none([m["test"]["overall"] for m in ms]))]
                        + [fixed(mean_or_none([m["ablations"][a]["overall"] for m in ms if a in m["ablations"]]))
                           for a in ABLATIONS])
    return (["Test accuracy (%) per question type and under the evaluation-time ablations, fp32 and compressed "
             "(means over seeds):", ""]
            + md_table(["variant", "path"] + ctx.types + ["all"] + list(ABLATIONS.values()), rows,
                        right=set(range(2, 3 + len(ctx.types) + len(ABLATIONS)))) + [""])


def _compressed(ctx: Context) -> list[str]:
    """Each variant's runs evaluated compressed (harness.compression.compress) beside the same runs in fp32."""
    crows = compressed_rows(ctx.preds, ctx.groups, ctx.types, ctx.stats.boot, ctx.metric) if ctx.preds else []
    if not crows:
        return []
    rows = []
    for g, r in ctx.pairs():
        mine = [row for row in crows if row.group is g]
        rows += [_fp32_row(g, r, ctx, crows)] + [_compressed_row(row) for row in mine] if mine else []
    headers = ["variant", "path", "n seeds", "test acc", "95% CI", "Δ fp32", "95% CI", "p (Holm)",
               "McNemar per seed: b/c, p", "agrees %", "max |Δ logit|", "size MB", "CPU ms b1", "CPU ms b32",
               "speed-up b1"]
    return (_compressed_intro(ctx, crows) + md_table(headers, rows, right=set(range(2, len(headers)))) + [""]
            + _compressed_notes(crows) + _compressed_per_type(ctx, crows))


#: a data set's sections in report order: (title, function of the Context returning its lines)
SECTIONS: list[tuple[str, Callable[[Context], list[str]]]] = [
    ("Main table", _main_table),
    ("Accuracy per question type", _per_type_table),
    ("Evaluation-time ablations", _ablation_table),
    ("Significance", _significance),
    ("Accuracy against cost", _cost_section),
    ("Compressed: int8 and ONNX Runtime beside fp32", _compressed),
    ("Per-type accuracy (plot)", _per_type_plot),
    ("Training curves", _curves_plot),
]
#: the sections of a data set whose task is ranked by another metric than accuracy: metric name ->
#: its sections (harness.report.count registers the count task's, ``mse``); :data:`SECTIONS` otherwise
TASK_SECTIONS: dict[str, list[tuple[str, Callable[[Context], list[str]]]]] = {}


@dataclass
class Shared:
    """What the data sets of one report share: the runs' predictions (:class:`_Predictions`), the
    bootstrap, the references' variant names, where the plots go and the plots written so far."""

    preds: Callable
    boot: S.Bootstrap
    names: dict[str, str]
    files_dir: Path
    multi: bool  # several data sets: one set of plots each, named by data set
    written: dict[str, bytes] = field(default_factory=dict)


def context(shared: Shared, data_id: str, groups: list[Group]) -> Context:
    """A data set's :class:`Context`: its references, statistics and main-table rows."""
    types = type_names(groups)
    refs = {key: reference(groups, name) for key, name in shared.names.items()}
    metric = M.task_metric(R.task(groups[0].runs[0])).name
    stats = section_stats(shared.preds, groups, types, refs, shared.boot, metric)
    rows = [summarize(g, refs["baseline"], refs["control"], types, stats.cells[g.label]) for g in groups]
    for g, row in zip(groups, rows):
        comparison_columns(row, stats, g.label)
    return Context(data_id, R.data_name(groups[0].runs[0]) or data_id, groups, rows, types, refs, shared.names,
                   stats, {g.label: COLORS[i % len(COLORS)] for i, g in enumerate(groups)}, shared.files_dir,
                   f"-{slug(data_id)}" if shared.multi else "", shared.written, metric, shared.preds)


def _mc_loss_line(ctx: Context) -> list[str]:
    """Which multiple-choice loss the runs trained with (HCRN's hinge or cross entropy), per variant if they differ."""
    losses = {g.label: sorted({R.task_loss(r) for r in g.runs}) for g in ctx.groups if R.mc_loss(g.runs[0])}
    if not losses:
        return []
    kinds = {x for v in losses.values() for x in v}
    if len(kinds) == 1:
        return [f"Multiple-choice loss of every run: {next(iter(kinds))}.", ""]
    return ["Multiple-choice loss per variant: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in losses.items())
            + ".", ""]


def data_section(ctx: Context) -> list[str]:
    """One data set's part of the report: its heading, then every section of :data:`SECTIONS`."""
    sizes = R.split_sizes(ctx.groups[0].runs[0])
    lines = [f"## Data set: {ctx.dname} (`{ctx.data_id}`)", ""]
    lines += ["Questions: " + ", ".join(f"{k} {v:,}" for k, v in sorted(sizes.items())) + ".", ""] if sizes else []
    lines += _mc_loss_line(ctx)
    for title, section in TASK_SECTIONS.get(ctx.metric, SECTIONS):
        body = section(ctx)
        lines += [f"### {title}", ""] + body if body else []  # a section with nothing to show is left out
    return lines
