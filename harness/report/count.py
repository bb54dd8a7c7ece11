"""The sections of a count data set (TGIF-QA Count: :mod:`variants.tasks`' ``count``), whose runs
are ranked by their test MSE (lower is better), not by accuracy. The statistics are those of the
accuracy sections, on other per-question values: the two-level bootstrap of the mean squared
error (seeds and test questions) and of paired differences, Holm across a table; McNemar's test,
which needs right / wrong answers, does not apply. Registered in :data:`sections.TASK_SECTIONS`
under the metric ``mse``."""
from __future__ import annotations

from .. import metrics as M
from .. import record as R
from ..evaluate import ABLATIONS
from ..stats import Estimate
from .fmt import QUESTIONS_ONLY, _f, _g, _md_table, fmt_p
from .grouping import Group, _mean, mean_std
from .sections import TASK_SECTIONS, Context, _fmt_n, _significance_table
from .statistics import ALPHA, COST_COLUMNS, CORRECTION

#: the metric of the count task (harness.metrics)
METRIC = "mse"
ND = 3  # decimals of an MSE


def _mse(x: float | None, sign: bool = False) -> str:
    return _f(x, ND, sign)


def _interval(e: Estimate | None, sign: bool = False) -> str:
    if e is None or e.lo is None:
        return "-"
    return f"[{_mse(e.lo, sign)}, {_mse(e.hi, sign)}]" + ("" if e.seed_level else QUESTIONS_ONLY)


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
    m, r = _mean(g.metric(METRIC)), _mean(ref.metric(METRIC))
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
                      _g(r[COST_COLUMNS["flops_per_sample"][1]]), _f(r[COST_COLUMNS["latency_ms_median"][1]], 3),
                      _mse(m) if s is None else f"{_mse(m)} ± {_mse(s)}", _interval(ctx.stats.cells[g.label]["all"]),
                      _fmt_n(g), _delta(g, ctx.base), _delta(g, ctx.ctrl), r["teachers"] or "-"])
    notes = ("Notes: test MSE: the mean squared error of the count (HCRN's: the output rounded and clamped to "
             "1-10) at the epoch with the lowest validation MSE; lower is better, so a negative Δ is an "
             "improvement. Mean ± std over seeds; 95% CI: the two-level bootstrap over seeds and test questions "
             f"({QUESTIONS_ONLY}: over the test questions only, for fewer seeds than needed to estimate seed "
             "variance). GFLOPs and latency as in the other tables (- where not measured).")
    return _md_table(headers, table, right=set(range(1, len(headers) - 1))) + ["", notes, ""]


def _per_type_table(ctx: Context) -> list[str]:
    """MSE per question type, each with its interval."""
    lines = ["Test MSE per question type: mean ± std over seeds [95% interval]; the last row is the number of "
             "test questions.", ""]
    cells = ctx.stats.cells
    rows = []
    for g in ctx.groups:
        per = [_mean(g.values(lambda r, t=t: R.per_type(r, "test", METRIC).get(t))) for t in ctx.types]
        rows.append([g.label] + [_cell(cells[g.label].get(t), v) for t, v in zip(ctx.types, per)]
                    + [_cell(cells[g.label].get("all"), _mean(g.metric(METRIC)))])
    counts = R.split_metrics(ctx.groups[0].runs[0], "test")
    rows.append(["questions"] + [str(counts.get("counts", {}).get(t, "-")) for t in ctx.types]
                + [str(counts.get("n", "-"))])
    return lines + _md_table(["variant"] + ctx.types + ["all"], rows) + [""]


def _ablation_table(ctx: Context) -> list[str]:
    """Test MSE under each evaluation-time ablation."""
    lines = ["Test MSE when the model is evaluated with the videos shuffled across questions, the appearance "
             "features zeroed, or the motion features zeroed (mean over seeds; an MSE that rises when a stream is "
             "removed shows that the model used it).", ""]
    rows = [[g.label, _mse(_mean(g.metric(METRIC)))]
            + [_mse(_mean(g.values(lambda x, key=key: R.metric(x, key, METRIC)))) for key in ABLATIONS]
            for g in ctx.groups]
    return lines + _md_table(["variant", "test"] + list(ABLATIONS.values()), rows) + [""]


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
            lines += _significance_table(ctx.stats.comparisons[key], mcnemar=False, nd=ND)
    return lines


SECTIONS = [
    ("Main table (count: MSE)", _main_table),
    ("MSE per question type", _per_type_table),
    ("Evaluation-time ablations", _ablation_table),
    ("Significance", _significance),
]
TASK_SECTIONS[M.METRICS[METRIC].name] = SECTIONS
