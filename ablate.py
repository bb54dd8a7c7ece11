"""Train, evaluate and compare VideoQA variants.

\b
  python ablate.py --grid tiny          # run grids/tiny.toml, then its report
  python ablate.py --grid kd-losses --jobs 4     # four runs at a time
  python ablate.py --grid msvd --executor slurm --partition gpu
  python ablate.py report --grid tiny   # regenerate reports/tiny.md
  python ablate.py search grids/search-logits.toml  # Optuna study
  python ablate.py run dualvgr          # one run, per-type accuracy
  python ablate.py list                 # the variant registry
  python ablate.py results              # every complete run in the store
  python ablate.py run dualvgr --log tensorboard  # watch it live
  python ablate.py export RUN_ID -o teacher.tar   # share a run ...
  python ablate.py import teacher.tar   # ... and use it elsewhere
  python ablate.py compress --grid tiny-compress  # int8, ONNX
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.console import error, make_console, plural, say

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
console = make_console()
LOG_HELP = ("Live logging sink, repeatable: tensorboard (event files under results/runs/<run>/tensorboard) or wandb "
            "(offline unless W&B is configured)")
MAX_RUNS_HELP = ("The most runs the grid may make; a larger grid is refused before it is expanded [default: "
                 "harness.execution.grid.MAX_RUNS, 10,000].")


INTERRUPTED = "interrupted; rerun to resume (complete runs are kept, unfinished ones continue from their last " \
              "completed epoch)"


def interrupted() -> typer.Exit:
    """Ctrl-C: one line saying how to go on, exit code 130 (the shell's for SIGINT)."""
    say(console, INTERRUPTED, "yellow")
    return typer.Exit(130)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can cause and fix (printed as a message, exit 2); anything else is a bug
    and shows its traceback."""
    import variants
    from harness.errors import HarnessError

    return (HarnessError, variants.UnknownNameError, variants.ConfigError)


def parse_sets(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, true, lists)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


#: ``run``'s options for what a user may try to give with ``--set`` (training settings and the run's own)
RUN_OPTIONS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "early_stop": "--early-stop",
               "precision": "--precision", "glove": "--no-glove", "seed": "--seed", "data": "--data",
               "device": "--device", "mode": "--mode"}


def check_set_keys(variant: str, overrides: dict, options: dict[str, str]) -> None:
    """A ``--set`` key that is no setting of ``variant`` but a command-line option (``lr``: ``--lr``)
    or a training setting is refused naming the option; other keys are left to the variant's check."""
    import variants
    from harness.runs.settings import TRAIN_CHECKS

    own = variants.settings(variant)
    for key, value in overrides.items():
        if key in own:
            continue
        if key in options:
            raise variants.ConfigError(f"--set {key}={value}: {key} is not a setting of variant {variant!r} but an "
                                       f"option of this command: use {options[key]}"
                                       + ("" if options[key].startswith("--no-") else f" {value}"))
        if key in TRAIN_CHECKS:
            raise variants.ConfigError(f"--set {key}={value}: {key} is not a setting of variant {variant!r} but a "
                                       f"training setting, which a grid file's [train] table sets")


def accuracy_table(record: dict, title: str | None = None) -> Table:
    """Per-question-type accuracy (a count's MSE: the run's task metric) of one run: val and test
    (best-val epoch), test (last epoch), and the evaluation-time ablations (which evidence each
    question type uses)."""
    from harness.evaluation import metrics as M
    from harness.runs import record as R

    metric = M.task_metric(R.task(record))
    m = {k: {"overall": v.get(metric.key), "per_type": v.get(metric.per_type) or {}, "counts": v.get("counts", {}),
             "n": v.get("n")} for k, v in record["metrics"].items() if isinstance(v, dict) and k != "ablations"}
    m["ablations"] = {k: {"overall": v.get(metric.key), "per_type": v.get(metric.per_type) or {}}
                      for k, v in record["metrics"].get("ablations", {}).items()}
    types = [t for t in record["data"]["type_names"] if t in m["test"]["per_type"] or t in m["val"]["per_type"]]
    what = ("" if metric.name == M.PRIMARY
            else f": {metric.title}, {'higher' if metric.higher_is_better else 'lower'} is better")
    t = Table(title=title or f"{record['variant']} on {record['data']['name']} (seed {record['seed']}){what}")
    t.add_column("split")
    for name in types:
        t.add_column(name, justify="right")
    t.add_column("all", justify="right", style="bold")
    for label, key in (("val (best epoch)", "val"), ("test (best-val epoch)", "test"),
                       ("test (last epoch)", "test_last")):
        row = m[key]
        t.add_row(label, *[f"{row['per_type'][n]:.2f}" if n in row["per_type"] else "-" for n in types],
                  f"{row['overall']:.2f}")
    from harness.evaluation.evaluate import ABLATIONS

    for key, row in m.get("ablations", {}).items():
        t.add_row(f"test, {ABLATIONS.get(key, key)}",
                  *[f"{row['per_type'][n]:.2f}" if n in row["per_type"] else "-" for n in types],
                  f"{row['overall']:.2f}", style="italic")
    t.add_row("questions (test)", *[str(m["test"]["counts"].get(n, 0)) for n in types], str(m["test"]["n"]),
              style="dim")
    return t


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    grid: Optional[str] = typer.Option(None, "--grid", help="Run the grid grids/NAME.toml (or a path to a grid "
                                       "file): complete runs are skipped, teachers run first, "
                                       "then the report is written."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Runs at a time [default: the grid's executor.jobs, else 1]."),
    executor: Optional[str] = typer.Option(None, help="local (processes on this machine), slurm (a submitit job "
                                           "array), submitit-local, or another kind registered in "
                                           "harness.execution.executor [default: the grid's, else local]."),
    executor_option: Optional[list[str]] = typer.Option(None, "--executor-option", help="KEY=VALUE, repeatable: "
                                                        "an option of the executor (a key of its grid [executor] "
                                                        "table); the SLURM options below are shorthands."),
    data: Optional[str] = typer.Option(None, help="Override the grid's data set."),
    seeds: Optional[str] = typer.Option(None, help="Override the grid's seeds, comma-separated."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N [default: cuda when available; with --jobs, "
                               "runs are spread over the GPUs]."),
    results: str = typer.Option("results", help="Results store directory."),
    reports: str = typer.Option("reports", help="Where the report goes."),
    partition: Optional[str] = typer.Option(None, help="SLURM partition [default: the grid's executor.partition, "
                                            "else the cluster's default partition]."),
    gpus_per_run: Optional[int] = typer.Option(None, min=0, help="GPUs per SLURM job (--gpus-per-node); 0 for a "
                                               "CPU-only partition [default: the grid's executor.gpus_per_run, else 1 "
                                               "when --device is cuda, else none requested]."),
    cpus_per_run: Optional[int] = typer.Option(None, min=1, help="CPUs per SLURM job (--cpus-per-task); torch uses "
                                               "as many threads [default: the grid's executor.cpus_per_run, else "
                                               "the cluster's default]."),
    mem_gb: Optional[float] = typer.Option(None, min=0, help="Memory per SLURM job, GB (--mem; 0 is SLURM's 'all of "
                                           "the node's memory') [default: the grid's executor.mem_gb, else the "
                                           "cluster's default]."),
    time_min: Optional[int] = typer.Option(None, min=1, help="SLURM time limit per job, minutes; a run that reaches "
                                           "it is requeued and resumes from its last completed epoch [default: the "
                                           "grid's executor.time_min, else the partition's default time limit]."),
    array_parallelism: Optional[int] = typer.Option(None, min=1, help="SLURM jobs running at a time [default: the "
                                                    "grid's executor.array_parallelism, else --jobs]."),
    mode: str = typer.Option("auto", help="Feature loading: memory, stream or auto."),
    reuse_other_code: bool = typer.Option(True, help="Reuse complete runs computed by other code than this "
                                          "checkout's (their records' code fingerprint; the grid says how many); "
                                          "--no-reuse-other-code trains them again (theirs kept in "
                                          "RESULTS/other-code/<fingerprint>)."),
    refuse_damaged: bool = typer.Option(False, "--refuse-damaged", help="Stop when a complete teacher run's "
                                        "weights are damaged (size or SHA-1 unlike what was written) instead of "
                                        "setting it aside and retraining it."),
    max_runs: Optional[int] = typer.Option(None, min=1, help=MAX_RUNS_HELP),
    log: Optional[list[str]] = typer.Option(None, "--log", help=LOG_HELP + " [default: the grid's [log]]."),
):
    """Run an ablation grid (--grid), or one of the commands below."""
    if ctx.invoked_subcommand is not None:
        return
    if grid is None:
        console.print(ctx.get_help())
        raise typer.Exit(0)
    from harness.execution import grid as G
    from harness.runs.store import ResultsStore
    from harness.files import check_writable

    try:
        g = G.load(grid, data=data, seeds=[int(x) for x in seeds.split(",")] if seeds else None,
                   max_runs=max_runs or G.MAX_RUNS)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    ex = executor or g.executor.get("kind", "local")
    # the command line overrides the grid's [executor] table (checked when it was loaded); a value given is sent
    # as is, 0 included
    given = {"partition": partition, "gpus_per_run": gpus_per_run, "cpus_per_run": cpus_per_run, "mem_gb": mem_gb,
             "time_min": time_min, "array_parallelism": array_parallelism}
    try:
        options = _grid_options(g, ex, executor_option, given)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    store = ResultsStore(results)
    try:
        check_writable(store.root)
        check_writable(reports, "reports directory", "--reports")  # before the training, not after it
        res = G.run_grid(g, store, executor=ex, jobs=jobs or int(g.executor.get("jobs", 1)), device=device, mode=mode,
                       console=console, options=options, reuse_other_code=reuse_other_code,
                       refuse_damaged=refuse_damaged, log=log)
        if res.interrupted:
            raise KeyboardInterrupt
        _measure_costs(store, res.run_ids, device)
        compress_failed = _compress(store, _grid_run_ids(store, g, res.run_ids), g.compress)
        reported = _write_report(store, g, reports, res.run_ids,
                                 regenerate=_command("report", grid=grid, results=results, reports=reports,
                                                     data=data, seeds=seeds, max_runs=max_runs))
    except KeyboardInterrupt:
        raise interrupted() from None
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    if res.failed:
        say(console, f"{plural(len(res.failed), 'run')} failed: " + "; ".join(
            f"{f['variant']} seed {f['seed']}: {f['reason']}" for f in res.failed), "red")
        raise typer.Exit(1)
    if not reported or compress_failed:  # a compressed evaluation that failed was said in red above
        raise typer.Exit(2 if not reported else 1)


def _grid_run_ids(store, g, run_ids: list[str]) -> list[str]:
    """The complete runs among ``run_ids`` of the variants the grid lists (not the teachers it trains for them)."""
    listed = {s.variant for s in g.runs}
    return [r for r in run_ids if store.is_complete(r) and store.read_record(r)["variant"] in listed]


def _compress(store, run_ids: list[str], methods: tuple[str, ...], force: bool = False) -> list[dict]:
    """Each run evaluated compressed by each method (harness.compression.compress), on the CPU, one at a time,
    after the training and the cost measurements; complete ones are skipped. Returns the failures, each said."""
    from harness.compression import compress

    if not methods or not run_ids:
        return []
    failures = compress.compress_runs(store, run_ids, methods, force=force, say=lambda m: say(console, m, "dim"))
    for f in failures:
        error(console, f"compressed evaluation failed: {f['variant']} ({f['run_id']}), {f['method']}: {f['reason']}")
    return failures


def _grid_options(g, kind: str, items: list[str] | None, given: dict) -> dict:
    """The executor's options: the grid's ``[executor]`` table, then ``--executor-option``, then the
    options given on the command line that are not None, each checked by the executors that read it
    (a ``--partition`` that is not a partition name is refused)."""
    from harness.execution.executor import check_options

    given = {k: v for k, v in given.items() if v is not None}
    check_options(given, "command line")
    return {**g.executor, **_executor_options(kind, items), **given}


def _executor_options(kind: str, items: list[str] | None) -> dict:
    """``--executor-option KEY=VALUE`` pairs for the executor ``kind``: each key one it reads, each
    value checked by it (harness.execution.executor's registry)."""
    from harness.execution.executor import EXECUTORS, check_options, executor_kind

    if kind not in EXECUTORS:
        raise typer.BadParameter(f"--executor must be one of {', '.join(EXECUTORS.list())}, got {kind!r}")
    options = parse_sets(items)
    unknown = sorted(set(options) - set(executor_kind(kind).options))
    if unknown:
        raise typer.BadParameter(f"--executor-option: executor {kind!r} has no option(s) {', '.join(unknown)} "
                                 f"(its options: {', '.join(executor_kind(kind).options) or 'none'})")
    check_options(options, "--executor-option")
    return options


def _measure_costs(store, run_ids: list[str], device: str) -> None:
    """Latency and inference memory of each trained configuration, once per device, serially,
    after all training (harness.measurement.costs)."""
    from harness.measurement import costs

    n = costs.measure_missing(store, run_ids, device, say=lambda m: say(console, m, "dim"))
    if n:
        say(console, f"inference cost measured for {plural(n, 'configuration')}, one at a time")


def _command(sub: str | None = None, **options) -> str:
    """The ablate.py command line that does ``sub`` with these options (those that differ from the
    defaults), quoted for a shell: what a hint or a report header tells the user to run."""
    import shlex

    defaults = {"results": "results", "reports": "reports"}
    words = ["python", "ablate.py", *([sub] if sub else [])]
    for k, v in options.items():
        if v is not None and v != defaults.get(k):
            words += [f"--{k.replace('_', '-')}", str(v)]
    return shlex.join(words)


def _planned(store, g, plans=None) -> list[dict] | None:
    """What each run of the grid (teachers included) is: id, variant, settings label, seed; so that
    a partial report can say what it lacks. None when the data set is not recorded."""
    from harness.execution.grid import grid_plans
    from harness.training.plan import recorded_info

    if plans is None:
        try:
            plans = [q for p in grid_plans(g, lambda d: recorded_info(d, store)) for q in p.all_plans()]
        except user_errors():
            return None
    out = {}
    for q in plans:
        ov = q.spec.overrides
        label = q.spec.variant + (f" [{', '.join(f'{k}={v}' for k, v in sorted(ov.items()))}]" if ov else "")
        out.setdefault(q.run_id, {"run_id": q.run_id, "variant": q.spec.variant, "label": label, "seed": q.spec.seed})
    return list(out.values())


def _write_report(store, g, reports: str, run_ids: list[str], regenerate: str, plans=None) -> bool:
    """Write the grid's report (its header names ``regenerate``, the command that writes it again);
    False (with one error line) when it cannot be written."""
    from harness.report import write_report
    from harness.files import NoSpace, NotWritable

    if not any(store.is_complete(r) for r in run_ids):
        say(console, "no complete run: no report written")
        return True
    try:
        path = write_report(store, g.name, run_ids=run_ids, out_dir=reports, grid_file=str(g.path),
                            command=regenerate, planned=_planned(store, g, plans))
    except user_errors() as e:
        fix = {NoSpace: "free some space and run", NotWritable: f"make {reports} writable (or give another folder "
               "with --reports DIR) and run"}.get(type(e), "fix that and run")
        error(console, f"{e}; the report was not written (the results store is unchanged: every complete run is "
                       f"kept); {fix} `{regenerate}`")
        return False
    say(console, f"report: {path}")
    return True


@app.command()
def report(grid: str = typer.Option(..., "--grid", help="Grid name or file whose runs the report covers."),
           results: str = typer.Option("results", help="Results store directory."),
           reports: str = typer.Option("reports", help="Where the report goes."),
           data: Optional[str] = typer.Option(None, help="Override the grid's data set."),
           seeds: Optional[str] = typer.Option(None, help="Override the grid's seeds, comma-separated."),
           max_runs: Optional[int] = typer.Option(None, min=1, help=MAX_RUNS_HELP)):
    """Regenerate reports/NAME.md (and .csv, and plots) from the results store; trains nothing."""
    from harness.execution import grid as G
    from harness.training.plan import recorded_info
    from harness.runs.store import ResultsStore

    store = ResultsStore(results)
    try:
        g = G.load(grid, data=data, seeds=[int(x) for x in seeds.split(",")] if seeds else None,
                   max_runs=max_runs or G.MAX_RUNS)
        # the data sets' info from the store: no feature file is read
        plans = [q for p in G.grid_plans(g, lambda d: recorded_info(d, store)) for q in p.all_plans()]
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    ids = [*dict.fromkeys(q.run_id for q in plans)]
    missing = [r for r in ids if not store.is_complete(r)]
    if len(missing) == len(ids):
        error(console, f"no complete run of grid {g.name} ({g.path}) in the results store {store.root} "
                       f"(looked for {plural(len(ids), 'run')}): nothing to report; "
                       f"`{_command(grid=grid, results=results, data=data, seeds=seeds, max_runs=max_runs)}` runs them")
        raise typer.Exit(1)
    if missing:
        say(console, f"{len(missing)} of {plural(len(ids), 'run')} {'is' if len(missing) == 1 else 'are'} not "
                     "complete; the report covers the rest and says "
                     "what is missing (run "
                     f"`{_command(grid=grid, results=results, data=data, seeds=seeds, max_runs=max_runs)}` to "
                     "finish them)", "yellow")
    if not _write_report(store, g, reports, ids, _command("report", grid=grid, results=results, reports=reports,
                                                           data=data, seeds=seeds, max_runs=max_runs), plans):
        raise typer.Exit(2)


@app.command()
def compress(run_id: Optional[list[str]] = typer.Argument(None, help="Runs to compress (see `ablate.py results`)."),
             grid: Optional[str] = typer.Option(None, "--grid", help="Compress the complete runs of this grid."),
             method: Optional[list[str]] = typer.Option(None, "--method", help="dynamic-int8, onnx, "
                                                        "ort-dynamic-int8 or ort-static-int8, repeatable [default: "
                                                        "the grid's [evaluate] compress, else all]."),
             results: str = typer.Option("results", help="Results store directory."),
             force: bool = typer.Option(False, help="Evaluate and time again those already complete."),
             threads: Optional[int] = typer.Option(None, min=1, help="torch and ONNX Runtime CPU threads [default: "
                                                   "torch's]; on a CPU shared with other work, "
                                                   "1 times more steadily.")):
    """Evaluate complete runs compressed (int8, ONNX Runtime, ONNX Runtime int8) on the CPU, without retraining: each
    is recorded in results/runs/<run>/compressed/<method>/ beside the run (whose own files are only read); complete
    ones are skipped. `ablate.py report --grid NAME` then shows them beside their fp32 runs."""
    from harness.compression import compress as C
    from harness.execution import grid as G
    from harness.evaluation import metrics as M
    from harness.runs import record as R
    from harness.training.plan import recorded_info
    from harness.runs.store import ResultsStore

    store = ResultsStore(results)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        ids = list(run_id or [])
        for rid in ids:
            if not store.is_complete(rid):
                raise C.CompressError(f"{rid}: not a complete run in {store.root} (see `ablate.py results`)")
        g = G.load(grid) if grid else None
        if g is not None:
            plans = G.grid_plans(g, lambda d: recorded_info(d, store))
            ids += _grid_run_ids(store, g, [p.run_id for p in plans])
        methods = C.check_methods(method or (g.compress if g is not None and g.compress else list(C.METHODS)),
                                  "--method")
        if not ids:
            raise C.CompressError("no run to compress: name run ids or a grid with complete runs")
        failed = _compress(store, ids, methods, force=force)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    for rid in ids:
        fp32 = store.read_record(rid)
        metric = M.task_metric(R.task(fp32))  # accuracy, or a count's MSE

        def figure(r: dict, metric=metric) -> str:
            return metric.fmt(R.metric(r, "test", metric.name))

        for m, rec in ((m, r) for m, r in C.read_all(store, fp32).items() if m in methods):
            a, cpu = rec["agreement"], rec["cpu"]["latency"]
            say(console, f"{rec['variant']} seed {rec['seed']} {m}: {metric.title} {figure(rec)} "
                         f"(fp32 {figure(fp32)}), predictions agree {100 * a['prediction_agreement']:.1f}%, "
                         f"max |logit diff| {a['max_abs_logit_diff']:.2g}, {rec['size']['bytes']:,} bytes, "
                         f"batch 1 {cpu['1']['compressed']['latency_ms_median']:.2f} ms "
                         f"(fp32 {cpu['1']['fp32']['latency_ms_median']:.2f} ms)")
    if failed:
        raise typer.Exit(1)


def _check_same_data(gs) -> None:
    """Two grids compared share a data set (runs are paired on the same questions), else a GridError naming them."""
    from harness.errors import GridError

    if not set(gs[0].datasets) & set(gs[1].datasets):
        raise GridError(f"grids {gs[0].name} ({gs[0].path}: {', '.join(gs[0].datasets)}) and {gs[1].name} "
                        f"({gs[1].path}: {', '.join(gs[1].datasets)}) are on different data sets: compare pairs runs "
                        "of the same variant and seed on the same data set")


@app.command()
def compare(grid: list[str] = typer.Option(..., "--grid", help="The two grids (names or files), A then B."),
            results: str = typer.Option("results", help="Results store directory."),
            out: Optional[str] = typer.Option(None, help="Also write the table as Markdown to this file.")):
    """Compare two grids run by run (same variant, same seed) on each data set's task metric: accuracy
    difference B - A per variant and McNemar's test on per-question predictions; a count's test MSE
    (lower is better) and its paired difference. Planned runs not finished are named (a partial grid).
    For fp32 against bf16, or before against after a change of settings:
    `python ablate.py compare --grid precision-fp32 --grid precision-bf16`. Says which code (fingerprint)
    computed each side's runs; refuses to compare a run with itself (two grids planning the same runs)."""
    from harness.execution import grid as G
    from harness.report import compare_runs
    from harness.training.plan import recorded_info
    from harness.runs.store import ResultsStore

    if len(grid) != 2:
        error(console, f"compare takes exactly two --grid options, got {len(grid)}")
        raise typer.Exit(2)
    store = ResultsStore(results)
    try:
        gs = [G.load(x) for x in grid]
        _check_same_data(gs)
        plans = []
        for g in gs:
            plans.append(G.grid_plans(g, lambda d: recorded_info(d, store)))
        ids = [[*dict.fromkeys(r for p in ps for r in p.all_run_ids())] for ps in plans]
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    same = sorted({p.run_id for p in plans[0]} & {p.run_id for p in plans[1]})
    if same:
        error(console, f"grids {gs[0].name} and {gs[1].name} plan the same {plural(len(same), 'run')} "
                       f"({', '.join(same[:3])}"
                       f"{', ...' if len(same) > 3 else ''}): that compares a run with itself (run ids cover "
                       "settings, data and seed, not the code; a record names its code fingerprint)")
        raise typer.Exit(2)
    from harness.runs import identity

    code = [identity.describe_code(store.read_record(r) for r in i if store.is_complete(r)) for i in ids]
    planned = tuple({q.run_id: (q.spec.variant, q.spec.seed) for p in ps for q in p.all_plans()} for ps in plans)
    df, md = compare_runs(store, ids[0], ids[1], gs[0].name, gs[1].name, planned=planned)
    md += ["", f"Code: {gs[0].name} reads runs of {code[0]}; {gs[1].name} reads runs of {code[1]}."
           + "".join(f" {c[0].upper()}{c[1:]}." for c in identity.against_checkout(
               store.read_record(r) for r in dict.fromkeys(ids[0] + ids[1]) if store.is_complete(r)))]
    if df.empty:
        console.print("[yellow]no variant has complete runs with the same seed in both grids[/yellow]")
        for line in md:
            if line.startswith(("Not compared", f"{gs[0].name} is partial", f"{gs[1].name} is partial")):
                console.print(line)
        raise typer.Exit(1)
    text = "\n".join([f"# {gs[1].name} against {gs[0].name}", "",
                       f"`python ablate.py compare --grid {gs[0].name} --grid {gs[1].name}`", "", *md, ""])
    console.print(text)
    if out:
        from harness.files import atomic_write_bytes
        atomic_write_bytes(Path(out), text.encode())
        console.print(f"written: {out}")


@app.command()
def search(file: str = typer.Argument(..., help="A study file, e.g. grids/search-logits.toml (see docs/search.md)."),
           jobs: Optional[int] = typer.Option(None, min=1, help="Worker processes (or SLURM jobs) sharing the study "
                                              "[default: the file's executor.jobs, else 1]."),
           executor: Optional[str] = typer.Option(None, help="local, slurm or submitit-local [default: the file's, "
                                                  "else local]."),
           executor_option: Optional[list[str]] = typer.Option(None, "--executor-option", help="KEY=VALUE, "
                                                               "repeatable: an option of the executor."),
           device: str = typer.Option("auto", help="cpu, cuda, cuda:N."),
           results: str = typer.Option("results", help="Results store directory (the study's journal goes in "
                                       "its studies/)."),
           reports: str = typer.Option("reports", help="Where the reports go."),
           storage: Optional[str] = typer.Option(None, help="An RDB URL (sqlite:///..., postgresql://...) for the "
                                                 "study instead of the journal file in the results store."),
           report_only: bool = typer.Option(False, "--report-only", help="Train nothing: rewrite the reports.")):
    """Search a variant's settings with Optuna (validation accuracy only), then retrain the best with fresh seeds
    and compare it on test with the control; rerun the same command to resume."""
    from harness.search import optimize as S
    from harness.search.report import write_study_report
    from harness.runs.store import ResultsStore
    from harness.files import check_writable

    try:
        study = S.load_study(file)
        ex = executor or study.executor.get("kind", "local")
        options = {**study.executor, **_executor_options(ex, executor_option)}
        jobs = jobs or int(study.executor.get("jobs", 1))
        store = ResultsStore(results)
        check_writable(store.root)
        with S.study_lock(study, store):
            o = S.open_study(study, store, storage) if report_only else S.search_phase(
                study, store, jobs=jobs, executor=ex, device=device, url=storage, options=options, console=console)
            ids, final = S.final_phase(study, store, o, jobs=jobs, executor=ex, device=device, options=options,
                                       console=console, reports=reports, train_runs=not report_only)
            md = write_study_report(study, store, o, storage or str(S.storage_for_path(study, store)), ids, final,
                                    reports)
    except KeyboardInterrupt:
        raise interrupted() from None
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    say(console, f"report: {md}" + ("" if final else " (the fresh-seed comparison is not complete)"))
    if final is None:
        raise typer.Exit(1)


@app.command()
def run(
    variant: str = typer.Argument(..., help="Registered variant name (see `ablate.py list`)."),
    data: str = typer.Option("synthetic:tiny", help="A feature directory in the HCRN/DualVGR format, or "
                             "synthetic:PRESET[:SEED] (tiny, small, msvd, tiny-mc, tiny-count), "
                             "generated on first use."),
    seed: int = typer.Option(666, help="Random seed (the reference uses 666)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs [default: the data set's suggestion, else 25]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [default: suggestion, else 256]."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate [default: suggestion, else 1e-4]; "
                                       "halved every 10 epochs."),
    early_stop: Optional[int] = typer.Option(None, help="Stop after this many epochs without a better "
                                             "validation accuracy [default: off]."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Variant setting key=value, repeatable "
                                             "(module_dim=256, graph_layers=2, alpha=0.5...)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1... [default: cuda when available]."),
    results: str = typer.Option("results", help="Results store directory."),
    no_glove: bool = typer.Option(False, "--no-glove", help="Do not initialise word embeddings from the "
                                  "questions file's GloVe matrix."),
    precision: str = typer.Option("fp32", help="fp32 (strict: no TF32 on CUDA), tf32 (CUDA: TF32 matmuls and cuDNN), "
                                  "or bf16: autocast for the forward passes in training and evaluation (losses, "
                                  "weights and optimizer state stay fp32; on CUDA the LSTMs run in fp32/TF32, "
                                  "recorded as lstm_precision)."),
    force: bool = typer.Option(False, help="Retrain even if the run is complete in the store."),
    mode: str = typer.Option("auto", help="Feature loading: memory, stream, or auto (stream when the "
                             "features do not fit in half the free RAM)."),
    no_teacher_cache: bool = typer.Option(False, "--no-teacher-cache", help="A distilled student runs its "
                                          "teachers every step instead of reading their outputs, computed once, "
                                          "from results/runs/<teacher run>/teacher_outputs/ (the same training)."),
    refuse_damaged: bool = typer.Option(False, "--refuse-damaged", help="Stop when a complete run (the teachers "
                                        "included) has damaged weights instead of setting it aside and retraining."),
    log: Optional[list[str]] = typer.Option(None, "--log", help=LOG_HELP + "."),
):
    """Train and evaluate one variant; print its per-question-type accuracy table."""
    from harness.data import dataset as D
    from harness.files import check_writable
    from harness.runs.store import ResultsStore, StateError
    from harness.training.plan import RunSpec, feature_modalities, feature_mode, plan
    from harness.training.runner import check_run, train

    store = ResultsStore(results)
    run_id = None
    try:  # checked once, here: what needs no data before any data is loaded, the plan before anything trains
        check_writable(store.root)
        D.check_mode(mode, "--mode")
        dev, sinks = check_run(device, precision, log)
        overrides = parse_sets(set_)
        check_set_keys(variant, overrides, RUN_OPTIONS)
        spec = RunSpec(variant=variant, data=data, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                       early_stop=early_stop, glove=not no_glove, precision=precision, overrides=overrides)
        ds = D.load(data, mode=feature_mode(spec, mode), modalities=feature_modalities(spec))
        p = plan(spec, ds)
        run_id = p.run_id
        record = train(p, store, data=ds, device=dev, force=force,
                       teacher_cache=not no_teacher_cache, refuse_damaged=refuse_damaged, log=sinks)
    except KeyboardInterrupt:
        raise interrupted() from None
    except user_errors() as e:
        error(console, e)
        # the run started: record why it failed (a refused resume state: nothing ran, the message says what to do)
        if run_id is not None and store.run_dir(run_id).exists() and not isinstance(e, StateError):
            _record_failure(store, run_id, {"variant": variant, "seed": seed}, e)
        raise typer.Exit(2) from None
    try:
        _measure_costs(store, [record["run_id"]], device)
    except KeyboardInterrupt:
        raise interrupted() from None
    if record.how == "waited":
        say(console, f"trained by another process: {run_id}, not retrained here (the record from "
                     f"{store.run_dir(run_id)})", "yellow")
    elif record.how == "reused":
        say(console, f"already complete: {run_id}, not retrained (the record from {store.run_dir(run_id)}; "
                     f"--force retrains)", "yellow")
    _print_run(store, record)


def _print_run(store, record: dict) -> None:
    """A run's table of its task's metric per question type, its summary line and its teachers'."""
    from harness.runs import record as R

    console.print(accuracy_table(record))
    say(console, f"run {record['run_id']}: {plural(record['epochs_run'], 'epoch')}, best val epoch "
                 f"{record['metrics']['best_epoch'] + 1}, {record['params']['total']:,} parameters, "
                 f"{record['train_samples_per_s']:.0f} train samples/s on {record['device_name']}; "
                 f"record in {store.run_dir(record['run_id'])}")
    if R.mc_loss(record):
        say(console, f"multiple-choice loss: {R.task_loss(record)}")
    for t in record.get("teachers", []):
        say(console, f"teacher {t['variant']}: run {t['run_id']}, {t['params']:,} parameters, "
                     f"{R.test_figure(store.read_record(t['run_id']))}")


def _record_failure(store, run_id: str, info: dict, e: Exception) -> None:
    """Record why a run failed and say where, or that it could not be; say what was kept."""
    failure = store.write_failure(run_id, info, e)
    if failure.get("failed_json"):
        say(console, f"failure recorded in {failure['failed_json']}")
    else:
        say(console, f"the failure was not recorded either: {failure.get('not_recorded')}", "red")
    state = store.run_dir(run_id) / "state.pt"
    if state.is_file():
        say(console, f"the epochs completed so far are kept in {state}: the same command resumes from there")


@app.command("export")
def export_(run_id: str = typer.Argument(..., help="The run to export (see `ablate.py results`)."),
            out: str = typer.Option(..., "-o", "--out", help="The bundle to write (a tar file; .tar.gz compresses)."),
            results: str = typer.Option("results", help="Results store directory.")):
    """Pack a complete run (record, best weights, config, data id, commit, checksums) into one file to share it."""
    from harness.training.bundle import export_run
    from harness.runs.store import ResultsStore

    try:
        m = export_run(ResultsStore(results), run_id, out)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    say(console, f"{out}: run {run_id} ({m['variant']}, data {m['data_id']}, commit {m['git_commit']}); "
                 f"`python ablate.py import {out}` adds it to another results store")


@app.command("import")
def import_(bundle: str = typer.Argument(..., help="A bundle written by `ablate.py export`."),
            results: str = typer.Option("results", help="Results store directory."),
            data: Optional[str] = typer.Option(None, help="Where the run's data set is on this machine "
                                               "[default: the data spec its record names]."),
            max_unpacked_mib: Optional[float] = typer.Option(None, min=1, help="The most the bundle may unpack "
                                                             "to, in MiB; a larger one is refused before it is read "
                                                             "[default: 1024, bundle.MAX_UNPACKED_MIB].")):
    """Verify a run bundle (size, checksums, data id, identity, plain-tensor weights, its metrics re-evaluated on
    the local data) and add its run to the store, where students find it as a teacher as if it had been trained
    here."""
    from harness.runs import record as R
    from harness.training.bundle import MAX_UNPACKED_MIB, import_bundle
    from harness.runs.store import ResultsStore

    try:
        rec, added, verified = import_bundle(bundle, ResultsStore(results), data=data,
                                             max_unpacked_mib=max_unpacked_mib or MAX_UNPACKED_MIB)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2) from None
    what = "imported" if added else "already in the store, unchanged:"
    say(console, f"{what} run {rec['run_id']} ({rec['variant']}, seed {rec['seed']}, {R.test_figure(rec)}) in "
                 f"{ResultsStore(results).run_dir(rec['run_id'])}" + (f"; {verified}" if added else ""))


@app.command("list")
def list_(pattern: str = typer.Argument("*", help="Shell wildcard, e.g. 'teacher-*'.")):
    """List registered variants (and model families and distillation losses) with their descriptions."""
    import variants

    names = variants.list(pattern)
    if not names:
        error(console, f"no variant matches {pattern!r} (known: {', '.join(variants.list())})")
        raise typer.Exit(1)
    t = Table(title="variants")
    t.add_column("name", style="bold")
    t.add_column("model family")
    t.add_column("description")
    for name in names:
        cfg = variants.get_config(name)
        t.add_row(name, cfg.arch, cfg.description)
    console.print(t)
    ft = Table(title="model families")
    ft.add_column("name", style="bold")
    ft.add_column("description")
    for e in variants.MODEL_FAMILIES:
        ft.add_row(e.name, e.description)
    console.print(ft)
    if len(variants.LOSSES):
        lt = Table(title="distillation losses")
        lt.add_column("name", style="bold")
        lt.add_column("description")
        for e in variants.LOSSES:
            lt.add_row(e.name, e.description)
        console.print(lt)


@app.command()
def results(results: str = typer.Option("results", help="Results store directory."),
            csv: Optional[str] = typer.Option(None, help="Also write the table to this CSV file."),
            failed: bool = typer.Option(False, "--failed", help="List the runs that failed, with the reason."),
            incomplete: bool = typer.Option(False, "--incomplete", help="List the runs that started and have no "
                                            "record (killed, or still running), with their last epoch."),
            fmt: str = typer.Option("table", "--format", help="table, or csv: every column of the store's table "
                                                            "(or those of --columns) as CSV on stdout."),
            columns: Optional[str] = typer.Option(None, "--columns", help="Comma-separated columns to show, in this "
                                                  "order [default: on a terminal those that fit its width, in a "
                                                  "pipe every one].")):
    """Every complete run in the results store, one line each (best epoch 1-based, as `run` prints). No value is
    broken across lines: a terminal shows the columns that fit and names the others."""
    from harness.runs.store import ResultsStore

    store = ResultsStore(results)
    if fmt not in ("table", "csv"):
        error(console, f"--format {fmt}: not a format (table, csv)")
        raise typer.Exit(2)
    if not store.runs.is_dir():
        error(console, f"no results store at {results} (no {store.runs} directory): nothing has run there yet")
        raise typer.Exit(1)
    if failed or incomplete:
        _list_unfinished(store, failed)
        return
    df = store.to_frame()
    if df.empty:
        say(console, f"no complete runs in {results}")
        return
    df["best_epoch"] = df["best_epoch"] + 1
    df = _identity_columns(store, df)
    cols = [c for c in ("run_id", "identity", "code", "variant", "teachers", "teacher_runs", "overrides", "data",
                        "seed", "params", "epochs_run", "best_epoch", *_metric_columns(), "train_samples_per_s")
            if c in df]
    if columns is not None:
        cols = [c.strip() for c in columns.split(",") if c.strip()]
        unknown = [c for c in cols if c not in df]
        if unknown or not cols:
            what = f"no column {', '.join(unknown)} in the results table" if cols else "names no column"
            error(console, f"--columns {columns}: {what} (its columns: {', '.join(df.columns)})")
            raise typer.Exit(2)
    if fmt == "csv":
        typer.echo(df[cols if columns is not None else list(df.columns)].to_csv(index=False), nl=False)
    else:
        _print_results_table(df, cols, fit=columns is None and console.is_terminal)
    if csv:
        df.to_csv(csv, index=False)


#: the results table's columns a narrow terminal keeps first (the others, and a column with no value, after them)
RESULTS_FIRST = ("run_id", "variant", "data", "seed", "test_acc", "test_mse", "val_acc", "best_epoch", "epochs_run",
                 "teachers", "overrides", "test_last_acc")


def _print_results_table(df, cols: list[str], fit: bool) -> None:
    """The results table, every value on one line: each column as wide as its widest value. ``fit``: only
    the columns that fit the console's width (:data:`RESULTS_FIRST` first), naming those left out;
    otherwise every one of ``cols`` at the width they need (a pipe, a log: nothing is cut)."""
    cells = {c: [_cell(v) for v in df[c]] for c in cols}
    need = {c: max(len(c), *map(len, cells[c])) + 3 for c in cols}  # a value, its padding and one border
    shown = cols
    if fit:
        empty = {c for c in cols if all(v == "-" for v in cells[c])}
        order = sorted(cols, key=lambda c: (c in empty, RESULTS_FIRST.index(c) if c in RESULTS_FIRST else
                                            len(RESULTS_FIRST)))
        room, keep = console.width - 1, set()
        for c in order:
            if need[c] <= room or not keep:  # the run id at least
                keep.add(c)
                room -= need[c]
        shown = [c for c in cols if c in keep]
    t = Table()
    for c in shown:
        t.add_column(c, no_wrap=True, min_width=need[c] - 3)
    for i in range(len(df)):
        t.add_row(*[cells[c][i] for c in shown])
    width = sum(need[c] for c in shown) + 1
    if fit:
        console.print(t)
        left = [c for c in cols if c not in shown]
        if left:
            say(console, f"{plural(len(left), 'column')} left out to fit {console.width} columns: {', '.join(left)} "
                         "(--columns NAME,... shows those named, --format csv every one)")
    else:  # as wide as the table, whatever the console's width
        wide = Console(file=console.file, width=max(width, 20), color_system=console.color_system,
                       force_terminal=console.is_terminal)
        wide.print(t)


def _metric_columns() -> list[str]:
    """The registered metrics' columns of the store's table (harness.evaluation.metrics): the primary metric on
    every split, the others on the test split."""
    from harness.evaluation import metrics as M

    return [*(f"{s}_{M.PRIMARY}" for s in M.SPLITS), *(f"test_{m.name}" for m in M.secondary())]


def _identity_columns(store, df):
    """Which identity scheme made each record's id (harness.runs.identity: 2 current, 1 the config as spelled, unknown:
    not reproducible, never reused) and the fingerprint of the code that computed it."""
    from harness.runs import identity

    recs = {r["run_id"]: r for r in store.iter_records()}
    df["identity"] = [identity.scheme_of(recs[r]) if r in recs else "-" for r in df["run_id"]]
    df["code"] = [identity.code_of(recs.get(r, {})) or "-" for r in df["run_id"]]
    old = (df["identity"] != str(identity.SCHEME)).sum()
    if old:
        say(console, f"{plural(old, 'record')} {'has' if old == 1 else 'have'} ids of an older identity scheme "
                     "(1: the variant config as spelled; "
                     "unknown: not reproducible): no grid or run finds them; `python ablate.py migrate` re-keys "
                     "those whose computation is provably unchanged", "yellow")
    return df


@app.command()
def migrate(results: str = typer.Option("results", help="Results store directory."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be re-keyed.")):
    """Re-key records made under an older run-id scheme whose resolved computation is provably unchanged (every
    value their config left unspelled is a declared neutral default); list the others, which are never reused."""
    from harness.runs import identity
    from harness.runs.store import ResultsStore

    store = ResultsStore(results)
    if not store.runs.is_dir():
        error(console, f"no results store at {results} (no {store.runs} directory)")
        raise typer.Exit(1)
    done, left = identity.migrate_store(store, apply=not dry_run)
    for old, new in done:
        console.print(f"{'would re-key' if dry_run else 're-keyed'} {old} -> {new}")
    for rid, why in left:
        console.print(f"left as is: {rid}: {why}")
    say(console, f"{plural(len(done), 'record')} {'to re-key' if dry_run else 're-keyed'}, {len(left)} left as is "
                 f"(kept in the store, not reused: a grid trains their computation again)")


def _cell(v) -> str:
    """A results-table cell: '-' for an empty one (None or NaN), floats to 2 decimals."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _list_unfinished(store, failed: bool) -> None:
    """The failed (or incomplete) runs; a resume state that cannot be read safely is an error line
    naming it (exit 2), the others are listed."""
    from harness.runs.store import StateError, read_state

    refused: list[str] = []
    t = Table()
    for c in ("run_id", "reason" if failed else "last epoch"):
        t.add_column(c)
    n = 0
    for d in sorted(store.runs.iterdir()):
        if store.is_complete(d.name):
            continue
        f = d / "failed.json"
        if failed and f.is_file():
            t.add_row(d.name, str((store.read_failure(d.name) or {}).get("reason", "? (failed.json unreadable)")))
            n += 1
        elif not failed and not f.is_file():
            epochs = "-"
            if (d / "state.pt").is_file():
                try:
                    epochs = str(read_state(d / "state.pt", d.name)["epoch"] + 1)
                except StateError as e:
                    refused.append(str(e))
                    epochs = "? (state.pt refused)"
            if (pruned := store.read_pruned(d.name)) is not None:
                epochs += f" (pruned by a search after epoch {pruned['epoch'] + 1})"
            t.add_row(d.name, epochs)
            n += 1
    if n:
        console.print(t)
    else:
        say(console, f"no {'failed' if failed else 'incomplete'} runs in {store.root}")
    for message in refused:
        error(console, message)
    if refused:
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
