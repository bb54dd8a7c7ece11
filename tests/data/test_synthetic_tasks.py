"""The multiple-choice and count synthetic sets: ``tiny-mc`` and ``tiny-count`` in HCRN's TGIF-QA
layouts, their answers read from tiny's videos, and learnable from the video only (simple probes on the written
files: a video-based probe far above question-only ones)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from harness.data import layout
from harness.data import synthetic as syn
from harness.data import synthetic_tasks as tasks
from harness.data import synthetic_world as world

K = 5


def _load(d: Path) -> dict:
    files = syn.dataset_files(d)
    out: dict = {"vocab": json.loads(files["vocab"].read_text()), "meta": json.loads(files["meta"].read_text())}
    with h5py.File(files["appearance"], "r") as f:
        out["app"], out["ids"] = f[layout.APPEARANCE_KEY][:], f[layout.IDS_KEY][:]
    with h5py.File(files["motion"], "r") as f:
        out["mot"] = f[layout.MOTION_KEY][:]
    for split in syn.SPLITS:
        with open(files[split], "rb") as f:
            out[split] = pickle.load(f)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return {p: syn.generate(root / p, p, seed=0, progress=False) for p in ("tiny", "tiny-mc", "tiny-count")}


@pytest.fixture(scope="module")
def data(dirs) -> dict[str, dict]:
    return {p: _load(d) for p, d in dirs.items()}


def _story(preset: str, seed: int = 0):
    """The generator's own view of the videos: (layout, videos, events or None)."""
    p = syn.PRESETS[preset]
    lay = world.make_layout(p)
    vids = world.make_videos(p, lay, world.make_world(p, lay, seed), seed)
    return lay, vids, (tasks._events(p, seed) if p.task == world.COUNT else None)


def _rows(d: dict, split: str) -> np.ndarray:
    row_of = {int(v): r for r, v in enumerate(d["ids"])}
    return np.array([row_of[int(v)] for v in d[split][layout.VIDEO_IDS_KEY]])


def _inverse(vocab: dict) -> dict[int, str]:
    return {i: t for t, i in vocab[layout.QUESTION_TOKENS_KEY].items()}


def _candidate_words(d: dict, split: str) -> np.ndarray:
    """(N, K) the answer word of each candidate (its one token that is not a filler word)."""
    inv = _inverse(d["vocab"])
    c = d[split][layout.CANDIDATES_KEY]
    fill = np.vectorize(lambda t: t == 0 or inv[int(t)].startswith("w_"))(c)
    assert ((~fill).sum(2) == 1).all()  # exactly one answer word per candidate
    return np.where(fill, 0, c).max(2)


# --------------------------------------------------------------------------- presets and format


@pytest.mark.slow
def test_presets_name_their_task_and_model_config_fits_the_files(dirs):
    from harness.data.dataset import describe

    assert syn.PRESETS["tiny"].task == world.OPEN_ENDED
    assert (syn.PRESETS["tiny-mc"].task, syn.PRESETS["tiny-count"].task) == (world.MULTIPLE_CHOICE, world.COUNT)
    for name in ("tiny-mc", "tiny-count"):
        p = syn.PRESETS[name]
        tiny = syn.PRESETS["tiny"]
        assert (p.n_videos, p.n_clips, p.n_frames, p.vision_dim, p.n_train, p.n_val, p.n_test) == (
            tiny.n_videos, tiny.n_clips, tiny.n_frames, tiny.vision_dim, tiny.n_train, tiny.n_val, tiny.n_test)
        info = describe(str(dirs[name]))
        info.check_model_config(p.model_config())  # raises on a mismatch
        assert {k: p.model_config()[k] for k in info.dims} == info.dims
    assert syn.PRESETS["tiny-mc"].model_config()["answer_vocab"] == 2
    assert syn.PRESETS["tiny-count"].model_config()["answer_vocab"] == 1


