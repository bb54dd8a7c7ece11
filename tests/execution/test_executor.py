"""The executor without a cluster: SLURM requests (exactly what was asked, 0 included, nothing
else), their checks, the command line's options, sacct noise, job states from squeue, the
checkpoint hook, and worker processes that die with a SIGKILLed grid."""
import io
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from rich.console import Console
from typer.testing import CliRunner

from harness.execution import executor as E
from harness.execution import grid as G
from harness.execution.schedule import cpu_threads_per_worker, worker_init
from harness.execution import slurm as S
from harness.errors import GridError

ROOT = Path(__file__).resolve().parents[2]


def sbatch_lines(params: dict, tmp_path) -> list[str]:
    """The #SBATCH lines submitit writes for these parameters (submitit's own renderer)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return [line for line in _make_sbatch_string(command="true", folder=tmp_path, **params).splitlines()
            if line.startswith("#SBATCH")]


def flags(lines: list[str]) -> dict:
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in lines if "=" in line)


def test_nothing_is_requested_that_was_not_asked(tmp_path):
    f = flags(sbatch_lines(S.slurm_parameters({"time_min": 30}, device="cpu"), tmp_path))
    for key in ("gpus-per-node", "cpus-per-task", "mem", "partition"):
        assert key not in f, f
    assert f["time"] == "30" and f["signal"] == "USR2@90"
    # device auto (the default) asks for one GPU per run: without it the jobs would land on CPU nodes
    f = flags(sbatch_lines(S.slurm_parameters({"time_min": 30}, device="auto"), tmp_path))
    assert f["gpus-per-node"] == "1" and "cpus-per-task" not in f and "mem" not in f


def test_requests_are_sent_exactly_zero_included(tmp_path):
    opts = {"partition": "debug", "gpus_per_run": 0, "cpus_per_run": 1, "mem_gb": 4, "time_min": 1,
            "array_parallelism": 3}
    f = flags(sbatch_lines(S.slurm_parameters(opts, device="cuda", jobs=1), tmp_path))
    assert f["partition"] == "debug" and f["gpus-per-node"] == "0" and f["cpus-per-task"] == "1"
    assert f["mem"] == "4G" and f["time"] == "1"
    assert f["signal"] == "USR2@30"  # short limits: SLURM may signal up to 60 s early, not before the job starts
    assert S.slurm_parameters({"time_min": 2})["signal_delay_s"] == 30
    assert S.slurm_parameters({"time_min": 3})["signal_delay_s"] == 90  # submitit's default
    assert S.slurm_parameters({**opts, "mem_gb": 2.5})["mem"] == "2560M"
    assert S.slurm_parameters({**opts, "mem_gb": 0})["mem"] == "0G"  # SLURM's --mem=0: all of the node's memory
    assert S.slurm_parameters(opts)["array_parallelism"] == 3
    assert S.slurm_parameters({"time_min": 5}, jobs=4)["array_parallelism"] == 4  # default: --jobs


@pytest.mark.parametrize("device, gpus", [("auto", 1), ("cpu", None), ("cuda", 1), ("cuda:1", 1)])
def test_gpus_unasked_for_cuda_and_auto(device, gpus):
    """With auto and no GPU asked for, a SLURM job would train on a CPU node without a word."""
    assert S.slurm_parameters({"time_min": 5}, device=device).get("gpus_per_node") == gpus
    assert S.slurm_parameters({"time_min": 5, "gpus_per_run": 2}, device=device)["gpus_per_node"] == 2


@pytest.mark.parametrize("options, match", [
    ({"gpus_per_run": -1}, r"where: gpus_per_run = -1 must be an integer >= 0"),
    ({"cpus_per_run": 0}, r"where: cpus_per_run = 0 must be an integer >= 1"),
    ({"cpus_per_run": True}, r"cpus_per_run = True must be an integer"),
    ({"mem_gb": "4G"}, r"mem_gb = '4G' must be a number >= 0"),
    ({"time_min": 0}, r"time_min = 0 must be an integer >= 1"),
    ({"array_parallelism": 1.5}, r"array_parallelism = 1.5 must be an integer >= 1"),
    ({"partition": ""}, r"partition = '' is not a SLURM partition name"),
])
def test_bad_requests_name_the_key(options, match):
    with pytest.raises(GridError, match=match):
        S.check_executor_options(options, "where")


def test_minutes():
    assert [S._minutes(x) for x in ("infinite", "1-00:00:00", "2:00:00", "30:00", "45", "1-2", "n/a")] == \
        [0, 1440, 120, 30, 45, 1442, None]


def fake_command(tmp_path, monkeypatch, name: str, script: str) -> None:
    """A stand-in for a SLURM command, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    p = bin_dir / name
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_time_limit_from_the_partition_when_not_set(tmp_path, monkeypatch):
    fake_command(tmp_path, monkeypatch, "sinfo", 'case "$*" in\n'
                 '  *"-p gpu"*) echo "gpu n/a 2-00:00:00" ;;\n'
                 '  *"%P %L %l"*) printf "debug* 30:00 infinite\\ngpu n/a 2-00:00:00\\n" ;;\n'
                 '  *) printf "debug*\\ngpu\\n" ;;\nesac\n')
    assert S.slurm_parameters({})["time"] == 30  # the default partition's DefaultTime
    assert S.slurm_parameters({"partition": "gpu"})["time"] == 2880  # no DefaultTime: its MaxTime
    fake_command(tmp_path, monkeypatch, "sinfo", 'case "$*" in\n  *"-p nope"*) ;;\n  *) printf "debug*\\ngpu\\n" ;;\n'
                 'esac\n')
    with pytest.raises(S.ExecutorError, match=r"no partition 'nope' \(partitions: debug, gpu\)"):
        S.slurm_parameters({"partition": "nope"})
    fake_command(tmp_path, monkeypatch, "sinfo",
                 'echo "slurm_load_partitions: Unable to contact slurm controller" >&2\n'
                 'exit 1\n')
    with pytest.raises(S.ExecutorError, match="Unable to contact slurm controller"):
        S.slurm_parameters({"partition": "debug"})


