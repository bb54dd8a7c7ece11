"""Rough edges a new user hit: read-only results paths, prepare's file modes, bench.py's
and ablate.py's messages. Each test fails on the behaviour before."""
from __future__ import annotations

import errno
import tempfile

import pytest
from typer.testing import CliRunner

import ablate
from harness import files
from harness.runs import store as St

runner = CliRunner()


def invoke(*args, app=ablate.app):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output, r.exception


def _read_only_under(monkeypatch, root):
    """Writes under ``root`` fail as on a read-only mount (the tests run as root, where chmod does not)."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(root)):
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("argv", [["run", "question-only", "--epochs", "1"], ["--grid", "ci"]])
def test_a_read_only_results_path_is_an_error_line_naming_it(tmp_path, monkeypatch, argv):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only_under(monkeypatch, ro)
    code, out, exc = invoke(*argv, "--results", ro)
    assert code == 2 and out.startswith("error: ") and f"results directory {ro}: cannot write here" in out, out
    assert "Traceback" not in out and isinstance(exc, SystemExit)
    assert not (ro / "runs").exists()


def test_a_results_path_under_a_file_is_an_error_line(tmp_path):
    (tmp_path / "f").write_text("")
    code, out, _ = invoke("run", "question-only", "--epochs", "1", "--results", tmp_path / "f" / "results")
    assert code == 2 and "error: results directory" in out and "cannot write here" in out, out


def test_store_writes_and_locks_under_a_read_only_path_raise_store_errors(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    with pytest.raises(files.StoreError, match=r"f/x/y.json: cannot write here"):
        files.atomic_write_bytes(tmp_path / "f" / "x" / "y.json", b"{}")
    with pytest.raises(files.StoreError, match=r"f/x/lock: cannot write here"):
        with files.locked(tmp_path / "f" / "x" / "lock"):
            pass


@pytest.mark.slow
def test_bench_measures_each_cpu_variant_in_a_fresh_process(tmp_path):
    """CPU peak memory is the process's peak RSS: measured after another variant it would include
    that one's leftovers, so every variant is measured in a process of its own."""
    import json
    import os

    import bench

    out = tmp_path / "out.json"
    code, output, _ = invoke("--variant", "question-only", "--variant", "dualvgr", "--config", "tiny", "--device",
                             "cpu", "--batch-size", "2", "--reps", "1", "--warmup", "0", "--no-train", "--no-flops",
                             "--format", "json", "--no-store", "--out", out, app=bench.app)
    assert code == 0, output
    recs = json.loads(out.read_text())
    assert sorted(r["variant"] for r in recs) == ["dualvgr", "question-only"]
    pids = {r["pid"] for r in recs}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(r["measured_in"] == "a fresh process for this variant" and r["peak_mem_mib_infer"] > 0 for r in recs)


@pytest.mark.parametrize("opt", ["--reps", "--train-reps"])
def test_bench_rejects_zero_repetitions(opt):
    import bench

    code, out, _ = invoke("--variant", "dualvgr", "--config", "tiny", "--device", "cpu", opt, "0", "--no-store",
                          app=bench.app)
    assert code == 2 and f"Invalid value for '{opt}'" in out and "greater than or equal to 1" in out, out


def test_bench_set_help_does_not_say_student_only():
    import bench

    code, out, _ = invoke("--help", app=bench.app)
    assert code == 0 and "student only" not in out


def test_top_level_help_keeps_one_example_per_line():
    code, out, _ = invoke("--help")
    lines = [ln.strip() for ln in out.splitlines()]
    assert code == 0
    for example in ("python ablate.py --grid tiny ", "python ablate.py report --grid tiny ", "python ablate.py list "):
        assert any(ln.startswith(example) for ln in lines), (example, out)


@pytest.mark.slow
def test_results_shows_whole_run_ids_and_dashes_for_empty_cells(tmp_path, monkeypatch, tiny):
    from harness.training.plan import RunSpec
    from harness.training.runner import train

    store = St.ResultsStore(tmp_path / "results")
    rec = train(RunSpec("question-only", epochs=1, batch_size=512, seed=0), store, device="cpu", progress=False)
    monkeypatch.setattr(ablate.console, "width", 90)
    code, out, _ = invoke("results", "--results", store.root)
    assert code == 0, out
    assert rec["run_id"] in out.replace("│", " ").replace("\n", " ").replace(" ", "") or \
        rec["run_id"] in "".join(ln.split("│")[1].strip() for ln in out.splitlines() if ln.count("│") > 2)
    assert "…" not in out and "nan" not in out, out


