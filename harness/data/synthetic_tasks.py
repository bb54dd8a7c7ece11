"""Multiple-choice and count questions about the synthetic videos: the presets ``tiny-mc`` and
``tiny-count`` keep tiny's world, videos and splits (:mod:`harness.data.synthetic_world`) and ask other questions,
written in HCRN's TGIF-QA layouts (:mod:`harness.data.layout`).

Multiple choice (``tiny-mc``; the features are tiny's, byte for byte): five question types, each with K = 5
candidate answers from one group of answer words, the right one read from the video::

    what ... <ordinal> ...  -> the object of that clip            (clip appearance)
    who ...                 -> the dominant object                (video appearance)
    how ...                 -> the dominant action                (motion)
    when ... <act_k> ...    -> the object of the clip doing act_k (find the clip by motion, read its appearance)
    where ...               -> the scene                          (appearance, every frame)

Nothing but the video tells the right candidate: a question's right answer is drawn uniformly from the answers
its type can have in the split (then a question with that answer, uniformly), the four distractors uniformly
from the type's other such answers, and the right one's slot uniformly; so, given the question and its
candidates, every candidate is equally likely right, and a model without the video is at 1/K = 20% (it
cannot even learn that a popular word is more often right). "where" never names an action here (tiny's
language hint). A candidate is its answer word with 0-2 filler words around it (ragged, padded with 0).

Count (``tiny-count``): tiny's videos, and in each video two of N_EVENTS event kinds (``ev_0`` ..), each
flashing in 1..10 of its frames (count and frames uniform): the event's prototype vector is added to the
appearance of those frames. ``how ... many ... times ... <ev_k> ...`` -> how many frames show ev_k: the
count, uniform over 1..10 and independent of the question (a question-only model's best guess is the mean,
mean squared error ~8.25), readable from the appearance frames (summed over frames, the event's direction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from harness.data import layout
from harness.data.synthetic_world import (S_EVENTS, S_TASK_QUESTIONS, STORY, WORLD_TEXT, COUNT, COUNT_WORDS,
    MULTIPLE_CHOICE, N_EVENTS, QUESTION_WORDS, SPLITS, Preset, features_for_video, Layout, QTokens, rng, task_vocab,
    Videos, make_vocab, World)

Features = Callable[[int], tuple[np.ndarray, np.ndarray]]  # video row -> (appearance, motion)


@dataclass(frozen=True)
class _TaskStory:
    """Knobs of the multiple-choice and count questions."""

    n_candidates: int = 5  # K, as TGIF-QA's and NExT-QA's
    max_candidate_len: int = 3  # the answer word and up to 2 filler words
    events_per_video: int = 2
    w_event: float = 2.0  # weight of an event's prototype in a frame (the other parts sum to unit variance)


_TASK = _TaskStory()
MC_TYPES: tuple[str, ...] = QUESTION_WORDS
#: the group of answer words each multiple-choice type's candidates come from
MC_GROUPS: dict[str, str] = {"what": "object", "who": "object", "how": "action", "when": "object",
                             "where": "scene"}
_GROUP_PREFIX = {"object": "obj", "action": "act", "scene": "scene"}
COUNT_TYPE = "how"
_TASK_TEXT = {
    MULTIPLE_CHOICE: (" Multiple choice: 5 candidates from the type's answer words (what <ordinal> -> object of "
                      "that clip; who -> dominant object; how -> dominant action; when <act> -> object of the clip "
                      "doing that action; where -> scene); right answers uniform over the type's answers, "
                      "distractors uniform over the others, right slot uniform: 20% without the video."),
    COUNT: (" Count: each video shows two of the event kinds ev_i, each in 1..10 of its frames (uniform), the "
            "event's prototype added to those frames' appearance; how many times <ev_i> -> that count."),
}


@dataclass
class TaskSet:
    """What a multiple-choice or count preset writes besides tiny's world: vocabularies, the splits' question
    arrays, each video's features and the meta json's task entries."""

    vocab: dict[str, dict[str, int]]
    questions: dict[str, dict[str, np.ndarray]]
    features: Features
    meta: dict


def make(p: Preset, lay: Layout, world: World, vids: Videos, split_rows: dict[str, np.ndarray],
         seed: int) -> TaskSet:
    """The questions (and, for count, the events) of preset ``p``'s task over these videos."""
    vocab = task_vocab(p, lay)
    q = QTokens.make(p, lay, make_vocab(p, lay))  # the story's question token ids: the same in ``vocab``
    r = rng(seed, S_TASK_QUESTIONS)
    counts = {"train": p.n_train, "val": p.n_val, "test": p.n_test}
    meta = {"story": WORLD_TEXT + _TASK_TEXT[p.task], layout.TASK_META_KEY: p.task}
    if p.task == MULTIPLE_CHOICE:
        cands = [_word_ids(vocab, MC_GROUPS[t], lay) for t in MC_TYPES]
        qs = {s: _mc_split(r, q, _mc_options(q, vids, split_rows[s]), cands, counts[s], lay.max_len)
              for s in SPLITS}
        meta.update(num_candidates=_TASK.n_candidates, max_candidate_len=_TASK.max_candidate_len,
                    candidate_groups=dict(MC_GROUPS))
        features: Features = lambda row: features_for_video(p, world, vids, row, seed)  # noqa: E731
    else:
        ev = _events(p, seed)
        qv = vocab[layout.QUESTION_TOKENS_KEY]
        words = [qv[w] for w in COUNT_WORDS]
        ev_ids = np.array([qv[f"ev_{i}"] for i in range(N_EVENTS)], dtype=np.int64)
        qs = {s: _count_split(r, q, ev, split_rows[s], counts[s], lay.max_len, words, ev_ids) for s in SPLITS}
        meta.update(question_types=[COUNT_TYPE], count_range=list(layout.COUNT_RANGE), events=N_EVENTS,
                    events_per_video=_TASK.events_per_video)
        features = lambda row: _count_features(p, world, vids, ev, row, seed)  # noqa: E731
    _add_ids(r, qs, vids)
    return TaskSet(vocab, qs, features, meta)