def test_command_line_requests_override_the_grid_and_keep_zero(tmp_path, monkeypatch):
    import ablate
    from harness.execution.schedule import GridResult

    seen = {}

    def fake_run_grid(g, store, **kw):
        seen.update(kw)
        return GridResult([], [], [], 0, interrupted=True)  # ablate exits 130 without a report

    monkeypatch.setattr(G, "run_grid", fake_run_grid)
    grid = tmp_path / "g.toml"
    grid.write_text('variants = ["dualvgr"]\n[executor]\nkind = "slurm"\npartition = "gpu"\ngpus_per_run = 2\n'
                    'cpus_per_run = 8\nmem_gb = 32\n')
    r = CliRunner().invoke(ablate.app, ["--grid", str(grid), "--gpus-per-run", "0", "--cpus-per-run", "1",
                                        "--partition", "debug"])
    assert r.exit_code == 130, r.output
    assert seen["executor"] == "slurm"
    assert {k: seen["options"][k] for k in ("partition", "gpus_per_run", "cpus_per_run", "mem_gb")} == \
        {"partition": "debug", "gpus_per_run": 0, "cpus_per_run": 1, "mem_gb": 32}
    r = CliRunner().invoke(ablate.app, ["--grid", str(grid), "--gpus-per-run", "-1"])
    assert r.exit_code == 2 and "Invalid value for '--gpus-per-run'" in r.output
    grid.write_text('variants = ["dualvgr"]\n[executor]\ncpus_per_run = 0\n')
    r = CliRunner().invoke(ablate.app, ["--grid", str(grid)])
    assert r.exit_code == 2 and f"{grid}: [executor]: cpus_per_run = 0 must be an integer >= 1" in r.output


