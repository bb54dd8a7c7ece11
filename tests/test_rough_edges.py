"""Rough edges a new user met: refusals that name the file, the key and the value, numbers printed
as what they are, tables that fit, plurals. Each test fails on the behaviour before."""
from __future__ import annotations

import errno
import tempfile

import pytest
from typer.testing import CliRunner

import ablate
import bench
from harness.runs import store as St

runner = CliRunner()


def invoke(*args, app=ablate.app):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output, r.exception


def refused(code: int, out: str, *fragments: str) -> None:
    """One ``error:`` line naming every fragment, a non-zero exit, no traceback."""
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert code != 0 and len(lines) == 1, out
    assert all(f in lines[0] for f in fragments), (fragments, out)
    assert "Traceback" not in out


def grid_file(tmp_path, body: str, name: str = "g.toml", data: str = "synthetic:tiny"):
    path = tmp_path / name
    path.write_text(f'data = "{data}"\nseeds = [0]\n' + body)
    return path


TINY_QO = 'variants = ["question-only"]\n[train]\nepochs = 1\nbatch_size = 512\n'


@pytest.fixture
def qo_store(tmp_path, shared_store):
    """A store holding the one complete question-only run of ``TINY_QO``'s grid (1 epoch, seed 0, batch 512),
    copied from the session's shared store."""
    store, _ = shared_store.copy(tmp_path / "results", "question-only")
    return store


# -- grid refusals name the grid file, the key and the value

def test_an_exclude_value_that_no_loss_accepts_is_named_with_its_valid_values(tmp_path):
    g = grid_file(tmp_path, 'variants = ["student-similarity"]\n[[exclude]]\n"similarity.matrix" = "slef"\n')
    code, out, _ = invoke("--grid", g, "--results", tmp_path / "r", "--reports", tmp_path / "rep")
    refused(code, out, str(g), "[[exclude]] #1", "similarity.matrix", "'slef'", "cross, self")
    assert "no run of the grid" not in out and not (tmp_path / "r" / "runs").exists()


def test_a_set_value_that_no_loss_accepts_is_refused_with_the_grid_file(tmp_path):
    g = grid_file(tmp_path, 'variants = ["student-similarity"]\n[set]\n"similarity.matrix" = "slef"\n')
    code, out, _ = invoke("report", "--grid", g, "--results", tmp_path / "r")
    refused(code, out, str(g), "'slef'", "cross, self")


def test_a_keep_ratio_the_data_set_refuses_names_the_grid_file(tmp_path, tiny):
    g = grid_file(tmp_path, 'variants = ["sparse-node"]\n[set]\nkeep_ratio = 0.9\n')
    code, out, _ = invoke("--grid", g, "--results", tmp_path / "r", "--reports", tmp_path / "rep", "--device", "cpu")
    refused(code, out, str(g), "keep_ratio 0.9 keeps all 4 clips")
    assert not (tmp_path / "r" / "runs").exists()


@pytest.mark.parametrize("argv", [["--grid"], ["report", "--grid"], ["compress", "--grid"]])
def test_an_unknown_synthetic_preset_names_the_grid_file(tmp_path, argv):
    g = grid_file(tmp_path, 'variants = ["dualvgr"]\n', data="synthetic:nope")
    code, out, _ = invoke(*argv, g, "--results", tmp_path / "r")
    refused(code, out, str(g), "'synthetic:nope'", "unknown preset 'nope'", "tiny-count")


def test_a_missing_data_directory_names_the_grid_file(tmp_path):
    g = grid_file(tmp_path, 'variants = ["dualvgr"]\n', data=str(tmp_path / "no-such-data"))
    code, out, _ = invoke("report", "--grid", g, "--results", tmp_path / "r")
    refused(code, out, f"{g}: ", "no-such-data")


# -- ranges, modes and weights checked before anything runs

