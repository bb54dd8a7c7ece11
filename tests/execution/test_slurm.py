"""The grid on a real SLURM cluster: the one-node cluster that `scripts/local-slurm.sh start` runs on
this machine (CI starts it; `.ci/run`). The `ci` grid through SLURM must meet
tests/golden/ci_expected.json exactly as the local executor's results must; a run that reaches its
time limit is requeued and resumes; Ctrl-C cancels the grid's jobs and running again resumes.

Skipped, with the reason, when no cluster whose node is this machine answers (jobs must see this
machine's files); with VQAKD_SLURM=1 (set by .ci/run once it started the cluster) that is a failure."""
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from harness.execution import grid as G
from harness.execution import regression as R
from harness.execution.grid import run_grid
from harness.runs.store import ResultsStore

ROOT = Path(__file__).resolve().parents[2]


def _cluster() -> tuple[str | None, str]:
    """(partition, '') when a SLURM cluster with this machine as a node answers, else (None, why not)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %N"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "sinfo is not installed"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"sinfo failed: {e}"
    if out.returncode:
        return None, f"sinfo failed: {(out.stderr or out.stdout).strip()}"
    rows = [line.split() for line in out.stdout.splitlines() if len(line.split()) == 2]
    want = os.environ.get("VQAKD_SLURM_PARTITION")
    rows = [r for r in rows if r[0].rstrip("*") == want] if want else \
        sorted(rows, key=lambda r: not r[0].endswith("*"))  # the default partition first
    if not rows:
        return None, f"sinfo lists no partition{' ' + repr(want) if want else ''}"
    partition, nodes = rows[0][0].rstrip("*"), rows[0][1]
    host = socket.gethostname().split(".")[0]
    if host not in nodes.split(","):
        return None, f"this machine ({host}) is not a node of partition {partition} ({nodes}): jobs could not " \
                     f"see its files"
    return partition, ""


@pytest.fixture(scope="module")
def partition():
    name, why = _cluster()
    if name is None:
        msg = f"no local SLURM cluster: {why} (`eval \"$(scripts/local-slurm.sh start)\"` starts one, as root)"
        if os.environ.get("VQAKD_SLURM") == "1":
            pytest.fail(f"VQAKD_SLURM=1 says a local SLURM cluster was started, but {msg}")
        pytest.skip(msg)
    return name


def quiet():
    return Console(file=open(os.devnull, "w"))


def squeue(name: str, field: str = "%T") -> list[str]:
    """A field (default: the state) of each of this user's jobs with this name still queued or running."""
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", field], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def job_logs(results: Path, grid: str) -> str:
    return "".join(p.read_text() for p in sorted((results / "submitit" / grid).glob("*_log.*")))


#: the runs of the ci grid that go through SLURM: a baseline and a student, whose teacher is trained by a job
#: that the student's job waits for (the local executor's tests run the whole grid)
SLURM_SUBSET = ("question-only", "student-logits")


@pytest.mark.slow
def test_ci_grid_on_slurm_matches_expected_results(partition, tiny, tmp_path):
    """Runs of the CI regression grid through SLURM on a CPU-only partition (no GPU asked: gpus_per_run 0),
    one CPU per job, two jobs at a time: the same expected results as the local executor's."""
    g = G.load("ci")
    g = dataclasses.replace(g, runs=[r for r in g.runs if r.variant in SLURM_SUBSET])
    assert {r.variant for r in g.runs} == set(SLURM_SUBSET)
    store = ResultsStore(tmp_path / "results")
    res = run_grid(g, store, executor="slurm", jobs=2, device="cpu", console=quiet(), poll_s=0.5,
                   options={"partition": partition, "gpus_per_run": 0, "cpus_per_run": 1, "time_min": 30})
    assert not res.failed and not res.interrupted, res.failed
    assert res.skipped == 0 and sorted(res.complete + res.teachers_complete) == sorted(res.run_ids)
    folder = tmp_path / "results" / "submitit" / "ci"
    assert len(list(folder.glob("*_result.pkl"))) == len(res.run_ids)  # each run (teacher included) a SLURM job
    # every run is complete now: measure() trains nothing, it reads the records the SLURM jobs wrote
    expected = json.loads(R.expected_path("ci").read_text())
    measured = R.measure(g, store, console=quiet())
    expected["variants"] = {v: e for v, e in expected["variants"].items() if v in measured}
    assert set(SLURM_SUBSET) <= set(measured)
    rows = R.compare(measured, expected)
    assert not rows, "numbers moved outside tolerance:\n" + R.format_rows(rows)


