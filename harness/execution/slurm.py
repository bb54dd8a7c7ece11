"""SLURM, as the grid's ``slurm`` executor (:mod:`harness.execution.executor`) meets it: the requests a grid's
jobs are submitted with (exactly those the grid's ``[executor]`` table or the command line set,
:func:`slurm_parameters`), the partition's default time limit from ``sinfo``, job states from
``squeue`` (clusters without accounting have no ``sacct``; submitit's warnings about it are summarised
once) and why a job that ended without a result was lost."""
from __future__ import annotations

import getpass
import logging
import math
import re
import subprocess

from rich.console import Console

from harness.console import plural, say
from harness.errors import GridError, HarnessError


class ExecutorError(HarnessError, RuntimeError):
    """The grid cannot be submitted or followed (SLURM refused the jobs, squeue or sinfo failed...)."""


#: grid [executor] keys (= ablate.py options) that are SLURM requests, with the sbatch option each becomes
SLURM_REQUESTS = {"partition": "--partition", "gpus_per_run": "--gpus-per-node", "cpus_per_run": "--cpus-per-task",
                  "mem_gb": "--mem", "time_min": "--time", "array_parallelism": "--array=...%N"}
_MINIMUM = {"gpus_per_run": 0, "cpus_per_run": 1, "mem_gb": 0, "time_min": 1, "array_parallelism": 1}
#: the longest partition or job name sent (SLURM's own names are far shorter)
MAX_NAME = 64
#: what a partition name sent to sbatch may be: names SLURM accepts, comma-separated, of characters that
#: mean nothing to sbatch's ``#SBATCH`` line parser or a shell (no space, quote, ``#``, ``$``, newline), so
#: the value needs no quoting and cannot add a line or an option to the script
SLURM_NAMES = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NAME}}}(,[A-Za-z0-9_.-]{{1,{MAX_NAME}}})*")
#: characters a job name keeps; any other (a grid file's name may hold anything) becomes ``_``
_JOB_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")
#: times a run may be requeued at its time limit before it is recorded as failed (each requeue resumes)
MAX_REQUEUES = 20


def check_executor_options(options: dict, where: str = "executor options") -> None:
    """Raise GridError naming ``where`` and the key for a SLURM request that is not a valid value."""
    for key, low in _MINIMUM.items():
        v = options.get(key)
        if v is None:
            continue
        kind = (int, float) if key == "mem_gb" else int
        if isinstance(v, bool) or not isinstance(v, kind) or v < low:
            raise GridError(f"{where}: {key} = {v!r} must be {'a number' if key == 'mem_gb' else 'an integer'} "
                            f">= {low}")
    part = options.get("partition")
    if part is not None and (not isinstance(part, str) or not SLURM_NAMES.fullmatch(part)):
        raise GridError(f"{where}: partition = {str(part)[:80]!r} is not a SLURM partition name (or a comma-separated "
                        f"list of them): letters, digits, '_', '-', '.', at most {MAX_NAME} characters each")


def slurm_parameters(options: dict, device: str = "auto", jobs: int = 1, name: str = "ablate") -> dict:
    """submitit SlurmExecutor parameters for a grid's jobs: exactly the requests that were set (0
    included: ``gpus_per_run = 0`` sends ``--gpus-per-node=0``), nothing else, so the cluster's
    defaults apply to the rest. GPUs are requested unasked when the device is cuda or auto (one per
    run: with auto and no GPU asked for, a job would silently train on a CPU node); ``gpus_per_run =
    0`` or ``--device cpu`` asks for none. ``mem_gb = 0`` is SLURM's ``--mem=0`` (all of the node's
    memory). Without ``time_min``
    the partition's default time limit is looked up (submitit always sends one). The partition is one
    :data:`SLURM_NAMES` allows; the job name keeps letters, digits and ``_.+-`` (others become ``_``):
    neither can add a line or an option to the sbatch script."""
    check_executor_options(options)
    name = _JOB_NAME_UNSAFE.sub("_", name)[:MAX_NAME] or "ablate"
    gpus = options.get("gpus_per_run")
    if gpus is None and (device == "auto" or device.startswith("cuda")):
        gpus = 1
    params = {"job_name": name, "partition": options.get("partition"), "gpus_per_node": gpus,
              "cpus_per_task": options.get("cpus_per_run"), "array_parallelism": options.get("array_parallelism", jobs)}
    mem = options.get("mem_gb")
    if mem is not None:
        params["mem"] = f"{mem}G" if float(mem).is_integer() else f"{math.ceil(mem * 1024)}M"
    time_min = options.get("time_min")
    if time_min is None:
        time_min = partition_time_limit(options.get("partition"))
    params["time"] = time_min
    # SLURM signals the job signal_delay_s before its time limit (submitit then checkpoints and requeues it), or up
    # to 60 s earlier: 90 s (submitit's default) from 3 minutes on, 30 s below, so that a 2-minute job is signalled
    # between 30 and 90 s; a 1-minute job may be signalled as it starts (too short to be requeued reliably)
    params["signal_delay_s"] = 90 if not time_min or time_min >= 3 else 30
    return {k: v for k, v in params.items() if v is not None}


