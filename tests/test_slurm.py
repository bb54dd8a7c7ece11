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
from rich.console import Console

from harness import grid as G
from harness import regression as R
from harness.executor import run_grid
from harness.store import ResultsStore

ROOT = Path(__file__).resolve().parent.parent


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
                   slurm={"partition": partition, "gpus_per_run": 0, "cpus_per_run": 1, "time_min": 30})
    assert not res.failed and not res.interrupted, res.failed
    assert res.skipped == 0 and sorted(res.complete) == sorted(res.run_ids)
    folder = tmp_path / "results" / "submitit" / "ci"
    assert len(list(folder.glob("*_result.pkl"))) == len(g.runs)  # each run was one SLURM job
    # every run is complete now: measure() trains nothing, it reads the records the SLURM jobs wrote
    rows = R.compare(R.measure(g, store, console=quiet()), json.loads(R.expected_path("ci").read_text()))
    assert not rows, "numbers moved outside tolerance:\n" + R.format_rows(rows)


def _epoch_seconds(variant: str, tmp_path) -> float:
    """Training time of one epoch of this variant on the tiny set, here and now (the machine may be shared)."""
    from harness.runner import RunSpec, train

    rec = train(RunSpec(variant=variant, seed=0, epochs=3, batch_size=512), ResultsStore(tmp_path / "calibration"),
                device="cpu", progress=False)
    return max(h["train_time_s"] for h in rec["history"][1:])


def test_a_run_at_its_time_limit_is_requeued_and_resumes(partition, tiny, tmp_path):
    """time_min = 1 and a run that needs about 75 s: SLURM signals the job 30 s before its limit,
    submitit calls the checkpoint hook and requeues it, the runner resumes from the last completed
    epoch; the record is complete and its history continuous."""
    epochs = max(20, round(75 / _epoch_seconds("question-only", tmp_path)))
    grid = tmp_path / "requeue.toml"
    grid.write_text(f'data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n'
                    f'[train]\nepochs = {epochs}\nbatch_size = 512\n')
    g = G.load(grid)
    results = tmp_path / "results"
    store = ResultsStore(results)
    t0 = time.time()
    res = run_grid(g, store, executor="slurm", device="cpu", console=quiet(), poll_s=0.5,
                   slurm={"partition": partition, "gpus_per_run": 0, "cpus_per_run": 1, "time_min": 1})
    assert not res.failed, res.failed
    rec = store.read_record(res.complete[0])
    assert rec["epochs_run"] == epochs and [h["epoch"] for h in rec["history"]] == list(range(epochs))
    logs = job_logs(results, "requeue")
    assert "requeued, the run resumes from its last completed epoch" in logs, logs[-3000:]
    resumed = [int(k) for k in re.findall(r"resuming after epoch (\d+)", logs)]
    assert resumed and all(0 < k < epochs for k in resumed), logs[-3000:]  # resumed, not restarted from epoch 0
    # one record, started by the first attempt (a restart would have started it again)
    assert rec["wall_time_s"] > 60 and rec["started_at"] <= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + 60))


def test_ctrl_c_cancels_the_jobs_and_running_again_resumes(partition, tiny, data_cache, tmp_path):
    """`ablate.py --grid ... --executor slurm --gpus-per-run 0`: SIGINT while jobs run cancels them
    (scancel); the same command again finishes the runs from their last completed epoch."""
    name = f"vqakd-test-{os.getpid()}"
    grid = tmp_path / f"{name}.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0, 1]\n'
                    '[train]\nepochs = 12\nbatch_size = 512\n')
    results = tmp_path / "results"
    env = {**os.environ, "VQAKD_DATA_DIR": str(data_cache), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "ablate.py"), "--grid", str(grid), "--executor", "slurm", "--partition",
           partition, "--gpus-per-run", "0", "--cpus-per-run", "1", "--time-min", "30", "--jobs", "2",
           "--device", "cpu", "--results", str(results), "--reports", str(tmp_path / "reports")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(results.glob("runs/*/state.pt")) and proc.poll() is None:
            time.sleep(0.2)  # a job has completed an epoch
        assert proc.poll() is None and list(results.glob("runs/*/state.pt")), "no epoch completed in 180 s"
        assert squeue(f"ablate-{name}"), "the grid's jobs are not in the queue"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    assert re.search(r"cancelled 2 submitit job\(s\)", out), out
    deadline = time.time() + 30  # scancel: SIGTERM, then SIGKILL after KillWait
    while time.time() < deadline and set(squeue(f"ablate-{name}")) - {"COMPLETED", "CANCELLED"}:
        time.sleep(0.5)
    assert not set(squeue(f"ablate-{name}")) - {"COMPLETED", "CANCELLED"}, "jobs still queued or running"
    assert not list(results.glob("runs/*/record.json")), "a run finished before Ctrl-C: the test proves nothing"
    done_epochs = {p.parent.name: __import__("torch").load(p, weights_only=False)["epoch"]
                   for p in results.glob("runs/*/state.pt")}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    recs = ResultsStore(results).records()
    assert len(recs) == 2 and all(r["epochs_run"] == 12 for r in recs)
    logs = job_logs(results, name)
    for run_id, epoch in done_epochs.items():  # each run that had a state resumed after it, not from scratch
        assert re.search(rf"{re.escape(run_id)}: resuming after epoch (\d+)", logs), logs[-3000:]