def _word_ids(vocab: dict, group: str, lay: Layout) -> np.ndarray:
    """Question-vocabulary ids of a group's answer words, by entity index."""
    n = {"object": lay.n_obj, "action": lay.n_act, "scene": lay.n_scene}[group]
    qv = vocab[layout.QUESTION_TOKENS_KEY]
    return np.array([qv[f"{_GROUP_PREFIX[group]}_{i}"] for i in range(n)], dtype=np.int64)


def _add_ids(r: np.random.Generator, qs: dict[str, dict[str, np.ndarray]], vids: Videos) -> None:
    """Video ids of the questions' rows, and question ids unique across the splits, not in row order."""
    total = sum(len(d[layout.ANSWERS_KEY]) for d in qs.values())
    qids = (100000 + r.permutation(total)).astype(np.int64)
    start = 0
    for split in SPLITS:
        d = qs[split]
        rows = d.pop("rows")
        qs[split] = {layout.QUESTIONS_KEY: d.pop(layout.QUESTIONS_KEY),
                     layout.QUESTIONS_LEN_KEY: d.pop(layout.QUESTIONS_LEN_KEY),
                     layout.VIDEO_IDS_KEY: vids.ids[rows].astype(np.int64),
                     layout.QUESTION_ID_KEY: qids[start:start + len(rows)].copy(), **d}
        start += len(rows)


def _tokens(r: np.random.Generator, q: QTokens, qword: int, spec: list[int], max_len: int) -> list[int]:
    """A question: its question word, then its specifying tokens in order among Zipf filler words, for a
    ragged length of 3 (or more, to hold the spec) .. max_len."""
    lo = max(STORY.min_question_len, 1 + len(spec))
    n = int(r.integers(lo, max_len + 1)) - 1
    rest = list(r.choice(q.filler, size=n, p=q.p_filler))
    for pos, tok in zip(np.sort(r.choice(n, size=len(spec), replace=False)), spec):
        rest[int(pos)] = tok
    return [qword, *(int(t) for t in rest)]


# --------------------------------------------------------------------------- multiple choice


@dataclass
class _Options:
    """Every question of one type that a split's videos allow: its video row, its specifying token (-1: none)
    and its answer (an entity of the type's group); ``answers`` are the distinct answers."""

    rows: np.ndarray
    spec: np.ndarray
    answer: np.ndarray

    def __post_init__(self) -> None:
        self.answers = np.unique(self.answer)
        if len(self.answers) < _TASK.n_candidates:
            raise ValueError(f"too few videos: only {len(self.answers)} distinct answers of a multiple-choice "
                             f"type in a split, fewer than the {_TASK.n_candidates} candidates")


def _mc_options(q: QTokens, vids: Videos, rows: np.ndarray) -> list[_Options]:
    """The options of each type of :data:`MC_TYPES` over the video rows ``rows``."""
    C = q.n_clips
    rr, kk = np.repeat(rows, C), np.tile(np.arange(C), len(rows))  # every (video, clip)
    none = np.full(len(rows), -1, dtype=np.int64)
    acts = vids.clip_act[rows]
    unique = ((acts[:, :, None] == acts[:, None, :]).sum(2) == 1).reshape(-1)  # clips whose action is unique
    return [_Options(rr, q.ordinal[kk], vids.clip_obj[rr, kk]),
            _Options(rows, none, vids.dom_obj[rows]),
            _Options(rows, none, vids.dom_act[rows]),
            _Options(rr[unique], q.act_q[vids.clip_act[rr, kk][unique]], vids.clip_obj[rr, kk][unique]),
            _Options(rows, none, vids.scene[rows])]