def _minutes(text: str) -> int | None:
    """A SLURM time ([D-]HH:MM:SS, MM:SS, MM, infinite) in minutes, rounded up; 0 for no limit."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED"):
        return 0
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(x) for x in clock.split(":")]
        d = int(days) if days else 0
    except ValueError:
        return None
    seconds = {1: lambda p: p[0] * 60, 2: lambda p: p[0] * 60 + p[1],
               3: lambda p: p[0] * 3600 + p[1] * 60 + p[2]}.get(len(parts))
    return None if seconds is None else d * 1440 + math.ceil(seconds(parts) / 60)


def partition_time_limit(partition: str | None) -> int:
    """The time limit, in minutes (0: none), that a job asking for none gets on this partition (the
    cluster's default one when None): its DefaultTime, else its MaxTime. Raises ExecutorError when
    sinfo fails or the partition does not exist."""
    cmd = ["sinfo", "-h", "-o", "%P %L %l"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExecutorError(f"cannot ask SLURM about its partitions ({' '.join(cmd)}): {e}") from None
    if out.returncode:
        raise ExecutorError(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout.strip()}")
    rows = [line.split() for line in out.stdout.splitlines() if len(line.split()) == 3]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")]
    if not rows:
        known = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60).stdout.split()
        what = f"no partition {partition!r}" if partition else "no default partition"
        raise ExecutorError(f"SLURM has {what} (partitions: {', '.join(k.rstrip('*') for k in known) or 'none'}); "
                            f"pass --partition")
    _, default, maximum = rows[0]
    for text in (default, maximum):
        minutes = _minutes(text)
        if minutes is not None:
            return minutes
    return 0


class SacctNoise(logging.Filter):
    """On clusters without accounting every sacct call fails and submitit logs a warning each time:
    the first is shown once, as one line that says what it means; the rest are dropped."""

    def __init__(self, console: Console):
        super().__init__()
        self.console, self.seen = console, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        self.seen += 1
        if self.seen == 1:
            say(self.console, f"sacct does not answer (no job accounting on this cluster?); job states are read from "
                              f"result files and squeue; further sacct errors are not shown. ({record.getMessage()})",
                "dim")
        return False


#: squeue states of a job that has ended (a requeued job is PENDING or REQUEUED again)
_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}


def _job_states(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """State and reason (why a pending job waits: ``Resources``, ``ReqNodeNotAvail``...) of these
    SLURM jobs (array tasks as ``123_4``) by squeue, which needs no accounting; ``GONE`` for a job no
    longer listed (ended). None when squeue cannot say."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    rows = [line.split("|", 2) for line in out.stdout.splitlines()]
    states = {r[0].strip(): (r[1].strip(), r[2].strip() if len(r) > 2 else "") for r in rows if len(r) >= 2}
    return {j: states.get(j, ("GONE", "")) for j in job_ids}


#: why a job ended without a result, by the last state squeue showed
_LOST = {"CANCELLED": "was cancelled (scancel, or by an administrator)",
         "TIMEOUT": "reached its time limit and was not requeued",
         "DEADLINE": "reached its deadline", "OUT_OF_MEMORY": "ran out of memory (SLURM's memory limit)",
         "NODE_FAIL": "lost its node (node failure)", "BOOT_FAIL": "could not boot its node",
         "FAILED": "failed before the run could record a result"}


class Watch:
    """What squeue says about a wave's jobs: which ended without a result (seen ended twice in a
    row), the last state of each, and why pending jobs wait (told once, and when it changes)."""

    def __init__(self, tell):
        self.tell, self.gone_before, self.last, self.waiting = tell, set(), {}, {}

    def poll(self, jobs: list) -> list:
        """The jobs that ended without writing a result."""
        states = _job_states([j.job_id for j in jobs])
        if states is None:
            self.gone_before = set()
            return []
        self._tell_waiting(states)
        self.last.update({j: st for j, (st, _) in states.items() if st != "GONE"})
        gone = {j for j, (st, _) in states.items() if st in _ENDED | {"GONE"}}
        lost = [j for j in jobs if j.job_id in gone & self.gone_before and not j.paths.result_pickle.exists()]
        self.gone_before = gone
        return lost

    def why_lost(self, job_id: str) -> str:
        state = self.last.get(job_id)
        return _LOST.get(state) or (f"ended without a result (last seen {state}, then no longer in squeue: "
                                    f"cancelled, killed, node failure?)" if state else
                                    "ended without a result (cancelled, killed, node failure?)")

    def _tell_waiting(self, states: dict) -> None:
        waiting = {j: reason for j, (st, reason) in states.items() if st == "PENDING" and reason}
        changed: dict[str, list[str]] = {}
        for j, reason in waiting.items():
            if self.waiting.get(j) != reason:
                changed.setdefault(reason, []).append(j)
        self.waiting = waiting
        for reason, ids in changed.items():
            verb = "waits" if len(ids) == 1 else "wait"
            self.tell(f"SLURM: {plural(len(ids), 'job')} {verb} ({reason}): {', '.join(ids)}")