def test_sacct_errors_are_summarised_once():
    out = io.StringIO()
    noise = S.SacctNoise(Console(file=out, width=300))
    logger = logging.getLogger("submitit")
    caught = []
    handler = logging.Handler()
    handler.emit = caught.append
    logger.addHandler(handler)
    logger.addFilter(noise)
    try:
        for i in range(5):
            logger.warning(f"Call #{i} - Bypassing sacct error Command '['sacct']' returned non-zero exit status 1., "
                           f"status may be inaccurate.")
        logger.warning("something else")
    finally:
        logger.removeFilter(noise)
        logger.removeHandler(handler)
    assert [r.getMessage() for r in caught] == ["something else"]
    assert out.getvalue().count("sacct does not answer") == 1 and noise.seen == 5


def test_job_states_from_squeue(tmp_path, monkeypatch):
    fake_command(tmp_path, monkeypatch, "squeue", 'printf "7_0|RUNNING|None\\n7_1|COMPLETED|None\\n'
                 '7_2|PENDING|Nodes required for job are DOWN\\n7_3|CANCELLED|None\\n8|REQUEUED|None\\n"\n')
    assert {j: st for j, (st, _) in S._job_states(["7_0", "7_1", "7_3", "7_4", "8"]).items()} == {
        "7_0": "RUNNING", "7_1": "COMPLETED", "7_3": "CANCELLED", "7_4": "GONE", "8": "REQUEUED"}  # 7_4: not listed
    assert S._job_states(["7_2", "7_4"]) == {"7_2": ("PENDING", "Nodes required for job are DOWN"),
                                             "7_4": ("GONE", "")}
    fake_command(tmp_path, monkeypatch, "squeue", "exit 1\n")
    assert S._job_states(["7_0"]) is None


class FakeJob:
    def __init__(self, job_id, folder: Path):
        self.job_id = job_id
        self.paths = submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=0)

    def stderr(self):
        return "line 1\nKilled"


def test_a_job_that_ends_without_result_is_reported_failed(tmp_path, monkeypatch):
    """A SLURM job killed before it could write its result (scancel, OOM, node failure) is a failed
    run once squeue has shown it ended twice, not a grid waiting forever for sacct."""
    from types import SimpleNamespace

    fake_command(tmp_path, monkeypatch, "squeue", 'echo "9_1|RUNNING|None"\n')
    spec = SimpleNamespace(variant="dualvgr", seed=0)
    pending = {FakeJob("9_0", tmp_path): SimpleNamespace(run_id="r0", spec=spec),
               FakeJob("9_1", tmp_path): SimpleNamespace(run_id="r1", spec=spec)}
    done = []
    calls = []
    real = S._job_states
    monkeypatch.setattr(S, "_job_states", lambda ids: calls.append(list(ids)) or real(ids))

    def finish(p, out):
        assert p.run_id == out["run_id"]
        done.append(out)
        if len(done) == 1:  # 9_1 then finishes with a result
            (tmp_path / "9_1_0_result.pkl").write_bytes(b"")

    monkeypatch.setattr(FakeJob, "result", lambda self: {"run_id": "r1", "status": "complete"}, raising=False)
    E.follow(pending, "slurm", finish, poll_s=0, squeue_every_s=0)
    assert done[0]["run_id"] == "r0" and done[0]["status"] == "failed"
    assert "SLURM job 9_0 ended without a result" in done[0]["reason"] and "Killed" in done[0]["reason"]
    assert done[1] == {"run_id": "r1", "status": "complete"} and not pending
    assert calls[:2] == [["9_0", "9_1"], ["9_0", "9_1"]]  # seen ended twice before it counts


def test_checkpoint_requeues_the_same_run():
    run = E.SubmititRun()
    assert isinstance(run, submitit.helpers.Checkpointable)
    spec = {"variant": "dualvgr", "seed": 0}
    d = run.checkpoint(spec, "/r", "cpu", "memory", ("tensorboard",), 3)
    assert isinstance(d, submitit.helpers.DelayedSubmission)
    # its logging sinks and its share of the CPU too
    assert d.function is run and d.args == (spec, "/r", "cpu", "memory", ("tensorboard",), 3)


