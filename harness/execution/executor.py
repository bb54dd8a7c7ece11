"""Running a grid: skip complete runs, run the rest (in this process, in worker processes, or as
a submitit job array on SLURM), teachers before the students that need them, failures recorded
and the grid going on, Ctrl-C stopping cleanly (running again resumes).

Worker processes (``--jobs N``) die with the grid's process, even when it is killed with SIGKILL
(:mod:`harness.execution.schedule`, with the schedule itself).
On SLURM, resources are requested exactly as the grid's ``[executor]`` table or the command line
asks (see :func:`harness.execution.slurm.slurm_parameters`), a run that reaches the job's time limit is
requeued and resumes from its last completed epoch (:class:`SubmititRun`), job states are read from
result files and ``squeue`` (clusters without accounting have no ``sacct``; :mod:`harness.execution.slurm`),
and Ctrl-C cancels the grid's jobs.

Each kind of executor is one registered implementation of :class:`Executor` (``local``, ``slurm``,
``submitit-local``; :func:`register_executor` adds one): grid files and ``ablate.py --executor`` read
the registry.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Protocol

import submitit
import torch

from variants.registry import Registry

from harness.data import dataset as D
from harness.runs import record as R
from harness.console import plural, say
from harness.training.plan import RunSpec, feature_modalities, feature_mode, plan
from harness.training.runner import check_run, train
from harness.execution.schedule import (failure_answer, Schedule, worker_init, cpu_share, device_slots, job_init,
                                        submitit_threads)
from harness.execution.slurm import (MAX_REQUEUES, SLURM_REQUESTS, ExecutorError, SacctNoise, Watch,
    check_executor_options, slurm_parameters)
from harness.runs.store import ResultsStore

_DATA: dict[tuple, D.VideoQAData] = {}  # per process: each worker loads a data set once (per streams read)


def _data(spec: str, mode: str, modalities: tuple[str, ...] | None = None) -> D.VideoQAData:
    key = (spec, mode, modalities)
    if key not in _DATA:
        _DATA[key] = D.load(spec, mode=mode, **({"modalities": modalities} if modalities else {}))
    return _DATA[key]


def run_one(spec: dict, results: str, device: str = "auto", mode: str = "auto", log: tuple[str, ...] = ()) -> dict:
    """Train one run of a grid; never raises for a failing run: it is recorded as failed
    (``failed.json`` with reason and traceback in its run directory) and reported."""
    s = RunSpec(**spec)
    store = ResultsStore(results)
    run_id = None
    try:
        data = _data(s.data, feature_mode(s, mode), feature_modalities(s))
        p = plan(s, data)
        run_id = p.run_id
        dev, sinks = check_run(device, s.precision, log)
        # per-epoch lines named by variant and seed in logs (SLURM, CI); no live bar beside the grid's own
        rec = train(p, store, data=data, device=dev, progress=not sys.stderr.isatty(), log=sinks)
        (store.run_dir(run_id) / "failed.json").unlink(missing_ok=True)
        return {"run_id": rec["run_id"], "variant": s.variant, "seed": s.seed, "status": "complete",
                "test_acc": rec["metrics"]["test"]["overall"], "result": R.test_figure(rec)}
    except Exception as e:  # every failure is recorded; the grid goes on
        info = {"variant": s.variant, "seed": s.seed, "spec": spec}
        if run_id is None:
            failure = {"run_id": None, **info, "status": "failed", "reason": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()}
        else:
            failure = store.write_failure(run_id, info, e)
        return failure


class SubmititRun(submitit.helpers.Checkpointable):
    """:func:`run_one` as a submitit job. When the job nears its SLURM time limit (or is preempted),
    submitit calls :meth:`checkpoint` from its signal handler and requeues the job with the call it
    returns: the same run, which the runner resumes from ``state.pt`` (its last completed epoch)."""

    def __call__(self, spec: dict, results: str, device: str = "auto", mode: str = "auto", log=(),
                 threads: int | None = None) -> dict:
        job_init(threads)
        return run_one(spec, results, device, mode, log)

    def checkpoint(self, spec: dict, results: str, device: str = "auto", mode: str = "auto", log=(),
                   threads: int | None = None):
        print(f"{spec['variant']} seed {spec['seed']}: job time limit or preemption: requeued, the run resumes "
              f"from its last completed epoch", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, spec, results, device, mode, log, threads)


# --- executors: one registered implementation per kind -----------------------------------------------------


@dataclasses.dataclass
class Launch:
    """What an executor is given besides the schedule: the grid's name, the results store, runs at a time,
    the device, the feature loading mode, its options (the grid's ``[executor]`` table with the
    command line's values over it) and how often to look at submitted jobs."""

    name: str  # the grid's: submitit's folder and job names
    store: ResultsStore
    jobs: int = 1
    device: str = "auto"
    mode: str = "auto"
    options: dict = dataclasses.field(default_factory=dict)
    poll_s: float = 2.0


class Executor(Protocol):
    """One kind of executor (``[executor] kind`` in a grid, ``--executor`` on the command line).

    ``run(sched, launch)`` trains the schedule's runs and returns when none is left: it takes the
    runs whose teachers are done (``sched.ready()``), starts each (``spec = sched.start(p)``), has
    :func:`run_one` train it somewhere (``run_one(spec, str(launch.store.root), device, launch.mode,
    sched.log)``), and reports each answer with ``sched.finished(p, out)`` (a run lost without one:
    ``failure_answer(p, reason)``); Ctrl-C (KeyboardInterrupt) goes through. ``options`` names the
    ``[executor]`` keys (and ``--executor-option`` keys) it reads besides ``kind``, ``jobs`` and
    ``device``; ``check(options, where)`` raises GridError naming ``where`` and the key of a bad value
    (it sees only the keys it declares)."""

    name: str
    options: tuple[str, ...]

    def check(self, options: dict, where: str) -> None: ...

    def run(self, sched: "Schedule", launch: Launch) -> None: ...


EXECUTORS = Registry("executor")
#: [executor] keys every kind reads
COMMON_OPTIONS = ("kind", "jobs", "device")


def register_executor(executor: Executor, description: str = "") -> Executor:
    """Register an implementation of :class:`Executor` under its ``name``: grid files and
    ``ablate.py --executor`` accept it, and its options, at once."""
    EXECUTORS.add(executor.name, executor, description or (type(executor).__doc__ or "").strip().split("\n")[0])
    return executor


def executor_kind(name: str) -> Executor:
    """The registered executor ``name`` (UnknownNameError lists the known ones)."""
    return EXECUTORS.get(name).fn


def executor_options() -> set[str]:
    """Every ``[executor]`` key some registered kind reads."""
    return {*COMMON_OPTIONS, *(k for e in EXECUTORS for k in e.fn.options)}


def check_options(options: dict, where: str = "executor options") -> None:
    """Each registered kind checks the keys of ``options`` it declares (GridError names ``where``)."""
    for e in EXECUTORS:
        e.fn.check({k: v for k, v in options.items() if k in e.fn.options}, where)


def kept_in(paths: list[Path]) -> str:
    """Where :meth:`ResultsStore.keep_other_code` put runs: their folders' common parent, or each."""
    parents = sorted({str(p.parent) for p in paths})
    return parents[0] if len(parents) == 1 else ", ".join(map(str, paths))


def _run_serial(sched: Schedule, store: ResultsStore, device: str, mode: str) -> None:
    """One run after another in this process, teachers first."""
    while True:
        ready = sched.ready()
        if not ready:
            return
        p = ready[0]
        sched.finished(p, run_one(sched.start(p), str(store.root), device, mode, sched.log))


def _run_pool(sched: Schedule, store: ResultsStore, jobs: int, device: str, mode: str) -> None:
    """``jobs`` worker processes (spawned; they die with this process), each run on its own
    device slot (GPUs round-robin when there are several), a run starting when its teachers are done.
    A worker that dies (SIGKILL, the OOM killer, SIGBUS) costs only its run: it is recorded as
    failed with the signal or exit code, a fresh worker takes the slot and the grid goes on."""
    ngpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    slots = device_slots(jobs, device, ngpu)
    if any(n > 1 and d.startswith("cuda") for d, n in slots):
        say(sched.console, f"{plural(jobs, 'job')} on {plural(ngpu, 'GPU')}: "
                           f"up to {max(n for _, n in slots)} runs share a GPU; their "
                           f"throughput, wall time and device-seconds are shared (recorded as runs_sharing_device)",
            "yellow")
    threads = cpu_share(jobs, device)
    ctx = mp.get_context("spawn")
    work = run_one  # looked up now: what the workers run (a test hands in one that dies)
    workers = [_Worker(ctx, threads, work, slots[i][1]) for i in range(jobs)]
    try:
        while True:
            idle = [w for w in workers if w.job is None]
            for w, p in zip(idle, sched.ready()):
                dev = slots[workers.index(w)][0]
                w.submit(p, (sched.start(p), str(store.root), dev, mode, sched.log))
            busy = [w for w in workers if w.job is not None]
            if not busy:
                return
            ready = set(mp_connection.wait([x for w in busy for x in (w.conn, w.proc.sentinel)]))
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    p, out = w.collect()
                    if out is None:  # the worker died with the run
                        out = failure_answer(p, w.death())
                    if not w.proc.is_alive():  # a fresh worker takes its place
                        w.stop()
                        i = workers.index(w)
                        workers[i] = _Worker(ctx, threads, work, slots[i][1])
                    sched.finished(p, out)
    finally:
        for w in workers:
            w.stop()


class _Worker:
    """One worker process of a local grid and the run it trains (``job``: its plan, or None)."""

    def __init__(self, ctx, threads: int | None, work, sharing: int = 1):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, os.getpid(), threads, work, sharing), daemon=True,
                                name="ablate-worker")
        self.proc.start()
        child.close()
        self.job = None

    def submit(self, p, args: tuple) -> None:
        self.job = p
        self.conn.send(args)

    def collect(self) -> tuple:
        """The run that ended and run_one's answer, or None when the worker died without one."""
        p, self.job = self.job, None
        try:
            if self.conn.poll():
                return p, self.conn.recv()
        except (EOFError, OSError):
            pass
        self.proc.join(5)
        return p, None

    def death(self) -> str:
        """Why the worker died, as a failure reason: the signal, or the exit code."""
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
            hint = {signal.SIGKILL: " (the OOM killer, or kill -9)", signal.SIGBUS: " (a memory-mapped file "
                    "truncated while in use? the rerun rebuilds a damaged teacher-output cache)"}.get(-code, "")
            how += hint
        else:
            how = f"exited with code {code}"
        return (f"worker process {self.proc.pid} died: {how}; the run resumes from its last completed epoch "
                f"when the grid is run again")

    def stop(self) -> None:
        if self.proc.is_alive():
            if self.job is None:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
                self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc.join()
        self.conn.close()


