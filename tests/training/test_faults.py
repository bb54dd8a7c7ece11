"""Faults as a cluster user meets them: each test injects one and checks that it costs
one run, never the grid, that the failure is remembered (``failed.json``, ``results --failed``,
the report) and that the messages name what happened."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ablate
from harness.execution import executor as E
from harness.execution import slurm as S
from harness.execution.schedule import GridResult, Schedule

cli = CliRunner()
run_one = E.run_one  # the real one (tests replace E.run_one)


def _faulty_run_one(spec, results, device="auto", mode="auto", log=()):
    """run_one in a worker, except for the seeds named in $FAULTS_DIR: seed 1 is SIGKILLed (kill -9,
    the OOM killer), seed 2 dies of SIGBUS reading a memory-mapped file truncated under it (a teacher
    output cache truncated by another process). Each fault fires once (its marker file is removed)."""
    marker = Path(os.environ["FAULTS_DIR"]) / f"seed-{spec['seed']}"
    if marker.exists():
        marker.unlink()
        if spec["seed"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        path = marker.with_suffix(".npy")
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1 << 16,))[:] = 1
        arr = np.load(path, mmap_mode="r")
        os.truncate(path, 0)
        float(arr.sum())  # SIGBUS: the pages behind the map are gone
    return run_one(spec, results, device, mode, log)


def _kill_seed_1(spec, results, device="auto", mode="auto", log=()):
    """A worker's run that does not train: seed 1 kills its worker (SIGKILL), the others complete."""
    if spec["seed"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"run_id": f"r{spec['seed']}", "variant": spec["variant"], "seed": spec["seed"], "status": "complete",
            "test_acc": 50.0}


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_replaced_and_the_others_go_on(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rich.console import Console

    from harness.console import progress_bar
    from harness.training.plan import RunSpec
    from harness.runs.store import ResultsStore

    monkeypatch.setattr(E, "run_one", _kill_seed_1)
    store = ResultsStore(tmp_path / "results")
    plans = [SimpleNamespace(run_id=f"r{s}", spec=RunSpec("question-only", seed=s), all_run_ids=(lambda s=s: [f"r{s}"]))
             for s in range(4)]
    result = GridResult([p.run_id for p in plans], [], [], 0)
    console = Console(file=open(os.devnull, "w"))
    with progress_bar(console) as progress:
        sched = Schedule("g", plans, {p.run_id for p in plans}, result, console, progress, store=store)
        E._run_pool(sched, store, 2, "cpu", "auto")
    assert sorted(result.complete) == ["r0", "r2", "r3"] and [f["run_id"] for f in result.failed] == ["r1"]
    assert "killed by signal SIGKILL" in store.read_failure("r1")["reason"]


@pytest.mark.slow
def test_a_dead_worker_costs_only_its_run(tmp_path, data_cache, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    for seed in (1, 2):
        (faults / f"seed-{seed}").touch()
    monkeypatch.setenv("FAULTS_DIR", str(faults))
    monkeypatch.setattr(E, "run_one", _faulty_run_one)
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0, 1, 2]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n')
    args = ["--grid", str(grid), "--jobs", "2", "--device", "cpu", "--results", str(tmp_path / "results"),
            "--reports", str(tmp_path / "reports")]
    r = cli.invoke(ablate.app, args)
    assert r.exit_code == 1, r.output
    assert "BrokenProcessPool" not in r.output and "Traceback" not in r.output, r.output
    assert (tmp_path / "reports" / "g.md").is_file()  # the other runs finished and were reported
    failed = {f["seed"]: f for f in map(json.loads, map(Path.read_text, (tmp_path / "results").glob(
        "runs/*/failed.json")))}
    assert sorted(failed) == [1, 2], failed
    assert "killed by signal SIGKILL" in failed[1]["reason"] and "killed by signal SIGBUS" in failed[2]["reason"]
    assert "2 runs failed" in r.output
    listed = cli.invoke(ablate.app, ["results", "--results", str(tmp_path / "results"), "--failed"]).output
    assert "SIGKILL" in listed and "SIGBUS" in listed, listed
    report = (tmp_path / "reports" / "g.md").read_text()
    assert "SIGKILL" in report and "SIGBUS" in report  # the report says why two runs are missing
    r = cli.invoke(ablate.app, [*args, "--jobs", "1"])  # the rerun trains the two runs that died, only those
    assert r.exit_code == 0, r.output
    assert "(1 already complete, 2 to run)" in r.output, r.output
    assert not list((tmp_path / "results").glob("runs/*/failed.json"))


class FakeJob:
    """A submitit job as follow sees it: an id, its paths (no result file: killed before it wrote one)."""

    def __init__(self, job_id, folder: Path):
        import submitit

        self.job_id = job_id
        self.paths = submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=0)

    def stderr(self):
        return "slurmstepd: error: *** JOB CANCELLED ***"


