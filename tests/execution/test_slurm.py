"""The grid on a real SLURM cluster: the one-node cluster that `scripts/local-slurm.sh start` runs on
this machine (CI starts it; `.ci/run`). The `ci` grid through SLURM must meet
tests/golden/ci_expected.json exactly as the local executor's results must; a run that reaches its
time limit is requeued and resumes; Ctrl-C cancels the grid's jobs and running again resumes.

Skipped, with the reason, when no cluster whose node is this machine answers (jobs must see this
machine's files); with VQAKD_SLURM=1 (set by .ci/run once it started the cluster) that is a failure."""
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


def squeue(name: str) -> list[str]:
    """States of this user's jobs with this name still queued or running."""
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def job_logs(results: Path, grid: str) -> str:
    return "".join(p.read_text() for p in sorted((results / "submitit" / grid).glob("*_log.*")))


def test_ci_grid_on_slurm_matches_expected_results(partition, tiny, tmp_path):
    """The CI regression grid through SLURM on a CPU-only partition (no GPU asked: gpus_per_run 0),
    one CPU per job, two jobs at a time: the same expected results as the local executor."""
    g = G.load("ci")
    store = ResultsStore(tmp_path / "results")
    res = run_grid(g, store, executor="slurm", jobs=2, device="cpu", console=quiet(), poll_s=0.5,
                   options={"partition": partition, "gpus_per_run": 0, "cpus_per_run": 1, "time_min": 30})
    assert not res.failed and not res.interrupted, res.failed
    assert res.skipped == 0 and sorted(res.complete) == sorted(res.run_ids)
    folder = tmp_path / "results" / "submitit" / "ci"
    assert len(list(folder.glob("*_result.pkl"))) == len(g.runs)  # each run was one SLURM job
    # every run is complete now: measure() trains nothing, it reads the records the SLURM jobs wrote
    rows = R.compare(R.measure(g, store, console=quiet()), json.loads(R.expected_path("ci").read_text()))
    assert not rows, "numbers moved outside tolerance:\n" + R.format_rows(rows)


def _epoch_seconds(variant: str, tmp_path) -> float:
    """Training time of one epoch of this variant on the tiny set, here and now (the machine may be shared)."""
    from harness.training.plan import RunSpec
    from harness.training.runner import train

    rec = train(RunSpec(variant=variant, seed=0, epochs=3, batch_size=512), ResultsStore(tmp_path / "calibration"),
                device="cpu", progress=False)
    # the fastest epoch: the job may run faster than this calibration (which can share the cores with another
    # test worker), and a job that finishes before SLURM signals it tests nothing
    return min(h["train_time_s"] for h in rec["history"][1:])


def test_ctrl_c_cancels_the_jobs_then_a_time_limited_run_is_requeued_and_resumes(partition, tiny, data_cache,
                                                                                  tmp_path):
    """One run through `ablate.py --executor slurm --gpus-per-run 0 --time-min 2` (one test for both, to keep
    CI short). SIGINT once an epoch is done cancels its job (scancel). The same command again resumes the
    run; it needs about 150 s of training, so SLURM signals the job before its 2-minute limit (30 to 90 s
    in: submitit's signal, which SLURM may send up to 60 s early), submitit calls the checkpoint hook and
    requeues the job, and the runner resumes from the last completed epoch again. The record is
    complete, its history continuous, and it spans both attempts (no attempt outlives the limit)."""
    epochs = max(30, round(150 / _epoch_seconds("question-only", tmp_path)))
    name = f"vqakd-test-{os.getpid()}"
    grid = tmp_path / f"{name}.toml"
    grid.write_text(f'data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n'
                    f'[train]\nepochs = {epochs}\nbatch_size = 512\n')
    results = tmp_path / "results"
    env = {**os.environ, "VQAKD_DATA_DIR": str(data_cache), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "ablate.py"), "--grid", str(grid), "--executor", "slurm", "--partition",
           partition, "--gpus-per-run", "0", "--cpus-per-run", "1", "--time-min", "2", "--device", "cpu",
           "--results", str(results), "--reports", str(tmp_path / "reports")]
    # SIGINT restored to its default in the child: a shell starts background jobs with it ignored (`... &`),
    # and Python then installs no KeyboardInterrupt handler, so Ctrl-C would never reach the grid
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(results.glob("runs/*/state.pt")) and proc.poll() is None:
            time.sleep(0.2)  # the job has completed an epoch
        assert proc.poll() is None and list(results.glob("runs/*/state.pt")), "no epoch completed in 180 s"
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
    run_id, cancelled_after = state.parent.name, torch.load(state, weights_only=False)["epoch"] + 1

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    logs = job_logs(results, name)
    assert again.returncode == 0, again.stdout + again.stderr + logs[-3000:]
    rec = ResultsStore(results).read_record(run_id)
    assert rec["epochs_run"] == epochs and [h["epoch"] for h in rec["history"]] == list(range(epochs))
    resumed = [int(k) for k in re.findall(rf"{re.escape(run_id)}: resuming after epoch (\d+)", logs)]
    assert resumed[0] == cancelled_after, logs[-3000:]  # after Ctrl-C: from the saved epoch, not from scratch
    assert "requeued, the run resumes from its last completed epoch" in logs, logs[-3000:]
    assert len(resumed) >= 2 and resumed == sorted(resumed) and resumed[-1] < epochs, logs[-3000:]  # after requeue
    # one record across attempts: its active time covers every epoch's training, those of each attempt included
    # (not a fixed figure: how long ~150 s of calibrated training takes under SLURM varies with the machine)
    assert rec["wall_time_s"] >= sum(h["train_time_s"] for h in rec["history"]), rec["wall_time_s"]
