"""Teacher outputs computed once (harness/training/teacher_cache.py): a student trained from the cache
trains exactly as one that runs its teachers every step; the cache holds only the keys the
losses read, is shared by the students of a teacher run, and a damaged, partial or stale cache
is rebuilt, never used."""
import dataclasses
import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import variants
from harness.data import dataset as D
from harness.training import teacher_cache as TC
from harness.measurement.bill import training_bill
from harness.errors import HarnessError
from harness.training.plan import RunPruned, RunSpec, plan
from harness.training.runner import train
from harness.model.step import build_step
from harness.runs.store import ResultsStore
from harness.files import atomic_torch_save

#: the same teacher for every student below: equal training settings and seed
#: whole runs of a small model (module_dim 16, the teacher's too): what is checked is the cache's path, not the models
FAST = {"epochs": 2, "batch_size": 512, "seed": 1, "overrides": {"module_dim": 16}}
N_ROWS = 128  # questions of the training split used by the unit tests (two batches of 64)


def _head(split: D.SplitData, n: int) -> D.SplitData:
    """The first ``n`` questions of a split."""
    t = {f: getattr(split, f)[:n] for f in ("questions", "lengths", "video_rows", "answers", "qtypes")}
    return D.SplitData(split.name, **t, question_ids=split.question_ids[:n], video_ids=split.video_ids[:n])


def _fake_teacher(store: ResultsStore, tiny, variant: str = "teacher-g4", seed: int = 0):
    """A randomly initialised teacher saved as a complete-looking run (its best.pt and the
    record fields the cache reads)."""
    cfg = plan(RunSpec(variant), tiny).cfg
    torch.manual_seed(seed)
    model = variants.build(cfg).eval().requires_grad_(False)
    run_id = f"{variant}-fake{seed}"
    atomic_torch_save(store.run_dir(run_id) / "best.pt", model.state_dict())
    return {"run_id": run_id, "variant": variant, "variant_config": cfg.to_dict()}, model


def _student(tiny, name: str, seed: int = 3):
    p = plan(RunSpec(name), tiny)
    torch.manual_seed(seed)
    return p, variants.build(p.cfg)


def _probe(split, features, n=4):
    return next(D.iterate_batches(split, features, n))


# ----------------------------------------------------------------------------- which keys


@pytest.mark.parametrize("name, keys", [("student-logits", ["logits"]), ("student-fused", ["clip_fused"]),
                                        ("student-similarity", ["video", "question"])])
