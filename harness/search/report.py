"""A study's report (``reports/NAME.md`` and its plots in ``reports/NAME_files/``): what the search
spent and found, on validation accuracy, then the fresh-seed comparison on test.

Sections: the header (study file, variant, data, storage, sampler, pruner, trials spent by state);
the trials table (number, validation accuracy, state, the epoch a pruned trial stopped at, reused or
trained, run id, settings); the best settings; Optuna's parameter importances; the optimisation
history and slice plots (Optuna's matplotlib plots); the study's training bill (each distinct run
once: complete runs' own cost from :mod:`harness.measurement.bill`, pruned runs' measured seconds from their
``pruned.json``, teachers and teacher-output caches once); and the test comparison of the best
settings, the control and the defaults retrained with fresh seeds (rows of the normal report of
those runs, ``reports/NAME-final.md``, whose two-level statistics it quotes).
"""
from __future__ import annotations

import io
import shlex
import warnings
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import optuna
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.ticker import NullFormatter
from optuna.trial import TrialState

from harness.measurement import bill
from harness.console import plural
from harness.search.optimize import Study, definition_hash, spent
from harness.runs.store import ResultsStore
from harness.files import atomic_write_bytes
from harness.report.fmt import fixed, md_table

OPTIMISM = ("The best trial's validation accuracy is optimistic: it is the maximum over {n} trials evaluated on "
            "the same validation questions, so part of its lead is selection on noise. The test comparison below "
            "does not share that optimism: the settings were fixed before any test accuracy was read, and they are "
            "retrained with fresh seeds ({seeds}) that the search never saw.")


def _trial_rows(o: optuna.Study) -> list[list[str]]:
    rows = []
    for t in o.get_trials(deepcopy=False):
        if t.user_attrs.get("abandoned"):
            state = "abandoned (asked again)"
        else:
            state = t.state.name.lower() + (f": {t.user_attrs['failure']}" if "failure" in t.user_attrs else "")
        pruned = str(t.user_attrs.get("pruned_epoch", t.last_step)) if t.state == TrialState.PRUNED else "-"
        how = "reused" if t.user_attrs.get("reused") else ("retry of #%d" % t.user_attrs["retry_of"]
                                                           if "retry_of" in t.user_attrs else "trained")
        params = ", ".join(f"{k}={_param(v)}" for k, v in sorted(t.params.items()))
        rows.append([str(t.number), fixed(t.value), state, pruned, how, f"`{t.user_attrs.get('run_id', '-')}`", params])
    return rows


def _param(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _importances(o: optuna.Study, seed: int) -> tuple[list[str], str]:
    """Optuna's parameter importances (fANOVA when scikit-learn is there, else PED-ANOVA, which
    needs nothing more), as table lines, and the evaluator's name."""
    try:
        import sklearn  # noqa: F401
        ev = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    except ImportError:
        ped = getattr(optuna.importance, "PedAnovaImportanceEvaluator", None)  # Optuna >= 3.6
        ev = ped() if ped is not None else optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed)
    name = type(ev).__name__
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(o, evaluator=ev)
    except (ValueError, RuntimeError) as e:
        return [f"Importances could not be computed: {e}", ""], name
    return md_table(["setting", "importance"], [[k, f"{v:.3f}"] for k, v in imp.items()], right={1}) + [""], name