def _fake_squeue(tmp_path, monkeypatch, lines: str) -> None:
    from tests.execution.test_executor import fake_command

    fake_command(tmp_path, monkeypatch, "squeue", f"cat {tmp_path / 'squeue.out'}\n")
    (tmp_path / "squeue.out").write_text(lines)


def test_a_cancelled_teacher_and_its_student_are_remembered(tmp_path, monkeypatch):
    """scancel of a teacher's job: the teacher (cancelled) and its student (teacher failed) each get
    a failed.json with the reason, which `results --failed` and the report show."""
    from types import SimpleNamespace

    from rich.console import Console

    from harness.report import missing_line
    from harness.training.plan import RunSpec
    from harness.runs.store import ResultsStore

    store = ResultsStore(tmp_path / "results")
    teacher = SimpleNamespace(run_id="teacher-g4-aaa", spec=RunSpec("teacher-g4", seed=0),
                              all_run_ids=lambda: ["teacher-g4-aaa"])
    student = SimpleNamespace(run_id="student-bbb", spec=RunSpec("student-logits", seed=0),
                              all_run_ids=lambda: ["teacher-g4-aaa", "student-bbb"])
    result = GridResult([teacher.run_id, student.run_id], [], [], 0)
    console = Console(file=open(os.devnull, "w"))
    from harness.console import progress_bar

    with progress_bar(console) as progress:
        sched = Schedule("g", [teacher, student], {student.run_id}, result, console, progress, store=store)
        assert sched.ready() == [teacher]
        sched.start(teacher)
        _fake_squeue(tmp_path, monkeypatch, "41_0|CANCELLED|None\n")
        E.follow({FakeJob("41_0", tmp_path): teacher}, "slurm", sched.finished, poll_s=0, squeue_every_s=0)
        assert sched.ready() == []  # the student is given up on: its teacher failed
    t, s = store.read_failure(teacher.run_id), store.read_failure(student.run_id)
    assert "SLURM job 41_0 was cancelled" in t["reason"] and "JOB CANCELLED" in t["reason"]
    assert "teacher run teacher-g4 seed 0 (teacher-g4-aaa) failed" in s["reason"]
    assert s["spec"]["variant"] == "student-logits" and s["failed_at"]
    assert [f["run_id"] for f in result.failed] == [teacher.run_id, student.run_id]
    listed = cli.invoke(ablate.app, ["results", "--results", str(store.root), "--failed"]).output
    assert "was cancelled" in listed and "teacher run teacher-g4" in listed, listed
    assert "(failed: teacher run teacher-g4 seed 0" in missing_line(store, student.run_id)


def test_why_slurm_jobs_wait_is_told_once_and_when_it_changes(tmp_path, monkeypatch):
    told = []
    watch = S.Watch(told.append)
    jobs = [FakeJob("50_0", tmp_path), FakeJob("50_1", tmp_path)]
    down = "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"
    _fake_squeue(tmp_path, monkeypatch, f"50_0|PENDING|{down}\n50_1|PENDING|{down}\n")
    assert watch.poll(jobs) == [] and watch.poll(jobs) == []
    assert told == [f"SLURM: 2 jobs wait ({down}): 50_0, 50_1"]  # once, not at every poll
    _fake_squeue(tmp_path, monkeypatch, "50_0|RUNNING|None\n50_1|PENDING|Resources\n")
    watch.poll(jobs)
    assert told[1:] == ["SLURM: 1 job waits (Resources): 50_1"]
    _fake_squeue(tmp_path, monkeypatch, "50_1|RUNNING|None\n")  # 50_0 gone (twice) without a result: lost
    assert watch.poll(jobs) == [] and watch.poll(jobs) == [jobs[0]] and len(told) == 2
    assert "last seen RUNNING" in watch.why_lost("50_0")


def test_atomic_writes_honour_the_umask(tmp_path):
    """Records, weights, reports... are written through atomic_output: group members of a shared
    cluster read them when the umask lets them, as with a plain write (mkstemp alone gives 0600)."""
    import stat

    from harness.files import atomic_torch_save, atomic_write_json

    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "record.json", {"run_id": "x"})
        atomic_torch_save(tmp_path / "best.pt", {"w": 1})
        os.umask(0o002)
        atomic_write_json(tmp_path / "g.json", {})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    assert mode("record.json") == mode("best.pt") == 0o640
    assert mode("g.json") == mode("plain") == 0o664