def test_dry_run_finds_the_keys_a_loss_reads_and_changes_nothing(tiny, name, keys):
    p, model = _student(tiny, name)
    teachers = [variants.build(t.cfg).eval() for t in p.teachers]
    step = build_step(p.cfg, model, teachers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    got = TC.keys_read(step.objective, model, teachers, _probe(tiny.splits["train"], tiny.features))
    assert [sorted(k) for k in got] == [sorted(keys)]  # the order of reading does not matter
    assert model.training and step.objective.training  # modes restored
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(v, before[k]), k


def test_recorder_counts_iteration_as_reading_every_key():
    r = TC._KeyRecorder({"a": 1, "b": 2, "c": 3})
    assert "b" in r and r.read == []  # a membership test reads nothing
    r["b"]
    assert r.read == ["b"]
    list(r.items())
    assert r.read == ["b", "a", "c"]


# ----------------------------------------------------------------------------- one step


@pytest.mark.parametrize("name", [n for n in variants.list("student-*") if variants.get_config(n).teachers])
@pytest.mark.slow
def test_step_from_the_cache_equals_the_step_that_runs_the_teachers(tiny, tmp_path, name):
    store = ResultsStore(tmp_path)
    split = _head(tiny.splits["train"], N_ROWS)
    p, _ = _student(tiny, name)
    fakes = [_fake_teacher(store, tiny, t.spec.variant, seed=i) for i, t in enumerate(p.teachers)]
    trecs, teachers = [f[0] for f in fakes], [f[1] for f in fakes]
    steps = []
    for _ in range(2):
        _, model = _student(tiny, name)
        steps.append(build_step(p.cfg, model, teachers, lr=1e-3))
    keys = TC.keys_read(steps[1].objective, steps[1].model, teachers, _probe(split, tiny.features))
    cache = TC.prepare(store, trecs, teachers, keys, split, tiny.features, tiny.data_id, torch.device("cpu"))
    losses = []
    for i, step in enumerate(steps):  # one after the other: each draws the same dropout masks
        torch.manual_seed(7)
        losses.append([])
        for b in D.iterate_batches(split, tiny.features, 64, shuffle=True, generator=torch.Generator().manual_seed(5)):
            t_outs = cache.gather(b.index) if i == 1 else None
            losses[-1].append(step(b.appearance, b.motion, b.questions, b.lengths, b.answers,
                                   teacher_outputs=t_outs).loss)
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=1e-6, atol=1e-7)
    for x, y in zip(steps[0].model.parameters(), steps[1].model.parameters()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- on disk


def _prepare(store, trec, teacher, split, tiny, keys=("logits", "video")):
    return TC.prepare(store, [trec], [teacher], [list(keys)], split, tiny.features, tiny.data_id,
                      torch.device("cpu"))


def _expected(teacher, split, tiny, key):
    b = next(D.iterate_batches(split, tiny.features, len(split)))
    with torch.no_grad():
        return teacher(b.appearance, b.motion, b.questions, b.lengths)[key]


def test_cache_files_manifest_and_values(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    split = _head(tiny.splits["train"], N_ROWS)
    trec, teacher = _fake_teacher(store, tiny)
    cache = _prepare(store, trec, teacher, split, tiny)
    npy, man = TC.cache_paths(store, trec["run_id"], tiny.data_id, "train", "fp32", "cpu", "video")
    m = json.loads(man.read_text())
    assert m["teacher_run"] == trec["run_id"] and m["data_id"] == tiny.data_id and m["split"] == "train"
    assert m["key"] == "video" and m["dtype"] == "float32" and m["shape"] == [N_ROWS, 64]
    assert m["rows"] == N_ROWS and m["nbytes"] == npy.stat().st_size and m["build_keys"] == ["logits", "video"]
    assert sorted(p.name for p in TC.cache_dir(store, trec["run_id"]).glob("*.npy")) == \
        sorted(f"{tiny.data_id}-train-fp32-cpu-{k}.npy" for k in ("logits", "video"))
    idx = torch.tensor([5, 0, N_ROWS - 1, 17])
    got = cache.gather(idx)[0]
    assert set(got) == {"logits", "video"}
    for k in got:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], _expected(teacher, split, tiny, k)[idx], rtol=1e-6, atol=1e-7)
    # streamed (as on a GPU too small to hold it): the same rows
    streamed = dataclasses.replace(cache, streaming=True).gather(idx)[0]
    assert all(torch.equal(streamed[k], got[k]) for k in got)
    # used as it is the second time: no build
    again = _prepare(store, trec, teacher, split, tiny)
    assert again.info[0]["build_s_now"] == 0.0
    assert not any(f["built_now"] for f in again.info[0]["files"])


def _build_id(store, trec, tiny, key):
    man = TC.cache_paths(store, trec["run_id"], tiny.data_id, "train", "fp32", "cpu", key)[1]
    try:
        return json.loads(man.read_text())["build_id"]
    except (OSError, ValueError):
        return None


def _rebuilds(store, trec, teacher, split, tiny, match: str):
    before = {k: _build_id(store, trec, tiny, k) for k in ("logits", "video")}
    with pytest.warns(UserWarning, match=match):
        cache = _prepare(store, trec, teacher, split, tiny)
    rebuilt = [f for f in cache.info[0]["files"] if f["built_now"]]
    assert rebuilt and all(f["build_id"] != before[f["key"]] for f in rebuilt)
    idx = torch.arange(len(split))
    for k, v in cache.gather(idx)[0].items():
        torch.testing.assert_close(v, _expected(teacher, split, tiny, k), rtol=1e-6, atol=1e-7)