def _epoch_seconds(variant: str, tmp_path) -> float:
    """Training time of one epoch of this variant on the tiny set, here and now, with one thread as the job has."""
    from harness.training.plan import RunSpec
    from harness.training.runner import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = train(RunSpec(variant=variant, seed=0, epochs=4, batch_size=512),
                    ResultsStore(tmp_path / "calibration"), device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return min(h["train_time_s"] for h in rec["history"][1:])


def _state_epoch(results: Path) -> int:
    """The last completed epoch the run's state.pt holds (-1 while there is none, or while it is replaced)."""
    try:
        (state,) = results.glob("runs/*/state.pt")
        return torch.load(state, weights_only=False)["epoch"]
    except (ValueError, OSError, RuntimeError, EOFError, KeyError):
        return -1


def _wait(what: str, done, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not done() and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None and done(), f"{what}: not within {seconds:.0f} s (the command exited: " \
                                           f"{proc.poll() is not None})"


@pytest.mark.slow
def test_ctrl_c_cancels_the_jobs_then_a_time_limited_run_is_requeued_and_resumes(partition, tiny, data_cache,
                                                                                  tmp_path):
    """One run through `ablate.py --executor slurm --gpus-per-run 0 --time-min 5` (one test for both, to keep
    CI short). SIGINT once an epoch is done cancels its job (scancel). The same command again resumes the
    run from its saved epoch; once that attempt has completed an epoch more, the test sends the job what SLURM
    sends a job near its time limit (USR2 to its steps: `scancel --signal=USR2`, the signal submitit asks
    SLURM for with `--signal`). Sent by the test rather than awaited, so that the test does not depend on
    how fast this machine trains or when SLURM's time-limit check comes round; with a limit under 10 minutes
    submitit counts any such signal as the time limit. submitit calls the checkpoint hook and requeues the
    job, and the runner resumes from the last completed epoch again. The record is complete, its history
    continuous, and it spans the attempts."""
    # about 8 s of training, at least 30 epochs: each attempt must still be running when the test has seen its
    # next epoch's checkpoint (read between the run's replacements of it, which come every epoch)
    epochs = max(30, round(8 / _epoch_seconds("question-only", tmp_path)))
    name = f"vqakd-test-{os.getpid()}"
    grid = tmp_path / f"{name}.toml"
    grid.write_text(f'data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n'
                    f'[train]\nepochs = {epochs}\nbatch_size = 512\n')
    results = tmp_path / "results"
    env = {**os.environ, "VQAKD_DATA_DIR": str(data_cache), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "ablate.py"), "--grid", str(grid), "--executor", "slurm", "--partition",
           partition, "--gpus-per-run", "0", "--cpus-per-run", "1", "--time-min", "5", "--device", "cpu",
           "--results", str(results), "--reports", str(tmp_path / "reports")]
    # SIGINT restored to its default in the child: a shell starts background jobs with it ignored (`... &`),
    # and Python then installs no KeyboardInterrupt handler, so Ctrl-C would never reach the grid
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait("the job's first epoch", lambda: _state_epoch(results) >= 0, proc, 180)
        assert squeue(f"ablate-{name}"), "the grid's job is not in the queue"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    assert re.search(r"cancelled 1 submitit job:", out), out
    deadline = time.time() + 30  # scancel: SIGTERM, then SIGKILL after KillWait
    while time.time() < deadline and squeue(f"ablate-{name}"):
        time.sleep(0.5)
    assert not squeue(f"ablate-{name}"), "the job still runs after Ctrl-C"
    assert not list(results.glob("runs/*/record.json"))
    (state,) = results.glob("runs/*/state.pt")
    run_id, cancelled_after = state.parent.name, _state_epoch(results) + 1

    again = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait("an epoch of the resumed job", lambda: _state_epoch(results) >= cancelled_after, again, 180)
        job = squeue(f"ablate-{name}", "%i")
        assert len(job) == 1, job
        subprocess.run(["scancel", "--signal=USR2", job[0]], check=True, timeout=30)
        out, _ = again.communicate(timeout=600)
    finally:
        if again.poll() is None:
            again.kill()
            again.communicate()
    logs = job_logs(results, name)
    assert again.returncode == 0, out + logs[-3000:]
    rec = ResultsStore(results).read_record(run_id)
    assert rec["epochs_run"] == epochs and [h["epoch"] for h in rec["history"]] == list(range(epochs))
    resumed = [int(k) for k in re.findall(rf"{re.escape(run_id)}: resuming after epoch (\d+)", logs)]
    assert resumed[0] == cancelled_after, logs[-3000:]  # after Ctrl-C: from the saved epoch, not from scratch
    assert "requeued, the run resumes from its last completed epoch" in logs, logs[-3000:]
    assert len(resumed) >= 2 and resumed == sorted(resumed) and resumed[-1] < epochs, logs[-3000:]  # after requeue
    # one record across attempts: its active time covers every epoch's training, those of each attempt included
    assert rec["wall_time_s"] >= sum(h["train_time_s"] for h in rec["history"]), rec["wall_time_s"]