def test_bench_refuses_a_negative_warmup():
    code, out, _ = invoke("--variant", "dualvgr", "--config", "tiny", "--device", "cpu", "--warmup", "-1",
                          "--no-store", app=bench.app)
    assert code == 2 and "Invalid value for '--warmup'" in out and "greater than or equal to 0" in out, out


@pytest.mark.parametrize("opt", ["--question-len", "--threads"])
def test_bench_refuses_nonsense_ranges(opt):
    code, out, _ = invoke("--variant", "dualvgr", "--config", "tiny", "--device", "cpu", opt, "0", "--no-store",
                          app=bench.app)
    assert code == 2 and f"Invalid value for '{opt}'" in out, out


@pytest.mark.parametrize("setting", ["alpha=-1", "beta=-1e-8", "logits.weight=-0.5"])
def test_run_refuses_a_negative_loss_weight(tmp_path, setting):
    code, out, _ = invoke("run", "student-logits", "--set", setting, "--results", tmp_path, "--device", "cpu")
    refused(code, out, setting.split("=")[0], "loss weights must be >= 0")
    assert not (tmp_path / "runs").exists()


def test_a_study_range_with_a_negative_loss_weight_is_refused(tmp_path):
    from harness.search.definition import StudyError, load_study

    f = tmp_path / "s.toml"
    f.write_text('variants = ["student-logits"]\n[search]\nn_trials = 2\n'
                 '[search.params]\nalpha = {low = -1, high = 1}\n')
    with pytest.raises(StudyError, match=r"alpha.*loss weights must be >= 0"):
        load_study(f)
    code, out, _ = invoke("search", f, "--results", tmp_path / "r")
    refused(code, out, str(f), "alpha", "loss weights must be >= 0")


def test_question_only_runs_refuse_a_bogus_mode(tmp_path):
    code, out, _ = invoke("run", "question-only", "--mode", "bogus", "--results", tmp_path, "--device", "cpu")
    refused(code, out, "--mode 'bogus'", "auto, memory, stream")
    assert not (tmp_path / "runs").exists()


def test_a_grid_of_complete_runs_refuses_a_bogus_mode(tmp_path, qo_store):
    g = grid_file(tmp_path, TINY_QO)
    code, out, _ = invoke("--grid", g, "--mode", "bogus", "--results", qo_store.root, "--reports", tmp_path / "rep")
    refused(code, out, "--mode 'bogus'")
    assert not (tmp_path / "rep" / "g.md").exists()


# -- report, search and compare say what is wrong