def test_damaged_partial_or_stale_cache_is_rebuilt_never_used(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    split = _head(tiny.splits["train"], N_ROWS)
    trec, teacher = _fake_teacher(store, tiny)
    _prepare(store, trec, teacher, split, tiny)
    npy, man = TC.cache_paths(store, trec["run_id"], tiny.data_id, "train", "fp32", "cpu", "logits")
    # a flipped byte in the data
    raw = bytearray(npy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npy.write_bytes(bytes(raw))
    _rebuilds(store, trec, teacher, split, tiny, "sha1 differs")
    # a truncated file
    npy.write_bytes(npy.read_bytes()[:-100])
    _rebuilds(store, trec, teacher, split, tiny, "bytes, the manifest says")
    # a build that did not finish: the data there, no manifest
    man.unlink()
    _rebuilds(store, trec, teacher, split, tiny, "no manifest")
    # an unreadable manifest
    man.write_text("{not json")
    _rebuilds(store, trec, teacher, split, tiny, "unreadable manifest")
    # the teacher run retrained (other weights under the same run id): stale
    torch.manual_seed(99)
    teacher2 = variants.build(variants.VariantConfig(**trec["variant_config"])).eval().requires_grad_(False)
    atomic_torch_save(store.run_dir(trec["run_id"]) / "best.pt", teacher2.state_dict())
    _rebuilds(store, trec, teacher2, split, tiny, "teacher_weights_sha1")
    # other data (another data set id or split size): other files or a rebuild, never these values
    small = _head(tiny.splits["train"], N_ROWS - 10)
    _rebuilds(store, trec, teacher2, small, tiny, f"rows is {N_ROWS}, expected {N_ROWS - 10}")


def test_a_build_that_fails_midway_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    split = _head(tiny.splits["train"], N_ROWS)
    trec, teacher = _fake_teacher(store, tiny)
    calls = {"n": 0}
    forward = teacher.forward

    def dies_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return forward(*a, **k)

    monkeypatch.setattr(teacher, "forward", dies_on_second_batch)
    monkeypatch.setattr(TC, "BUILD_BATCH", 64)
    with pytest.raises(KeyboardInterrupt):
        _prepare(store, trec, teacher, split, tiny)
    d = TC.cache_dir(store, trec["run_id"])
    assert not list(d.glob("*.npy")) and not list(d.glob("*.json")) and not list(d.glob(".*.tmp"))
    monkeypatch.undo()
    cache = _prepare(store, trec, teacher, split, tiny)
    assert all(f["built_now"] for f in cache.info[0]["files"])


def test_an_output_that_is_not_a_row_per_question_is_refused(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    split = _head(tiny.splits["train"], N_ROWS)
    trec, teacher = _fake_teacher(store, tiny)
    with pytest.raises(TC.TeacherCacheError, match="'common_app'.*list.*--no-teacher-cache"):
        _prepare(store, trec, teacher, split, tiny, keys=["common_app"])
    assert issubclass(TC.TeacherCacheError, HarnessError)


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One store: teacher-g4 trained, student-logits trained from the cache (which it builds),
    stopped after its first epoch and resumed (a second process reading the same cache)."""
    store = ResultsStore(tmp_path_factory.mktemp("tc") / "results")
    with pytest.raises(RunPruned):  # stopped after its first epoch (the teacher trains whole)
        train(RunSpec("student-logits", **FAST), store, data=tiny, device="cpu", progress=False,
              on_epoch=lambda epoch, acc: True)
    rec = train(RunSpec("student-logits", **FAST), store, data=tiny, device="cpu", progress=False)
    preds = pd.read_csv(store.run_dir(rec["run_id"]) / "predictions_test.csv")
    return store, rec, preds


@pytest.mark.slow
def test_student_trained_from_the_cache_gives_the_same_predictions(tiny, trained):
    store, cached, cached_preds = trained
    tc = cached["training_compute"]
    assert tc["teacher_cache"]["used"] and tc["teacher_step_samples"] == 0
    (build,) = tc["teacher_cache"]["builds"]
    assert build["keys"] == ["logits"] and build["built_by_this_run"] and build["rows"] == len(tiny.splits["train"])
    # the same run (the cache is not part of its id), retrained running the teacher every step
    plain = train(RunSpec("student-logits", **FAST), store, data=tiny, device="cpu", progress=False, force=True,
                  teacher_cache=False)
    assert plain["run_id"] == cached["run_id"]
    assert not plain["training_compute"]["teacher_cache"]["used"]
    assert plain["training_compute"]["teacher_step_samples"] == 2 * len(tiny.splits["train"])
    assert [h["loss"] for h in plain["history"]] == [h["loss"] for h in cached["history"]]
    assert plain["metrics"]["test"] == cached["metrics"]["test"]
    preds = pd.read_csv(store.run_dir(plain["run_id"]) / "predictions_test.csv")
    assert (preds["pred_best"] == cached_preds["pred_best"]).all()
    assert (preds["pred_last"] == cached_preds["pred_last"]).all()


@pytest.mark.slow
def test_students_of_one_teacher_run_share_its_cache(tiny, trained, monkeypatch):
    store, first, _ = trained

    def no_build(*a, **k):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(TC, "_build", no_build)
    other = train(RunSpec("student-dkd", **FAST), store, data=tiny, device="cpu", progress=False)
    assert other["teacher_runs"] == first["teacher_runs"]
    (b1,) = first["training_compute"]["teacher_cache"]["builds"]
    (b2,) = other["training_compute"]["teacher_cache"]["builds"]
    assert b2["build_id"] == b1["build_id"] and not b2["built_by_this_run"]
    assert other["training_compute"]["cache_build_s"] == 0.0
    # both bills carry the same build and the same teacher, each once
    bill = training_bill(store, other)
    assert [c["build_id"] for c in bill["caches"]] == [b1["build_id"]]
    assert [t["run_id"] for t in bill["teachers"]] == first["teacher_runs"]


def test_cli_run_no_teacher_cache_reaches_the_runner(monkeypatch, tmp_path, data_cache):
    import ablate
    import harness.training.runner as R

    seen = {}

    def fake_train(*a, **k):
        seen.update(k)
        raise HarnessError("stop here")

    monkeypatch.setattr(R, "train", fake_train)
    for flag, want in (([], True), (["--no-teacher-cache"], False)):
        r = CliRunner().invoke(ablate.app, ["run", "student-logits", "--results", str(tmp_path), *flag])
        assert r.exit_code == 2 and "stop here" in r.output
        assert seen["teacher_cache"] is want


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_cache_is_read_through_a_memory_map_not_copied(tiny, tmp_path):
    """On the CPU the cache's tensors are the file's pages (held once, by the OS page cache),
    so an MSVD-QA-sized key (0.76 GB) is never held twice: their data lies in a mapping of the
    .npy file."""
    store = ResultsStore(tmp_path)
    split = _head(tiny.splits["train"], N_ROWS)
    trec, teacher = _fake_teacher(store, tiny)
    cache = _prepare(store, trec, teacher, split, tiny)
    assert not cache.streaming
    maps = open("/proc/self/maps").read().splitlines()
    for k, t in cache.tables[0].items():
        npy = TC.cache_paths(store, trec["run_id"], tiny.data_id, "train", "fp32", "cpu", k)[0]
        ptr = t.untyped_storage().data_ptr()
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps if line.endswith(str(npy))]
        assert any(lo <= ptr < hi for lo, hi in spans), (k, npy)
