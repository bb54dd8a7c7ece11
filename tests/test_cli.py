"""What a user sees when something is wrong: messages, exit codes and failure records, no
traceback for anything a user caused; help and paths printed as text."""
from __future__ import annotations

import json
import warnings

import pytest
from typer.testing import CliRunner

import ablate
import bench
from harness.training.plan import RunSpec
from harness.training.runner import train

runner = CliRunner()


def run(*args, app=ablate.app):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output, r.exception


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs = 0 is not an integer >= 1"),
    (["--batch-size", "1"], "batch_size = 1 is not an integer >= 2"),
    (["--set", "alpha=abc"], "setting alpha = 'abc' must be float"),
    (["--set", "graph_layer=2"], "has no setting 'graph_layer'"),
    (["--precision", "fp8"], "precision 'fp8' is not one of fp32, tf32, bf16"),
])
def test_run_rejects_bad_settings_before_anything_runs(tmp_path, args, message, tiny):
    code, out, exc = run("run", "dualvgr", "--results", tmp_path, "--device", "cpu", *args)
    assert code == 2 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()  # no run directory left behind


def test_run_bad_distillation_setting_fails_before_the_teacher_trains(tmp_path, tiny):
    code, out, _ = run("run", "student-logits", "--set", "logits.T=abc", "--results", tmp_path, "--device", "cpu")
    assert code == 2 and "logits.T = 'abc'" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_run_nan_loss_ends_with_a_message_and_failed_json(tmp_path, tiny):
    code, out, _ = run("run", "dualvgr", "--set", "beta=1e38", "--epochs", "1", "--batch-size", "512",
                       "--results", tmp_path, "--device", "cpu")
    assert code == 2 and "loss became" in out and "Traceback" not in out, out
    (failed,) = (tmp_path / "runs").glob("*/failed.json")
    rec = json.loads(failed.read_text())
    assert "loss became" in rec["reason"] and "Traceback" in rec["traceback"]


@pytest.mark.slow
def test_run_says_when_it_reuses_a_record(tmp_path, tiny):
    args = ("run", "question-only", "--epochs", "1", "--batch-size", "512", "--results", tmp_path, "--device", "cpu")
    assert run(*args)[0] == 0
    code, out, _ = run(*args)
    assert code == 0 and "already complete: question-only-" in out and "not retrained" in out


def test_a_damaged_record_is_set_aside_and_the_run_redone(tmp_path, tiny, shared_store):
    store, recs = shared_store.copy(tmp_path, "question-only")
    rec = recs["question-only"]
    path = store.run_dir(rec["run_id"]) / "record.json"
    path.write_text('{"run_id": "x", "truncat')
    with pytest.warns(UserWarning, match="damaged record"):
        assert not store.is_complete(rec["run_id"])
    assert list(path.parent.glob("record.json.damaged-*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.records() == []  # listing goes on without it
    again = train(RunSpec("question-only", epochs=1, batch_size=512, seed=0), store, data=tiny, device="cpu",
                  progress=False)
    assert again["run_id"] == rec["run_id"] and store.is_complete(rec["run_id"])


def test_results_lists_failed_and_incomplete_runs(tmp_path, tiny):
    code, out, _ = run("results", "--results", tmp_path / "nothing")
    assert code == 1 and "no results store" in out
    run("run", "dualvgr", "--set", "beta=1e38", "--epochs", "1", "--batch-size", "512", "--results", tmp_path,
        "--device", "cpu")
    code, out, _ = run("results", "--results", tmp_path, "--failed")
    assert code == 0 and "loss became" in out


def test_help_shows_defaults_and_brackets():
    code, out, _ = run("run", "--help")
    assert code == 0 and "[default: the data set's suggestion, else 25]" in out


def test_grid_errors_keep_their_brackets(tmp_path):
    p = tmp_path / "g[v2].toml"
    p.write_text('variants = ["dualvgr"]\n[train]\nepoch = 3\n')
    code, out, _ = run("--grid", p)
    assert code == 2 and "[train] has unknown key(s) epoch" in out and "g[v2].toml" in out, out


def test_list_and_bench_name_a_pattern_that_matches_nothing():
    code, out, _ = run("list", "nosuch*")
    assert code == 1 and "no variant matches 'nosuch*'" in out
    code, out, _ = run("--variant", "dualvgr", "--variant", "teacher-g5", "--no-store", app=bench.app)
    assert code == 2 and "no variant matches 'teacher-g5'" in out


def test_a_full_disk_is_named_not_a_traceback(tmp_path, tiny, monkeypatch):
    import errno
    import os

    def full(fd):  # every atomic write of the store fsyncs before its rename: the disk fills there
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, out, _ = run("run", "question-only", "--epochs", "1", "--batch-size", "512", "--results", tmp_path,
                       "--device", "cpu")
    assert code == 2 and "no space left on the device" in out and "Traceback" not in out, out
    assert str(tmp_path) in out.replace("\n", "")


def _apps() -> dict:
    from harness.data.prepare import cli as prepare_cli

    return {"ablate.py": ablate.app, "bench.py": bench.app, "prepare": prepare_cli.build_cli()}


def _commands() -> list[tuple[str, list[str]]]:
    """(app name, argv) of every command line: ablate.py and its subcommands, bench.py, prepare's."""
    import typer.main

    out = []
    for name, app in _apps().items():
        cmd = typer.main.get_command(app)
        out += [(name, [])] * (not hasattr(cmd, "commands") or name == "ablate.py")
        out += [(name, [sub]) for sub in getattr(cmd, "commands", {})]
    return out


@pytest.mark.parametrize("name, argv", _commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_help_at_80_columns_shows_every_option_name_whole(name, argv):
    import typer.main

    app = _apps()[name]
    cmd = typer.main.get_command(app)
    for sub in argv:
        cmd = cmd.commands[sub]
    r = CliRunner().invoke(app, [*argv, "--help"], terminal_width=80,
                           env={"COLUMNS": "80", "TERMINAL_WIDTH": "80", "FORCE_TERMINAL": "1"})  # as in a terminal
    assert r.exit_code == 0, r.output
    words = set(r.output.replace(",", " ").split())
    for p in cmd.params:
        for opt in p.opts + p.secondary_opts:
            if opt.startswith("-"):
                assert opt in words, f"{name} {argv} --help at 80 columns: {opt} not shown whole\n{r.output}"
    assert max(len(line) for line in r.output.splitlines()) <= 80, r.output
    assert "\\[" not in r.output, f"{name} {argv} --help shows a markup escape (rich markup is off): {r.output}"


def test_requires_python_covers_the_standard_library_modules_used():
    """tomllib (grid files) is Python 3.11+: the declared minimum must say so."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
    low = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", spec).groups())
    uses_tomllib = any("import tomllib" in p.read_text() for p in [*root.glob("harness/**/*.py"), *root.glob("*.py")])
    assert uses_tomllib and low >= (3, 11), spec