def _worker_main(conn, parent: int, threads: int | None, work, sharing: int = 1) -> None:
    """A worker process: run the runs it is sent (``work``: :func:`run_one`), one at a time, until
    it is sent None."""
    worker_init(parent, threads, sharing)
    try:
        while (args := conn.recv()) is not None:
            conn.send(work(*args))
    except (KeyboardInterrupt, EOFError):  # Ctrl-C reaches the workers too; the grid's process reports it
        pass


def submitit_executor(name: str, root: Path, executor: str, jobs: int, device: str, slurm: dict):
    folder = root / "submitit" / name
    if executor == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        ex.update_parameters(**slurm_parameters(slurm, device, jobs, name=f"ablate-{name}"))
    else:  # submitit's LocalExecutor: the same code path, on this machine (used in CI)
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        ex.update_parameters(timeout_min=slurm.get("time_min", 60), **local_gpus(slurm, device))
    return ex


def local_gpus(options: dict, device: str) -> dict:
    """submitit's LocalExecutor hides every GPU (``CUDA_VISIBLE_DEVICES=""``) unless asked for
    some: ``gpus_per_node`` from ``gpus_per_run``, else, when the device is auto or cuda and this
    machine has a GPU, one (GPU 0; for ``cuda:N``, GPUs 0..N so that device N exists in the job)."""
    n = options.get("gpus_per_run")
    if n is None and device != "cpu" and torch.cuda.device_count():
        n = int(device.split(":", 1)[1]) + 1 if device.startswith("cuda:") else 1
    return {"gpus_per_node": n} if n else {}


