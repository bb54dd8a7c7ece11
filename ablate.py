"""Train, evaluate and compare VideoQA variants.

    python ablate.py --grid tiny                            # run an ablation grid (grids/tiny.toml), then its report
    python ablate.py --grid kd-losses --jobs 4              # four runs at a time (one per GPU when there are GPUs)
    python ablate.py --grid msvd --executor slurm --partition gpu
    python ablate.py report --grid tiny                     # regenerate reports/tiny.md from the results store
    python ablate.py run dualvgr --data synthetic:tiny      # one run, per-type accuracy table
    python ablate.py list                                   # the variant registry
    python ablate.py results                                # every complete run in the store
    python ablate.py run dualvgr --log tensorboard          # watch it live: tensorboard --logdir results/runs
    python ablate.py export RUN_ID -o teacher.tar           # share a trained run (a teacher) ...
    python ablate.py import teacher.tar                     # ... and use it in another results store
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from harness.console import error, make_console, say

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
console = make_console()
LOG_HELP = ("Live logging sink, repeatable: tensorboard (event files under results/runs/<run>/tensorboard) or wandb "
            "(offline unless W&B is configured)")


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


def accuracy_table(record: dict, title: str | None = None) -> Table:
    """Per-question-type accuracy of one run: val and test (best-val epoch), test (last epoch), and
    the evaluation-time ablations (which evidence each question type uses)."""
    m = record["metrics"]
    types = [t for t in record["data"]["type_names"] if t in m["test"]["per_type"] or t in m["val"]["per_type"]]
    t = Table(title=title or f"{record['variant']} on {record['data']['name']} (seed {record['seed']})")
    t.add_column("split")
    for name in types:
        t.add_column(name, justify="right")
    t.add_column("all", justify="right", style="bold")
    for label, key in (("val (best epoch)", "val"), ("test (best-val epoch)", "test"), ("test (last epoch)", "test_last")):
        row = m[key]
        t.add_row(label, *[f"{row['per_type'][n]:.2f}" if n in row["per_type"] else "-" for n in types],
                  f"{row['overall']:.2f}")
    from harness.evaluate import ABLATIONS

    for key, row in m.get("ablations", {}).items():
        t.add_row(f"test, {ABLATIONS.get(key, key)}", *[f"{row['per_type'][n]:.2f}" if n in row["per_type"] else "-" for n in types],
                  f"{row['overall']:.2f}", style="italic")
    t.add_row("questions (test)", *[str(m["test"]["counts"].get(n, 0)) for n in types], str(m["test"]["n"]),
              style="dim")
    return t


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    grid: Optional[str] = typer.Option(None, "--grid", help="Run the grid grids/NAME.toml (or a path to a grid "
                                       "file): complete runs are skipped, teachers run first, then the report is written."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Runs at a time \\[default: the grid's executor.jobs, else 1]."),
    executor: Optional[str] = typer.Option(None, help="local (processes on this machine), slurm (a submitit job "
                                           "array), or submitit-local \\[default: the grid's, else local]."),
    data: Optional[str] = typer.Option(None, help="Override the grid's data set."),
    seeds: Optional[str] = typer.Option(None, help="Override the grid's seeds, comma-separated."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N \\[default: cuda when available; with --jobs, "
                               "runs are spread over the GPUs]."),
    results: str = typer.Option("results", help="Results store directory."),
    reports: str = typer.Option("reports", help="Where the report goes."),
    partition: Optional[str] = typer.Option(None, help="SLURM partition \\[default: the grid's executor.partition, "
                                            "else the cluster's default partition]."),
    gpus_per_run: Optional[int] = typer.Option(None, min=0, help="GPUs per SLURM job (--gpus-per-node); 0 for a "
                                               "CPU-only partition \\[default: the grid's executor.gpus_per_run, else 1 "
                                               "when --device is cuda, else none requested]."),
    cpus_per_run: Optional[int] = typer.Option(None, min=1, help="CPUs per SLURM job (--cpus-per-task); torch uses "
                                               "as many threads \\[default: the grid's executor.cpus_per_run, else "
                                               "the cluster's default]."),
    mem_gb: Optional[float] = typer.Option(None, min=0, help="Memory per SLURM job, GB (--mem; 0 is SLURM's 'all of "
                                           "the node's memory') \\[default: the grid's executor.mem_gb, else the "
                                           "cluster's default]."),
    time_min: Optional[int] = typer.Option(None, min=1, help="SLURM time limit per job, minutes; a run that reaches "
                                           "it is requeued and resumes from its last completed epoch \\[default: the "
                                           "grid's executor.time_min, else the partition's default time limit]."),
    array_parallelism: Optional[int] = typer.Option(None, min=1, help="SLURM jobs running at a time \\[default: the "
                                                    "grid's executor.array_parallelism, else --jobs]."),
    mode: str = typer.Option("auto", help="Feature loading: memory, stream or auto."),
    log: Optional[list[str]] = typer.Option(None, "--log", help=LOG_HELP + " \\[default: the grid's [log]]."),
):
    """Run an ablation grid (--grid), or one of the commands below."""
    if ctx.invoked_subcommand is not None:
        return
    if grid is None:
        console.print(ctx.get_help())
        raise typer.Exit(0)
    from harness import grid as G
    from harness.executor import check_executor_options, run_grid
    from harness.store import ResultsStore

    try:
        g = G.load(grid, data=data, seeds=[int(x) for x in seeds.split(",")] if seeds else None)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2)
    ex = executor or g.executor.get("kind", "local")
    if ex not in G.EXECUTOR_KINDS:
        error(console, f"--executor must be one of {', '.join(G.EXECUTOR_KINDS)}, got {ex!r}")
        raise typer.Exit(2)
    try:  # a SLURM request given in the grid is checked before anything runs; the command line's by typer
        check_executor_options(g.executor, f"{g.path}: [executor]")
    except G.GridError as e:
        error(console, e)
        raise typer.Exit(2)
    # the command line overrides the grid's [executor] table; a value given is sent as is, 0 included
    given = {"partition": partition, "gpus_per_run": gpus_per_run, "cpus_per_run": cpus_per_run, "mem_gb": mem_gb,
             "time_min": time_min, "array_parallelism": array_parallelism}
    slurm = {**g.executor, **{k: v for k, v in given.items() if v is not None}}
    store = ResultsStore(results)
    try:
        res = run_grid(g, store, executor=ex, jobs=jobs or int(g.executor.get("jobs", 1)), device=device, mode=mode,
                       console=console, slurm=slurm, log=log)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2)
    if res.interrupted:
        raise typer.Exit(130)
    _measure_costs(store, res.run_ids, device)
    _write_report(store, g, reports, res.run_ids)
    if res.failed:
        say(console, f"{len(res.failed)} run(s) failed: " + "; ".join(
            f"{f['variant']} seed {f['seed']}: {f['reason']}" for f in res.failed), "red")
        raise typer.Exit(1)


def _measure_costs(store, run_ids: list[str], device: str) -> None:
    """Latency and inference memory of each trained configuration, once per device, serially,
    after all training (harness.costs)."""
    from harness import costs

    n = costs.measure_missing(store, run_ids, device, say=lambda m: say(console, m, "dim"))
    if n:
        say(console, f"inference cost measured for {n} configuration(s), one at a time")


def _write_report(store, g, reports: str, run_ids: list[str]) -> None:
    from harness.report import write_report

    complete = [r for r in run_ids if store.is_complete(r)]
    if not complete:
        say(console, "no complete run: no report written")
        return
    path = write_report(store, g.name, run_ids=complete, out_dir=reports, grid_file=str(g.path))
    say(console, f"report: {path}")


@app.command()
def report(grid: str = typer.Option(..., "--grid", help="Grid name or file whose runs the report covers."),
           results: str = typer.Option("results", help="Results store directory."),
           reports: str = typer.Option("reports", help="Where the report goes."),
           data: Optional[str] = typer.Option(None, help="Override the grid's data set."),
           seeds: Optional[str] = typer.Option(None, help="Override the grid's seeds, comma-separated.")):
    """Regenerate reports/NAME.md (and .csv, and plots) from the results store; trains nothing."""
    from harness import grid as G
    from harness.runner import plan, recorded_info
    from harness.store import ResultsStore

    store = ResultsStore(results)
    try:
        g = G.load(grid, data=data, seeds=[int(x) for x in seeds.split(",")] if seeds else None)
        info = recorded_info(g.data, store)  # from the store: no feature file is read
        ids = [*dict.fromkeys(r for s in g.runs for r in plan(s, info).all_run_ids())]
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2)
    missing = [r for r in ids if not store.is_complete(r)]
    if missing:
        say(console, f"{len(missing)} of {len(ids)} runs are not complete; the report covers the rest "
                     f"(run `python ablate.py --grid {grid}` to finish them)", "yellow")
    _write_report(store, g, reports, ids)


@app.command()
def compare(grid: list[str] = typer.Option(..., "--grid", help="The two grids (names or files), A then B."),
            results: str = typer.Option("results", help="Results store directory."),
            out: Optional[str] = typer.Option(None, help="Also write the table as Markdown to this file.")):
    """Compare two grids run by run (same variant, same seed): accuracy difference B - A per variant and
    McNemar's test on per-question predictions. For fp32 against bf16, or before against after a change:
    `python ablate.py compare --grid precision-fp32 --grid precision-bf16`."""
    from harness import grid as G
    from harness.report import compare_runs
    from harness.runner import plan, recorded_info
    from harness.store import ResultsStore

    if len(grid) != 2:
        error(console, f"compare takes exactly two --grid options, got {len(grid)}")
        raise typer.Exit(2)
    store = ResultsStore(results)
    try:
        gs = [G.load(x) for x in grid]
        ids = [[*dict.fromkeys(r for s in g.runs for r in plan(s, recorded_info(g.data, store)).all_run_ids())]
               for g in gs]
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2)
    df, md = compare_runs(store, ids[0], ids[1], gs[0].name, gs[1].name)
    if df.empty:
        console.print("[yellow]no variant has complete runs with the same seed in both grids[/yellow]")
        raise typer.Exit(1)
    text = "\n".join([f"# {gs[1].name} against {gs[0].name}", "",
                       f"`python ablate.py compare --grid {gs[0].name} --grid {gs[1].name}`", "", *md, ""])
    console.print(text)
    if out:
        from harness.store import atomic_write_bytes
        atomic_write_bytes(Path(out), text.encode())
        console.print(f"written: {out}")


@app.command()
def run(
    variant: str = typer.Argument(..., help="Registered variant name (see `ablate.py list`)."),
    data: str = typer.Option("synthetic:tiny", help="A feature directory in the HCRN/DualVGR format, or "
                             "synthetic:PRESET[:SEED] (tiny, small, msvd), generated on first use."),
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
    precision: str = typer.Option("fp32", help="fp32, or bf16: autocast for the forward passes and losses in "
                                  "training and evaluation (weights and optimizer state stay fp32)."),
    force: bool = typer.Option(False, help="Retrain even if the run is complete in the store."),
    mode: str = typer.Option("auto", help="Feature loading: memory, stream, or auto (stream when the "
                             "features do not fit in half the free RAM)."),
    no_teacher_cache: bool = typer.Option(False, "--no-teacher-cache", help="A distilled student runs its "
                                          "teachers every step instead of reading their outputs, computed once, "
                                          "from results/runs/<teacher run>/teacher_outputs/ (the same training)."),
    log: Optional[list[str]] = typer.Option(None, "--log", help=LOG_HELP + "."),
):
    """Train and evaluate one variant; print its per-question-type accuracy table."""
    import variants
    from harness import data as D
    from harness.env import check_precision, resolve_device
    from harness.runner import RunSpec, feature_mode, plan, train
    from harness.sinks import check_sinks
    from harness.store import ResultsStore

    store = ResultsStore(results)
    run_id = None
    try:  # everything is checked before any data is loaded or anything trained
        check_precision(resolve_device(device), precision, train=True)
        sinks = check_sinks(log)
        spec = RunSpec(variant=variant, data=data, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                       early_stop=early_stop, glove=not no_glove, precision=precision, overrides=parse_sets(set_))
        spec.resolved_train()
        variants.get_config(variant, **spec.overrides)
        ds = D.load(data, mode=feature_mode(spec, mode))
        run_id = plan(spec, ds).run_id
        reused = store.is_complete(run_id) and not force
        record = train(spec, store, data=ds, device=device, force=force, teacher_cache=not no_teacher_cache,
                       log=sinks)
    except user_errors() as e:
        error(console, e)
        if run_id is not None and store.run_dir(run_id).exists():  # the run started: record why it failed
            store.write_failure(run_id, {"variant": variant, "seed": seed}, e)
            say(console, f"failure recorded in {store.run_dir(run_id) / 'failed.json'}")
        raise typer.Exit(2)
    _measure_costs(store, [record["run_id"]], device)
    if reused:
        say(console, f"already complete: {run_id}, not retrained (the record from {store.run_dir(run_id)}; "
                     f"--force retrains)", "yellow")
    console.print(accuracy_table(record))
    say(console, f"run {record['run_id']}: {record['epochs_run']} epochs, best val epoch "
                 f"{record['metrics']['best_epoch'] + 1}, {record['params']['total']:,} parameters, "
                 f"{record['train_samples_per_s']:.0f} train samples/s on {record['device_name']}; "
                 f"record in {store.run_dir(record['run_id'])}")
    for t in record.get("teachers", []):
        say(console, f"teacher {t['variant']}: run {t['run_id']}, {t['params']:,} parameters, "
                     f"test accuracy {t['test_acc']:.2f}")


@app.command("export")
def export_(run_id: str = typer.Argument(..., help="The run to export (see `ablate.py results`)."),
            out: str = typer.Option(..., "-o", "--out", help="The bundle to write (a tar file; .tar.gz compresses)."),
            results: str = typer.Option("results", help="Results store directory.")):
    """Pack a complete run (record, best weights, config, data id, commit, checksums) into one file to share it."""
    from harness.bundle import export_run
    from harness.store import ResultsStore

    try:
        m = export_run(ResultsStore(results), run_id, out)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2)
    say(console, f"{out}: run {run_id} ({m['variant']}, data {m['data_id']}, commit {m['git_commit']}); "
                 f"`python ablate.py import {out}` adds it to another results store")


@app.command("import")
def import_(bundle: str = typer.Argument(..., help="A bundle written by `ablate.py export`."),
            results: str = typer.Option("results", help="Results store directory."),
            data: Optional[str] = typer.Option(None, help="Where the run's data set is on this machine "
                                               "\\[default: the data spec its record names].")):
    """Verify a run bundle (checksums, data id, identity, plain-tensor weights) and add its run to the store,
    where students find it as a teacher as if it had been trained here."""
    from harness.bundle import import_bundle
    from harness.store import ResultsStore

    try:
        rec, added = import_bundle(bundle, ResultsStore(results), data=data)
    except user_errors() as e:
        error(console, e)
        raise typer.Exit(2)
    what = "imported" if added else "already in the store, unchanged:"
    say(console, f"{what} run {rec['run_id']} ({rec['variant']}, seed {rec['seed']}, test accuracy "
                 f"{rec['metrics']['test']['overall']:.2f}) in {ResultsStore(results).run_dir(rec['run_id'])}")


@app.command("list")
def list_(pattern: str = typer.Argument("*", help="Shell wildcard, e.g. 'teacher-*'.")):
    """List registered variants (and distillation losses) with their descriptions."""
    import variants

    names = variants.list(pattern)
    if not names:
        error(console, f"no variant matches {pattern!r} (known: {', '.join(variants.list())})")
        raise typer.Exit(1)
    t = Table(title="variants")
    t.add_column("name", style="bold")
    t.add_column("arch")
    t.add_column("description")
    for name in names:
        cfg = variants.get_config(name)
        t.add_row(name, cfg.arch, cfg.description)
    console.print(t)
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
                                            "record (killed, or still running), with their last epoch.")):
    """Every complete run in the results store, one line each (best epoch 1-based, as `run` prints)."""
    from harness.store import ResultsStore

    store = ResultsStore(results)
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
    cols = [c for c in ("run_id", "variant", "teachers", "teacher_runs", "overrides", "data", "seed", "params",
                        "epochs_run", "best_epoch", "val_acc", "test_acc", "test_last_acc", "train_samples_per_s")
            if c in df]
    t = Table()
    for c in cols:
        t.add_column(c)
    for _, r in df[cols].iterrows():
        t.add_row(*[f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in r])
    console.print(t)
    if csv:
        df.to_csv(csv, index=False)


def _list_unfinished(store, failed: bool) -> None:
    t = Table()
    for c in ("run_id", "reason" if failed else "last epoch"):
        t.add_column(c)
    n = 0
    for d in sorted(store.runs.iterdir()):
        if store.is_complete(d.name):
            continue
        f = d / "failed.json"
        if failed and f.is_file():
            t.add_row(d.name, json.loads(f.read_text()).get("reason", "?"))
            n += 1
        elif not failed and not f.is_file():
            epochs = "-"
            if (d / "state.pt").is_file():
                import torch
                epochs = str(torch.load(d / "state.pt", map_location="cpu", weights_only=False)["epoch"] + 1)
            t.add_row(d.name, epochs)
            n += 1
    if n:
        console.print(t)
    else:
        say(console, f"no {'failed' if failed else 'incomplete'} runs in {store.root}")


if __name__ == "__main__":
    app()
