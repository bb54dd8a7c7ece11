"""How a grid's runs are scheduled: the worker processes' set-up (each one's device and CPU threads,
ending with the grid's process) and the schedule (every teacher run before the students that need
it, what is running, the result so far). The executors of :mod:`harness.execution.executor` drive it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import threading
import time

import torch
from rich.console import Console
from rich.progress import Progress

from harness.console import say
from harness.env import SHARING_ENV
from harness.runs.store import ResultsStore

# --- local worker processes die with the grid's process ----------------------------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_init(parent: int, threads: int | None, sharing: int = 1) -> None:
    """Initializer of the grid's worker processes: die with the grid; on the CPU, use ``threads``
    (the cores shared out among the workers: N workers of all the cores each would oversubscribe
    the CPU, and be slower together than one at a time); ``sharing``: how many workers share this
    one's device (each run records it as ``runs_sharing_device``)."""
    _die_with_parent(parent)
    os.environ[SHARING_ENV] = str(sharing)
    if threads:
        torch.set_num_threads(threads)


def device_slots(jobs: int, device: str, ngpu: int) -> list[tuple[str, int]]:
    """Each of ``jobs`` workers' device and how many workers share it: GPUs round-robin when the
    device is auto or cuda and there are GPUs, else the CPU (or the device named)."""
    if ngpu and (device == "auto" or device == "cuda"):
        devs = [f"cuda:{i % ngpu}" for i in range(jobs)]
    else:
        devs = ["cpu" if device == "auto" else device] * jobs
    return [(d, devs.count(d)) for d in devs]


def cpu_threads_per_worker(jobs: int) -> int:
    """torch CPU threads for each of ``jobs`` workers: this process's cores shared out, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def cpu_share(jobs: int, device: str) -> int | None:
    """The torch CPU threads of each of ``jobs`` processes training at once on this machine: None where they
    train on the GPUs (``auto`` or ``cuda`` with GPUs here), else the cores shared out
    (:func:`cpu_threads_per_worker`)."""
    ngpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    return None if ngpu else cpu_threads_per_worker(jobs)


def submitit_threads(executor: str, device: str, concurrent: int) -> int | None:
    """The torch CPU threads to give each of ``concurrent`` submitit jobs that run at once: on SLURM None (the
    job takes the CPUs SLURM gave it, :func:`job_init`); with submitit's local executor, which starts every job
    of an array at once on this machine, the local workers' share (:func:`cpu_share`)."""
    return None if executor == "slurm" else cpu_share(concurrent, device)


def job_init(threads: int | None) -> None:
    """The start of a submitit job: torch uses as many CPU threads as SLURM gave the job
    (``SLURM_CPUS_PER_TASK``; it would otherwise use every core of the node), else ``threads``
    (:func:`submitit_threads`). Jobs that each use every core oversubscribe the CPU: two submitit-local jobs of
    two threads each on 2 cores took 62 s for what took 6 s with one thread each."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or threads
    if cpus:
        torch.set_num_threads(int(cpus))


def _die_with_parent(parent: int) -> None:
    """Initializer of the grid's worker processes: end this worker when the grid's process ends, even
    by SIGKILL (which leaves no chance to clean up), instead of training on for nobody. Linux: the
    kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); everywhere: a thread that
    checks every second that the parent is still this process's parent."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the worker
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


@dataclasses.dataclass
class GridResult:
    run_ids: list[str]  # every run of the grid and their teachers, teachers first
    complete: list[str]  # the grid's own runs that are complete (teacher runs: ``teachers_complete``)
    failed: list[dict]  # failed runs, the teacher runs the grid trained for its students included
    skipped: int  # the grid's own runs that were already complete
    interrupted: bool = False
    teachers_complete: list[str] = dataclasses.field(default_factory=list)


def _depends(p) -> set[str]:
    return set(p.all_run_ids()) - {p.run_id}


def failure_answer(p, reason: str) -> dict:
    return {"run_id": p.run_id, "variant": p.spec.variant, "seed": p.spec.seed, "status": "failed", "reason": reason}


def _acc(out: dict) -> str:
    """A finished run's test accuracy, for an answer without its task's figure (``result``: a job of an
    older harness, a stand-in worker)."""
    return f"test acc {out['test_acc']:.2f}"


@dataclasses.dataclass
class Schedule:
    """What a grid still has to train, in order (every teacher run before the students that need it,
    the teachers the grid does not list included: each is scheduled once, so parallel students never
    wait on one another's teacher), what is running, the result so far and the progress bar."""

    name: str
    todo: list  # plans still to run, teachers first
    own: set  # the run ids the grid lists (the others in ``todo`` are teachers they need)
    result: GridResult
    console: Console
    progress: Progress
    running: dict = dataclasses.field(default_factory=dict)
    task: int = 0
    store: ResultsStore | None = None  # where the failures the grid gives up on are recorded (failed.json)
    log: tuple = ()  # logging sinks (harness.training.sinks) of every run

    def __post_init__(self) -> None:
        self.pending = list(self.todo)
        self.ids = {p.run_id for p in self.todo}
        self.specs = {p.run_id: dataclasses.asdict(p.spec) for p in self.todo}
        self.failed_plans: dict = {}
        self.task = self.progress.add_task(self.name, total=len(self.todo), info="")

    def status(self) -> str:
        done = len(self.todo) - len(self.pending) - len(self.running)
        return (f"done {done - len(self.result.failed)}  running {len(self.running)}  failed {len(self.result.failed)}"
                f"  left {len(self.pending)}")

    def start(self, p) -> dict:
        """Take ``p`` off the pending list; its spec, for :func:`run_one`."""
        self.pending.remove(p)
        self.running[p.run_id] = p
        self.progress.update(self.task, info=self.status(), description=f"{self.name}: {p.spec.variant} seed "
                                                                          f"{p.spec.seed}")
        return self.specs[p.run_id]

    def finished(self, p, out: dict) -> None:
        """``p`` ended with ``out`` (:func:`run_one`'s answer)."""
        self.running.pop(p.run_id, None)
        if out["status"] == "complete":
            (self.result.complete if p.run_id in self.own else self.result.teachers_complete).append(p.run_id)
            say(self.console,
                f"done {out['variant']} seed {out['seed']}: {out.get('result') or _acc(out)} ({out['run_id']})",
                "green")
        else:
            if self.store is not None and "failed_at" not in out:  # given up here, not recorded by run_one
                out = self.store.record_failure({**out, "run_id": p.run_id, "spec": self.specs[p.run_id]})
            self.result.failed.append(out)
            self.failed_plans[p.run_id] = p
            say(self.console, f"failed {out['variant']} seed {out['seed']}: {out['reason']}", "red")
        self.progress.update(self.task, advance=1, info=self.status())

    def dependency_failed(self, p) -> str | None:
        bad = [self.failed_plans[r] for r in _depends(p) if r in self.failed_plans]
        return None if not bad else (f"teacher run {bad[0].spec.variant} seed {bad[0].spec.seed} "
                                     f"({bad[0].run_id}) failed")

    def ready(self) -> list:
        """Pending runs whose teachers in this schedule are complete; a run whose teacher failed is
        recorded as failed (with that reason) instead of being tried."""
        out = []
        for p in list(self.pending):
            reason = self.dependency_failed(p)
            if reason:
                self.pending.remove(p)
                self.finished(p, failure_answer(p, reason))
            elif not (_depends(p) & self.ids) - set(self.result.complete) - set(self.result.teachers_complete):
                out.append(p)
        return out