def _full_disk(monkeypatch, under: str = "") -> None:
    """ENOSPC from every atomic write (they fsync before the rename) of a file whose path has ``under``."""
    import errno

    fsync = os.fsync

    def full(fd):
        if under not in os.readlink(f"/proc/self/fd/{fd}"):
            return fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.slow
def test_a_grid_given_as_a_path_gets_hints_that_work_and_a_full_disk_one_error_line(tmp_path, data_cache,
                                                                                    monkeypatch):
    import shlex

    grid = tmp_path / "my grid.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n')
    results, reports = tmp_path / "res", tmp_path / "rep"
    r = cli.invoke(ablate.app, ["--grid", str(grid), "--device", "cpu", "--results", str(results),
                                "--reports", str(reports)])
    assert r.exit_code == 0, r.output
    header = (reports / "my grid.md").read_text().splitlines()[2]
    command = shlex.split(header.split("`")[1])
    assert command[:4] == ["python", "ablate.py", "report", "--grid"] and command[4] == str(grid), header
    again = cli.invoke(ablate.app, command[2:])  # the header's command regenerates the report
    assert again.exit_code == 0 and "report:" in again.output, again.output
    r = cli.invoke(ablate.app, ["report", "--grid", str(grid), "--results", str(results), "--reports",
                                str(reports), "--seeds", "0,1"])
    hint = r.output.replace("\n", "").split("(run `")[1].split("`")[0]
    assert shlex.split(hint) == ["python", "ablate.py", "--grid", str(grid), "--results", str(results),
                                 "--seeds", "0,1"], r.output
    _full_disk(monkeypatch)
    r = cli.invoke(ablate.app, command[2:])
    out = r.output.replace("\n", "")
    assert r.exit_code == 2 and "Traceback" not in r.output and r.output.count("error:") == 1, r.output
    assert "no space left on the device" in out and str(reports) in out and "report was not written" in out
    assert "completed epochs" not in out


def test_a_failure_that_cannot_be_recorded_is_not_claimed(tmp_path, tiny, monkeypatch):
    _full_disk(monkeypatch, under=f"{tmp_path}/runs/")  # the data set's info is written; the run's files not
    r = cli.invoke(ablate.app, ["run", "question-only", "--epochs", "1", "--batch-size", "512", "--results",
                                str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 2 and "no space left on the device" in r.output, r.output
    assert "failure recorded in" not in r.output and "the failure was not recorded either" in r.output
    assert not list(tmp_path.glob("runs/*/failed.json"))


@pytest.mark.slow
def test_a_damaged_teacher_is_set_aside_and_retrained_or_refused(tmp_path, tiny, shared_store):
    """A truncated teacher best.pt: its students' reruns do not die in torch.load forever; the grid
    sets the teacher aside (named) and retrains it first, or, asked to, refuses naming the file."""
    from harness.execution import grid as G
    from harness.training.runner import _frozen_teacher
    from harness.runs.store import DamagedRun
    from harness.files import file_digest

    # student-logits (seed 3, 1 epoch, batch 512) and its teacher-g4, copied from the session's shared store
    store, recs = shared_store.copy(tmp_path / "results", "student-logits")
    rec = recs["student-logits"]
    tid = rec["teacher_runs"][0]
    weights = store.run_dir(tid) / "best.pt"
    assert store.read_record(tid)["weights"]["best.pt"] == file_digest(weights)  # recorded at write

    def damage():
        weights.write_bytes(weights.read_bytes()[:1000])
        (store.run_dir(rec["run_id"]) / "record.json").unlink()  # the student is to be (re)trained

    damage()
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["student-logits"]\nseeds = [3]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n')
    with pytest.raises(DamagedRun, match=r"best.pt has 1,000 bytes, [\d,]+ were written"):
        G.run_grid(G.load(str(grid)), store, device="cpu", refuse_damaged=True)
    assert store.is_complete(tid)  # refused: nothing was touched
    with pytest.warns(UserWarning, match=rf"run {tid}: .*best.pt has 1,000 bytes.*set aside"):
        res = G.run_grid(G.load(str(grid)), store, device="cpu")
    assert not res.failed and res.teachers_complete == [tid] and res.complete == [rec["run_id"]]
    assert list(store.run_dir(tid).glob("best.pt.damaged-*")) and store.usable(tid)
    old = store.read_record(tid)
    old.pop("weights")  # a record from before checksums: the load itself names the file
    weights.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DamagedRun, match=rf"{tid}.*best.pt cannot be read"), pytest.warns(UserWarning,
                                                                                        match="set aside"):
        _frozen_teacher(store, old, torch.device("cpu"))
    assert not store.is_complete(tid)  # set aside: retrained by the next run
