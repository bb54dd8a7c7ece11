"""Planning without data: run ids from a data set's recorded info, reports that read no feature
file, a data id that follows the feature contents, settings that reach implicit teachers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import ablate
from harness.data import dataset as D
from harness.data.features import FINGERPRINT_FILE, NoFeatures
from harness.data import layout as L
from harness.training.plan import RunPruned, RunSpec, plan
from harness.training.runner import train
from harness.runs.store import ResultsStore

ROOT = Path(__file__).resolve().parents[2]


def copy_tiny(tiny, dst: Path) -> Path:
    shutil.copytree(tiny.paths.appearance.parent, dst)
    (dst / FINGERPRINT_FILE).unlink(missing_ok=True)
    return dst


def test_describe_plans_the_same_ids_as_a_full_load(tiny):
    info = D.describe("synthetic:tiny")
    assert info == tiny.info
    for v in ("dualvgr", "student-logits", "question-only"):
        assert plan(RunSpec(v), info).run_id == plan(RunSpec(v), tiny).run_id


def test_data_id_covers_the_feature_contents(tiny, tmp_path):
    """Same vocab, questions and shapes, other feature values: another data set, another run id;
    the old record is not returned for it (issue: stale results for re-extracted features)."""
    a = copy_tiny(tiny, tmp_path / "a")
    b = copy_tiny(tiny, tmp_path / "b")
    assert D.describe(a).data_id == D.describe(b).data_id  # same bytes, same id
    with h5py.File(L.appearance_file(b, tiny.name), "r+") as f:
        ds = f[L.APPEARANCE_KEY]
        ds[0] = np.random.default_rng(0).standard_normal(ds.shape[1:]).astype(np.float32)  # one video re-extracted
    assert D.describe(b).data_id != D.describe(a).data_id
    cache = json.loads((b / FINGERPRINT_FILE).read_text())
    assert set(cache) >= {L.appearance_file(b, tiny.name).name, L.motion_file(b, tiny.name).name}


def test_fingerprints_are_cached_by_size_and_mtime(tiny, tmp_path, monkeypatch):
    d = copy_tiny(tiny, tmp_path / "c")
    first = D.describe(d).data_id
    opened = []
    real_open = open

    def spy(path, *a, **k):
        if str(path).endswith(".h5") and "rb" in (a[0] if a else k.get("mode", "r")):
            opened.append(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    assert D.describe(d).data_id == first and not opened  # no feature file hashed again


@pytest.mark.slow
def test_report_reads_no_feature_file(tiny, tmp_path, monkeypatch, data_cache):
    """A grid's report needs only the results store: the feature files deleted, h5py unusable."""
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["question-only"]\nseeds = [0]\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n')
    results, reports = tmp_path / "results", tmp_path / "reports"
    runner = CliRunner()
    r = runner.invoke(ablate.app, ["--grid", str(grid), "--results", str(results), "--reports", str(reports)])
    assert r.exit_code == 0, r.output
    (reports / "g.md").unlink()
    moved = tmp_path / "moved"
    shutil.move(str(tiny.paths.appearance.parent), moved)  # the data set is gone
    try:
        def no_h5(*a, **k):
            raise AssertionError("the report opened an h5 file")

        monkeypatch.setattr(h5py, "File", no_h5)
        r = runner.invoke(ablate.app, ["report", "--grid", str(grid), "--results", str(results),
                                       "--reports", str(reports)])
        assert r.exit_code == 0, r.output
        assert (reports / "g.md").exists() and "question-only" in (reports / "g.md").read_text()
    finally:
        monkeypatch.undo()
        shutil.move(str(moved), str(tiny.paths.appearance.parent))


def test_grid_settings_reach_the_implicit_teacher(tiny):
    """module_dim given to a student (grid [set] or --set) reaches the teacher it trains against;
    graph_layers, which makes the teacher what it is, does not."""
    p = plan(RunSpec("student-logits", overrides={"module_dim": 32}), tiny)
    (t,) = p.teachers
    assert t.cfg.model["module_dim"] == 32 and t.cfg.model["graph_layers"] == 4
    assert t.run_id == plan(RunSpec("teacher-g4", overrides={"module_dim": 32}), tiny).run_id
    p2 = plan(RunSpec("student-logits", overrides={"graph_layers": 2}), tiny)
    assert p2.teachers[0].cfg.model["graph_layers"] == 4


def test_question_only_reads_no_features(tiny, tmp_path):
    d = D.load("synthetic:tiny", mode="none")
    assert isinstance(d.features, NoFeatures) and d.data_id == tiny.data_id
    rec = train(RunSpec("question-only", epochs=1, batch_size=512, seed=3), ResultsStore(tmp_path), device="cpu",
                progress=False)
    assert rec["status"] == "complete"


def test_contiguous_features_are_memory_mapped(tiny):
    assert tiny.features.mapped  # the synthetic writer stores contiguous datasets


def test_resumed_wall_time_counts_running_time_only(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    s = RunSpec("question-only", epochs=2, batch_size=512, seed=4)
    with pytest.raises(RunPruned):  # stopped after its first epoch, as a process that died there
        train(s, store, data=tiny, device="cpu", progress=False, on_epoch=lambda epoch, acc: True)
    state = store.run_dir(plan(s, tiny).run_id) / "state.pt"
    old = os.stat(state).st_mtime - 3600
    os.utime(state, (old, old))  # as if the process had died an hour ago
    import torch
    st = torch.load(state, weights_only=False)
    st["started_at"] = "2000-01-01T00:00:00+00:00"
    torch.save(st, state)
    rec = train(s, store, data=tiny, device="cpu", progress=False)
    assert rec["wall_time_s"] < 600  # not the 26 years since started_at


@pytest.mark.slow
def test_a_teacher_without_the_output_a_loss_reads_fails_before_anything_trains(tiny, tmp_path, monkeypatch):
    """A student whose hint loss reads ``clip_fused`` from a question-only teacher (which has no
    video features) is refused when planned, naming the output and the teacher, before the
    teacher trains; in a grid, before any run trains."""
    import re

    import pytest

    import variants
    from harness.execution import grid as G
    from harness.errors import GridError
    from harness.execution.grid import run_grid
    from variants.registry import Entry

    def student_qo_hint():
        spec = variants.get_config("student-hint").to_dict()
        return {k: spec[k] for k in ("arch", "model", "loss", "distill")} | {"teachers": ["question-only"]}

    monkeypatch.setitem(variants.VARIANTS._entries, "student-qo-hint",
                        Entry("student-qo-hint", student_qo_hint, "", ()))
    store = ResultsStore(tmp_path / "results")
    msg = r"variant 'student-qo-hint' \(teachers: question-only\): distillation loss 'hint': the teacher's outputs " \
          r"have no 'clip_fused' \(keys: logits, question\)"
    with pytest.raises(variants.ConfigError, match=msg):
        train(RunSpec("student-qo-hint", epochs=1), store, data=tiny, device="cpu", progress=False)
    grid = tmp_path / "g.toml"
    grid.write_text('data = "synthetic:tiny"\nvariants = ["dualvgr", "student-qo-hint"]\nseeds = [0]\n')
    with pytest.raises(GridError, match=re.escape(f"{grid}: ") + msg):  # a grid's refusal names its file
        run_grid(G.load(grid), store)
    assert not list((tmp_path / "results").glob("runs/*/record.json"))  # nothing trained
    # the same student with a teacher that has the output trains (a small one: module_dim 16, its teacher's too)
    train(RunSpec("student-hint", epochs=1, batch_size=512, overrides={"module_dim": 16}), store, data=tiny,
          device="cpu", progress=False)
