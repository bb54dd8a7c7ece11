"""Running a grid: skip complete runs, run the rest (in this process, in worker processes, or as
a submitit job array on SLURM), teachers before the students that need them, failures recorded
and the grid going on, Ctrl-C stopping cleanly (running again resumes)."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import data as D
from .grid import Grid
from .runner import RunSpec, feature_mode, plan, train
from .store import ResultsStore, atomic_write_json

_DATA: dict[tuple[str, str], D.VideoQAData] = {}  # per process: each worker loads a data set once


def _data(spec: str, mode: str) -> D.VideoQAData:
    if (spec, mode) not in _DATA:
        _DATA[(spec, mode)] = D.load(spec, mode=mode)
    return _DATA[(spec, mode)]


def run_one(spec: dict, results: str, device: str = "auto", mode: str = "auto") -> dict:
    """Train one run of a grid; never raises for a failing run: it is recorded as failed
    (``failed.json`` with reason and traceback in its run directory) and reported."""
    s = RunSpec(**spec)
    store = ResultsStore(results)
    run_id = None
    try:
        data = _data(s.data, feature_mode(s, mode))
        run_id = plan(s, data).run_id
        rec = train(s, store, data=data, device=device, progress=False)
        (store.run_dir(run_id) / "failed.json").unlink(missing_ok=True)
        return {"run_id": rec["run_id"], "variant": s.variant, "seed": s.seed, "status": "complete",
                "test_acc": rec["metrics"]["test"]["overall"]}
    except Exception as e:  # noqa: BLE001 - every failure is recorded; the grid goes on
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, torch.cuda.OutOfMemoryError):
            reason = f"out of GPU memory: {e}"
        failure = {"run_id": run_id, "variant": s.variant, "seed": s.seed, "status": "failed", "reason": reason,
                   "traceback": traceback.format_exc(), "spec": spec,
                   "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if run_id is not None:
            atomic_write_json(store.run_dir(run_id) / "failed.json", failure)
        return failure


@dataclasses.dataclass
class GridResult:
    run_ids: list[str]  # every run of the grid and their teachers, teachers first
    complete: list[str]
    failed: list[dict]
    skipped: int
    interrupted: bool = False


def _depends(p) -> set[str]:
    return set(p.all_run_ids()) - {p.run_id}


def run_grid(grid: Grid, store: ResultsStore, *, executor: str = "local", jobs: int = 1, device: str = "auto",
             mode: str = "auto", console: Console | None = None, slurm: dict | None = None,
             poll_s: float = 2.0) -> GridResult:
    console = console or Console(stderr=True)
    info = D.describe(grid.data)  # run ids from the data set's info: no feature is read here
    store.write_data_info(info.to_dict())
    plans = [plan(s, info) for s in grid.runs]
    all_ids = [*dict.fromkeys(r for p in plans for r in p.all_run_ids())]
    todo = [p for p in plans if not store.is_complete(p.run_id)]
    skipped = len(plans) - len(todo)
    console.print(f"grid [bold]{grid.name}[/bold]: {len(plans)} runs on {grid.data} "
                  f"({skipped} already complete, {len(todo)} to run) with {executor} x {jobs}")
    result = GridResult(all_ids, [p.run_id for p in plans if store.is_complete(p.run_id)], [], skipped)
    if not todo:
        return result

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not console.is_terminal)
    task = progress.add_task(grid.name, total=len(todo), status="")
    running: dict = {}

    def status() -> str:
        return (f"done {len(result.complete) - skipped}  running {len(running)}  failed {len(result.failed)}  "
                f"left {len(todo) - len(result.complete) + skipped - len(result.failed) - len(running)}")

    def finished(out: dict) -> None:
        if out["status"] == "complete":
            result.complete.append(out["run_id"])
            console.print(f"[green]done[/green] {out['variant']} seed {out['seed']}: test {out['test_acc']:.2f}%"
                          f" ({out['run_id']})")
        else:
            result.failed.append(out)
            console.print(f"[red]failed[/red] {out['variant']} seed {out['seed']}: {out['reason']}")
        progress.update(task, advance=1, status=status())

    specs = {p.run_id: dataclasses.asdict(p.spec) for p in todo}
    pending = list(todo)
    grid_ids = {p.run_id for p in todo}

    def ready(p) -> bool:  # teachers in this grid must be done (or failed) first
        deps = _depends(p) & grid_ids
        done = set(result.complete) | {f["run_id"] for f in result.failed}
        return deps <= done

    with progress:
        try:
            if executor == "local" and jobs <= 1:
                for p in pending:
                    running[p.run_id] = p
                    progress.update(task, status=status(), description=f"{grid.name}: {p.spec.variant} seed {p.spec.seed}")
                    out = run_one(specs[p.run_id], str(store.root), device, mode)
                    running.pop(p.run_id)
                    finished(out)
            elif executor == "local":
                ngpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
                free_slots = list(range(jobs))
                with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                    futures = {}
                    try:
                        while pending or futures:
                            for p in [q for q in pending if ready(q)]:
                                if not free_slots:
                                    break
                                slot = free_slots.pop(0)
                                dev = f"cuda:{slot % ngpu}" if ngpu else ("cpu" if device == "auto" else device)
                                futures[pool.submit(run_one, specs[p.run_id], str(store.root), dev, mode)] = (p, slot)
                                running[p.run_id] = p
                                pending.remove(p)
                            progress.update(task, status=status())
                            if not futures:  # nothing ready: a dependency failed outside the grid's order
                                futures_left = pending[:]
                                pending.clear()
                                for p in futures_left:
                                    finished({"run_id": p.run_id, "variant": p.spec.variant, "seed": p.spec.seed,
                                              "status": "failed", "reason": "a teacher run failed"})
                                break
                            done, _ = wait(futures, return_when=FIRST_COMPLETED)
                            for f in done:
                                p, slot = futures.pop(f)
                                free_slots.append(slot)
                                running.pop(p.run_id, None)
                                finished(f.result())
                    except KeyboardInterrupt:
                        for f in futures:
                            f.cancel()
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
            else:
                _run_submitit(grid, todo, specs, store, executor, jobs, device, mode, slurm or {}, finished,
                              running, progress, task, status, poll_s)
        except KeyboardInterrupt:
            result.interrupted = True
            console.print("[yellow]interrupted[/yellow]: finished runs are kept; run the same command again to "
                          "resume (unfinished runs continue from their last completed epoch)")
    return result


def _run_submitit(grid, todo, specs, store, executor, jobs, device, mode, slurm, finished, running, progress, task,
                  status, poll_s) -> None:
    """Job arrays through submitit: one array per dependency wave (teachers, then students)."""
    import submitit

    folder = Path(store.root) / "submitit" / grid.name
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {"slurm_partition": slurm.get("partition"), "gpus_per_node": slurm.get("gpus_per_run", 1),
                  "timeout_min": slurm.get("time_min", 240), "slurm_array_parallelism": slurm.get("array_parallelism", jobs),
                  "cpus_per_task": slurm.get("cpus_per_run", 8), "mem_gb": slurm.get("mem_gb", 32),
                  "name": f"ablate-{grid.name}"}
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    else:  # submitit's LocalExecutor: the same code path, on this machine (used in CI)
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=slurm.get("time_min", 60))
    ids = {p.run_id for p in todo}
    waves: list[list] = []
    left = list(todo)
    while left:
        placed = {p.run_id for w in waves for p in w}
        wave = [p for p in left if (_depends(p) & ids) <= placed]
        if not wave:
            wave = left[:]
        waves.append(wave)
        left = [p for p in left if p not in wave]
    for wave in waves:
        jobs_ = ex.map_array(run_one, [specs[p.run_id] for p in wave], [str(store.root)] * len(wave),
                             [device] * len(wave), [mode] * len(wave))
        pending = dict(zip(jobs_, wave))
        for p in wave:
            running[p.run_id] = p
        progress.update(task, status=status())
        while pending:
            for job in [j for j in pending if j.done()]:
                p = pending.pop(job)
                running.pop(p.run_id, None)
                try:
                    out = job.result()
                except Exception as e:  # noqa: BLE001 - the job itself died (node failure, timeout)
                    out = {"run_id": p.run_id, "variant": p.spec.variant, "seed": p.spec.seed, "status": "failed",
                           "reason": f"submitit job {job.job_id} failed: {type(e).__name__}: {e}"}
                finished(out)
            if pending:
                time.sleep(poll_s)