@pytest.mark.parametrize("name", ["tiny-mc", "tiny-count"])
def test_vocab_and_meta(data, name):
    d, tiny = data[name], data["tiny"]
    q = d["vocab"][layout.QUESTION_TOKENS_KEY]
    assert sorted(q.values()) == list(range(len(q)))
    assert d["vocab"][layout.QUESTION_ANSWER_TOKENS_KEY] == q
    # the story's question words keep their ids, so the first glove rows are tiny's
    assert all(q[t] == i for t, i in tiny["vocab"][layout.QUESTION_TOKENS_KEY].items())
    glove = d["train"][layout.GLOVE_KEY]
    assert glove.shape == (len(q), syn.PRESETS[name].word_dim) and glove.dtype == np.float32
    np.testing.assert_array_equal(glove[:len(tiny["train"][layout.GLOVE_KEY])], tiny["train"][layout.GLOVE_KEY])
    a = d["vocab"][layout.ANSWER_TOKENS_KEY]
    assert a == ({"<UNK0>": 0, "<UNK1>": 1} if name == "tiny-mc" else {"<UNK>": 0})
    m = d["meta"]
    assert m[layout.TASK_META_KEY] == syn.PRESETS[name].task
    assert set(tiny["meta"]) < set(m)  # everything tiny's meta says, and more
    assert m["suggested_train"] == syn.SUGGESTED_TRAIN[name] and m["suggested_model"] == {"module_dim": 64}
    assert m["preset"] == name


def test_multiple_choice_files(data):
    d, p = data["tiny-mc"], syn.PRESETS["tiny-mc"]
    n_q = len(d["vocab"][layout.QUESTION_TOKENS_KEY])
    for split, n in (("train", p.n_train), ("val", p.n_val), ("test", p.n_test)):
        s = d[split]
        assert set(s) == {*layout.QUESTION_KEYS, layout.CANDIDATES_KEY, layout.CANDIDATES_LEN_KEY}
        c, cl = s[layout.CANDIDATES_KEY], s[layout.CANDIDATES_LEN_KEY]
        assert c.dtype == cl.dtype == np.int64 and c.shape == (n, K, 3) and cl.shape == (n, K)
        assert cl.min() == 1 and cl.max() == 3  # ragged
        pos = np.arange(c.shape[2])
        assert (c[pos >= cl[..., None]] == 0).all() and (c[pos < cl[..., None]] >= 2).all()
        assert c.max() < n_q and s[layout.QUESTIONS_KEY].max() < n_q
        assert s[layout.ANSWERS_KEY].dtype == np.int64 and s[layout.ANSWERS_KEY].shape == (n,)
        assert set(np.unique(s[layout.ANSWERS_KEY]).tolist()) == set(range(K))
        words = _candidate_words(d, split)
        assert all(len(set(row.tolist())) == K for row in words)  # five different answers
    slots = np.bincount(d["train"][layout.ANSWERS_KEY], minlength=K) / p.n_train
    assert np.abs(slots - 1 / K).max() < 0.03  # the right one's slot is uniform


def test_multiple_choice_answers_come_from_the_video(data):
    """Each type's right candidate is what the generator put in the video; the others are of its group."""
    d = data["tiny-mc"]
    lay, vids, _ = _story("tiny-mc")
    inv, q = _inverse(d["vocab"]), d["vocab"][layout.QUESTION_TOKENS_KEY]
    ordinals = {q[o]: k for k, o in enumerate(world._ORDINALS[:4])}
    for split in syn.SPLITS:
        s, rows, words = d[split], _rows(d, split), _candidate_words(d, split)
        right = words[np.arange(len(words)), s[layout.ANSWERS_KEY]]
        for i in range(len(rows)):
            v, t, toks = rows[i], inv[int(s[layout.QUESTIONS_KEY][i, 0])], s[layout.QUESTIONS_KEY][i]
            spec = [int(x) for x in toks if int(x) in ordinals or inv[int(x)].startswith("act_")]
            if t == "what":
                want = f"obj_{vids.clip_obj[v, ordinals[spec[0]]]}"
            elif t == "when":
                c = list(vids.clip_act[v]).index(int(inv[spec[0]][4:]))
                assert (vids.clip_act[v] == vids.clip_act[v, c]).sum() == 1  # the named action is in one clip
                want = f"obj_{vids.clip_obj[v, c]}"
            else:
                want = {"who": f"obj_{vids.dom_obj[v]}", "how": f"act_{vids.dom_act[v]}",
                        "where": f"scene_{vids.scene[v]}"}[t]
                assert not spec  # no language hint
            assert inv[int(right[i])] == want, (split, i, t)
            prefix = {"object": "obj_", "action": "act_", "scene": "scene_"}[tasks.MC_GROUPS[t]]
            assert all(inv[int(w)].startswith(prefix) for w in words[i]), (split, i)


