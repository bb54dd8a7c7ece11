"""The generative story of the synthetic data sets (:mod:`harness.data.synthetic` writes them; its
docstring tells the story): the presets and their sizes, the world (objects, actions, scenes),
the videos, the questions and each video's features, all drawn from seeded random streams.
The multiple-choice and count presets (``tiny-mc``, ``tiny-count``) share this world and these
videos; their questions (and the count set's per-frame events) are :mod:`harness.data.synthetic_tasks`'.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

import variants.tasks

from harness.data import layout
from harness.data.sizes import SIZES

#: training settings that fit each preset (the reference recipe, 25 epochs of batch 256 at
#: lr 1e-4, is sized for MSVD-QA's 30k questions); the runner uses them unless told otherwise
SUGGESTED_TRAIN: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 15, "batch_size": 64, "lr": 1e-3},
    # DualVGR, seed 666, batch 64, CPU: tiny-mc 59.2% test accuracy after 20 epochs at lr 3e-3 (val 59.5% at
    # epoch 15), against 41.5% after 15 and 48.7% after 30 epochs at 1e-3; tiny-count a test MSE of 2.86 after
    # 15 epochs at 3e-3, against 4.04 at 1e-3
    "tiny-mc": {"epochs": 15, "batch_size": 64, "lr": 3e-3},
    "tiny-count": {"epochs": 15, "batch_size": 64, "lr": 3e-3},
    "small": {"epochs": 15, "batch_size": 128, "lr": 5e-4},
    "msvd": {},
}
QUESTION_WORDS = layout.QUESTION_WORDS
TIME_BUCKETS: tuple[str, ...] = ("start", "middle", "end")
_ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
    "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
    "sixteenth",
)
SPLITS = layout.SPLITS

#: a data set's task, as its meta json names it under layout.TASK_META_KEY: the task registry's names
OPEN_ENDED, MULTIPLE_CHOICE, COUNT = variants.tasks.OPEN_ENDED, variants.tasks.MULTIPLE_CHOICE, variants.tasks.COUNT
#: the presets whose questions are not open-ended, by name (every other preset is open-ended)
PRESET_TASKS: dict[str, str] = {"tiny-mc": MULTIPLE_CHOICE, "tiny-count": COUNT}


@dataclass(frozen=True)
class Preset:
    """Sizes of a synthetic data set (and of the model config that matches it: the shipped
    presets take theirs from :data:`harness.data.sizes.SIZES`)."""

    name: str  # also names the task (PRESET_TASKS)
    n_videos: int
    n_clips: int
    n_frames: int
    vision_dim: int
    n_train: int
    n_val: int
    n_test: int
    # the open-ended story's vocabularies (the world's numbers of objects, actions and scenes follow from
    # them); a multiple-choice or count preset writes other vocabularies, which model_config() gives
    question_vocab: int  # total size of question_token_to_idx, incl. <NULL>=0 and <UNK>=1
    answer_vocab: int  # total size of answer_token_to_idx
    word_dim: int  # width of the glove matrix
    suggested_module_dim: int

    @property
    def task(self) -> str:
        """The task of the questions: :data:`PRESET_TASKS` by name, open-ended otherwise."""
        return PRESET_TASKS.get(self.name, OPEN_ENDED)

    def model_config(self) -> dict:
        """The model settings of this size (the data's dims and the suggested module_dim): what
        ``bench.py --config NAME`` and the tests build; the vocabularies are those the files hold."""
        cfg = {"question_vocab": self.question_vocab, "answer_vocab": self.answer_vocab,
               "vision_dim": self.vision_dim, "module_dim": self.suggested_module_dim, "word_dim": self.word_dim,
               "num_clips": self.n_clips, "num_frames": self.n_frames}
        if self.task != OPEN_ENDED:
            v = task_vocab(self, make_layout(self))
            cfg.update(question_vocab=len(v[layout.QUESTION_TOKENS_KEY]),
                       answer_vocab=len(v[layout.ANSWER_TOKENS_KEY]), task=self.task)
        return cfg


def _preset(name: str, **data_sizes: int) -> Preset:
    """A preset of the model size ``name`` (:data:`harness.data.sizes.SIZES`) with these numbers of
    videos and questions."""
    m = SIZES[name]
    return Preset(name=name, n_clips=m.num_clips, n_frames=m.num_frames, vision_dim=m.vision_dim,
                  question_vocab=m.question_vocab, answer_vocab=m.answer_vocab, word_dim=m.word_dim,
                  suggested_module_dim=m.module_dim, **data_sizes)


PRESETS: dict[str, Preset] = {
    # ~3.3 MB of appearance features; matches the harness's tiny model config.
    "tiny": _preset("tiny", n_videos=400, n_train=3000, n_val=600, n_test=1000),
    # ~131 MB of appearance features (~150 MB in all).
    "small": _preset("small", n_videos=1000, n_train=12000, n_val=3000, n_test=5000),
    # MSVD-QA's sizes (as HCRN / DualVGR preprocess it): ~2.1 GB of appearance features.
    "msvd": _preset("msvd", n_videos=1970, n_train=30933, n_val=6415, n_test=13157),
}
# tiny's world, videos and sizes with multiple-choice / count questions (harness.data.synthetic_tasks)
PRESETS["tiny-mc"] = dataclasses.replace(PRESETS["tiny"], name="tiny-mc")
PRESETS["tiny-count"] = dataclasses.replace(PRESETS["tiny"], name="tiny-count")


@dataclass(frozen=True)
class _Story:
    """Knobs of the generative story (shared by all presets)."""

    type_mix: tuple[float, ...] = (0.35, 0.25, 0.15, 0.10, 0.15)  # what who how when where
    zipf_alpha: float = 1.0  # popularity of objects / actions / scenes
    filler_zipf_alpha: float = 1.0
    p_preferred_scene: float = 0.7  # scene = preferred scene of the dominant action
    p_where_names_action: float = 0.5  # "where" question names the dominant action
    w_scene: float = 1.0
    w_object: float = 0.8
    w_drift_app: float = 0.6
    sigma_video_app: float = 0.5
    sigma_frame: float = 1.4
    w_action: float = 1.0
    w_drift_motion: float = 0.6
    sigma_video_motion: float = 0.5
    sigma_clip_motion: float = 1.0
    min_question_len: int = 3
    video_split: tuple[float, float, float] = (0.60, 0.15, 0.25)


STORY = _Story()
_MAX_QUESTION_LEN = {"tiny": 10, "tiny-mc": 10, "tiny-count": 10, "small": 12, "msvd": 16}

# Random streams (spawn keys) -- one per purpose so that they never interfere.
_S_WORLD, _S_VIDEOS, _S_SPLIT, _S_QUESTIONS, S_GLOVE, _S_FEATURES = range(6)
# the multiple-choice / count questions, the count set's events (harness.data.synthetic_tasks)
S_TASK_QUESTIONS, S_EVENTS = 6, 7
#: the count set's event kinds (question tokens ev_0 ..); the words a count question adds
N_EVENTS = 8
COUNT_WORDS: tuple[str, ...] = ("many", "times")

#: the world and videos (every preset's), then tiny's open-ended questions
WORLD_TEXT = (
    "Each video has a scene (seen in every frame), a dominant object (in most clips) "
    "and a dominant action (in most but not all clips; the other clips each do a "
    "distinct action). Appearance = scene + clip object + time drift + noise; motion = "
    "clip action + time drift + noise."
)
STORY_TEXT = WORLD_TEXT + (
    " what <ordinal> -> object of that clip; who -> "
    "dominant object; how -> dominant action; when <act> -> start/middle/end of the "
    "clip doing that action; where -> scene (half of these questions name the dominant "
    "action, which predicts the scene 70% of the time)."
)


# --------------------------------------------------------------------------- helpers


def rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _zipf(n: int, alpha: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    return p / p.sum()


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class Layout:
    n_obj: int
    n_act: int
    n_scene: int
    n_filler: int
    max_len: int


def make_layout(p: Preset) -> Layout:
    if not 3 <= p.n_clips <= len(_ORDINALS):
        raise ValueError(f"n_clips must be in [3, {len(_ORDINALS)}], got {p.n_clips}")
    content = p.answer_vocab - 2 - len(TIME_BUCKETS)
    if content < 9:
        raise ValueError("answer_vocab too small")
    n_obj = int(round(0.45 * content))
    n_act = int(round(0.30 * content))
    n_scene = content - n_obj - n_act
    if n_act < p.n_clips:
        raise ValueError("answer_vocab too small for n_clips distinct actions per video")
    n_filler = p.question_vocab - 2 - len(QUESTION_WORDS) - p.n_clips - n_act
    if n_filler < 8:
        raise ValueError("question_vocab too small for the answer vocabulary")
    max_len = _MAX_QUESTION_LEN.get(p.name, 12)
    return Layout(n_obj, n_act, n_scene, n_filler, max_len)


def make_vocab(p: Preset, lay: Layout) -> dict[str, dict[str, int]]:
    q_tokens = (
        ["<NULL>", "<UNK>"]
        + list(QUESTION_WORDS)
        + list(_ORDINALS[: p.n_clips])
        + [f"act_{i}" for i in range(lay.n_act)]
        + [f"w_{i}" for i in range(lay.n_filler)]
    )
    a_tokens = (
        ["<UNK0>", "<UNK1>"]
        + [f"obj_{i}" for i in range(lay.n_obj)]
        + [f"act_{i}" for i in range(lay.n_act)]
        + [f"scene_{i}" for i in range(lay.n_scene)]
        + list(TIME_BUCKETS)
    )
    q = {t: i for i, t in enumerate(q_tokens)}
    a = {t: i for i, t in enumerate(a_tokens)}
    qa = dict(q)
    for t in a_tokens:
        if t not in qa:
            qa[t] = len(qa)
    assert len(q) == p.question_vocab and len(a) == p.answer_vocab
    return {
        layout.QUESTION_TOKENS_KEY: q,
        layout.ANSWER_TOKENS_KEY: a,
        "question_answer_token_to_idx": qa,
    }


def task_vocab(p: Preset, lay: Layout) -> dict[str, dict[str, int]]:
    """The vocabularies a multiple-choice or count preset writes: the story's question words plus the
    candidates' words (objects and scenes; actions already are question words) or the count questions'
    words and events, in a question vocabulary that question_answer_token_to_idx repeats (as HCRN's
    TGIF-QA files); the answer vocabulary is HCRN's placeholder for the task."""
    extra = {MULTIPLE_CHOICE: [f"obj_{i}" for i in range(lay.n_obj)] + [f"scene_{i}" for i in range(lay.n_scene)],
             COUNT: list(COUNT_WORDS) + [f"ev_{i}" for i in range(N_EVENTS)]}[p.task]
    q = dict(make_vocab(p, lay)[layout.QUESTION_TOKENS_KEY])
    for t in extra:
        q[t] = len(q)
    answers = {"<UNK0>": 0, "<UNK1>": 1} if p.task == MULTIPLE_CHOICE else {"<UNK>": 0}
    return {layout.QUESTION_TOKENS_KEY: q, layout.ANSWER_TOKENS_KEY: answers,
            layout.QUESTION_ANSWER_TOKENS_KEY: dict(q)}


def _time_bucket(n_clips: int) -> np.ndarray:
    """start = first n//3 clips, end = last n//3 clips, middle = the rest."""
    k = max(1, n_clips // 3)
    b = np.ones(n_clips, dtype=np.int64)
    b[:k] = 0
    b[n_clips - k:] = 2
    return b


@dataclass
class World:
    obj: np.ndarray  # (n_obj, D) float32
    act: np.ndarray  # (n_act, D)
    scene: np.ndarray  # (n_scene, D)
    drift_app: np.ndarray  # (C, F, D) float32, already weighted
    drift_motion: np.ndarray  # (C, D)
    preferred_scene: np.ndarray  # (n_act,) int64


def make_world(p: Preset, lay: Layout, seed: int) -> World:
    r = rng(seed, _S_WORLD)
    D, C, F = p.vision_dim, p.n_clips, p.n_frames
    obj = r.standard_normal((lay.n_obj, D), dtype=np.float32)
    act = r.standard_normal((lay.n_act, D), dtype=np.float32)
    scene = r.standard_normal((lay.n_scene, D), dtype=np.float32)
    # smooth drift trajectories: A cos(pi t) + B sin(pi t), t in [0, 1]
    ab_app = r.standard_normal((2, D)).astype(np.float32)
    ab_mot = r.standard_normal((2, D)).astype(np.float32)
    t_frame = (np.arange(C * F, dtype=np.float64) + 0.5) / (C * F)
    t_clip = (np.arange(C, dtype=np.float64) + 0.5) / C

    def traj(ab: np.ndarray, t: np.ndarray) -> np.ndarray:
        # cos^2 + sin^2 = 1: unit variance per dimension at every t
        basis = np.stack([np.cos(np.pi * t), np.sin(np.pi * t)], axis=1)  # (T, 2)
        return basis @ ab.astype(np.float64)

    drift_app = (STORY.w_drift_app * traj(ab_app, t_frame)).reshape(C, F, D).astype(np.float32)
    drift_motion = (STORY.w_drift_motion * traj(ab_mot, t_clip)).astype(np.float32)
    preferred = r.choice(lay.n_scene, size=lay.n_act, p=_zipf(lay.n_scene, STORY.zipf_alpha))
    return World(obj, act, scene, drift_app, drift_motion, preferred.astype(np.int64))


@dataclass
class Videos:
    ids: np.ndarray  # (V,) int64, stored order
    scene: np.ndarray  # (V,)
    dom_obj: np.ndarray  # (V,)
    dom_act: np.ndarray  # (V,)
    clip_obj: np.ndarray  # (V, C)
    clip_act: np.ndarray  # (V, C)


def _choice_excluding(r: np.random.Generator, p: np.ndarray, exclude: int, size: int,
                      replace: bool) -> np.ndarray:
    q = p.copy()
    q[exclude] = 0.0
    q /= q.sum()
    return r.choice(len(p), size=size, replace=replace, p=q)


def make_videos(p: Preset, lay: Layout, world: World, seed: int) -> Videos:
    r = rng(seed, _S_VIDEOS)
    V, C = p.n_videos, p.n_clips
    ids = (1000 + r.permutation(V)).astype(np.int64)
    p_obj = _zipf(lay.n_obj, STORY.zipf_alpha)
    p_act = _zipf(lay.n_act, STORY.zipf_alpha)
    p_scene = _zipf(lay.n_scene, STORY.zipf_alpha)
    dom_act = r.choice(lay.n_act, size=V, p=p_act)
    dom_obj = r.choice(lay.n_obj, size=V, p=p_obj)
    use_pref = r.random(V) < STORY.p_preferred_scene
    scene = np.where(use_pref, world.preferred_scene[dom_act], r.choice(lay.n_scene, size=V, p=p_scene))
    clip_obj = np.empty((V, C), dtype=np.int64)
    clip_act = np.empty((V, C), dtype=np.int64)
    majority = C // 2 + 1
    for v in range(V):
        m_o = int(r.integers(majority, C + 1))  # clips showing the dominant object
        order = r.permutation(C)
        clip_obj[v, order[:m_o]] = dom_obj[v]
        if m_o < C:
            clip_obj[v, order[m_o:]] = _choice_excluding(r, p_obj, dom_obj[v], C - m_o, True)
        m_a = int(r.integers(majority, C))  # never all clips: some action is unique
        order = r.permutation(C)
        clip_act[v, order[:m_a]] = dom_act[v]
        clip_act[v, order[m_a:]] = _choice_excluding(r, p_act, dom_act[v], C - m_a, False)
    return Videos(ids, scene.astype(np.int64), dom_obj.astype(np.int64),
                   dom_act.astype(np.int64), clip_obj, clip_act)


def split_videos(p: Preset, seed: int) -> dict[str, np.ndarray]:
    """Disjoint video rows per split (about 60/15/25)."""
    r = rng(seed, _S_SPLIT)
    perm = r.permutation(p.n_videos)
    fr = STORY.video_split
    n_tr = max(1, int(round(fr[0] * p.n_videos)))
    n_va = max(1, int(round(fr[1] * p.n_videos)))
    if n_tr + n_va >= p.n_videos:
        raise ValueError("too few videos for three disjoint splits")
    return {"train": np.sort(perm[:n_tr]), "val": np.sort(perm[n_tr:n_tr + n_va]),
            "test": np.sort(perm[n_tr + n_va:])}


@dataclass
class QTokens:
    """Token and answer ids the question generator draws from."""

    n_clips: int
    qword: np.ndarray
    ordinal: np.ndarray
    act_q: np.ndarray
    filler: np.ndarray
    p_filler: np.ndarray
    obj_a: np.ndarray
    act_a: np.ndarray
    scene_a: np.ndarray
    time_a: np.ndarray
    bucket: np.ndarray

    @classmethod
    def make(cls, p: Preset, lay: Layout, vocab: dict[str, dict[str, int]]) -> "QTokens":
        qv, av = vocab[layout.QUESTION_TOKENS_KEY], vocab[layout.ANSWER_TOKENS_KEY]
        ids = lambda table, names: np.array([table[n] for n in names], dtype=np.int64)  # noqa: E731
        return cls(p.n_clips, ids(qv, QUESTION_WORDS), ids(qv, _ORDINALS[:p.n_clips]),
                   ids(qv, [f"act_{i}" for i in range(lay.n_act)]), ids(qv, [f"w_{i}" for i in range(lay.n_filler)]),
                   _zipf(lay.n_filler, STORY.filler_zipf_alpha), ids(av, [f"obj_{i}" for i in range(lay.n_obj)]),
                   ids(av, [f"act_{i}" for i in range(lay.n_act)]), ids(av, [f"scene_{i}" for i in range(lay.n_scene)]),
                   ids(av, TIME_BUCKETS), _time_bucket(p.n_clips))


def _question(r: np.random.Generator, q: QTokens, vids: Videos, v: int, t: int, length: int
              ) -> tuple[list[int], int]:
    """One question of type ``t`` about video row ``v``: its tokens after the question word, and its answer."""
    C = q.n_clips
    spec: list[int] = []
    if t == 0:  # what: object of the named clip
        k = int(r.integers(C))
        spec = [int(q.ordinal[k])]
        answer = q.obj_a[vids.clip_obj[v, k]]
    elif t == 1:  # who: dominant object
        answer = q.obj_a[vids.dom_obj[v]]
    elif t == 2:  # how: dominant action
        answer = q.act_a[vids.dom_act[v]]
    elif t == 3:  # when: time bucket of the clip doing a (unique) named action
        acts = vids.clip_act[v]
        uniq = [c for c in range(C) if int((acts == acts[c]).sum()) == 1]
        c = int(uniq[int(r.integers(len(uniq)))])
        spec = [int(q.act_q[acts[c]])]
        answer = q.time_a[q.bucket[c]]
    else:  # where: scene (sometimes with the dominant action as a language hint)
        if r.random() < STORY.p_where_names_action:
            spec = [int(q.act_q[vids.dom_act[v]])]
        answer = q.scene_a[vids.scene[v]]
    rest = list(r.choice(q.filler, size=length - 1 - len(spec), p=q.p_filler))
    for tok in spec:  # scatter spec tokens among the fillers, keeping their order
        rest.insert(int(r.integers(len(rest) + 1)), tok)
    return rest, int(answer)


def make_questions(p: Preset, lay: Layout, vocab: dict[str, dict[str, int]], vids: Videos,
               split_rows: dict[str, np.ndarray], seed: int) -> dict[str, dict[str, np.ndarray]]:
    r = rng(seed, _S_QUESTIONS)
    q = QTokens.make(p, lay, vocab)
    counts = {"train": p.n_train, "val": p.n_val, "test": p.n_test}
    qids = (100000 + r.permutation(sum(counts.values()))).astype(np.int64)
    out: dict[str, dict[str, np.ndarray]] = {}
    start = 0
    for split in SPLITS:
        n = counts[split]
        # balanced use of the split's videos, in random order
        vrow = r.permutation(np.resize(r.permutation(split_rows[split]), n))
        qtype = r.choice(len(QUESTION_WORDS), size=n, p=np.asarray(STORY.type_mix))
        lengths = r.integers(STORY.min_question_len, lay.max_len + 1, size=n)
        toks = np.zeros((n, lay.max_len), dtype=np.int64)
        answers = np.empty(n, dtype=np.int64)
        for i in range(n):
            t, L = int(qtype[i]), int(lengths[i])
            rest, answers[i] = _question(r, q, vids, int(vrow[i]), t, L)
            toks[i, 0] = q.qword[t]
            toks[i, 1:L] = rest
        out[split] = {"questions": toks, "questions_len": lengths.astype(np.int64),
                      "video_ids": vids.ids[vrow].astype(np.int64), "question_id": qids[start:start + n].copy(),
                      "answers": answers}
        start += n
    return out


def features_for_video(p: Preset, world: World, vids: Videos, row: int, seed: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    s = STORY
    r = rng(seed, _S_FEATURES, row)
    C, F, D = p.n_clips, p.n_frames, p.vision_dim
    app = r.standard_normal((C, F, D), dtype=np.float32)
    app *= np.float32(s.sigma_frame)
    app += world.drift_app
    app += (s.w_scene * world.scene[vids.scene[row]]
            + np.float32(s.sigma_video_app) * r.standard_normal(D, dtype=np.float32))
    app += (np.float32(s.w_object) * world.obj[vids.clip_obj[row]])[:, None, :]
    app *= np.float32(1.0 / np.sqrt(s.w_scene**2 + s.w_object**2 + s.w_drift_app**2
                                    + s.sigma_video_app**2 + s.sigma_frame**2))
    mot = r.standard_normal((C, D), dtype=np.float32)
    mot *= np.float32(s.sigma_clip_motion)
    mot += world.drift_motion
    mot += np.float32(s.sigma_video_motion) * r.standard_normal(D, dtype=np.float32)
    mot += np.float32(s.w_action) * world.act[vids.clip_act[row]]
    mot *= np.float32(1.0 / np.sqrt(s.w_action**2 + s.w_drift_motion**2
                                    + s.sigma_video_motion**2 + s.sigma_clip_motion**2))
    return app, mot