def _interrupt(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["harness.training.runner.train", "ablate._measure_costs"])
@pytest.mark.slow
def test_ctrl_c_in_a_run_says_how_to_resume_and_exits_130(tmp_path, monkeypatch, where, tiny):
    monkeypatch.setattr(where, _interrupt)
    code, out, _ = invoke("run", "question-only", "--epochs", "1", "--batch-size", "512", "--results",
                          tmp_path / "results")
    assert code == 130 and out.strip().endswith(ablate.INTERRUPTED) and "error" not in out, out


@pytest.mark.parametrize("where", ["harness.execution.executor.run_one", "ablate._measure_costs",
                                   "ablate._write_report"])
def test_ctrl_c_in_a_grid_says_how_to_resume_and_exits_130_without_an_error_line(tmp_path, monkeypatch, where, tiny):
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n')
    monkeypatch.setattr(where, _interrupt)
    code, out, _ = invoke("--grid", grid, "--results", tmp_path / "results", "--reports", tmp_path / "reports")
    assert code == 130 and ablate.INTERRUPTED in out and "error:" not in out, out


def _copy_run_later(src: St.ResultsStore, dst: St.ResultsStore, run_id: str, ready):
    """Another process training ``run_id`` in ``dst``: holds its lock, and writes its files after a while."""
    import shutil
    import threading
    import time

    from harness.training.runner import RUN_LOCK

    def work():
        with files.locked(dst.run_dir(run_id) / RUN_LOCK):
            ready.set()
            time.sleep(1.5)
            for f in src.run_dir(run_id).iterdir():
                if f.name != RUN_LOCK and f.is_file():
                    shutil.copy(f, dst.run_dir(run_id) / f.name)

    t = threading.Thread(target=work)
    t.start()
    return t


@pytest.mark.slow
def test_a_run_that_waited_for_another_process_says_so(tmp_path, tiny):
    import threading

    from harness.training.plan import RunSpec

    from harness.training.runner import train

    spec = RunSpec("question-only", epochs=1, batch_size=512, seed=0)
    done = train(spec, St.ResultsStore(tmp_path / "a"), device="cpu", progress=False)
    ready = threading.Event()
    t = _copy_run_later(St.ResultsStore(tmp_path / "a"), St.ResultsStore(tmp_path / "b"), done["run_id"], ready)
    ready.wait()
    code, out, _ = invoke("run", "question-only", "--epochs", "1", "--batch-size", "512", "--seed", "0",
                          "--device", "cpu", "--results", tmp_path / "b")
    t.join()
    assert code == 0, out
    assert f"another process is training {done['run_id']}: waiting for it" in out
    assert f"trained by another process: {done['run_id']}, not retrained here" in out


def test_inference_costs_are_measured_one_at_a_time_and_not_twice(tmp_path, monkeypatch, tiny):
    """Two processes that finish the same configuration together: the second waits for the first's
    measurement instead of timing latency at the same time, then finds it done."""
    import threading
    import time

    from harness.measurement import costs
    from harness.training.plan import RunSpec
    from harness.training.runner import train

    store = St.ResultsStore(tmp_path / "r")
    rec = train(RunSpec("question-only", epochs=1, batch_size=512, seed=0), store, device="cpu", progress=False)
    key = costs.cost_key(rec["variant_config"]["model"], rec["variant_config"]["arch"], rec["device_name"])
    path = costs._path(store, key)
    path.unlink(missing_ok=True)
    ready = threading.Event()

    def other_process():
        with files.locked(path.parent / ".measuring.lock"):
            ready.set()
            time.sleep(1.0)
            files.atomic_write_json(path, {"measured by": "the other process"})

    t = threading.Thread(target=other_process)
    t.start()
    ready.wait()
    calls = []
    monkeypatch.setattr(costs, "measure_one", lambda *a, **k: calls.append(a) or {})
    n = costs.measure_missing(store, [rec["run_id"]], "cpu")
    t.join()
    assert n == 0 and not calls