def test_count_files_and_answers_count_the_event_frames(data):
    d, p = data["tiny-count"], syn.PRESETS["tiny-count"]
    _, _, ev = _story("tiny-count")
    inv = _inverse(d["vocab"])
    lo, hi = layout.COUNT_RANGE
    for split in syn.SPLITS:
        s = d[split]
        assert set(s) == set(layout.QUESTION_KEYS)
        ans, rows = s[layout.ANSWERS_KEY], _rows(d, split)
        assert ans.dtype == np.int64 and lo <= ans.min() and ans.max() <= hi
        for i in range(len(ans)):
            words = [inv[int(t)] for t in s[layout.QUESTIONS_KEY][i, :s[layout.QUESTIONS_LEN_KEY][i]]]
            assert words[0] == "how" and words.index("many") < words.index("times")
            (named,) = [int(w[3:]) for w in words if w.startswith("ev_")]
            (j,) = np.flatnonzero(ev.kind[rows[i]] == named)
            assert ans[i] == ev.shown[rows[i], j].sum() == ev.count[rows[i], j]
    hist = np.bincount(d["train"][layout.ANSWERS_KEY], minlength=hi + 1)[lo:]
    assert hist.min() > 0.6 * p.n_train / (hi - lo + 1)  # every count is common: no degenerate prior


def test_features_are_tinys_and_the_count_sets_events(data):
    tiny, mc, count = data["tiny"], data["tiny-mc"], data["tiny-count"]
    for key in ("app", "mot", "ids"):
        np.testing.assert_array_equal(mc[key], tiny[key])
    np.testing.assert_array_equal(count["mot"], tiny["mot"])
    _, _, ev = _story("tiny-count")
    changed = np.abs(count["app"] - tiny["app"]).max(-1) > 0  # (videos, clips, frames)
    np.testing.assert_array_equal(changed, ev.shown.any(1))


@pytest.mark.slow
def test_task_sets_are_deterministic_and_complete(tmp_path, dirs):
    for name in ("tiny-mc", "tiny-count"):
        again = syn.generate(tmp_path / name, name, seed=0, progress=False)
        other = syn.generate(tmp_path / f"{name}-1", name, seed=1, progress=False)
        assert syn.is_complete(again, name, 0) and not syn.is_complete(again, "tiny", 0)
        first, same, differs = (syn.dataset_files(x) for x in (dirs[name], again, other))
        for key in (*syn.SPLITS, "vocab", "meta"):
            assert same[key].read_bytes() == first[key].read_bytes(), (name, key)
        for key in (*syn.SPLITS, "meta"):
            assert differs[key].read_bytes() != first[key].read_bytes(), (name, key)