def _png(ax) -> bytes:
    fig = (ax if hasattr(ax, "figure") else np.ravel(ax)[0]).figure
    for a in fig.axes:
        if a.get_ylabel() == "Objective Value":
            a.set_ylabel("validation accuracy (%)")
        if a.get_xscale() == "log":  # log axes label their decades only (minor labels overlap)
            a.xaxis.set_minor_formatter(NullFormatter())
    fig.set_size_inches(max(6.0, 3.0 * (len(fig.axes) - 1)), 4.0)  # the slice plot: one panel per setting
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _plots(o: optuna.Study, name: str, files: Path) -> list[str]:
    """The optimisation history and the slice plots, written as PNGs; their Markdown lines."""
    from optuna.visualization import matplotlib as vis

    lines = []
    for fname, plot, what in (("history.png", vis.plot_optimization_history, "optimisation history"),
                              ("slice.png", vis.plot_slice, "slice plot (validation accuracy per setting)")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            data = _png(plot(o))
        atomic_write_bytes(files / fname, data)
        lines += [f"![{what}]({name}_files/{fname})", ""]
    return lines


def _bill(store: ResultsStore, o: optuna.Study) -> tuple[list[str], float]:
    """The study's training bill: each distinct run once; returns its lines and the device-seconds."""
    own_s, own_g, pruned_s, pruned_g, teachers, caches, runs, n_pruned = 0.0, 0.0, 0.0, 0.0, {}, {}, set(), 0
    uncounted = 0
    for t in o.get_trials(deepcopy=False):
        rid = t.user_attrs.get("run_id")
        if rid is None or rid in runs:
            continue
        runs.add(rid)
        if store.is_complete(rid):
            b = bill.training_bill(store, store.read_record(rid))
            own_s += b["own"]["device_s"] or 0.0
            own_g += b["own"]["gflops"] or 0.0
            teachers.update({x["run_id"]: x for x in b["teachers"]})
            caches.update({c["build_id"]: c for c in b["caches"]})
        elif (p := store.read_pruned(rid)) is not None and "training_compute" in p:  # counted as a record's
            b = bill.training_bill(store, {"run_id": rid, "variant": p.get("variant"),
                                           "training_compute": p["training_compute"]})
            pruned_s += b["own"]["device_s"] or 0.0
            pruned_g += b["own"]["gflops"] or 0.0
            teachers.update({x["run_id"]: x for x in b["teachers"]})
            caches.update({c["build_id"]: c for c in b["caches"]})
            n_pruned += 1
        elif p is not None:  # pruned by a harness that measured its seconds only
            pruned_s += p.get("active_time_s") or 0.0
            n_pruned, uncounted = n_pruned + 1, uncounted + 1
    t_s = sum(x["device_s"] or 0.0 for x in [*teachers.values(), *caches.values()])
    t_g = sum(x["gflops"] or 0.0 for x in [*teachers.values(), *caches.values()])
    other = len(runs) - n_pruned - sum(store.is_complete(r) for r in runs)  # failed runs
    rows = [["complete trial runs (own training)", str(len(runs) - n_pruned - other), fixed(own_g), fixed(own_s, 1)],
            ["pruned trial runs (until pruned)", str(n_pruned), fixed(pruned_g), fixed(pruned_s, 1)],
            ["teachers and teacher-output caches", str(len(teachers) + len(caches)), fixed(t_g), fixed(t_s, 1)]]
    total = own_s + pruned_s + t_s
    rows.append(["**total**", str(len(runs)), fixed(own_g + pruned_g + t_g), f"**{fixed(total, 1)}**"])
    note = [f"Not billed: {plural(other, 'trial run')} with neither a record nor a pruning recorded (failed runs).", ""]
    if uncounted:
        note += [f"{plural(uncounted, 'pruned run')} {'was' if uncounted == 1 else 'were'} pruned by a harness "
                 "that measured their seconds but did not yet "
                 f"count their FLOPs: the GFLOPs are a lower bound.", ""]
    return md_table(["part", "runs", "GFLOPs (counted)", "device-seconds (measured)"], rows,
                     right={1, 2, 3}) + [""] + note[0 if other else 2:], total


def _final(final_report: Path | None, ids: dict[str, list[str]] | None) -> list[str]:
    """The test comparison's rows, from the CSV of the final runs' normal report."""
    if final_report is None:
        return ["The fresh-seed runs are not all complete yet (or one failed: `ablate.py results --failed`); run "
                "the same command again to finish them.", ""]
    df = pd.read_csv(final_report.with_suffix(".csv"))
    role = {r: k for k, v in (ids or {}).items() for r in v}
    rows = []
    for _, r in df.iterrows():
        roles = sorted({role.get(x, "?") for x in str(r["run_ids"]).split(";")})
        ref = "control" in roles
        rows.append([r["label"], "/".join(roles), str(r["n_seeds"]),
                     f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}", f"[{r['test_acc_ci_lo']:.1f}, "
                     f"{r['test_acc_ci_hi']:.1f}]", "ref" if ref else fixed(r["delta_control"], sign=True),
                     "-" if pd.isna(r["delta_control_ci_lo"]) else
                     f"[{r['delta_control_ci_lo']:+.1f}, {r['delta_control_ci_hi']:+.1f}]",
                     fixed(r["p_control_holm"], 3)])
    return md_table(["configuration", "role", "seeds", "test acc", "95% CI", "Δ control", "Δ 95% CI",
                      "p (Holm)"], rows, right={2, 3, 4, 5, 6, 7}) + [
        "", f"Full report of these runs, with per-type accuracies, McNemar tests and curves: "
            f"[{final_report.name}]({final_report.name}).", ""]


def regenerate_command(study: Study, storage: str, results: Path, out_dir: Path) -> str:
    """The command that rewrites the study's reports: its results store, its reports folder and an
    RDB storage where they are not the defaults."""
    words = ["python", "ablate.py", "search", str(study.path), "--results", str(results)]
    words += ["--reports", str(out_dir)] if Path(out_dir) != Path("reports") else []
    words += ["--storage", storage] if "://" in storage else []
    return shlex.join([*words, "--report-only"])


def _header(study: Study, o: optuna.Study, storage: str, results: Path, out_dir: Path) -> list[str]:
    trials = o.get_trials(deepcopy=False)
    count = {s: sum(t.state == s and not t.user_attrs.get("abandoned") for t in trials) for s in TrialState}
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = f"{min(starts):%Y-%m-%dT%H:%M:%S} .. {max(ends):%Y-%m-%dT%H:%M:%S}" if starts and ends else "-"
    s = study.search
    params = "; ".join(f"`{k}` " + (f"in {p.choices}" if p.choices is not None else
                                    f"{'log-uniform' if p.log else 'uniform'}{' integer' if p.int else ''} "
                                    f"[{p.low}, {p.high}]") for k, p in study.params.items())
    return [f"# {study.name}", "",
            f"Regenerated by `{regenerate_command(study, storage, results, out_dir)}`; do not edit.", "",
            f"- generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"- study file: `{study.path}` (trials' definition {definition_hash(study)}); {study.description}",
            f"- variant `{study.variant}` on `{study.data}`, training seed {s['seed']}, [train] {study.train or '{}'}, "
            f"[set] {study.fixed or '{}'}",
            f"- searched: {params}",
            f"- sampler {s['sampler']} (seeded from {s['seed']}), pruner {s['pruner']} (startup trials "
            f"{s['startup_trials']}, warm-up epochs {s['warmup_epochs']}); objective: the validation accuracy at "
            f"the best-validation epoch, maximised; test metrics are sealed while searching",
            f"- storage: `{storage}`",
            f"- trials spent: {spent(o)} of {s['n_trials']} ({count[TrialState.COMPLETE]} complete, "
            f"{count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed; "
            f"{sum(bool(t.user_attrs.get('abandoned')) for t in trials)} abandoned by a killed process and asked "
            f"again; {sum(bool(t.user_attrs.get('reused')) for t in trials)} reused a complete run)",
            f"- trials' dates: {span} (first start .. last finish, resumed studies included)", ""]


def write_study_report(study: Study, store: ResultsStore, o: optuna.Study, storage: str,
                       final_ids: dict[str, list[str]] | None, final_report: Path | None,
                       out_dir: str | Path = "reports") -> Path:
    """Write ``out_dir/NAME.md`` and its plots (``NAME_files/``); returns the Markdown's path."""
    out_dir = Path(out_dir)
    files = out_dir / f"{study.name}_files"
    best = o.best_trial
    imp, evaluator = _importances(o, study.search["seed"])
    bill_lines, _ = _bill(store, o)
    lines = _header(study, o, storage, store.root, out_dir)
    lines += ["## Trials", "", "Validation accuracy (%) at each run's best-validation epoch; a pruned trial's "
              "epoch is the last it trained (1-based).", ""]
    lines += md_table(["#", "val acc", "state", "pruned at epoch", "run", "run id", "settings"], _trial_rows(o),
                       right={0, 1, 3}) + [""]
    lines += ["## Best settings", "", f"Trial #{best.number}, validation accuracy {fixed(best.value)}% "
              f"(run `{best.user_attrs.get('run_id')}`): " + ", ".join(f"`{k}` = {_param(v)}"
                                                                        for k, v in sorted(best.params.items())), "",
              OPTIMISM.format(n=spent(o), seeds=", ".join(map(str, study.search["final_seeds"]))), ""]
    lines += [f"## Parameter importances ({evaluator})", ""] + imp
    lines += ["## Optimisation history and slices", ""] + _plots(o, study.name, files)
    lines += ["## Training bill of the study", "", "Each distinct run once (a trial that reused a complete run "
              "adds nothing new; teachers and caches once); the fresh-seed runs below are billed in their own "
              "report.", ""] + bill_lines
    lines += ["## Test comparison with fresh seeds", "", f"The best settings, the control `{study.search['control']}`"
              + (" and the variant at its default settings" if study.search["compare_default"] else "")
              + f", each trained with seeds {', '.join(map(str, study.search['final_seeds']))}; test accuracy at "
              "the best-validation epoch, differences against the control with the two-level bootstrap's 95% "
              "interval and Holm-corrected p-value.", ""] + _final(final_report, final_ids)
    md = out_dir / f"{study.name}.md"
    atomic_write_bytes(md, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return md
