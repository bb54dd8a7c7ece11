"""An executor is one registered implementation of harness.execution.executor.Executor: a toy kind registered
here, in the test, is accepted by grid files (its kind and its options, checked by it) and by the
command line, and runs a tiny grid through the same schedule as the built-in kinds."""
from __future__ import annotations

import pytest
from rich.console import Console
from typer.testing import CliRunner

from harness.execution import executor as E
from harness.execution import grid as G
from harness.execution.schedule import GridResult
from harness.runs.store import ResultsStore


class InOrderExecutor:
    """Toy: each ready run in this process, last ready first, noting what it ran."""

    name, options = "toy-in-order", ("note",)

    def __init__(self):
        self.ran: list[tuple[str, int]] = []
        self.launches: list[E.Launch] = []

    def check(self, options: dict, where: str) -> None:
        if "note" in options and not isinstance(options["note"], str):
            raise G.GridError(f"{where}: note = {options['note']!r} must be a string")

    def run(self, sched, launch: E.Launch) -> None:
        self.launches.append(launch)
        while ready := sched.ready():
            p = ready[-1]
            spec = sched.start(p)
            self.ran.append((p.spec.variant, p.spec.seed))
            sched.finished(p, E.run_one(spec, str(launch.store.root), launch.device, launch.mode, sched.log))


@pytest.fixture
def toy():
    ex = E.register_executor(InOrderExecutor())
    yield ex
    E.EXECUTORS._entries.pop(ex.name)


def _grid(tmp_path, executor: str) -> G.Grid:
    p = tmp_path / "g.toml"
    p.write_text('data = "synthetic:tiny"\nvariants = ["question-only", "student-logits"]\nseeds = [0]\n'
                 '[train]\nepochs = 1\nbatch_size = 512\n[set]\nmodule_dim = 16\nteacher = "teacher-g2"\n'
                 f'[executor]\n{executor}\n')
    return G.load(p)


def test_grid_files_read_the_registry(toy, tmp_path):
    g = _grid(tmp_path, 'kind = "toy-in-order"\nnote = "hello"')
    assert g.executor == {"kind": "toy-in-order", "note": "hello"}
    with pytest.raises(G.GridError, match=r"\[executor\]: note = 3 must be a string"):
        _grid(tmp_path, 'kind = "toy-in-order"\nnote = 3')
    E.EXECUTORS._entries.pop(toy.name)
    try:
        with pytest.raises(G.GridError, match=r"unknown key\(s\) note"):
            _grid(tmp_path, 'kind = "local"\nnote = "hello"')
        with pytest.raises(G.GridError, match=r"kind 'toy-in-order' is not one of local, slurm, submitit-local"):
            _grid(tmp_path, 'kind = "toy-in-order"')
    finally:
        E.register_executor(toy)


def test_the_command_line_reads_the_registry(toy, tmp_path, monkeypatch):
    import ablate

    seen = {}

    def fake_run_grid(g, store, **kw):
        seen.update(kw)
        return GridResult([], [], [], 0, interrupted=True)  # ablate exits 130 without a report

    monkeypatch.setattr(G, "run_grid", fake_run_grid)
    _grid(tmp_path, "")
    grid = str(tmp_path / "g.toml")
    r = CliRunner().invoke(ablate.app, ["--grid", grid, "--executor", "toy-in-order", "--executor-option", "note=hi"])
    assert r.exit_code == 130, r.output
    assert seen["executor"] == "toy-in-order" and seen["options"]["note"] == "hi"
    r = CliRunner().invoke(ablate.app, ["--grid", grid, "--executor", "toy-in-order", "--executor-option", "note=3"])
    assert r.exit_code == 2 and "note = 3 must be a string" in r.output
    r = CliRunner().invoke(ablate.app, ["--grid", grid, "--executor", "local", "--executor-option", "note=hi"])
    assert r.exit_code == 2 and "executor 'local' has no option(s) note" in r.output
    r = CliRunner().invoke(ablate.app, ["--grid", grid, "--executor", "k8s"])
    assert r.exit_code == 2 and "--executor must be one of local, slurm, submitit-local, toy-in-order" in r.output


@pytest.mark.slow
def test_a_toy_executor_runs_a_grid_teachers_first(toy, tiny, tmp_path):
    g = _grid(tmp_path, 'kind = "toy-in-order"\nnote = "hello"')
    store = ResultsStore(tmp_path / "results")
    res = G.run_grid(g, store, executor="toy-in-order", device="cpu", console=Console(quiet=True),
                     options=g.executor)
    assert not res.failed and len(res.complete) == 2 and len(res.teachers_complete) == 1, res
    # question-only and the teacher are ready at once, the student when its teacher is done; the last ready first
    assert [v for v, _ in toy.ran] == ["teacher-g2", "student-logits", "question-only"]
    assert toy.launches[0].options["note"] == "hello" and toy.launches[0].device == "cpu"
    assert {r["variant"] for r in store.iter_records()} == {"teacher-g2", "student-logits", "question-only"}
    again = G.run_grid(g, store, executor="toy-in-order", device="cpu", console=Console(quiet=True))
    assert again.skipped == 2 and len(toy.ran) == 3  # complete runs are not handed to the executor again
