"""The feature-format loader: reads the HCRN/DualVGR format and rejects bad input with a message
that names the file and what is wrong (one test per case)."""
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from harness.data import dataset as D

WORDS = ["<NULL>", "<UNK>", "what", "who", "how", "when", "where", "is", "the", "man", "doing", "why"]


def write_dataset(root: Path, name="toy", *, n_videos=6, clips=3, frames=2, dim=5, answers=4,
                  app=None, motion=None, app_ids=None, motion_ids=None, split_edit=None, vocab_edit=None,
                  app_key="resnet_features", motion_key="resnext_features", skip=()):
    """A small valid data set; the keyword arguments break it in controlled ways."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = np.arange(100, 100 + n_videos)
    app = rng.standard_normal((n_videos, clips, frames, dim)).astype(np.float32) if app is None else app
    motion = rng.standard_normal((n_videos, clips, dim)).astype(np.float32) if motion is None else motion
    with h5py.File(root / f"{name}_appearance_feat.h5", "w") as f:
        f[app_key] = app
        f["ids"] = ids if app_ids is None else app_ids
    with h5py.File(root / f"{name}_motion_feat.h5", "w") as f:
        f[motion_key] = motion
        f["ids"] = ids if motion_ids is None else motion_ids
    vocab = {"question_token_to_idx": {w: i for i, w in enumerate(WORDS)},
             "answer_token_to_idx": {f"a{i}": i for i in range(answers)},
             "question_answer_token_to_idx": {w: i for i, w in enumerate(WORDS)}}
    if vocab_edit:
        vocab_edit(vocab)
    (root / f"{name}_vocab.json").write_text(json.dumps(vocab))
    glove = rng.standard_normal((len(WORDS), 7)).astype(np.float32)
    for s, split in enumerate(D.SPLITS):
        first = [2, 3, 4, 5, 6, 11, 2, 7]  # what who how when where why(other) what is(other)
        n = len(first)
        q = np.zeros((n, 5), dtype=np.int64)
        lens = np.array([1, 2, 3, 4, 5, 3, 2, 1])
        for i in range(n):
            q[i, 0] = first[i]
            q[i, 1:lens[i]] = rng.integers(7, 12, lens[i] - 1)
        obj = {"questions": q, "questions_len": lens, "video_ids": ids[np.arange(n) % n_videos],
               "question_id": np.arange(n) + 1000 * s, "answers": np.arange(n) % answers, "glove": glove}
        if split_edit:
            split_edit(split, obj)
        for k in skip:
            obj.pop(k, None)
        with open(root / f"{name}_{split}_questions.pt", "wb") as f:
            pickle.dump(obj, f)
    return root


def test_loads_a_valid_dataset(tmp_path):
    d = D.load(write_dataset(tmp_path / "ok"))
    assert d.name == "toy"
    assert d.dims == {"question_vocab": 12, "answer_vocab": 4, "vision_dim": 5, "word_dim": 7, "num_clips": 3,
                      "num_frames": 2}
    tr = d.splits["train"]
    assert len(tr) == 8 and tr.questions.dtype == torch.int64
    # question types from the first word; anything else is "other"
    assert d.type_names == ["what", "who", "how", "when", "where", "other"]
    assert [d.type_names[t] for t in tr.qtypes.tolist()] == ["what", "who", "how", "when", "where", "other",
                                                             "what", "other"]
    # video rows index the feature arrays by id
    assert tr.video_rows.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert d.glove.shape == (12, 7)


def test_question_category_is_used_when_present(tmp_path):
    cats = ["count", "exist", "count", "query_color", "exist", "count", "count", "exist"]

    def edit(split, obj):
        obj["question_category"] = cats

    d = D.load(write_dataset(tmp_path / "svqa", split_edit=edit))
    assert d.type_names == ["count", "exist", "query_color"]
    assert [d.type_names[t] for t in d.splits["test"].qtypes.tolist()] == cats


def test_explicit_file_names(tmp_path):
    root = write_dataset(tmp_path / "x", name="weird")
    (root / "other_vocab.json").write_text("{}")
    with pytest.raises(D.DataError, match=r"cannot tell the data set name: expected exactly one \*_vocab.json"):
        D.load(root)
    assert D.load(root, name="weird").name == "weird"
    # files with any names, given one by one
    for p in list(root.glob("weird_*")):
        p.rename(root / p.name.replace("weird_", "").replace("_feat", "").upper())
    d = D.load(root, name="weird", appearance=root / "APPEARANCE.H5", motion=root / "MOTION.H5",
               vocab=root / "VOCAB.JSON", questions={s: root / f"{s.upper()}_QUESTIONS.PT" for s in D.SPLITS})
    assert len(d.splits["val"]) == 8


@pytest.mark.parametrize("victim,what", [
    ("toy_appearance_feat.h5", "appearance feature file"),
    ("toy_motion_feat.h5", "motion feature file"),
    ("toy_vocab.json", "vocab file"),
    ("toy_val_questions.pt", "val questions file"),
])
def test_missing_file(tmp_path, victim, what):
    root = write_dataset(tmp_path / "m")
    (root / victim).unlink()
    with pytest.raises(D.DataError, match=f"{what} .*{victim}.* does not exist"):
        D.load(root, name="toy")


def test_missing_h5_dataset(tmp_path):
    root = write_dataset(tmp_path / "h", app_key="features")
    with pytest.raises(D.DataError, match=r"toy_appearance_feat.h5: missing HDF5 dataset 'resnet_features'"):
        D.load(root)


def test_missing_motion_ids(tmp_path):
    root = write_dataset(tmp_path / "h")
    with h5py.File(root / "toy_motion_feat.h5", "a") as f:
        del f["ids"]
    with pytest.raises(D.DataError, match=r"toy_motion_feat.h5: missing HDF5 dataset 'ids'"):
        D.load(root)


def test_missing_pickle_key(tmp_path):
    root = write_dataset(tmp_path / "p", skip=("glove",))
    with pytest.raises(D.DataError, match=r"toy_train_questions.pt: missing key\(s\) 'glove'"):
        D.load(root)


def test_missing_vocab_key(tmp_path):
    root = write_dataset(tmp_path / "v", vocab_edit=lambda v: v.pop("answer_token_to_idx"))
    with pytest.raises(D.DataError, match=r"toy_vocab.json: missing key 'answer_token_to_idx'"):
        D.load(root)


def test_ids_disagree(tmp_path):
    root = write_dataset(tmp_path / "i", motion_ids=np.array([100, 101, 102, 103, 105, 104]))
    with pytest.raises(D.DataError, match=r"video ids disagree between .*toy_appearance_feat.h5 and "
                                          r".*toy_motion_feat.h5: row 4 is id 104 in one and 105"):
        D.load(root)


def test_question_video_without_features(tmp_path):
    def edit(split, obj):
        if split == "val":
            obj["video_ids"] = obj["video_ids"].copy()
            obj["video_ids"][3] = 999

    root = write_dataset(tmp_path / "q", split_edit=edit)
    with pytest.raises(D.DataError, match=r"toy_val_questions.pt: question 3 \(question_id 1003\) refers to video "
                                          r"id 999, which has no features"):
        D.load(root)


def test_clip_count_mismatch(tmp_path):
    root = write_dataset(tmp_path / "c", motion=np.zeros((6, 4, 5), np.float32))
    with pytest.raises(D.DataError, match=r"clip counts disagree: .*appearance_feat.h5 has 3 clips .*"
                                          r"motion_feat.h5 has 4"):
        D.load(root)


def test_feature_dim_mismatch(tmp_path):
    root = write_dataset(tmp_path / "d", motion=np.zeros((6, 3, 9), np.float32))
    with pytest.raises(D.DataError, match=r"feature dims disagree: .*has dim 5, .*motion_feat.h5 has dim 9"):
        D.load(root)


def test_feature_rank_wrong(tmp_path):
    root = write_dataset(tmp_path / "r", app=np.zeros((6, 3, 5), np.float32))
    with pytest.raises(D.DataError,
                       match=r"'resnet_features' must be \(videos, clips, frames, dim\), got shape \(6, 3, 5\)"):
        D.load(root)


def test_shape_mismatch_with_model_config(tmp_path):
    d = D.load(write_dataset(tmp_path / "mc"))
    with pytest.raises(D.DataError, match=r"model setting num_clips=8 does not match the data \(num_clips=3, "
                                          r"from .*toy_appearance_feat.h5"):
        d.check_model_config({"num_clips": 8})
    with pytest.raises(D.DataError, match=r"vision_dim=2048 does not match the data \(vision_dim=5"):
        d.check_model_config({"vision_dim": 2048})
    with pytest.raises(D.DataError, match=r"num_frames=16 does not match the data \(num_frames=2"):
        d.check_model_config({"num_frames": 16})
    d.check_model_config({"num_clips": 3, "vision_dim": 5, "module_dim": 64})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_non_finite_features(tmp_path, bad, mode):
    app = np.ones((6, 3, 2, 5), np.float32)
    app[4, 1, 0, 2] = bad
    root = write_dataset(tmp_path / f"n{mode}", app=app)
    with pytest.raises(D.DataError, match=r"toy_appearance_feat.h5: 'resnet_features' has NaN or Inf values "
                                          r"\(first at video row 4\)"):
        D.load(root, mode=mode)


def test_token_outside_vocab(tmp_path):
    def edit(split, obj):
        if split == "test":
            obj["questions"] = obj["questions"].copy()
            obj["questions"][5, 1] = 12

    root = write_dataset(tmp_path / "t", split_edit=edit)
    with pytest.raises(D.DataError, match=r"toy_test_questions.pt: token id 12 in question 5 \(question_id 2005\) "
                                          r"is outside the question vocabulary of 12 tokens"):
        D.load(root)


def test_answer_outside_vocab(tmp_path):
    def edit(split, obj):
        if split == "train":
            obj["answers"] = obj["answers"].copy()
            obj["answers"][2] = 4

    root = write_dataset(tmp_path / "a", split_edit=edit)
    with pytest.raises(D.DataError, match=r"toy_train_questions.pt: answer id 4 of question 2 \(question_id 2\) "
                                          r"is outside the answer vocabulary of 4 answers"):
        D.load(root)


def test_empty_split(tmp_path):
    def edit(split, obj):
        if split == "val":
            for k in ("questions_len", "video_ids", "question_id", "answers"):
                obj[k] = obj[k][:0]
            obj["questions"] = obj["questions"][:0]

    root = write_dataset(tmp_path / "e", split_edit=edit)
    with pytest.raises(D.DataError, match=r"toy_val_questions.pt: the val split is empty"):
        D.load(root)


def test_bad_question_length(tmp_path):
    def edit(split, obj):
        obj["questions_len"] = obj["questions_len"].copy()
        obj["questions_len"][1] = 0

    root = write_dataset(tmp_path / "l", split_edit=edit)
    with pytest.raises(D.DataError, match=r"questions_len\[1\] = 0 is outside 1..5"):
        D.load(root)


def test_length_mismatch_between_keys(tmp_path):
    def edit(split, obj):
        obj["answers"] = obj["answers"][:-1]

    root = write_dataset(tmp_path / "k", split_edit=edit)
    with pytest.raises(D.DataError, match=r"'answers' has 7 entries but 'questions' has 8"):
        D.load(root)


def test_not_a_pickle(tmp_path):
    root = write_dataset(tmp_path / "np")
    (root / "toy_train_questions.pt").write_bytes(b"not a pickle")
    with pytest.raises(D.DataError, match=r"toy_train_questions.pt: cannot unpickle"):
        D.load(root)


def test_bad_spec():
    with pytest.raises(D.DataError, match="unknown preset 'huge'"):
        D.load("synthetic:huge")
    with pytest.raises(D.DataError, match="does not exist"):
        D.load("/nonexistent/dir")


def test_streaming_batches_equal_memory_batches(tmp_path):
    root = write_dataset(tmp_path / "s")
    mem, stream = D.load(root, mode="memory"), D.load(root, mode="stream")
    assert stream.features.streaming and not mem.features.streaming
    split = mem.splits["train"]
    for g_seed in (0, 1):
        a = list(D.iterate_batches(split, mem.features, 3, shuffle=True,
                                   generator=torch.Generator().manual_seed(g_seed)))
        b = list(D.iterate_batches(stream.splits["train"], stream.features, 3, shuffle=True,
                                   generator=torch.Generator().manual_seed(g_seed)))
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                assert torch.equal(u, v)


def test_batches_cover_the_split_once(tmp_path):
    d = D.load(write_dataset(tmp_path / "b"))
    split = d.splits["train"]
    seen = torch.cat([b.index for b in D.iterate_batches(split, d.features, 3, shuffle=True,
                                                           generator=torch.Generator().manual_seed(5))])
    assert sorted(seen.tolist()) == list(range(len(split)))
    b = next(D.iterate_batches(split, d.features, 4))
    assert b.appearance.shape == (4, 3, 2, 5) and b.motion.shape == (4, 3, 5)
    # features follow the question's video
    assert torch.equal(b.appearance[1], d.features.appearance[split.video_rows[1]])


def test_torch_zip_questions_and_bad_glove_and_meta_are_named(tmp_path):
    root = write_dataset(tmp_path / "z")
    obj = pickle.load(open(root / "toy_train_questions.pt", "rb"))
    torch.save(obj, root / "toy_train_questions.pt")
    with pytest.raises(D.DataError, match=r"toy_train_questions.pt: a torch.save zip archive, not the pickle"):
        D.load(root)

    def nan_glove(split, obj):
        obj["glove"] = obj["glove"].copy()
        obj["glove"][3, 1] = np.nan
    with pytest.raises(D.DataError, match=r"toy_train_questions.pt: 'glove' has NaN or Inf values \(first at row 3"):
        D.load(write_dataset(tmp_path / "g", split_edit=nan_glove))
    root = write_dataset(tmp_path / "m")
    (root / "toy_meta.json").write_text("{broken")
    with pytest.raises(D.DataError, match=r"toy_meta.json: not valid JSON"):
        D.load(root)


class _RunsACommand:
    """A pickle whose loading would run a shell command (what a crafted question file can do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_question_pickle_that_would_run_code_is_refused(tmp_path, protocol):
    root = write_dataset(tmp_path / "evil")
    marker = tmp_path / "ran"
    obj = pickle.load(open(root / "toy_train_questions.pt", "rb"))
    obj["glove"] = _RunsACommand(marker)
    (root / "toy_train_questions.pt").write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(D.DataError, match=r"toy_train_questions.pt: refused to unpickle global (posix|os|nt)\.system"):
        D.load(root)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_question_pickles_of_every_protocol_with_numpy_scalars_and_strings_load(tmp_path, protocol):
    def edit(split, obj):
        obj["video_names"] = np.array([f"v{i}" for i in range(8)])
        obj["names"] = np.array(["a", 1], dtype=object)
        obj["count"] = np.int64(8)
        obj["dtype"] = np.dtype("float32")
        obj["extra"] = {"list": [1, 2.5, "x", (1, 2)], "bytes": b"\x00\xff"}

    root = write_dataset(tmp_path / "p", split_edit=edit)
    for split in D.SPLITS:
        f = root / f"toy_{split}_questions.pt"
        f.write_bytes(pickle.dumps(pickle.loads(f.read_bytes()), protocol=protocol))
    d = D.load(root)
    assert len(d.splits["train"]) == 8


def test_numpy1_spelling_of_array_globals_is_accepted():
    import io
    from harness.data.question_pickle import QuestionUnpickler
    raw = pickle.dumps(np.arange(4), protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    stub = QuestionUnpickler(io.BytesIO(raw), len(raw)).load()
    assert np.array_equal(stub.real(), np.arange(4))
