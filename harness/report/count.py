"""The sections of a count data set (TGIF-QA Count: :mod:`variants.tasks`' ``count``), whose runs
are ranked by their test MSE (lower is better), not by accuracy. The statistics are those of the
accuracy sections, on other per-question values: the two-level bootstrap of the mean squared
error (seeds and test questions) and of paired differences, Holm across a table; McNemar's test,
which needs right / wrong answers, does not apply. Registered in :data:`sections.TASK_SECTIONS`
under the metric ``mse``."""
from __future__ import annotations

from harness.evaluation import metrics as M
from harness.runs import record as R
from harness.evaluation.evaluate import ABLATIONS
from harness.stats import Estimate
from harness.report.fmt import QUESTIONS_ONLY, fixed, fmt_sig, md_table, fmt_ci, fmt_p
from harness.report.grouping import Group, mean_or_none, mean_std
from harness.report.plots import plot_curves
from harness.report.sections import (TASK_SECTIONS, Context, cpu_ms, fmt_n, median_or_none, significance_table,
    cost_note, latency_cell)
from harness.report.statistics import ALPHA, COST_COLUMNS, CORRECTION, compressed_rows

#: the metric of the count task (harness.evaluation.metrics)
METRIC = "mse"
ND = 3  # decimals of an MSE


def _mse(x: float | None, sign: bool = False) -> str:
    return fixed(x, ND, sign)


def _interval(e: Estimate | None, sign: bool = False) -> str:
    return fmt_ci(e, sign, ND)


def _cell(e: Estimate | None, mean: float | None) -> str:
    if e is None:
        return _mse(mean)
    spread = "" if e.std is None else f" ± {_mse(e.std)}"
    return f"{_mse(e.mean)}{spread} {_interval(e)}"


def _delta(g: Group, ref: Group | None) -> str:
    if ref is None:
        return "-"
    if g is ref:
        return "ref"
    m, r = mean_or_none(g.metric(METRIC)), mean_or_none(ref.metric(METRIC))
    return _mse(m - r, sign=True) if m is not None and r is not None else "-"


def _main_table(ctx: Context) -> list[str]:
    """Params, costs, test MSE with its spread, interval and deltas, teachers."""
    headers = (["variant", "params", "GFLOPs", "latency ms", "test MSE", "95% CI", "n seeds",
                f"Δ {ctx.names['baseline']}", f"Δ {ctx.names['control']}", "teachers"])
    table = []
    for g, r in ctx.pairs():
        m, s = mean_std(g.metric(METRIC))
        table.append([f"**{g.label}**" if g in (ctx.base, ctx.ctrl) else g.label,
                      f"{r['params']:,}" if r["params"] is not None else "-",
                      fmt_sig(r[COST_COLUMNS["flops_per_sample"][1]]),
                      latency_cell(g, r[COST_COLUMNS["latency_ms_median"][1]]),
                      _mse(m) if s is None else f"{_mse(m)} ± {_mse(s)}", _interval(ctx.stats.cells[g.label]["all"]),
                      fmt_n(g), _delta(g, ctx.base), _delta(g, ctx.ctrl), r["teachers"] or "-"])
    notes = ("Notes: test MSE: the mean squared error of the count (HCRN's: the output rounded and clamped to "
             "1-10) at the epoch with the lowest validation MSE; lower is better, so a negative Δ is an "
             "improvement. Mean ± std over seeds; 95% CI: the two-level bootstrap over seeds and test questions "
             f"({QUESTIONS_ONLY}: over the test questions only, for fewer seeds than needed to estimate seed "
             "variance). GFLOPs and latency as in the other tables (- where not measured).")
    return md_table(headers, table, right=set(range(1, len(headers) - 1))) + ["", notes, *cost_note(ctx.groups), ""]


def _per_type_table(ctx: Context) -> list[str]:
    """MSE per question type, each with its interval."""
    lines = ["Test MSE per question type: mean ± std over seeds [95% interval]; the last row is the number of "
             "test questions.", ""]
    cells = ctx.stats.cells
    rows = []
    for g in ctx.groups:
        per = [mean_or_none(g.values(lambda r, t=t: R.per_type(r, "test", METRIC).get(t))) for t in ctx.types]
        rows.append([g.label] + [_cell(cells[g.label].get(t), v) for t, v in zip(ctx.types, per)]
                    + [_cell(cells[g.label].get("all"), mean_or_none(g.metric(METRIC)))])
    counts = R.split_metrics(ctx.groups[0].runs[0], "test")
    rows.append(["questions"] + [str(counts.get("counts", {}).get(t, "-")) for t in ctx.types]
                + [str(counts.get("n", "-"))])
    return lines + md_table(["variant"] + ctx.types + ["all"], rows) + [""]


def _ablation_table(ctx: Context) -> list[str]:
    """Test MSE under each evaluation-time ablation."""
    lines = ["Test MSE when the model is evaluated with the videos shuffled across questions, the appearance "
             "features zeroed, or the motion features zeroed (mean over seeds; an MSE that rises when a stream is "
             "removed shows that the model used it).", ""]
    rows = [[g.label, _mse(mean_or_none(g.metric(METRIC)))]
            + [_mse(mean_or_none(g.values(lambda x, key=key: R.metric(x, key, METRIC)))) for key in ABLATIONS]
            for g in ctx.groups]
    return lines + md_table(["variant", "test"] + list(ABLATIONS.values()), rows) + [""]