def _run_submitit(sched: Schedule, name: str, store: ResultsStore, executor: str, jobs: int, device: str,
                  mode: str, slurm: dict, poll_s: float) -> None:
    """Job arrays through submitit: one array per wave of runs whose teachers are complete (teachers,
    then their students). Ctrl-C cancels the jobs not finished (running the grid again resumes them)."""
    root = Path(store.root).resolve()  # the jobs may start in another directory
    ex = submitit_executor(name, root, executor, jobs, device, slurm)
    noise = SacctNoise(sched.console)
    logging.getLogger("submitit").addFilter(noise)
    pending: dict = {}
    try:
        while wave := sched.ready():
            specs = [sched.start(p) for p in wave]
            # SLURM runs at most ``jobs`` of them at once; submitit's local executor all of them
            threads = submitit_threads(executor, device, len(wave))
            try:
                jobs_ = ex.map_array(SubmititRun(), specs, [str(root)] * len(wave), [device] * len(wave),
                                     [mode] * len(wave), [sched.log] * len(wave), [threads] * len(wave))
            except submitit.core.utils.FailedJobError as e:  # sbatch refused the jobs; its message says why
                hint = (" (the partition has no GPUs? --gpus-per-run 0 asks for none)"
                        if "gres" in str(e).lower() else "")
                raise ExecutorError(f"SLURM refused the grid's jobs: {e}{hint}") from None
            pending = dict(zip(jobs_, wave))
            follow(pending, executor, sched.finished, poll_s, tell=lambda msg: say(sched.console, msg, "yellow"))
    except KeyboardInterrupt:
        cancel = [j for j in pending if not j.paths.result_pickle.exists()]
        for job in cancel:
            job.cancel(check=False)
        if cancel:
            say(sched.console, f"cancelled {plural(len(cancel), 'submitit job')}: "
                               f"{', '.join(j.job_id for j in cancel)}")
        raise
    finally:
        logging.getLogger("submitit").removeFilter(noise)