def _read_only_under(monkeypatch, root):
    """Writes under ``root`` fail as on a read-only mount (the tests run as root, where chmod does not)."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(root)):
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_a_read_only_reports_folder_is_not_told_to_free_space(tmp_path, monkeypatch, qo_store):
    g = grid_file(tmp_path, TINY_QO)
    ro = tmp_path / "ro"
    _read_only_under(monkeypatch, ro)
    code, out, _ = invoke("report", "--grid", g, "--results", qo_store.root, "--reports", ro)
    refused(code, out, "cannot write here", f"make {ro} writable", "--reports")
    assert "free some space" not in out


def test_a_full_disk_under_the_reports_folder_is_told_to_free_space(tmp_path, monkeypatch, qo_store):
    g = grid_file(tmp_path, TINY_QO)
    real = tempfile.mkstemp

    def full(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(tmp_path / "rep")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    code, out, _ = invoke("report", "--grid", g, "--results", qo_store.root, "--reports", tmp_path / "rep")
    refused(code, out, "no space left", "free some space")


def test_a_grid_refuses_a_read_only_reports_folder_before_training(tmp_path, monkeypatch, tiny):
    g = grid_file(tmp_path, TINY_QO)
    ro = tmp_path / "ro"
    _read_only_under(monkeypatch, ro)
    code, out, _ = invoke("--grid", g, "--results", tmp_path / "r", "--reports", ro, "--device", "cpu")
    refused(code, out, f"reports directory {ro}: cannot write here", "--reports DIR")
    assert not (tmp_path / "r" / "runs").exists()


def test_report_with_no_complete_run_is_an_error_naming_where_it_looked(tmp_path, tiny):
    g = grid_file(tmp_path, TINY_QO)
    code, out, _ = invoke("report", "--grid", g, "--results", tmp_path / "empty", "--reports", tmp_path / "rep")
    refused(code, out, "no complete run of grid g", str(g), str(tmp_path / "empty"), "looked for 1 run)")
    assert not (tmp_path / "rep" / "g.md").exists()


def test_search_given_a_grid_file_says_it_is_a_grid_file(tmp_path):
    code, out, _ = invoke("search", ablate.Path(__file__).parent.parent / "grids" / "tiny.toml",
                          "--results", tmp_path)
    refused(code, out, "grids/tiny.toml", "not a study file", "a grid file", "ablate.py --grid")
    assert "unknown key" not in out


def test_compare_of_grids_on_different_data_sets_names_them(tmp_path):
    a = grid_file(tmp_path, 'variants = ["dualvgr"]\n', "a.toml")
    b = grid_file(tmp_path, 'variants = ["dualvgr"]\n', "b.toml", data="synthetic:tiny-count")
    code, out, _ = invoke("compare", "--grid", a, "--grid", b, "--results", tmp_path / "r")
    refused(code, out, "different data sets", "synthetic:tiny", "synthetic:tiny-count", str(a), str(b))


# -- --set of something that is a command-line option

@pytest.mark.parametrize("setting, hint", [("lr=1", "use --lr 1"), ("epochs=3", "use --epochs 3"),
                                           ("batch_size=8", "use --batch-size 8"),
                                           ("grad_clip=1", "a grid file's [train] table")])
def test_set_of_a_command_line_option_points_at_the_option(tmp_path, setting, hint):
    code, out, _ = invoke("run", "dualvgr", "--set", setting, "--results", tmp_path, "--device", "cpu")
    refused(code, out, f"--set {setting}", hint)
    assert "has no setting" not in out


# -- the documented study file is one

def test_the_search_docstrings_study_file_loads_and_names_real_settings(tmp_path):
    import textwrap

    import variants
    from harness.search import optimize as search
    from harness.search.definition import load_study

    doc = search.__doc__
    block = doc[doc.index("Study file"):].split("::\n", 1)[1].split("\n\n", 1)[0]
    f = tmp_path / "example.toml"
    f.write_text(textwrap.dedent(block))
    study = load_study(f)
    assert study.variant == "student-logits" and set(study.params) >= {"logits.T", "graph_layers", "beta"}
    assert set(study.params) <= set(variants.settings(study.variant))
    for p in study.params.values():  # every value the example lets a trial take is a valid setting
        for v in p.choices or [p.low, p.high]:
            variants.get_config(study.variant, **{p.name: v})


# -- what a line says is what it is

def _fake_compressed(method: str):
    lat = {"1": {"compressed": {"latency_ms_median": 1.0}, "fp32": {"latency_ms_median": 2.0}}}
    return {"variant": "question-only", "seed": 0, "method": method, "metrics": {"test": {"overall": 3.0}},
            "agreement": {"prediction_agreement": 1.0, "max_abs_logit_diff": 0.0}, "size": {"bytes": 1},
            "cpu": {"latency": lat}}


def test_compress_of_a_compressed_run_says_already_complete_for_the_method_asked(qo_store, monkeypatch):
    from harness.compression import compress as C

    monkeypatch.setattr(C, "read", lambda store, rid, method, record=None: _fake_compressed(method))
    monkeypatch.setattr(C, "compress_run", lambda *a, **k: pytest.fail("a complete evaluation was redone"))
    (rid,) = [r["run_id"] for r in qo_store.records()]
    code, out, _ = invoke("compress", rid, "--method", "dynamic-int8", "--results", qo_store.root)
    assert code == 0, out
    assert "dynamic-int8: already complete" in out and "--force redoes it" in out
    assert "onnx" not in out, out


def test_bench_suggests_one_thread_only_when_it_was_not_given(monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (4.0, 4.0, 4.0))
    monkeypatch.setattr(bench, "_measure_alone", lambda *a, **k: [])
    monkeypatch.setattr(bench, "_print", lambda *a, **k: None)
    args = ("--variant", "question-only", "--config", "tiny", "--device", "cpu", "--no-store")
    code, out, _ = invoke(*args, "--threads", "1", app=bench.app)
    assert code == 0 and "CPU load average is 4.0" in out and "--threads 1 helps" not in out, out
    code, out, _ = invoke(*args, "--threads", "2", app=bench.app)
    assert code == 0 and "with 2 threads" in out and "--threads 1 helps" in out, out


def test_the_cost_line_says_what_it_measures(qo_store, monkeypatch):
    from harness.measurement import costs

    monkeypatch.setattr(costs, "measure_one", lambda *a, **k: {})
    code, out, _ = invoke("run", "question-only", "--epochs", "1", "--batch-size", "512", "--seed", "0",
                          "--device", "cpu", "--results", qo_store.root)
    assert code == 0, out
    (line,) = [ln for ln in out.splitlines() if "measuring inference cost" in ln]
    assert "measuring inference cost 1/1 of question-only on " in line and "(cost entry question-only-" in line
    assert "shared by the runs of the same model settings and threads" in line


def test_the_study_reports_regenerate_line_keeps_a_non_default_reports_folder(tmp_path):
    from harness.search.report import regenerate_command
    from harness.search.definition import load_study

    f = tmp_path / "s.toml"
    f.write_text('variants = ["student"]\n[search]\n[search.params]\nalpha = {low = 0.1, high = 10.0}\n')
    study = load_study(f)
    cmd = regenerate_command(study, "results/studies/s.log", tmp_path / "r", tmp_path / "my reports")
    assert cmd == f"python ablate.py search {f} --results {tmp_path / 'r'} --reports '{tmp_path / 'my reports'}' " \
                  "--report-only"
    assert "--reports" not in regenerate_command(study, "x.log", tmp_path / "r", ablate.Path("reports"))
    assert "--storage sqlite:///s.db" in regenerate_command(study, "sqlite:///s.db", tmp_path / "r", tmp_path)


# -- a count run speaks MSE, the metric that chooses its best epoch

@pytest.mark.slow
def test_a_count_runs_epoch_lines_and_tensorboard_carry_its_validation_mse(data_cache, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from harness.measurement import costs
    from harness.training import sinks as S

    monkeypatch.setattr(costs, "measure_one", lambda *a, **k: {})
    code, out, _ = invoke("run", "question-only", "--data", "synthetic:tiny-count", "--epochs", "2", "--batch-size",
                          "512", "--seed", "0", "--device", "cpu", "--results", tmp_path, "--log", "tensorboard")
    assert code == 0, out
    (rec,) = St.ResultsStore(tmp_path).records()
    text = " ".join(out.split())  # the test console wraps at 80 columns
    for entry in rec["history"]:
        assert f"question-only seed 0 epoch {entry['epoch'] + 1}/2 loss {entry['loss']:.3f} val MSE " \
               f"{entry['val_mse']:.3f} (exact match: train {entry['train_acc']:.1f}%, val {entry['val_acc']:.1f}%)" \
               in text, out
    ea = EventAccumulator(str(St.ResultsStore(tmp_path).run_dir(rec["run_id"]) / S.TENSORBOARD_DIR),
                          size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.value for e in ea.Scalars("val/mse")] == pytest.approx([h["val_mse"] for h in rec["history"]])
    (final,) = ea.Scalars("final/test_mse")
    assert final.value == pytest.approx(rec["metrics"]["test"]["mse"])


def test_an_accuracy_runs_epoch_line_and_scalars_have_no_mse():
    from harness.training import sinks as S
    from harness.training.runner import epoch_line

    entry = {"epoch": 0, "loss": 1.5, "train_acc": 40.0, "val_acc": 35.25, "val_acc_per_type": {"what": 35.25}}
    assert epoch_line(entry, 3) == "epoch 1/3 loss 1.500 train 40.0% val 35.2%"
    assert "val/mse" not in S.epoch_scalars(entry)
    assert S.final_scalars({"metrics": {"test": {"overall": 1.0}, "val": {"overall": 2.0}}}) == \
        {"final/test_acc": 1.0, "final/val_acc": 2.0}


# -- the results table: no value broken in two, what fits on a terminal, everything in a pipe or CSV

@pytest.fixture(scope="module")
def two_task_store(tmp_path_factory, shared_store):
    """An accuracy run (synthetic:tiny, copied from the session's shared store) and a count run
    (synthetic:tiny-count), question-only, 1 epoch each."""
    from harness.training.plan import RunSpec
    from harness.training.runner import train

    store, _ = shared_store.copy(tmp_path_factory.mktemp("two") / "results", "question-only")
    train(RunSpec("question-only", data="synthetic:tiny-count", epochs=1, batch_size=512, seed=0), store,
          device="cpu", progress=False)
    return store


def _row_lines(out: str, store) -> dict[str, str]:
    """Each run's table line, found by its whole run id."""
    rows = {r["run_id"]: [ln for ln in out.splitlines() if r["run_id"] in ln] for r in store.records()}
    assert all(len(v) == 1 for v in rows.values()), out
    return {k: v[0] for k, v in rows.items()}


def _figures(rec: dict) -> list[str]:
    m = rec["metrics"]["test"]
    return [f"{m['overall']:.2f}", *([f"{m['mse']:.2f}"] if "mse" in m else [])]


def test_results_in_a_pipe_shows_every_column_each_value_whole(two_task_store):
    from harness.runs import record as R

    code, out, _ = invoke("results", "--results", two_task_store.root)
    assert code == 0, out
    (header,) = [ln for ln in out.splitlines() if "run_id" in ln]
    for col in ("run_id", "variant", "data", "val_acc", "test_acc", "test_last_acc", "test_mse", "train_samples_per_s"):
        assert f" {col} " in header, header
    rows = _row_lines(out, two_task_store)
    for rec in two_task_store.records():
        assert all(f" {x} " in rows[rec["run_id"]] for x in _figures(rec)), rows[rec["run_id"]]
        assert f" {R.data_id(rec)} " in rows[rec["run_id"]]


def test_results_on_a_120_column_terminal_shows_what_fits_and_names_the_rest(two_task_store, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(ablate, "console", Console(force_terminal=True, width=120, color_system=None))
    code, out, _ = invoke("results", "--results", two_task_store.root)
    assert code == 0, out
    assert max(map(len, out.splitlines())) <= 120, out
    (header,) = [ln for ln in out.splitlines() if "run_id" in ln]
    assert " test_acc " in header and " test_mse " in header, out
    rows = _row_lines(out, two_task_store)
    for rec in two_task_store.records():
        assert all(f" {x} " in rows[rec["run_id"]] for x in _figures(rec)), rows[rec["run_id"]]
    note = " ".join(out.split()).split(" columns left out to fit 120 columns: ")[1]
    assert "teacher_runs" in note and "--columns" in note and "--format csv" in note, out
    assert "test_acc" not in note.split("(")[0] and "run_id" not in note, out
    code, out, _ = invoke("results", "--results", two_task_store.root, "--columns", "run_id,teacher_runs,test_mse")
    (header,) = [ln for ln in out.splitlines() if "run_id" in ln]
    assert code == 0 and header.split() == ["┃", "run_id", "┃", "teacher_runs", "┃", "test_mse", "┃"], out


def test_results_format_csv_gives_every_column(two_task_store):
    import io

    import pandas as pd

    code, out, _ = invoke("results", "--results", two_task_store.root, "--format", "csv")
    assert code == 0, out
    df = pd.read_csv(io.StringIO(out)).set_index("run_id")
    for rec in two_task_store.records():
        m = rec["metrics"]["test"]
        assert df.loc[rec["run_id"], "test_acc"] == pytest.approx(m["overall"])
        assert df.loc[rec["run_id"], "test_mse"] == pytest.approx(m["mse"]) if "mse" in m else \
            pd.isna(df.loc[rec["run_id"], "test_mse"])
    code, out, _ = invoke("results", "--results", two_task_store.root, "--format", "csv", "--columns", "run_id,seed")
    assert code == 0 and out.splitlines()[0] == "run_id,seed" and len(out.splitlines()) == 3, out


def test_results_refuses_an_unknown_column_or_format(two_task_store):
    code, out, _ = invoke("results", "--results", two_task_store.root, "--columns", "run_id,test_accuracy")
    refused(code, out, "--columns run_id,test_accuracy", "no column test_accuracy", "test_acc")
    code, out, _ = invoke("results", "--results", two_task_store.root, "--format", "json")
    refused(code, out, "--format json", "table, csv")


# -- counts agree with their nouns

def test_plural_agrees_with_the_count():
    from harness.console import plural

    assert [plural(n, "run") for n in (0, 1, 2, 1234)] == ["0 runs", "1 run", "2 runs", "1,234 runs"]
    assert plural(1, "teacher run") == "1 teacher run" and plural(3, "entry", "entries") == "3 entries"


def test_one_epoch_one_run_one_teacher_run_are_singular(tiny, tmp_path, monkeypatch):
    import harness.execution.executor as E
    from harness.measurement import costs

    monkeypatch.setattr(costs, "measure_one", lambda *a, **k: {})
    code, out, _ = invoke("run", "question-only", "--epochs", "1", "--batch-size", "512", "--seed", "0",
                          "--device", "cpu", "--results", tmp_path / "r1")
    text = " ".join(out.split())
    assert code == 0 and ": 1 epoch, best val epoch 1," in text, out
    assert "inference cost measured for 1 configuration, one at a time" in text, out

    def teacher_fails(spec, results, device="auto", mode="auto", log=()):
        return {"run_id": "x", "variant": spec["variant"], "seed": spec["seed"], "status": "failed",
                "reason": "RunFailed: loss became nan in epoch 1"}

    monkeypatch.setattr(E, "run_one", teacher_fails)
    g = grid_file(tmp_path, 'variants = ["student-logits"]\n[train]\nepochs = 1\nbatch_size = 512\n')
    code, out, _ = invoke("--grid", g, "--results", tmp_path / "r2", "--reports", tmp_path / "rep")
    text = " ".join(out.split())
    assert code == 1 and "grid g: 1 run on synthetic:tiny (0 already complete, 1 to run), and 1 teacher run they " \
                         "need (1 to train)" in text, out
    assert "2 runs failed: " in text, out


@pytest.mark.slow
def test_a_searchs_report_names_the_reports_folder_it_was_written_to(tmp_path, tiny, monkeypatch):
    import shlex

    from harness.measurement import costs

    monkeypatch.setattr(costs, "measure_one", lambda *a, **k: {})
    f = tmp_path / "s.toml"
    f.write_text('data = "synthetic:tiny"\nvariants = ["student"]\n[train]\nepochs = 1\nbatch_size = 512\n[set]\n'
                 'module_dim = 16\n[search]\nn_trials = 1\nstartup_trials = 1\nfinal_seeds = [1, 2, 3]\n'
                 '[search.params]\nalpha = {low = 0.1, high = 100.0, log = true}\n')
    reports = tmp_path / "my reports"
    code, out, _ = invoke("search", f, "--results", tmp_path / "r", "--reports", reports, "--device", "cpu")
    assert code == 0, out
    md = (reports / "s.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("Regenerated by `"))
    words = shlex.split(line.split("`")[1])
    assert words[words.index("--reports") + 1] == str(reports) and words[-1] == "--report-only", line
    code, out, _ = invoke(*words[2:])  # the line, as given, rewrites the report in the same folder
    assert code == 0 and f"report: {reports / 's.md'}" in " ".join(out.split()), out