def _mc_pick(r: np.random.Generator, opts: _Options) -> tuple[int, int, np.ndarray, int]:
    """One question: (video row, spec token, the K candidates' entities, the right one's slot)."""
    a = opts.answers[r.integers(len(opts.answers))]
    idx = np.flatnonzero(opts.answer == a)
    o = int(idx[r.integers(len(idx))])
    others = r.choice(opts.answers[opts.answers != a], size=_TASK.n_candidates - 1, replace=False)
    order = r.permutation(_TASK.n_candidates)
    entities = np.concatenate([[a], others])[order]
    return int(opts.rows[o]), int(opts.spec[o]), entities, int(np.flatnonzero(order == 0)[0])


def _candidate(r: np.random.Generator, q: QTokens, word: int) -> list[int]:
    """A candidate answer's tokens: its word with 0 .. max_candidate_len-1 filler words around it."""
    toks = [int(t) for t in r.choice(q.filler, size=int(r.integers(_TASK.max_candidate_len)), p=q.p_filler)]
    toks.insert(int(r.integers(len(toks) + 1)), word)
    return toks


def _mc_split(r: np.random.Generator, q: QTokens, opts: list[_Options], cands: list[np.ndarray], n: int,
              max_len: int) -> dict[str, np.ndarray]:
    """A split's multiple-choice questions; types uniform (``rows`` holds their video rows)."""
    K, La = _TASK.n_candidates, _TASK.max_candidate_len
    qtype = r.integers(len(MC_TYPES), size=n)
    toks, lens = np.zeros((n, max_len), dtype=np.int64), np.zeros(n, dtype=np.int64)
    c_toks, c_lens = np.zeros((n, K, La), dtype=np.int64), np.zeros((n, K), dtype=np.int64)
    rows, answers = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i in range(n):
        t = int(qtype[i])
        rows[i], spec, entities, answers[i] = _mc_pick(r, opts[t])
        tk = _tokens(r, q, int(q.qword[t]), [spec] if spec >= 0 else [], max_len)
        toks[i, :len(tk)], lens[i] = tk, len(tk)
        for k, e in enumerate(entities):
            c = _candidate(r, q, int(cands[t][e]))
            c_toks[i, k, :len(c)], c_lens[i, k] = c, len(c)
    return {layout.QUESTIONS_KEY: toks, layout.QUESTIONS_LEN_KEY: lens, "rows": rows, layout.ANSWERS_KEY: answers,
            layout.CANDIDATES_KEY: c_toks, layout.CANDIDATES_LEN_KEY: c_lens}


# --------------------------------------------------------------------------- count


@dataclass
class _Events:
    """The count set's events: prototypes (N_EVENTS, D); per video row its event kinds (V, J), their counts
    (V, J) and the frames showing each (V, J, clips, frames) bool."""

    proto: np.ndarray
    kind: np.ndarray
    count: np.ndarray
    shown: np.ndarray


def _events(p: Preset, seed: int) -> _Events:
    r = rng(seed, S_EVENTS)
    V, C, F, J = p.n_videos, p.n_clips, p.n_frames, _TASK.events_per_video
    lo, hi = layout.COUNT_RANGE
    if hi > C * F or J > N_EVENTS:
        raise ValueError(f"count presets need at least {hi} frames per video (got {C} x {F}) and "
                         f"{J} <= {N_EVENTS} event kinds")
    proto = r.standard_normal((N_EVENTS, p.vision_dim), dtype=np.float32)
    kind = np.stack([r.choice(N_EVENTS, size=J, replace=False) for _ in range(V)]).astype(np.int64)
    count = r.integers(lo, hi + 1, size=(V, J)).astype(np.int64)
    shown = np.zeros((V, J, C * F), dtype=bool)
    for v in range(V):
        for j in range(J):
            shown[v, j, r.choice(C * F, size=int(count[v, j]), replace=False)] = True
    return _Events(proto, kind, count, shown.reshape(V, J, C, F))


def _count_features(p: Preset, world: World, vids: Videos, ev: _Events, row: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Tiny's features of the video, with its events' prototypes added to the frames that show them."""
    app, mot = features_for_video(p, world, vids, row, seed)
    for j in range(ev.kind.shape[1]):
        app += np.float32(_TASK.w_event) * ev.shown[row, j][:, :, None] * ev.proto[ev.kind[row, j]]
    return app, mot


def _count_split(r: np.random.Generator, q: QTokens, ev: _Events, rows: np.ndarray, n: int, max_len: int,
                 words: list[int], ev_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A split's count questions: the split's videos used evenly, one of each video's events asked."""
    vrow = r.permutation(np.resize(r.permutation(rows), n))
    j = r.integers(ev.kind.shape[1], size=n)
    toks, lens = np.zeros((n, max_len), dtype=np.int64), np.zeros(n, dtype=np.int64)
    how = int(q.qword[QUESTION_WORDS.index(COUNT_TYPE)])
    for i in range(n):
        tk = _tokens(r, q, how, [*words, int(ev_ids[ev.kind[vrow[i], j[i]]])], max_len)
        toks[i, :len(tk)], lens[i] = tk, len(tk)
    return {layout.QUESTIONS_KEY: toks, layout.QUESTIONS_LEN_KEY: lens, "rows": vrow.astype(np.int64),
            layout.ANSWERS_KEY: ev.count[vrow, j].astype(np.int64)}
