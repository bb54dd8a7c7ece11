"""Ablation grids: checking, expansion, ordering, resume, failures, executors, SIGKILL safety."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from harness.execution import grid as G
from harness.execution.schedule import cpu_threads_per_worker
from harness.execution.grid import run_grid
from harness.runs.store import ResultsStore

ROOT = Path(__file__).resolve().parents[2]
MICRO_TRAIN = "[train]\nepochs = 1\nbatch_size = 512\n"
#: a small model (every variant's module_dim 16, teachers' included) for the tests of a grid's path, not of its models
SMALL = "[set]\nmodule_dim = 16\n"


def write(tmp_path, text, name="g"):
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def quiet():
    return Console(file=open(os.devnull, "w"))


#: every shipped grid file (a study file, with its [search] table, is tests/search/test_optimize.py's)
SHIPPED = sorted(p.stem for p in (ROOT / "grids").glob("*.toml") if "[search]" not in p.read_text())


def test_the_shipped_grids_are_found():
    assert {"tiny", "ci", "ci-tasks", "tiny-tasks", "tgif-qa", "next-qa", "tiny-compress"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_grids_load(name):
    g = G.load(name)
    assert g.runs and g.description


def test_errors_name_the_file_and_key(tmp_path):
    cases = [
        ('variants = ["dualvgr"]\nsedes = [1]\n', r"g.toml: unknown key\(s\) sedes"),
        ('variants = ["dualvgr"]\nseeds = [1,, 2]\n', r"g.toml: not valid TOML: .*line 2"),
        ('variants = ["nope-*"]\n', r"g.toml: variants: 'nope-\*' matches no registered variant"),
        ('variants = ["dualvgr"]\n[axes]\ngraph_layer = [1, 2]\n', r"\[axes\] key 'graph_layer' is a setting of none"),
        ('variants = ["dualvgr"]\n[train]\nepoch = 3\n', r"\[train\] has unknown key\(s\) epoch"),
        ('variants = ["dualvgr"]\n[[include]]\nvariant = "dualvgr"\nfoo = 1\n',
         r"\[\[include\]\] #1: dualvgr has no setting"),
        ('variants = ["dualvgr"]\n[executor]\nkind = "k8s"\n', r"kind 'k8s' is not one of"),
        ('variants = ["dualvgr"]\n[train]\nprecision = "fp8"\n', r"g.toml: \[train\] precision = 'fp8' is not one of"),
        ('seeds = [1]\n', r"missing key 'variants'"),
        ('variants = ["dualvgr"]\n[train]\nepochs = 0\n', r"g.toml: \[train\] epochs = 0 is not an integer >= 1"),
        ('variants = ["dualvgr"]\n[train]\nbatch_size = 1\n', r"\[train\] batch_size = 1 is not an integer >= 2"),
        ('variants = ["dualvgr"]\n[train]\nepochs = "3"\n', r"\[train\] epochs = '3' is not an integer"),
        ('variants = ["dualvgr"]\n[train]\nlr = 0\n', r"\[train\] lr = 0 is not a number > 0"),
        ('variants = ["dualvgr"]\n[set]\nalpha = "abc"\n',
         r"g.toml: variant 'dualvgr': setting alpha = 'abc' must be float"),
        ('variants = ["dualvgr"]\n[axes]\nkeep_ratio = [0.5, 2.0]\n', r"g.toml: .*keep_ratio must be in \(0, 1\]"),
    ]
    for text, pattern in cases:
        with pytest.raises(G.GridError, match=pattern):
            G.load(write(tmp_path, text))
    with pytest.raises(G.GridError, match="no grid named 'nonexistent'"):
        G.load("nonexistent")


def test_expansion_axes_include_exclude_and_order(tmp_path):
    g = G.load(write(tmp_path, """