@pytest.mark.slow
def test_data_spec_and_cli_know_the_presets(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from harness.data.dataset import synthetic_dir

    monkeypatch.setenv("VQAKD_DATA_DIR", str(tmp_path))
    out = synthetic_dir("synthetic:tiny-count:3")
    assert syn.is_complete(out, "tiny-count", 3, name="synthetic-tiny-count")
    res = CliRunner().invoke(syn._make_app(), ["--out", str(tmp_path / "cli"), "--preset", "tiny-mc",
                                               "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(syn.dataset_files(tmp_path / "cli")["meta"].read_text())["task"] == "multiple-choice"


# --------------------------------------------------------------------------- learnability


def _mc_video_probe(d: dict) -> np.ndarray:
    """Nearest prototype per type: each answer word's mean video feature over the train questions it answers
    (the named clip's appearance for ``what``, else the video's mean appearance; the mean motion), the
    candidate with the nearest prototype chosen. Right or wrong per test question."""
    q = d["vocab"][layout.QUESTION_TOKENS_KEY]
    ords = [q[o] for o in world._ORDINALS[:4]]

    def feats(split):
        r, qs = _rows(d, split), d[split][layout.QUESTIONS_KEY]
        k = np.array([next((ords.index(t) for t in row if t in ords), -1) for row in qs])
        a = np.where((k >= 0)[:, None], d["app"][r, np.maximum(k, 0)].mean(1), d["app"][r].mean((1, 2)))
        return np.concatenate([a, d["mot"][r].mean(1)], 1)

    x_tr, x_te = feats("train"), feats("test")
    w_tr, w_te = _candidate_words(d, "train"), _candidate_words(d, "test")
    y_tr = w_tr[np.arange(len(w_tr)), d["train"][layout.ANSWERS_KEY]]
    ok = np.zeros(len(w_te), bool)
    for word in syn.QUESTION_WORDS:
        m, mt = d["train"][layout.QUESTIONS_KEY][:, 0] == q[word], d["test"][layout.QUESTIONS_KEY][:, 0] == q[word]
        proto = np.full((len(q), x_tr.shape[1]), np.inf, np.float32)
        for a in np.unique(y_tr[m]):
            proto[a] = x_tr[m][y_tr[m] == a].mean(0)
        dist = ((x_te[mt][:, None, :] - proto[w_te[mt]]) ** 2).sum(-1)
        ok[mt] = dist.argmin(1) == d["test"][layout.ANSWERS_KEY][mt]
    return ok


def _mc_question_probe(d: dict) -> np.ndarray:
    """Question and candidates only: a candidate's score is the train rate at which its word was right when
    offered together with each of the question's tokens (smoothed log-rates summed: the word's popularity and
    every question-word association); right or wrong per test question."""
    n = len(d["vocab"][layout.QUESTION_TOKENS_KEY])
    right, offered = np.ones((n, n)), np.full((n, n), float(K))  # Laplace: a prior rate of 1/K
    w_tr = _candidate_words(d, "train")
    y_tr = w_tr[np.arange(len(w_tr)), d["train"][layout.ANSWERS_KEY]]
    for toks, words, y in zip(d["train"][layout.QUESTIONS_KEY], w_tr, y_tr):
        toks = np.unique(toks)  # 0 (padding) included: a bias term shared by every question
        offered[np.ix_(toks, words)] += 1
        right[toks, y] += 1
    rate = np.log(right / offered)
    w_te = _candidate_words(d, "test")
    score = np.array([rate[np.unique(t)][:, w].sum(0) for t, w in zip(d["test"][layout.QUESTIONS_KEY], w_te)])
    return score.argmax(1) == d["test"][layout.ANSWERS_KEY]


def test_tiny_mc_needs_the_video(data):
    d = data["tiny-mc"]
    video, question = _mc_video_probe(d).mean(), _mc_question_probe(d).mean()
    slot = (d["test"][layout.ANSWERS_KEY] == np.bincount(d["train"][layout.ANSWERS_KEY]).argmax()).mean()
    print(f"\ntiny-mc test accuracy: video probe {video:.3f}, question+candidates probe {question:.3f}, "
          f"most common slot {slot:.3f}")
    assert video > 0.6
    assert 0.14 < question < 0.26 and 0.14 < slot < 0.26  # chance is 1/5
    assert video - question > 0.4


def test_tiny_count_needs_the_video(data):
    """Question only: the train mean (counts do not depend on the question); video: a ridge regression of the
    count on the mean appearance, one per event kind the question names."""
    d = data["tiny-count"]
    q = d["vocab"][layout.QUESTION_TOKENS_KEY]
    ev_ids = np.array([q[f"ev_{i}"] for i in range(world.N_EVENTS)])
    named = {s: (d[s][layout.QUESTIONS_KEY][:, :, None] == ev_ids).any(1).argmax(1) for s in ("train", "test")}
    x = {s: np.c_[d["app"][_rows(d, s)].mean((1, 2)), np.ones(len(named[s]))] for s in named}
    y_tr, y_te = d["train"][layout.ANSWERS_KEY].astype(float), d["test"][layout.ANSWERS_KEY].astype(float)
    pred = np.zeros_like(y_te)
    for e in range(world.N_EVENTS):
        m, mt = named["train"] == e, named["test"] == e
        w = np.linalg.solve(x["train"][m].T @ x["train"][m] + 10.0 * np.eye(x["train"].shape[1]),
                            x["train"][m].T @ y_tr[m])
        pred[mt] = x["test"][mt] @ w
    mse_q, mse_v = ((y_te - y_tr.mean()) ** 2).mean(), ((y_te - pred) ** 2).mean()
    print(f"\ntiny-count test MSE: question only (train mean) {mse_q:.2f}, video probe {mse_v:.2f}")
    assert mse_q > 6.0  # the variance of counts uniform over 1..10 is 8.25
    assert mse_v < 1.0 and mse_q > 6 * mse_v


@pytest.mark.slow
def test_the_question_probe_finds_a_leak_the_balancing_removes(tmp_path, monkeypatch):
    """Without the balancing (right answers as popular as the videos make them, distractors uniform), the
    question+candidates probe beats chance: it is a probe that can fail."""
    def leaky_pick(r, opts):
        o = int(r.integers(len(opts.answer)))
        a = opts.answer[o]
        others = r.choice(opts.answers[opts.answers != a], size=K - 1, replace=False)
        order = r.permutation(K)
        return int(opts.rows[o]), int(opts.spec[o]), np.concatenate([[a], others])[order], int(np.argmin(order))

    monkeypatch.setattr(tasks, "_mc_pick", leaky_pick)
    d = _load(syn.generate(tmp_path / "leaky", "tiny-mc", seed=0, progress=False))
    question = _mc_question_probe(d).mean()
    print(f"\nleaky tiny-mc: question+candidates probe {question:.3f}")
    assert question > 0.3
