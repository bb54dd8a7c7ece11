"""Tests for harness.data.synthetic (the synthetic HCRN/DualVGR-format data set writer)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so that plain `pytest` works as well as `python -m pytest`
    sys.path.insert(0, str(ROOT))

from harness.data import synthetic as syn  # noqa: E402

QUESTION_KEYS = {"questions", "questions_len", "video_ids", "question_id", "answers", "glove"}


# --------------------------------------------------------------------------- helpers


def _load_pt(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def _load_all(d: Path, name: str = "synthetic") -> dict:
    files = syn.dataset_files(d, name)
    out: dict = {}
    with h5py.File(files["appearance"], "r") as f:
        out["app"] = f["resnet_features"][:]
        out["app_ids"] = f["ids"][:]
    with h5py.File(files["motion"], "r") as f:
        out["mot"] = f["resnext_features"][:]
        out["mot_ids"] = f["ids"][:]
    out["vocab"] = json.loads(files["vocab"].read_text())
    out["meta"] = json.loads(files["meta"].read_text())
    for split in syn.SPLITS:
        out[split] = _load_pt(files[split])
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("tiny") / "data", "tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> dict:
    return _load_all(tiny_dir)


# --------------------------------------------------------------------------- format


def test_presets():
    msvd = syn.PRESETS["msvd"]
    assert (msvd.n_videos, msvd.n_clips, msvd.n_frames, msvd.vision_dim) == (1970, 8, 16, 2048)
    assert (msvd.n_train, msvd.n_val, msvd.n_test) == (30933, 6415, 13157)
    assert (msvd.question_vocab, msvd.answer_vocab, msvd.word_dim) == (4000, 1000, 300)
    assert msvd.suggested_module_dim == 768
    t = syn.PRESETS["tiny"]
    assert (t.question_vocab, t.answer_vocab, t.vision_dim, t.word_dim) == (100, 50, 128, 32)
    assert (t.n_clips, t.n_frames, t.suggested_module_dim) == (4, 4, 64)
    assert set(syn.PRESETS) == {"tiny", "small", "msvd", "tiny-mc", "tiny-count"}
    for key, p in syn.PRESETS.items():
        assert p.name == key
        # vocabularies of every preset (cheap, no features) have the exact sizes
        v = syn.make_vocab(p, syn.make_layout(p))
        assert len(v["question_token_to_idx"]) == p.question_vocab
        assert len(v["answer_token_to_idx"]) == p.answer_vocab


def test_files_and_features(tiny_dir, tiny):
    p = syn.PRESETS["tiny"]
    names = sorted(x.name for x in tiny_dir.iterdir())
    assert names == sorted(
        ["synthetic_appearance_feat.h5", "synthetic_motion_feat.h5", "synthetic_vocab.json",
         "synthetic_train_questions.pt", "synthetic_val_questions.pt",
         "synthetic_test_questions.pt", "synthetic_meta.json"]
    )  # and no temporary files left behind
    with h5py.File(tiny_dir / "synthetic_appearance_feat.h5", "r") as f:
        assert set(f.keys()) == {"resnet_features", "ids"}
    with h5py.File(tiny_dir / "synthetic_motion_feat.h5", "r") as f:
        assert set(f.keys()) == {"resnext_features", "ids"}
    app, mot = tiny["app"], tiny["mot"]
    assert app.dtype == np.float32 and app.shape == (p.n_videos, p.n_clips, p.n_frames, p.vision_dim)
    assert mot.dtype == np.float32 and mot.shape == (p.n_videos, p.n_clips, p.vision_dim)
    assert np.isfinite(app).all() and np.isfinite(mot).all()
    assert 0.5 < app.std() < 2.0 and 0.5 < mot.std() < 2.0
    ids = tiny["app_ids"]
    assert ids.dtype == np.int64 and ids.shape == (p.n_videos,)
    assert np.array_equal(ids, tiny["mot_ids"])  # same ids, same order
    assert len(np.unique(ids)) == p.n_videos
    assert not np.array_equal(np.sort(ids), np.arange(p.n_videos))  # ids are not row numbers
    assert not np.array_equal(ids, np.sort(ids))  # and not sorted


def test_vocab(tiny):
    p = syn.PRESETS["tiny"]
    v = tiny["vocab"]
    assert set(v) == {"question_token_to_idx", "answer_token_to_idx", "question_answer_token_to_idx"}
    q, a, qa = v["question_token_to_idx"], v["answer_token_to_idx"], v["question_answer_token_to_idx"]
    assert len(q) == p.question_vocab and len(a) == p.answer_vocab
    for d in (q, a, qa):
        assert sorted(d.values()) == list(range(len(d)))  # dense, unique indices
    assert q["<NULL>"] == 0 and q["<UNK>"] == 1
    assert qa["<NULL>"] == 0 and qa["<UNK>"] == 1
    assert set(qa) == set(q) | set(a)
    for w in syn.QUESTION_WORDS:
        assert w in q
    assert any(t.startswith("w_") for t in q)
    for prefix in ("obj_", "act_", "scene_"):
        assert any(t.startswith(prefix) for t in a)
    for b in syn.TIME_BUCKETS:
        assert b in a


def test_questions(tiny):
    p = syn.PRESETS["tiny"]
    q_vocab = tiny["vocab"]["question_token_to_idx"]
    qword_ids = {q_vocab[w] for w in syn.QUESTION_WORDS}
    ids = set(tiny["app_ids"].tolist())
    counts = {"train": p.n_train, "val": p.n_val, "test": p.n_test}
    all_qids, split_videos = [], {}
    glove = tiny["train"]["glove"]
    assert glove.dtype == np.float32 and glove.shape == (p.question_vocab, p.word_dim)
    for split in syn.SPLITS:
        d = tiny[split]
        assert set(d) == QUESTION_KEYS
        n = counts[split]
        qs, ql = d["questions"], d["questions_len"]
        assert qs.dtype == np.int64 and qs.ndim == 2 and qs.shape[0] == n
        for k in ("questions_len", "video_ids", "question_id", "answers"):
            assert d[k].dtype == np.int64 and d[k].shape == (n,), k
        assert np.array_equal(d["glove"], glove)
        assert ql.min() >= 3 and ql.max() == qs.shape[1]
        assert len(np.unique(ql)) >= 5  # ragged
        pos = np.arange(qs.shape[1])[None, :]
        assert (qs[pos >= ql[:, None]] == 0).all()  # padding after the tokens
        assert (qs[pos < ql[:, None]] >= 2).all()  # real tokens inside
        assert qs.max() < p.question_vocab
        assert set(np.unique(qs[:, 0]).tolist()) == qword_ids  # every type present
        assert set(d["video_ids"].tolist()) <= ids
        assert d["answers"].min() >= 2 and d["answers"].max() < p.answer_vocab
        all_qids.append(d["question_id"])
        split_videos[split] = set(d["video_ids"].tolist())
    all_qids = np.concatenate(all_qids)
    assert len(np.unique(all_qids)) == len(all_qids)
    # disjoint video sets per split, about 60/15/25
    assert not split_videos["train"] & split_videos["val"]
    assert not split_videos["train"] & split_videos["test"]
    assert not split_videos["val"] & split_videos["test"]
    assert len(split_videos["train"]) > len(split_videos["test"]) > len(split_videos["val"])
    # videos are shared by several questions
    assert p.n_train / len(split_videos["train"]) > 5


def test_answers_follow_question_types(tiny):
    """Each question word has its own answer group (objects / actions / scenes / time)."""
    q_vocab = tiny["vocab"]["question_token_to_idx"]
    inv_a = {i: t for t, i in tiny["vocab"]["answer_token_to_idx"].items()}
    d = tiny["train"]
    expect = {"what": "obj_", "who": "obj_", "how": "act_", "where": "scene_"}
    for w, prefix in expect.items():
        ans = d["answers"][d["questions"][:, 0] == q_vocab[w]]
        assert all(inv_a[int(a)].startswith(prefix) for a in ans), w
    ans = d["answers"][d["questions"][:, 0] == q_vocab["when"]]
    assert {inv_a[int(a)] for a in ans} == set(syn.TIME_BUCKETS)


def test_meta(tiny_dir, tiny):
    m = tiny["meta"]
    assert m["generator"] == "harness.data.synthetic"
    assert m["preset"] == "tiny" and m["seed"] == 0 and m["name"] == "synthetic"
    assert m["suggested_model"] == {"module_dim": 64}
    assert m["question_types"] == list(syn.QUESTION_WORDS)
    assert isinstance(m["story"], str) and m["story"]
    files = syn.dataset_files(tiny_dir)
    meta_mtime = files["meta"].stat().st_mtime_ns
    assert all(f.stat().st_mtime_ns <= meta_mtime for f in files.values())  # meta last


# --------------------------------------------------------------------------- behaviour


def test_determinism(tmp_path, tiny_dir, tiny):
    again = _load_all(syn.generate(tmp_path / "same", "tiny", seed=0, progress=False))
    other = _load_all(syn.generate(tmp_path / "other", "tiny", seed=1, progress=False))
    for key in ("app", "app_ids", "mot"):
        assert np.array_equal(tiny[key], again[key]), key
        assert not np.array_equal(tiny[key], other[key]), key
    assert tiny["vocab"] == again["vocab"]
    for split in syn.SPLITS:
        for k in QUESTION_KEYS:
            assert np.array_equal(tiny[split][k], again[split][k]), (split, k)
        for k in ("questions", "video_ids", "answers"):
            a, b = tiny[split][k], other[split][k]
            assert a.shape != b.shape or not np.array_equal(a, b), (split, k)
    assert not np.array_equal(tiny["train"]["glove"], other["train"]["glove"])
    # the pickles and the vocab are byte-identical too
    for key in (*syn.SPLITS, "vocab"):
        assert syn.dataset_files(tiny_dir)[key].read_bytes() == (
            syn.dataset_files(tmp_path / "same")[key].read_bytes()), key


def test_existing_complete_dir_is_not_rewritten(tmp_path):
    d = syn.generate(tmp_path / "d", "tiny", seed=5, progress=False)
    files = syn.dataset_files(d)
    past = 1_000_000_000  # force old mtimes so that any rewrite would be visible
    for f in files.values():
        os.utime(f, (past, past))
    assert syn.generate(d, "tiny", seed=5, progress=False) == d
    assert all(f.stat().st_mtime == past for f in files.values())
    assert syn.is_complete(d, "tiny", 5)
    # a different seed rewrites it; a different name writes alongside
    assert not syn.is_complete(d, "tiny", 6)
    syn.generate(d, "tiny", seed=6, progress=False)
    assert json.loads(files["meta"].read_text())["seed"] == 6
    assert files["appearance"].stat().st_mtime != past
    # an incomplete directory (no meta) is regenerated
    files["meta"].unlink()
    syn.generate(d, "tiny", seed=6, progress=False)
    assert syn.is_complete(d, "tiny", 6)


def test_killed_run_leaves_no_complete_looking_dir(tmp_path, monkeypatch):
    d = tmp_path / "crash"

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    original = syn.atomic_write_bytes
    calls = []

    def write_then_die(path, data):
        calls.append(path)
        if len(calls) == 3:  # after the features, the vocab and one question file
            boom()
        original(path, data)

    monkeypatch.setattr(syn, "atomic_write_bytes", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        syn.generate(d, "tiny", seed=0, progress=False)
    assert not syn.dataset_files(d)["meta"].exists()
    assert not syn.is_complete(d, "tiny", 0)
    assert not [x for x in d.iterdir() if ".tmp" in x.name]
    monkeypatch.setattr(syn, "_write_features", boom)
    with pytest.raises(KeyboardInterrupt):
        syn.generate(d, "tiny", seed=0, progress=False)
    assert not [x for x in d.iterdir() if ".tmp" in x.name]
    monkeypatch.undo()
    syn.generate(d, "tiny", seed=0, progress=False)
    assert syn.is_complete(d, "tiny", 0)


# --------------------------------------------------------------------------- learnability


def _features(data: dict, split: str):
    """(bag of question tokens, video features, answers, question word) for one split."""
    d = data[split]
    n_q = len(data["vocab"]["question_token_to_idx"])
    qs, ql = d["questions"], d["questions_len"]
    bow = np.zeros((len(qs), n_q), np.float32)
    mask = np.arange(qs.shape[1])[None, :] < ql[:, None]
    rows = np.repeat(np.arange(len(qs)), mask.sum(1))
    bow[rows, qs[mask]] = 1.0
    row_of = {int(v): r for r, v in enumerate(data["app_ids"])}
    r = np.array([row_of[int(v)] for v in d["video_ids"]])
    app, mot = data["app"][r], data["mot"][r]
    clip_app = app.mean(2)  # (N, clips, dim)
    video = np.concatenate(
        [app.mean((1, 2)), mot.mean(1), clip_app.reshape(len(r), -1), mot.reshape(len(r), -1)], 1
    )
    return bow, video.astype(np.float32), d["answers"], qs[:, 0]


def _logreg(x_tr, y_tr, x_te, n_classes, steps=300):
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt, xe = torch.from_numpy((x_tr - mu) / sd), torch.from_numpy((x_te - mu) / sd)
    torch.manual_seed(0)
    lin = torch.nn.Linear(xt.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-3)
    y = torch.from_numpy(y_tr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xt), y).backward()
        opt.step()
    with torch.no_grad():
        return lin(xe).argmax(1).numpy()


@pytest.mark.slow
def test_learnability_video_beats_question_only(tiny):
    n_ans = len(tiny["vocab"]["answer_token_to_idx"])
    q_vocab = tiny["vocab"]["question_token_to_idx"]
    bow_tr, vid_tr, y_tr, _ = _features(tiny, "train")
    bow_te, vid_te, y_te, first = _features(tiny, "test")
    pred_q = _logreg(bow_tr, y_tr, bow_te, n_ans)
    pred_v = _logreg(np.concatenate([bow_tr, vid_tr], 1), y_tr,
                     np.concatenate([bow_te, vid_te], 1), n_ans)
    acc_q, acc_v = (pred_q == y_te).mean(), (pred_v == y_te).mean()
    per_q, per_v = {}, {}
    for w in syn.QUESTION_WORDS:
        m = first == q_vocab[w]
        per_q[w] = float((pred_q[m] == y_te[m]).mean())
        per_v[w] = float((pred_v[m] == y_te[m]).mean())
    print(f"\nquestion-only {acc_q:.3f} {per_q}\nvideo-aware   {acc_v:.3f} {per_v}")
    assert acc_v - acc_q >= 0.15
    assert len({round(a, 3) for a in per_v.values()}) > 1
    assert max(per_v.values()) - min(per_v.values()) >= 0.15  # types differ in difficulty
    for w in ("who", "how", "where"):  # whole-video evidence is clearly usable
        assert per_v[w] > per_q[w] + 0.15, w


# --------------------------------------------------------------------------- CLI


def test_cli(tmp_path):
    from typer.testing import CliRunner

    app = syn._make_app()
    runner = CliRunner()
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    for word in ("--out", "--preset", "--seed", "--name", "tiny", "small", "msvd"):
        assert word in res.output, word
    res = runner.invoke(app, ["--out", str(tmp_path / "cli"), "--preset", "tiny", "--seed", "2",
                              "--name", "toy", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert syn.is_complete(tmp_path / "cli", "tiny", 2, name="toy")
    assert (tmp_path / "cli" / "toy_appearance_feat.h5").exists()
    res = runner.invoke(app, ["--out", str(tmp_path / "x"), "--preset", "huge"])
    assert res.exit_code != 0


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "harness.data.synthetic", "--help"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "msvd" in res.stdout and "tiny" in res.stdout