def _children() -> dict[int, set[int]]:
    """ppid -> pids, from /proc."""
    tree: dict[int, set[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, set()).add(int(d.name))
    return tree


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of pid."""
    tree, out, todo = _children(), {}, [pid]
    while todo:
        for c in tree.get(todo.pop(), ()):
            st = _stat(c)
            if st is not None:
                out[c] = st
                todo.append(c)
    return out


def _stat(pid: int) -> str | None:
    """The start time of a live (not zombie) process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.slow
def test_killing_a_parallel_grid_leaves_no_process(tmp_path, data_cache):
    """SIGKILL the parent of a --jobs 2 grid while its workers train: the workers and
    multiprocessing's resource tracker must not survive it."""
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0, 1]\n'
                    '[train]\nepochs = 500\nbatch_size = 512\n')  # runs far longer than the test
    results = tmp_path / "results"
    env = {**os.environ, "VQAKD_DATA_DIR": str(data_cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "ablate.py"), "--grid", str(grid), "--jobs", "2",
                             "--device", "cpu", "--results", str(results), "--reports", str(tmp_path / "reports")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    survivors: dict[int, str] = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(results.glob("runs/*/.lock"))) < 2 and proc.poll() is None:
            time.sleep(0.1)  # both workers are training (each holds its run's lock)
        assert proc.poll() is None, "the grid ended before its workers trained"
        assert len(list(results.glob("runs/*/.lock"))) == 2, "the workers did not start training in 120 s"
        children = _descendants(proc.pid)
        assert len(children) >= 2, children
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            survivors = {p: t for p, t in children.items() if _stat(p) == t}
            if not survivors:
                break
            time.sleep(0.1)
        assert not survivors, "processes of the killed grid still run: " + "; ".join(
            Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120] for p in survivors)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p, t in _descendants(proc.pid).items() | survivors.items():  # never leave them behind, even failing
            if _stat(p) == t:
                os.kill(p, signal.SIGKILL)


def _threads() -> int:
    return torch.get_num_threads()


@pytest.mark.slow
def test_cpu_workers_share_out_the_cores(monkeypatch):
    """N CPU workers with every core each oversubscribe the CPU (a --jobs 2 grid on 2 cores ran
    slower than --jobs 1): each gets its share of the cores."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [cpu_threads_per_worker(j) for j in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=worker_init,
                             initargs=(os.getpid(), 1)) as pool:
        assert pool.submit(_threads).result(timeout=120) == 1


def test_local_workers_share_gpus_and_say_how_many():
    """--jobs 2 on one GPU: both workers on cuda:0, each told it shares the device with one other run."""
    assert E.device_slots(2, "auto", 1) == [("cuda:0", 2), ("cuda:0", 2)]
    assert E.device_slots(3, "cuda", 2) == [("cuda:0", 2), ("cuda:1", 1), ("cuda:0", 2)]
    assert E.device_slots(2, "auto", 0) == [("cpu", 2), ("cpu", 2)]
    assert E.device_slots(2, "cuda:1", 2) == [("cuda:1", 2), ("cuda:1", 2)]


def test_worker_environment_names_the_sharing(monkeypatch):
    from harness.env import SHARING_ENV, runs_sharing_device

    from harness.execution import schedule

    monkeypatch.setattr(schedule, "_die_with_parent", lambda parent: None)  # where worker_init looks it up
    monkeypatch.setenv(SHARING_ENV, "1")  # recorded, so that what worker_init sets is undone after the test
    assert runs_sharing_device() == 1
    worker_init(0, None, 3)
    assert runs_sharing_device() == 3


@pytest.mark.parametrize("device, options, ngpu, expected", [
    ("auto", {}, 1, {"gpus_per_node": 1}), ("cuda", {}, 2, {"gpus_per_node": 1}),
    ("cuda:1", {}, 2, {"gpus_per_node": 2}), ("auto", {}, 0, {}), ("cpu", {}, 1, {}),
    ("auto", {"gpus_per_run": 0}, 1, {}), ("cuda", {"gpus_per_run": 2}, 2, {"gpus_per_node": 2})])
def test_submitit_local_is_given_the_gpus(monkeypatch, device, options, ngpu, expected):
    """submitit's LocalExecutor sets CUDA_VISIBLE_DEVICES="" unless gpus_per_node is given: a GPU
    machine's local grid then trained on the CPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: ngpu)
    assert E.local_gpus(options, device) == expected