def _significance(ctx: Context) -> list[str]:
    """Every variant against each reference: paired MSE differences, intervals, Holm."""
    b = ctx.stats.boot
    lines = [f"Each variant against the reference, runs paired seed by seed and questions by question_id. Δ: mean "
             f"over the paired seeds of the test-MSE difference (variant - reference; negative: fewer squared "
             f"errors). 95% CI and p: the two-level bootstrap ({b.resamples} resamples, seed {b.seed}) of the paired "
             f"squared errors; p is two-sided for Δ = 0 and never below {fmt_p(b.p_floor)}. p (Holm): {CORRECTION} "
             f"correction across the comparisons of the table (* below {ALPHA}). McNemar's test does not apply to "
             "a count.", ""]
    for key, refname in ctx.names.items():
        ref = ctx.refs[key]
        lines += [f"Against `{refname}`:", ""]
        if ref is None:
            lines += [f"`{refname}` has no run on this data set: no comparison.", ""]
        elif len(ctx.groups) < 2:
            lines += ["no other variant.", ""]
        else:
            lines += significance_table(ctx.stats.comparisons[key], mcnemar=False, nd=ND, ci_nd=ND)
    return lines


def _compressed(ctx: Context) -> list[str]:
    """Each variant's runs evaluated compressed (harness.compression.compress) beside the same runs in fp32: test MSE,
    its paired difference, agreement of the rounded counts, size and CPU latency."""
    crows = compressed_rows(ctx.preds, ctx.groups, ctx.types, ctx.stats.boot, METRIC) if ctx.preds else []
    if not crows:
        return []
    rows = []
    for g in ctx.groups:
        mine = [row for row in crows if row.group is g]
        if not mine:
            continue
        comp = [c for row in mine for _, c in row.pairs]
        m, sd = mean_std(g.metric(METRIC))
        size = median_or_none([c["size"]["fp32_bytes"] for c in comp])
        rows.append([g.label, "fp32 (eager)", fmt_n(g), _mse(m) if sd is None else f"{_mse(m)} ± {_mse(sd)}",
                     _interval(ctx.stats.cells[g.label]["all"]), "ref", "-", "-", "-",
                     fixed(size / 1e6, 3) if size else "-", fixed(cpu_ms(comp, "1", "fp32")),
                     fixed(cpu_ms(comp, "32", "fp32"))])
        for row in mine:
            xs = [c for _, c in row.pairs]
            cm, csd = mean_std([R.metric(c, "test", METRIC) for c in xs])
            d = row.cmp.delta if row.cmp else None
            star = " *" if row.cmp and row.cmp.p_holm is not None and row.cmp.p_holm < ALPHA else ""
            rows.append(["", row.method, f"n={len(xs)}", _mse(cm) if csd is None else f"{_mse(cm)} ± {_mse(csd)}",
                         _interval(row.acc), _mse(d.mean, sign=True) if d else "-", _interval(d, sign=True),
                         (fmt_p(row.cmp.p_holm) + star) if d else "-",
                         fixed(100 * mean_or_none([c["agreement"]["prediction_agreement"] for c in xs])),
                         fixed(median_or_none([c["size"]["bytes"] for c in xs]) / 1e6, 3),
                         fixed(cpu_ms(xs, "1", "compressed")), fixed(cpu_ms(xs, "32", "compressed"))])
    headers = ["variant", "path", "n seeds", "test MSE", "95% CI", "Δ fp32", "95% CI", "p (Holm)", "counts agree %",
               "size MB", "CPU ms b1", "CPU ms b32"]
    intro = ("Each run evaluated after training, without retraining (`harness.compression.compress`), on the CPU "
             "with the same "
             "evaluation code as the run. Δ fp32: the paired difference of test MSE against the same runs in fp32 "
             f"(same seeds, same questions; two-level bootstrap of the squared errors), p {CORRECTION}-corrected "
             f"across this table (* below {ALPHA}); negative: fewer squared errors. counts agree %: the compressed "
             "model's rounded counts equal to fp32's. Size and CPU latency as in the accuracy report's section.")
    return [intro, ""] + md_table(headers, rows, right=set(range(2, len(headers)))) + [""]


def _curves_plot(ctx: Context) -> list[str]:
    """Validation MSE per epoch (the epoch with the lowest is each run's selected one)."""
    fname = f"training_curves{ctx.suffix}.png"
    ctx.written[fname] = plot_curves(ctx.groups, ctx.colors, f"{ctx.dname}: validation MSE per epoch (mean over "
                                                               "seeds)", key="val_mse")
    return [f"![training curves]({ctx.link(fname)})", ""]


SECTIONS = [
    ("Main table (count: MSE)", _main_table),
    ("MSE per question type", _per_type_table),
    ("Evaluation-time ablations", _ablation_table),
    ("Significance", _significance),
    ("Compressed: int8 and ONNX Runtime beside fp32", _compressed),
    ("Training curves", _curves_plot),
]
TASK_SECTIONS[M.METRICS[METRIC].name] = SECTIONS