def follow(pending: dict, executor: str, finished, poll_s: float, squeue_every_s: float = 30.0,
            tell=None) -> None:
    """Wait for a wave's jobs; report each as it ends. On SLURM a job is over when its result file
    exists, or when squeue has shown it ended twice in a row (a job killed before it could write one:
    cancelled, out of memory, node failure); submitit's own check needs sacct, which clusters without
    accounting do not have. Why jobs wait (SLURM's reason: a node down, resources) goes to ``tell``,
    once, and again when it changes."""
    watch, last_squeue = Watch(tell or (lambda msg: None)), 0.0
    while pending:
        over = [j for j in pending if j.paths.result_pickle.exists()] if executor == "slurm" else \
            [j for j in pending if j.done()]
        lost = []
        if executor == "slurm" and time.time() - last_squeue >= squeue_every_s:
            last_squeue = time.time()
            lost = watch.poll([j for j in pending if j not in over])
        for job in over:
            p = pending.pop(job)
            try:
                out = job.result()
            except Exception as e:  # the job itself died (node failure, time limit)
                out = failure_answer(p, f"submitit job {job.job_id} failed: {type(e).__name__}: {e}")
            finished(p, out)
        for job in lost:
            p = pending.pop(job)
            log = (job.stderr() or "").strip().splitlines()[-5:]
            finished(p, failure_answer(p, f"SLURM job {job.job_id} {watch.why_lost(job.job_id)}; last lines of "
                                    f"{job.paths.stderr}: " + " | ".join(log)))
        if pending:
            time.sleep(poll_s)


# --- the built-in kinds -------------------------------------------------------------------------------------


class LocalExecutor:
    """Processes on this machine: one run after another in this process (jobs 1), else jobs worker
    processes, GPUs round-robin."""

    name, options = "local", ()

    def check(self, options: dict, where: str) -> None:
        pass

    def run(self, sched: Schedule, launch: Launch) -> None:
        if launch.jobs <= 1:
            _run_serial(sched, launch.store, launch.device, launch.mode)
        else:
            _run_pool(sched, launch.store, launch.jobs, launch.device, launch.mode)


class SubmititExecutor:
    """A submitit job array per wave of runs: on SLURM (``slurm``), or on this machine through the
    same code path (``submitit-local``, used in CI)."""

    def __init__(self, name: str, options: tuple[str, ...]):
        self.name, self.options = name, options

    def check(self, options: dict, where: str) -> None:
        check_executor_options(options, where)

    def run(self, sched: Schedule, launch: Launch) -> None:
        _run_submitit(sched, launch.name, launch.store, self.name, launch.jobs, launch.device, launch.mode,
                      launch.options, launch.poll_s)


register_executor(LocalExecutor())
register_executor(SubmititExecutor("slurm", tuple(SLURM_REQUESTS)), "a submitit job array on SLURM")
register_executor(SubmititExecutor("submitit-local", ("time_min",)),
                  "submitit's local executor: the SLURM code path on this machine (CI)")