variants = ["dualvgr", "student-logits", "teacher-g4"]
seeds = [0, 1]
[set]
module_dim = 32
[axes]
"logits.T" = [2.0, 4.0]
[[include]]
variant = "student-logits"
"logits.T" = 8.0
[[exclude]]
variant = "student-*"
"logits.T" = 2.0
"""))
    runs = [(r.variant, r.overrides, r.seed) for r in g.runs]
    assert runs[:2] == [("teacher-g4", {"module_dim": 32}, 0), ("teacher-g4", {"module_dim": 32}, 1)]  # teachers first
    assert ("dualvgr", {"module_dim": 32}, 0) in runs
    students = [r for r in runs if r[0] == "student-logits"]
    assert sorted(r[1]["logits.T"] for r in students) == [4.0, 4.0, 8.0, 8.0]
    assert runs[-1][0] == "student-logits"
    assert len(runs) == 8


@pytest.mark.slow
def test_run_resume_and_failures(tiny, tmp_path):
    p = write(tmp_path, 'data = "synthetic:tiny"\nvariants = ["question-only", "dualvgr"]\nseeds = [0]\n'
              + MICRO_TRAIN + SMALL  # and an HSIC weight that overflows: a failing run
              + '[[include]]\nvariant = "dualvgr"\nbeta = 1e38\n')
    g = G.load(p)
    store = ResultsStore(tmp_path / "results")
    res = run_grid(g, store, console=quiet())
    assert len(res.complete) == 2 and len(res.failed) == 1
    assert re.search(r"RunFailed: .*loss became (inf|nan) in epoch 1", res.failed[0]["reason"])
    failed = json.loads((store.run_dir(res.failed[0]["run_id"]) / "failed.json").read_text())
    assert "Traceback" in failed["traceback"]
    finished = {r["run_id"]: r["finished_at"] for r in store.records()}
    again = run_grid(g, store, console=quiet())  # resumes: only the failed run is tried again
    assert again.skipped == 2 and len(again.failed) == 1
    assert {r["run_id"]: r["finished_at"] for r in store.records()} == finished  # complete runs not redone


@pytest.mark.slow
def test_parallel_jobs_and_teacher_order(tiny, tmp_path):
    g = G.load(write(tmp_path, 'data = "synthetic:tiny"\n'
                     'variants = ["student-logits", "student-hint", "question-only"]\n'
                     'seeds = [0]\n' + MICRO_TRAIN + SMALL))
    store = ResultsStore(tmp_path / "results")
    res = run_grid(g, store, jobs=2, device="cpu", console=quiet())
    assert not res.failed and len(res.complete) == 3
    assert len(store.records(variant="teacher-g4")) == 1  # one teacher, trained once for both students
    teacher = store.records(variant="teacher-g4")[0]["run_id"]
    student = store.records(variant="student-logits")[0]["run_id"]
    assert len(res.run_ids) == 4 and res.run_ids.index(teacher) < res.run_ids.index(student)
    assert res.teachers_complete == [teacher]  # scheduled as a run of its own


def test_implicit_teachers_are_counted_and_scheduled_once_before_their_students(tiny, tmp_path, monkeypatch):
    """A grid listing two students of one teacher (not listed) trains that teacher once, as its
    own run before them (no student waits on another's teacher), and its header says so; a
    student whose teacher failed is recorded as failed without being tried."""
    import io

    import harness.execution.executor as E

    g = G.load(write(tmp_path, 'data = "synthetic:tiny"\nvariants = ["student-logits", "student-hint"]\n'
                     'seeds = [0]\n' + MICRO_TRAIN))
    calls = []

    def fake_run_one(spec, results, device="auto", mode="auto", log=()):
        calls.append(spec["variant"])
        return {"run_id": "x", "variant": spec["variant"], "seed": spec["seed"], "status": "failed",
                "reason": "RunFailed: loss became nan in epoch 1"}

    monkeypatch.setattr(E, "run_one", fake_run_one)
    out = io.StringIO()
    res = run_grid(g, ResultsStore(tmp_path / "results"), console=Console(file=out, width=200))
    header = out.getvalue().splitlines()[0]
    assert "2 runs on synthetic:tiny (0 already complete, 2 to run), and 1 teacher run they need (1 to train)" \
        in header, header
    assert calls == ["teacher-g4"]  # the students were not tried
    assert [f["variant"] for f in res.failed] == ["teacher-g4", "student-logits", "student-hint"]
    assert all(re.match(r"teacher run teacher-g4 seed 0 \(teacher-g4-\w+\) failed", f["reason"])
               for f in res.failed[1:]), res.failed
    assert not res.complete and not res.teachers_complete and len(res.run_ids) == 3


@pytest.mark.slow
def test_submitit_local_executor(tiny, tmp_path):
    g = G.load(write(tmp_path, 'data = "synthetic:tiny"\nvariants = ["question-only", "student"]\nseeds = [0]\n'
                     + MICRO_TRAIN + SMALL))
    store = ResultsStore(tmp_path / "results")
    res = run_grid(g, store, executor="submitit-local", device="cpu", console=quiet(), poll_s=0.2)
    assert not res.failed and len(res.complete) == 2
    assert (tmp_path / "results" / "submitit" / "g").is_dir()
    # submitit's local executor starts both jobs at once: each trains with its share of the cores, not all of them
    share = cpu_threads_per_worker(2)
    assert [r["environment"]["threads"] for r in store.records()] == [share, share]


@pytest.mark.slow
def test_sigkill_halfway_loses_and_duplicates_nothing(tmp_path, data_cache):
    p = write(tmp_path, 'data = "synthetic:tiny"\nvariants = ["question-only", "dualvgr"]\nseeds = [0, 1, 2]\n'
              + MICRO_TRAIN + SMALL)
    results = tmp_path / "results"
    env = {**os.environ, "VQAKD_DATA_DIR": str(data_cache), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "ablate.py"), "--grid", str(p), "--results", str(results), "--device", "cpu",
           "--reports", str(tmp_path / "reports")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list(results.glob("runs/*/record.json"))) < 2:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = {r["run_id"]: r["finished_at"] for r in ResultsStore(results).records()}
    assert 2 <= len(done_before) < 6
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    recs = ResultsStore(results).records()
    assert len(recs) == 6 and len({r["run_id"] for r in recs}) == 6
    assert {(r["variant"], r["seed"]) for r in recs} == {(v, s) for v in ("question-only", "dualvgr")
                                                          for s in (0, 1, 2)}
    for r in recs:  # runs finished before the kill were not run again
        if r["run_id"] in done_before:
            assert r["finished_at"] == done_before[r["run_id"]]
    assert (tmp_path / "reports" / "g.md").is_file()
    # a second invocation finishes at once: everything is complete
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 to run" in (again.stdout + again.stderr)


def test_include_seeds_are_kept_and_unknown_variants_named(tmp_path):
    base = 'data = "synthetic:tiny"\nvariants = ["dualvgr"]\nseeds = [0, 1]\n'
    g = G.load(write(tmp_path, base + '[[include]]\nvariant = "student-logits"\n"logits.T" = 8.0\nseeds = [5]\n'))
    inc = [(r.variant, r.seed) for r in g.runs if r.variant == "student-logits"]
    assert inc == [("student-logits", 5)]  # the entry's own seeds, not the grid's
    assert sorted(r.seed for r in g.runs if r.variant == "dualvgr") == [0, 1]
    g2 = G.load(write(tmp_path, base + '[[include]]\nvariant = "student-logits"\nseeds = [5]\n'), seeds=[3])
    assert sorted({r.seed for r in g2.runs}) == [3]  # --seeds replaces every seed list
    with pytest.raises(G.GridError, match=r"\[\[include\]\] #1: 'variant' must name a registered variant, "
                                          r"got 'teacher-g9'"):
        G.load(write(tmp_path, base + '[[include]]\nvariant = "teacher-g9"\n'))
    with pytest.raises(G.GridError, match=r"\[\[include\]\] #1: seeds must be a non-empty list of integers"):
        G.load(write(tmp_path, base + '[[include]]\nvariant = "dualvgr"\nseeds = "x"\n'))


@pytest.mark.parametrize("variant,key,values", [
    ("student-similarity", "similarity.matrix", ["cross", "self"]),
    ("student-relational", "relational.embedding", ["video", "joint"]),
    ("student-dkd", "dkd.beta", [4.0, 8.0]),
    ("student-sp", "sp.feature", ["clip_fused", "video"]),
    ("student-pkt", "pkt.embedding", ["video", "joint"]),
])
def test_any_loss_parameter_that_set_accepts_is_a_grid_axis(tmp_path, variant, key, values):
    """A loss parameter the variant's default params do not spell out (what --set accepts) works on
    [axes], [set], [[include]] and [[exclude]] alike."""
    import variants
    assert key not in {f"{d['name']}.{k}" for d in variants.get_config(variant).distill for k in d["params"]}
    g = G.load(write(tmp_path, f'variants = ["{variant}"]\nseeds = [0]\n[axes]\n"{key}" = {json.dumps(values)}\n'))
    assert sorted(r.overrides[key] for r in g.runs) == sorted(values)
    g = G.load(write(tmp_path, f'variants = ["{variant}"]\nseeds = [0]\n[set]\n"{key}" = {json.dumps(values[1])}\n'
                     f'[[include]]\nvariant = "{variant}"\n"{key}" = {json.dumps(values[0])}\n'
                     f'[[exclude]]\n"{key}" = {json.dumps(values[1])}\n'))
    assert [r.overrides[key] for r in g.runs] == [values[0]]


def test_exclude_keys_and_values_are_checked_and_an_exclude_must_drop_a_run(tmp_path):
    base = 'variants = ["student-logits"]\nseeds = [0]\n[axes]\n"logits.T" = [2.0, 4.0]\n[[exclude]]\n'
    cases = [
        ('"logits.TT" = 2.0\n', r"g.toml: \[\[exclude\]\] #1: 'logits.TT' is a setting of none of its variants"),
        ('variant = "dualvgr"\n', r"\[\[exclude\]\] #1: variant 'dualvgr' matches none of the grid's variants"),
        ('"logits.T" = "2"\n',
         r"\[\[exclude\]\] #1 \(logits.T = '2'\): variant 'student-logits': setting logits.T = '2' must be float"),
        ('"logits.T" = 3.0\n', r"\[\[exclude\]\] #1 matches no run of the grid"),
        ('"similarity.matrix" = "self"\n', r"'similarity.matrix' is a setting of none of its variants"),
    ]
    for text, pattern in cases:
        with pytest.raises(G.GridError, match=pattern):
            G.load(write(tmp_path, base + text))
    # a setting left at its default matches its default
    g = G.load(write(tmp_path, 'variants = ["student-logits", "student-hint"]\nseeds = [0]\n'
                     '[[exclude]]\n"logits.T" = 4.0\n'))
    assert [r.variant for r in g.runs] == ["student-hint"]


def test_set_and_grid_reject_an_unknown_loss_parameter_alike(tmp_path):
    import variants
    with pytest.raises(variants.ConfigError, match=r"distillation loss 'similarity' has no parameter 'matrx'"):
        variants.get_config("student-similarity", **{"similarity.matrx": "self"})
    with pytest.raises(G.GridError, match=r"\[axes\] key 'similarity.matrx' is a setting of none"):
        G.load(write(tmp_path, 'variants = ["student-similarity"]\n[axes]\n"similarity.matrx" = ["self"]\n'))


def test_list_valued_settings_on_a_grid(tmp_path):
    g = G.load(write(tmp_path, 'variants = ["student-similarity-ens"]\nseeds = [0]\n[axes]\n'
                     'teachers = [["teacher-g4"], ["teacher-g3", "teacher-g4"]]\n'))
    assert [r.overrides["teachers"] for r in g.runs] == [["teacher-g4"], ["teacher-g3", "teacher-g4"]]
