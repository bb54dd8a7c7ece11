"""From the public MSVD-QA / MSRVTT-QA release to the HCRN / DualVGR feature format.

Two commands (``python -m harness.prepare --help``)::

    python -m harness.prepare questions --dataset msvd-qa --annotations DIR --glove glove.840B.300d.txt --out OUT
    python -m harness.prepare features  --dataset msvd-qa --videos DIR --annotations DIR --out OUT \\
        --appearance resnet101 --motion r2plus1d_18 --clips 8 --frames 16

``questions`` follows HCRN's ``preprocess/preprocess_questions.py`` (and its copy in DualVGR):

* tokens: the lower-cased question without its last character (the ``?``), split like
  ``nltk.word_tokenize`` (:func:`tokenize`, a small re-implementation; no nltk dependency);
* question vocabulary: ``<NULL>`` = 0, ``<UNK>`` = 1, then every token of the training questions
  in order of first appearance; unknown tokens of val / test questions become ``<UNK>``;
* answer vocabulary: ``<UNK0>`` = 0, ``<UNK1>`` = 1, then the ``answer_top`` (4000, the reference
  default for both data sets) most frequent training answers, ties in order of first appearance;
* a training question whose answer is outside the answer vocabulary is dropped (HCRN keeps it
  with label ``<UNK0>`` = 0 and trains on it; we do not teach the model to answer "unknown");
  a val / test question with such an answer is kept with answer ``<UNK1>`` = 1, which is never a
  training label, so it counts as wrong (the accuracy is over all questions, as in the papers);
* every split is padded with ``<NULL>`` to its own longest question (as in the reference);
* ``glove``: one row per question token from the GloVe ``.txt`` file (exact, case-sensitive
  match, as the reference looks tokens up in its pickled dict); tokens without a vector (and
  ``<NULL>``, ``<UNK>``) get zeros, as in the reference. The matrix is stored in all three pickles
  (the reference stores it in the training pickle only; :mod:`harness.data` checks all three);
* ``question_id``: the record's ``id`` field when every record has a distinct one (the reference uses the
  position in the file); ``video_ids``: the integer video id (MSVD-QA: N of ``vidN`` in
  ``youtube_mapping.txt``; MSRVTT-QA: N of ``videoN.mp4``).

``features`` follows HCRN's ``preprocess/preprocess_features.py``: every video is decoded (PyAV),
``clips`` clips of ``frames`` consecutive frames are taken around ``clips`` evenly spaced centres
(:func:`clip_frame_indices`, with the reference's padding by repeating the first / last frame for
short videos), frames are resized to a square (bicubic, like the reference's ``imresize``; no
crop) and fed to

* appearance: a torchvision ResNet (``resnet101`` as in the reference; ImageNet normalisation,
  ``--image-size`` 224): the 2048-d pool5 feature of every frame -> ``resnet_features``
  (videos, clips, frames, 2048);
* motion: one feature per clip (the clip's frames at ``--motion-size`` 112) -> ``resnext_features``
  (videos, clips, dim): torchvision's Kinetics-400 ``r2plus1d_18`` / ``r3d_18`` / ``mc3_18``
  (512-d, Kinetics normalisation), or ``resnext101-3d:PATH``, the reference's ResNeXt-101 3D
  (Hara et al.; 2048-d; the ``resnext-101-kinetics.pth`` checkpoint HCRN uses, fed 0..255 pixel
  values without normalisation exactly as HCRN does).

A video that cannot be decoded gets zero features (as in the reference) and is reported; a video
too short to give ``clips x frames`` distinct frames is padded by the reference's rule and reported.
The h5 files are written one batch of videos at a time (resizable data sets, flushed after each
batch), so a killed run leaves readable files and running the command again skips the videos
already there. See ``docs/preparing-data.md``.
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse

import numpy as np

from .data import DataError
from .store import atomic_write_bytes, atomic_write_json

SPLITS = ("train", "val", "test")
DATASETS = ("msvd-qa", "msrvtt-qa")
#: the reference's ``--answer_top`` default, used for MSVD-QA and MSRVTT-QA alike
ANSWER_TOP = 4000
QUESTION_SPECIALS = {"<NULL>": 0, "<UNK>": 1}
ANSWER_SPECIALS = {"<UNK0>": 0, "<UNK1>": 1}
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".wmv")


class PrepareError(DataError):
    """Bad input or output for preparation: the message names the file, key or record."""


# ============================================================================= questions
# ----------------------------------------------------------------------------- tokenizer
# The reference tokenises with ``nltk.word_tokenize(question.lower()[:-1])``. For one sentence
# (every MSVD-QA / MSRVTT-QA question) that is nltk's NLTKWordTokenizer (improved Treebank rules),
# which the substitutions below re-implement: opening / closing double quotes become `` and '',
# punctuation (, : ; ? ! @ # $ % & * brackets, --, ...) is split off (a comma or colon followed by
# a digit is not: "1,000"), a final period is split off, clitics are split from their word
# ("what's" -> what 's, "man's" -> man 's, "kids'" -> kids ', "don't" -> do n't, "they're",
# "we'll", "i'm", "you've", "he'd"), and "cannot", "gonna", "gotta", "wanna", "gimme", "lemme"
# become two tokens. Checked against nltk 3.9's NLTKWordTokenizer on 200,000 random strings of
# such words: identical (tests/test_prepare.py keeps a few cases). Where it can differ from
# word_tokenize: text of several sentences (nltk first splits sentences with its punkt model and
# then also splits each sentence's final period) and non-ASCII quotes; neither occurs in these
# data sets' questions.
_R = re.compile
_BEFORE_PADDING = [
    (_R(r'^"'), "``"),
    (_R(r"(``)"), r" \1 "),
    (_R(r'([ (\[{<])("|\'\')'), r"\1 `` "),
    (_R(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),  # 'bout -> ' bout
    (_R(r"([^.])(\.)([\]\)}>\"' ]*)\s*$"), r"\1 \2 \3 "),  # the final period
    (_R(r"([:,])([^\d])"), r" \1 \2"),
    (_R(r"([:,])$"), r" \1 "),
    (_R(r"\.{2,}"), r" \g<0> "),
    (_R(r"[;@#$%&?!*]"), r" \g<0> "),
    (_R(r"([^'])' "), r"\1 ' "),
    (_R(r"[\]\[(){}<>]"), r" \g<0> "),
    (_R(r"--"), r" -- "),
]
_AFTER_PADDING = [
    (_R(r"''"), " '' "),
    (_R(r'"'), " '' "),
    (_R(r"\s+"), " "),
    (_R(r"([^' ])('[sSmMdD]|') "), r"\1 \2 "),
    (_R(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
    *[(_R(rf"(?i)\b({a})({b})\b"), r" \1 \2 ") for a, b in
      (("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"), ("more", "'n"))],
    (_R(r"(?i)\b(wan)(na)(?=\s)"), r" \1 \2 "),
    (_R(r"(?i) ('t)(is|was)\b"), r" \1 \2 "),
]


def tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` for a one-sentence text (see the comment above)."""
    for rx, sub in _BEFORE_PADDING:
        text = rx.sub(sub, text)
    text = f" {text} "
    for rx, sub in _AFTER_PADDING:
        text = rx.sub(sub, text)
    return text.split()


def question_tokens(question: str) -> list[str]:
    """The reference's tokens of a question: lower-cased, last character (the ``?``) dropped."""
    return tokenize(question.lower()[:-1])


# ----------------------------------------------------------------------------- QA records


@dataclass
class QARecord:
    question: str
    answer: str
    video_id: int
    question_id: int | None


_VIDEO_ID = re.compile(r"^(?:vid|video)?(\d+)$")


def parse_video_id(value, where: str) -> int:
    """An integer video id from a release's ``video_id`` (``12``, ``"12"``, ``"vid12"``, ``"video12"``)."""
    if isinstance(value, bool):
        raise PrepareError(f"{where}: video_id {value!r} is not a video id")
    if isinstance(value, (int, np.integer)):
        return int(value)
    m = _VIDEO_ID.match(str(value).strip())
    if not m:
        raise PrepareError(f"{where}: video_id {value!r} is not an integer, 'vidN' or 'videoN'")
    return int(m.group(1))


def read_qa(path: Path) -> list[QARecord]:
    """A release's ``{split}_qa.json``: a list of records with ``question``, ``answer``,
    ``video_id`` and (usually) ``id``."""
    if not path.is_file():
        raise PrepareError(f"QA file {path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, list):
        raise PrepareError(f"{path}: expected a JSON list of QA records, got {type(raw).__name__}")
    out = []
    for i, r in enumerate(raw):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise PrepareError(f"{where} is not an object ({type(r).__name__})")
        missing = [k for k in ("question", "answer", "video_id") if k not in r]
        if missing:
            raise PrepareError(f"{where} has no {', '.join(map(repr, missing))} (has: {', '.join(r)})")
        for k in ("question", "answer"):
            if not isinstance(r[k], str):
                raise PrepareError(f"{where}: {k!r} must be a string, got {r[k]!r}")
        qid = r.get("id")
        if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (int, np.integer))):
            raise PrepareError(f"{where}: 'id' must be an integer, got {qid!r}")
        out.append(QARecord(r["question"], r["answer"], parse_video_id(r["video_id"], where),
                            None if qid is None else int(qid)))
    if not out:
        raise PrepareError(f"{path}: no QA records")
    return out


def qa_paths(annotations: Path) -> dict[str, Path]:
    return {s: Path(annotations) / f"{s}_qa.json" for s in SPLITS}


# ----------------------------------------------------------------------------- vocab & encoding


def build_vocab(train: list[QARecord], answer_top: int = ANSWER_TOP) -> dict:
    """The reference's vocabularies from the training records."""
    counts = Counter()  # insertion order = first appearance; most_common keeps it for ties
    for r in train:
        counts[r.answer] += 1
    answers = dict(ANSWER_SPECIALS)
    for a, _ in counts.most_common(answer_top):
        answers[a] = len(answers)
    questions = dict(QUESTION_SPECIALS)
    for r in train:
        for t in question_tokens(r.question):
            questions.setdefault(t, len(questions))
    return {"question_token_to_idx": questions, "answer_token_to_idx": answers,
            "question_answer_token_to_idx": dict(QUESTION_SPECIALS)}


def encode_split(records: list[QARecord], vocab: dict, split: str, glove: np.ndarray, where: str
                 ) -> tuple[dict, dict]:
    """The question pickle of one split (as a dict of arrays) and its counts."""
    q_vocab, a_vocab = vocab["question_token_to_idx"], vocab["answer_token_to_idx"]
    unk, unk_answer = QUESTION_SPECIALS["<UNK>"], ANSWER_SPECIALS["<UNK1>"]
    # question ids: the records' ``id`` when every record has a distinct one, else the position in the
    # file (what the reference always uses)
    ids = [r.question_id for r in records]
    use_ids = None not in ids and len(set(ids)) == len(ids)
    enc, qids, vids, answers = [], [], [], []
    stats = {"records": len(records), "dropped_oov_answer": 0, "oov_answer_as_unk1": 0, "unknown_tokens": 0,
             "empty_questions": 0, "question_id": "record id" if use_ids else "position in the file"}
    for i, r in enumerate(records):
        answer = a_vocab.get(r.answer)
        if answer is None:
            if split == "train":
                stats["dropped_oov_answer"] += 1
                continue
            answer = unk_answer
            stats["oov_answer_as_unk1"] += 1
        tokens = [q_vocab.get(t, unk) for t in question_tokens(r.question)]
        stats["unknown_tokens"] += sum(t == unk for t in tokens)
        if not tokens:  # the reference would write a 0-length question, which no encoder accepts
            tokens = [unk]
            stats["empty_questions"] += 1
        enc.append(tokens)
        qids.append(r.question_id if use_ids else i)
        vids.append(r.video_id)
        answers.append(answer)
    if not enc:
        raise PrepareError(f"{where}: no question left in the {split} split (every answer is outside the "
                           f"answer vocabulary)")
    max_len = max(len(t) for t in enc)
    questions = np.zeros((len(enc), max_len), dtype=np.int32)  # <NULL> = 0 pads
    for i, t in enumerate(enc):
        questions[i, :len(t)] = t
    stats["questions"] = len(enc)
    stats["max_len"] = max_len
    vids_arr = np.asarray(vids, dtype=np.int64)
    obj = {"questions": questions, "questions_len": np.asarray([len(t) for t in enc], dtype=np.int32),
           "question_id": np.asarray(qids, dtype=np.int64), "video_ids": vids_arr, "video_names": vids_arr.copy(),
           "answers": np.asarray(answers, dtype=np.int64), "glove": glove}
    return obj, stats


def read_glove(path: Path, words: Iterable[str]) -> tuple[dict[str, np.ndarray], int]:
    """Vectors of ``words`` from a GloVe ``.txt`` file (``word v1 ... vD`` per line); returns
    (found vectors, D). The first vector of a word is kept. GloVe 840B has a few "words" with
    spaces in them (". . ."): D is the smallest field count - 1 over the first 100 lines, and a line
    is split from the right, so those entries never match a token."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"GloVe file {path} does not exist")
    want = set(words)
    found: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        head = list(itertools.islice(f, 100))
        counts = [len(line.rstrip("\n").rstrip(" ").split(" ")) - 1 for line in head if line.strip()]
        dim = min(counts) if counts else None
        if dim is None:
            raise PrepareError(f"{path}: empty GloVe file")
        if dim < 1:
            raise PrepareError(f"{path}: a line has no vector (expected 'word v1 ... vD' per line)")
        for lineno, line in enumerate(itertools.chain(head, f), 1):
            line = line.rstrip("\n").rstrip(" ")
            if not line:
                continue
            word = line.split(" ", 1)[0]
            if word not in want or word in found:
                continue
            parts = line.rsplit(" ", dim)
            if len(parts) != dim + 1:
                raise PrepareError(f"{path}: line {lineno} has {len(parts) - 1} values, expected {dim}")
            if parts[0] != word:  # a multi-word entry that starts with one of our tokens
                continue
            try:
                found[word] = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise PrepareError(f"{path}: line {lineno} ({word!r}) has a value that is not a number") from None
    return found, dim


def glove_matrix(vocab: dict, vectors: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """(question vocab, dim) float32; rows of tokens without a vector (and <NULL>, <UNK>) are zeros,
    as in the reference."""
    tokens = vocab["question_token_to_idx"]
    g = np.zeros((len(tokens), dim), dtype=np.float32)
    for t, i in tokens.items():
        v = vectors.get(t)
        if v is not None:
            g[i] = v
    return g


def read_youtube_mapping(path: Path) -> dict[int, str]:
    """MSVD's ``youtube_mapping.txt``: lines ``<youtube clip name> vid<N>`` -> {N: clip name}."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"MSVD video-name mapping {path} does not exist")
    out: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        m = re.fullmatch(r"vid(\d+)", parts[-1]) if len(parts) == 2 else None
        if not m:
            raise PrepareError(f"{path}: line {lineno} is not '<youtube name> vid<N>': {line!r}")
        vid = int(m.group(1))
        if vid in out and out[vid] != parts[0]:
            raise PrepareError(f"{path}: line {lineno}: vid{vid} is mapped twice ({out[vid]!r} and {parts[0]!r})")
        out[vid] = parts[0]
    if not out:
        raise PrepareError(f"{path}: empty mapping")
    return out


def find_mapping(*dirs: Path | None) -> Path | None:
    for d in dirs:
        if d is not None:
            for p in (Path(d) / "youtube_mapping.txt", Path(d).parent / "youtube_mapping.txt"):
                if p.is_file():
                    return p
    return None


def prepare_questions(dataset: str, annotations: Path, glove: Path, out: Path, *, answer_top: int = ANSWER_TOP,
                      mapping: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Write ``{dataset}_vocab.json`` and ``{dataset}_{train,val,test}_questions.pt`` under ``out``;
    returns the summary (also written to ``{dataset}_questions_report.json``)."""
    if dataset not in DATASETS:
        raise PrepareError(f"unknown data set {dataset!r} (known: {', '.join(DATASETS)})")
    if answer_top < 1:
        raise PrepareError(f"answer_top must be at least 1, got {answer_top}")
    annotations, out = Path(annotations), Path(out)
    paths = qa_paths(annotations)
    records = {s: read_qa(p) for s, p in paths.items()}
    if dataset == "msvd-qa":  # every question's video must have a name, or it can get no features
        mapping = mapping or find_mapping(annotations)
        if mapping is not None:
            names = read_youtube_mapping(mapping)
            for s in SPLITS:
                bad = sorted({r.video_id for r in records[s]} - set(names))
                if bad:
                    raise PrepareError(f"{paths[s]}: video id(s) {', '.join(f'vid{v}' for v in bad[:10])}"
                                       f"{' ...' if len(bad) > 10 else ''} are not in {mapping}")
    vocab = build_vocab(records["train"], answer_top)
    vectors, dim = read_glove(glove, vocab["question_token_to_idx"])
    g = glove_matrix(vocab, vectors, dim)
    objs, stats = {}, {}
    for s in SPLITS:
        objs[s], stats[s] = encode_split(records[s], vocab, s, g, str(paths[s]))
    counts = Counter(r.answer for r in records["train"])
    in_vocab = sum(n for a, n in counts.items() if a in vocab["answer_token_to_idx"])
    summary = {
        "dataset": dataset, "annotations": str(annotations), "glove": str(glove), "answer_top": answer_top,
        "question_vocab": len(vocab["question_token_to_idx"]), "answer_vocab": len(vocab["answer_token_to_idx"]),
        "unique_train_answers": len(counts), "train_answer_coverage": in_vocab / max(1, sum(counts.values())),
        "word_dim": dim, "glove_found": len(vectors),
        "glove_missing": sorted(t for t in vocab["question_token_to_idx"] if t not in vectors
                                and t not in QUESTION_SPECIALS),
        "splits": stats,
    }
    out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        atomic_write_bytes(out / f"{dataset}_{s}_questions.pt", pickle.dumps(objs[s], protocol=4))
    atomic_write_bytes(out / f"{dataset}_vocab.json", (json.dumps(vocab, indent=1) + "\n").encode())
    atomic_write_json(out / f"{dataset}_questions_report.json", summary)
    n_tokens = len(vocab["question_token_to_idx"]) - len(QUESTION_SPECIALS)
    log(f"question vocabulary: {summary['question_vocab']} tokens ({len(vectors)} of {n_tokens} with a GloVe "
        f"vector, the others zeros); answer vocabulary: {summary['answer_vocab']} (top {answer_top} of "
        f"{len(counts)} training answers, {100 * summary['train_answer_coverage']:.2f}% of training questions)")
    for s in SPLITS:
        st = stats[s]
        extra = (f", {st['dropped_oov_answer']} dropped (answer outside the vocabulary)" if s == "train"
                 else f", {st['oov_answer_as_unk1']} with an answer outside the vocabulary (<UNK1>, counted wrong)")
        log(f"{s}: {st['questions']} of {st['records']} questions{extra}; {st['unknown_tokens']} unknown tokens")
    log(f"wrote {out}/{dataset}_vocab.json and {dataset}_{{train,val,test}}_questions.pt")
    return summary


# ============================================================================= videos
# ----------------------------------------------------------------------------- finding videos


def find_videos(dataset: str, videos_dir: Path, mapping: Path | None = None) -> dict[int, Path]:
    """{video id: file} for every video under ``videos_dir`` (searched recursively): MSRVTT's
    ``video<N>.mp4`` (TrainValVideo/, TestVideo/), or MSVD's ``<youtube name>.avi`` (YouTubeClips/)
    with ids from ``youtube_mapping.txt``."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise PrepareError(f"video directory {videos_dir} does not exist")
    files = sorted(p for p in videos_dir.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    out: dict[int, Path] = {}

    def add(vid: int, p: Path):
        if vid in out:
            raise PrepareError(f"two files for video id {vid}: {out[vid]} and {p}")
        out[vid] = p

    if dataset == "msrvtt-qa":
        for p in files:
            m = re.fullmatch(r"video(\d+)", p.stem)
            if m:
                add(int(m.group(1)), p)
    elif dataset == "msvd-qa":
        mapping = mapping or find_mapping(videos_dir)
        if mapping is None:
            raise PrepareError(f"MSVD-QA needs youtube_mapping.txt (lines '<youtube name> vid<N>'): none in "
                               f"{videos_dir} or its parent; pass --mapping FILE")
        by_name = {name: vid for vid, name in read_youtube_mapping(mapping).items()}
        for p in files:
            if p.stem in by_name:
                add(by_name[p.stem], p)
    else:
        raise PrepareError(f"unknown data set {dataset!r} (known: {', '.join(DATASETS)})")
    return out


# ----------------------------------------------------------------------------- clip sampling


def clip_frame_indices(total_frames: int, num_clips: int, num_frames: int) -> tuple[np.ndarray, bool]:
    """(num_clips, num_frames) frame indices, and whether frames had to be repeated (padded).

    The reference's ``extract_clips_with_consecutive_frames``: clip centres at
    ``linspace(0, total, num_clips + 2)`` (truncated to integers) without the two ends; each clip
    is the ``num_frames`` consecutive frames ``[c - num_frames // 2, c + num_frames // 2)``. At the
    start of a short video the window is clipped at frame 0 and padded in front with copies of
    frame 0; at its end, a window past the last frame is cut at ``total - 1`` (the reference
    excludes the last frame there) and padded behind with copies of frame ``total - 1``. For an
    odd ``num_frames`` the window is ``[c - num_frames // 2, c + num_frames - num_frames // 2)``
    (the reference would fail).
    """
    if total_frames < 1:
        raise ValueError(f"a video with {total_frames} frames has no clips")
    if num_clips < 1 or num_frames < 1:
        raise ValueError(f"num_clips and num_frames must be positive, got {num_clips}, {num_frames}")
    centres = np.linspace(0, total_frames, num_clips + 2, dtype=np.int32)[1:num_clips + 1]
    half = num_frames // 2
    out = np.empty((num_clips, num_frames), dtype=np.int64)
    padded = False
    for k, c in enumerate(centres.tolist()):
        start, end = c - half, c + (num_frames - half)
        start = max(start, 0)
        if end > total_frames:
            end = total_frames - 1
        idx = list(range(start, end))
        if start == 0:
            short = num_frames - (end - start)
            if short > 0:
                idx = [0] * short + idx
                padded = True
        if end == total_frames - 1:
            short = num_frames - (end - start)
            if short > 0:
                idx = idx + [end] * short
                padded = True
        out[k] = idx[:num_frames]
    return out, padded


# ----------------------------------------------------------------------------- decoding


class VideoError(Exception):
    """A video that cannot be decoded."""


@dataclass
class DecodedVideo:
    video_id: int
    path: Path
    clips: np.ndarray | None  # (clips, frames, H, W, 3) uint8, None when unreadable
    total_frames: int
    padded: bool = False
    error: str | None = None
    warning: str | None = None


def _decode(path: Path, wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int, str | None]:
    """Decode a video's first stream; keep the frames in ``wanted`` (all when None) as RGB.
    Returns (frames, number decoded, warning). A decoding error after the first frames ends the
    video there (with a warning); before any frame it raises VideoError."""
    import av

    kept: dict[int, np.ndarray] = {}
    n, warning = 0, None
    try:
        container = av.open(str(path))
    except Exception as e:  # noqa: BLE001 - every kind of unreadable file
        raise VideoError(f"cannot open ({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if wanted is None or n in wanted:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except Exception as e:  # noqa: BLE001
            if n == 0:
                raise VideoError(f"cannot decode ({type(e).__name__}: {e})") from None
            warning = f"decoding stopped after {n} frames ({type(e).__name__}: {e})"
    if n == 0:
        raise VideoError("no decodable frame")
    return kept, n, warning


def _frame_count(path: Path) -> int:
    import av

    try:
        with av.open(str(path)) as c:
            return int(c.streams.video[0].frames) if c.streams.video else 0
    except Exception:  # noqa: BLE001 - reported by the decoding pass
        return 0


def decode_clips(video_id: int, path: Path, num_clips: int, num_frames: int) -> DecodedVideo:
    """The sampled clips of a video, never raising: an unreadable video has ``error`` set.

    Frames are counted by decoding (the container's frame count, when it has one, only chooses
    which frames to keep in a single pass; a second pass runs when the count was wrong)."""
    path = Path(path)
    try:
        meta = _frame_count(path)
        wanted = set(clip_frame_indices(meta, num_clips, num_frames)[0].ravel().tolist()) if meta > 0 else None
        kept, total, warning = _decode(path, wanted)
        idx, padded = clip_frame_indices(total, num_clips, num_frames)
        need = set(idx.ravel().tolist())
        if not need <= kept.keys():
            kept, total2, warning = _decode(path, need)
            if total2 != total or not need <= kept.keys():
                raise VideoError(f"decoded {total} frames, then {total2}: the video does not decode the same twice")
        clips = np.stack([np.stack([kept[i] for i in row]) for row in idx.tolist()])
        return DecodedVideo(video_id, path, clips, total, padded, None, warning)
    except VideoError as e:
        return DecodedVideo(video_id, path, None, 0, False, str(e))
    except Exception as e:  # noqa: BLE001 - any failure on one video is reported, not fatal
        return DecodedVideo(video_id, path, None, 0, False, f"{type(e).__name__}: {e}")


def prefetch(fn: Callable, items: list, workers: int, depth: int) -> Iterator:
    """``fn(item)`` for every item, computed ``workers`` at a time in threads (PyAV decodes without
    the GIL), yielded in order with at most ``depth`` results waiting."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as ex:
        it = iter(items)
        queue = deque(ex.submit(fn, x) for x in itertools.islice(it, depth))
        while queue:
            fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(ex.submit(fn, nxt))
            yield fut.result()


# ----------------------------------------------------------------------------- backbones

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINETICS_MEAN, KINETICS_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
APPEARANCE_MODELS = {"resnet50": "ResNet50_Weights.IMAGENET1K_V1", "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
                     "resnet152": "ResNet152_Weights.IMAGENET1K_V1"}
MOTION_MODELS = {"r2plus1d_18": "R2Plus1D_18_Weights.KINETICS400_V1", "r3d_18": "R3D_18_Weights.KINETICS400_V1",
                 "mc3_18": "MC3_18_Weights.KINETICS400_V1"}
RESNEXT3D = "resnext101-3d"


def _resnext3d():
    """ResNeXt-101 3D (32x4d, shortcut B) of Hara et al.'s 3D-ResNets, the motion network of HCRN
    and DualVGR (their ``preprocess/models/resnext.py`` with ``last_fc=False``). Module names match
    the ``resnext-101-kinetics.pth`` checkpoint's keys (after its ``module.`` prefix). The final
    average pool is adaptive: the reference's fixed (1, 4, 4) window is the whole map for 16 frames
    at 112 x 112 (identical there), and other sizes still give one 2048-d vector per clip."""
    from torch import nn

    class Block(nn.Module):
        expansion = 2

        def __init__(self, inplanes: int, planes: int, cardinality: int, stride: int = 1,
                     downsample: nn.Module | None = None):
            super().__init__()
            mid = cardinality * (planes // 32)
            self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
            self.bn1 = nn.BatchNorm3d(mid)
            self.conv2 = nn.Conv3d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
            self.bn2 = nn.BatchNorm3d(mid)
            self.conv3 = nn.Conv3d(mid, planes * self.expansion, kernel_size=1, bias=False)
            self.bn3 = nn.BatchNorm3d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNeXt3D(nn.Module):
        def __init__(self, layers=(3, 4, 23, 3), cardinality: int = 32):
            super().__init__()
            self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=(3, 3, 3), bias=False)
            self.bn1 = nn.BatchNorm3d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool3d(kernel_size=(3, 3, 3), stride=2, padding=1)
            self.inplanes = 64
            self.layer1 = self._layer(128, layers[0], cardinality, 1)
            self.layer2 = self._layer(256, layers[1], cardinality, 2)
            self.layer3 = self._layer(512, layers[2], cardinality, 2)
            self.layer4 = self._layer(1024, layers[3], cardinality, 2)
            self.avgpool = nn.AdaptiveAvgPool3d(1)

        def _layer(self, planes: int, blocks: int, cardinality: int, stride: int) -> nn.Sequential:
            downsample = None
            if stride != 1 or self.inplanes != planes * Block.expansion:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * Block.expansion, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * Block.expansion))
            mods = [Block(self.inplanes, planes, cardinality, stride, downsample)]
            self.inplanes = planes * Block.expansion
            mods += [Block(self.inplanes, planes, cardinality) for _ in range(1, blocks)]
            return nn.Sequential(*mods)

        def forward(self, x):  # (B, 3, T, H, W), 0..255 -> (B, 2048)
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.avgpool(x).flatten(1)

    return ResNeXt3D()


@dataclass
class Backbone:
    name: str
    module: object  # torch.nn.Module in eval mode on its device
    dim: int
    size: int
    mean: tuple | None  # on the 0..1 scale; None = raw 0..255 values (the reference's ResNeXt)
    std: tuple | None
    weights: str  # what the attrs record: torchvision:<enum>, file:<name>, random
    weights_path: str = ""


def _hub_checkpoint(enum_name: str) -> Path:
    """Where torchvision keeps a weights file once downloaded (nothing is downloaded here)."""
    import torch
    from torchvision.models import get_weight

    url = get_weight(enum_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _load_state_dict(path: Path, what: str) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{what} weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise PrepareError(f"{path}: cannot load {what} weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise PrepareError(f"{path}: no state dict in the {what} weights file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _apply_weights(module, state: dict, path: Path, what: str, drop: tuple[str, ...] = ()) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    have = module.state_dict()
    # checkpoints from before PyTorch 0.4.1 (HCRN's ResNeXt) have no BatchNorm num_batches_tracked
    missing = [k for k in have if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in have]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in have.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:3]) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")
        problems = [f"{label}: {few(xs)}" for label, xs in (("missing", missing), ("unexpected", unexpected),
                                                             ("wrong shape", shapes)) if xs]
        raise PrepareError(f"{path}: not {what} weights ({'; '.join(problems)})")
    module.load_state_dict(state, strict=False)


def _weights_state(name: str, enum_name: str | None, weights: Path | None, random_weights: bool, what: str,
                   option: str) -> tuple[dict | None, str, str]:
    """``option`` is how the user passes a file (``--appearance-weights PATH``)."""
    """(state dict or None for random, the weights label, the path) for a backbone."""
    if random_weights:
        return None, "random", ""
    if weights is not None:
        return _load_state_dict(weights, what), f"file:{Path(weights).name}", str(Path(weights).resolve())
    if enum_name is None:
        raise PrepareError(f"{what} model {name} needs a checkpoint: pass {option}")
    cached = _hub_checkpoint(enum_name)
    if not cached.is_file():
        raise PrepareError(
            f"no weights for {what} model {name}: torchvision's {enum_name} is not in its cache ({cached}), and this "
            f"command does not download. Either fetch it once on a machine with internet access, e.g. "
            f"python -c \"import torchvision; torchvision.models.get_model('{name}', "
            f"weights='{enum_name.split('.')[-1]}')\" "
            f"(or download {_weights_url(enum_name)} to {cached}), or pass {option} (a state dict file).")
    return _load_state_dict(cached, what), f"torchvision:{enum_name}", str(cached)


def _weights_url(enum_name: str) -> str:
    from torchvision.models import get_weight

    return get_weight(enum_name).url


@contextmanager
def _seeded_float32():
    """Build a model the same way every time (random weights for tests): seed 0, float32, without
    touching the caller's RNG state or default dtype."""
    import torch

    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


def build_appearance(name: str, weights: Path | None, random_weights: bool, size: int, device) -> Backbone:
    import torch
    import torchvision
    from torch import nn

    if name not in APPEARANCE_MODELS:
        raise PrepareError(f"unknown appearance model {name!r} (known: {', '.join(APPEARANCE_MODELS)})")
    state, label, wpath = _weights_state(name, APPEARANCE_MODELS[name], weights, random_weights, "appearance",
                                         "--appearance-weights PATH")
    with _seeded_float32():
        model = getattr(torchvision.models, name)(weights=None)
    if state is not None:
        _apply_weights(model, state, Path(wpath), name)
    model.fc = nn.Identity()  # pool5: the reference drops the last layer
    model = model.eval().to(device, torch.float32)
    return Backbone(name, model, 2048, size, IMAGENET_MEAN, IMAGENET_STD, label, wpath)


def build_motion(spec: str, weights: Path | None, random_weights: bool, size: int, device) -> Backbone:
    import torch
    import torchvision
    from torch import nn

    name, _, spec_path = spec.partition(":")
    if spec_path:
        if name != RESNEXT3D:
            raise PrepareError(f"--motion {spec!r}: only {RESNEXT3D} takes a checkpoint path in the name; "
                               f"use --motion-weights PATH")
        if weights is not None and Path(weights) != Path(spec_path):
            raise PrepareError(f"--motion {spec!r} and --motion-weights {weights} name two checkpoints")
        weights = Path(spec_path)
    if name == RESNEXT3D:
        state, label, wpath = _weights_state(name, None, weights, random_weights, "motion",
                                             f"--motion {RESNEXT3D}:PATH (HCRN's resnext-101-kinetics.pth)")
        with _seeded_float32():
            model = _resnext3d()
        if state is not None:  # the checkpoint's classifier (fc, 400 Kinetics classes) is not used
            _apply_weights(model, state, Path(wpath), "ResNeXt-101 3D", drop=("fc.",))
        return Backbone(name, model.eval().to(device, torch.float32), 2048, size, None, None, label, wpath)
    if name not in MOTION_MODELS:
        raise PrepareError(f"unknown motion model {spec!r} (known: {', '.join(MOTION_MODELS)}, {RESNEXT3D}:PATH)")
    state, label, wpath = _weights_state(name, MOTION_MODELS[name], weights, random_weights, "motion",
                                         "--motion-weights PATH")
    with _seeded_float32():
        model = getattr(torchvision.models.video, name)(weights=None)
    if state is not None:
        _apply_weights(model, state, Path(wpath), name)
    model.fc = nn.Identity()  # the 512-d globally pooled clip feature
    model = model.eval().to(device, torch.float32)
    return Backbone(name, model, 512, size, KINETICS_MEAN, KINETICS_STD, label, wpath)


def _preprocess(frames, size: int, mean, std):
    """(N, H, W, 3) uint8 on the device -> (N, 3, size, size) float: bicubic resize of the whole
    frame to a square (antialiased, like PIL's bicubic in the reference's ``imresize``; no crop),
    kept in 0..255, then normalised (or left in 0..255 when ``mean`` is None)."""
    import torch
    import torch.nn.functional as F

    x = frames.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0, 255).round_()  # imresize returns uint8
    if mean is None:
        return x
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
    return (x - m) / s


# ----------------------------------------------------------------------------- the h5 files


class FeatureFiles:
    """The two feature files, opened for appending: resizable along videos, flushed per batch.

    A row is complete once its id is written (features first, then ``ids``, then a flush), so
    after a kill the files hold every complete batch; opening them again truncates anything past
    the last id both files agree on. Attributes on the feature data sets record the backbone and
    sampling settings; resuming with other settings is refused."""

    def __init__(self, app_path: Path, motion_path: Path, num_clips: int, num_frames: int,
                 app_attrs: dict, motion_attrs: dict, app_dim: int, motion_dim: int):
        import h5py

        self.paths = (Path(app_path), Path(motion_path))
        self.files = []
        for p in self.paths:
            try:
                self.files.append(h5py.File(p, "a"))
            except OSError as e:
                self.close()
                raise PrepareError(f"{p}: not a readable HDF5 file ({e}); delete it to start again") from None
        fa, fm = self.files
        self.app = self._dataset(fa, "resnet_features", (num_clips, num_frames, app_dim), app_attrs, np.float32)
        self.mot = self._dataset(fm, "resnext_features", (num_clips, motion_dim), motion_attrs, np.float32)
        self.app_ids = self._dataset(fa, "ids", (), None, np.int64)
        self.mot_ids = self._dataset(fm, "ids", (), None, np.int64)
        self.nframes = self._dataset(fa, "num_frames", (), None, np.int64)
        n = min(self.app_ids.shape[0], self.mot_ids.shape[0])
        a, m = self.app_ids[:n], self.mot_ids[:n]
        if not np.array_equal(a, m):
            r = int(np.flatnonzero(a != m)[0])
            self.close()
            raise PrepareError(f"{self.paths[0]} and {self.paths[1]} disagree at row {r} (ids {a[r]} and {m[r]}): "
                               f"they were not written together; delete both to start again")
        for ds in (self.app, self.app_ids, self.nframes, self.mot, self.mot_ids):
            if ds.shape[0] > n:  # an interrupted batch
                ds.resize(n, axis=0)
        if self.nframes.shape[0] < n:  # should not happen; -1 = unknown
            old = self.nframes.shape[0]
            self.nframes.resize(n, axis=0)
            self.nframes[old:] = -1
        self.done: set[int] = set(a.tolist())
        for f in self.files:
            f.flush()

    def _dataset(self, f, key: str, row_shape: tuple, attrs: dict | None, dtype):
        path = f.filename
        if key in f:
            ds = f[key]
            if ds.shape[1:] != row_shape or ds.maxshape[0] is not None:
                raise PrepareError(f"{path}: data set {key!r} has shape {ds.shape} (max {ds.maxshape}), this run "
                                   f"writes rows of {row_shape} to a resizable data set: it was written with other "
                                   f"settings or by another tool; use another --out or delete the file")
            for k, v in (attrs or {}).items():
                have = ds.attrs.get(k)
                have = have.item() if hasattr(have, "item") else have
                if k != "weights_path" and have != v:
                    raise PrepareError(f"{path}: {key!r} was written with {k}={have!r}, this run uses {k}={v!r}; "
                                       f"use another --out or delete the file")
            return ds
        ds = f.create_dataset(key, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                              chunks=(1, *row_shape) if row_shape else (4096,))
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v
        return ds

    @staticmethod
    def _append(ds, values: np.ndarray) -> None:
        n = ds.shape[0]
        ds.resize(n + values.shape[0], axis=0)
        ds[n:] = values

    def append(self, ids: np.ndarray, app: np.ndarray, mot: np.ndarray, nframes: np.ndarray) -> None:
        fa, fm = self.files
        self._append(self.app, app)
        self._append(self.nframes, nframes)
        self._append(self.app_ids, ids)
        fa.flush()
        self._append(self.mot, mot)
        self._append(self.mot_ids, ids)
        fm.flush()
        self.done.update(int(i) for i in ids)

    def close(self) -> None:
        for f in self.files:
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        self.files = []


# ----------------------------------------------------------------------------- extraction


@dataclass
class FeatureSettings:
    appearance: str = "resnet101"
    motion: str = "r2plus1d_18"
    clips: int = 8
    frames: int = 16
    image_size: int = 224
    motion_size: int = 112
    batch_size: int = 4
    appearance_weights: Path | None = None
    motion_weights: Path | None = None
    random_weights: bool = False
    device: str = "auto"
    workers: int = 2
    allow_missing: bool = False


@dataclass
class FeatureSummary:
    appearance: Path
    motion: Path
    total: int = 0
    skipped: int = 0
    processed: int = 0
    unreadable: list = field(default_factory=list)  # {"id", "file", "error"}
    padded: list = field(default_factory=list)  # {"id", "file", "frames"}
    warnings: list = field(default_factory=list)  # {"id", "file", "warning"}
    missing: list = field(default_factory=list)  # video ids referenced by questions without a file
    complete: bool = False


def video_ids_of(annotations: Path) -> set[int]:
    return {r.video_id for p in qa_paths(annotations).values() for r in read_qa(p)}


def extract_features(dataset: str, videos: Path, out: Path, settings: FeatureSettings, *,
                     annotations: Path | None = None, mapping: Path | None = None, only: Iterable[int] | None = None,
                     console=None, progress: bool = True) -> FeatureSummary:
    """Write (or complete) ``{dataset}_appearance_feat.h5`` and ``{dataset}_motion_feat.h5``.

    Videos: every one found under ``videos`` (see :func:`find_videos`), or only those the QA
    files under ``annotations`` refer to (a referenced video without a file is an error unless
    ``settings.allow_missing``: then it gets zero features, like an unreadable one); ``only``
    restricts further (tests)."""
    import torch
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or Console(stderr=True, soft_wrap=True)
    s = settings
    if dataset not in DATASETS:
        raise PrepareError(f"unknown data set {dataset!r} (known: {', '.join(DATASETS)})")
    for k in ("clips", "frames", "image_size", "motion_size", "batch_size"):
        if getattr(s, k) < 1:
            raise PrepareError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(s, k)}")
    out = Path(out)
    if dataset == "msvd-qa" and mapping is None:
        mapping = find_mapping(annotations, videos)
    files = find_videos(dataset, videos, mapping)
    summary = FeatureSummary(out / f"{dataset}_appearance_feat.h5", out / f"{dataset}_motion_feat.h5")
    if annotations is not None:
        wanted_ids = video_ids_of(annotations)
        summary.missing = sorted(wanted_ids - files.keys())
        if summary.missing and not s.allow_missing:
            names = ", ".join(map(str, summary.missing[:20]))
            raise PrepareError(f"{len(summary.missing)} video(s) referenced by the QA files in {annotations} have no "
                               f"file under {videos}: ids {names}{' ...' if len(summary.missing) > 20 else ''} "
                               f"(pass --allow-missing to give them zero features)")
        targets = {v: files.get(v) for v in wanted_ids}
    else:
        targets = dict(files)
        if not targets:
            like = "video<N>.mp4" if dataset == "msrvtt-qa" else "<youtube name>.avi from the mapping"
            raise PrepareError(f"no video under {videos} is named like a {dataset} video ({like})")
    if only is not None:
        only = set(only)
        targets = {v: p for v, p in targets.items() if v in only}

    from .env import resolve_device

    try:
        dev = resolve_device(s.device)
    except ValueError as e:
        raise PrepareError(f"--{e}") from None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    app_model = build_appearance(s.appearance, s.appearance_weights, s.random_weights, s.image_size, dev)
    mot_model = build_motion(s.motion, s.motion_weights, s.random_weights, s.motion_size, dev)
    common = {"clips": s.clips, "frames": s.frames}
    app_attrs = {"model": app_model.name, "weights": app_model.weights, "weights_path": app_model.weights_path,
                 "image_size": s.image_size, **common}
    mot_attrs = {"model": mot_model.name, "weights": mot_model.weights, "weights_path": mot_model.weights_path,
                 "image_size": s.motion_size, **common}
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / f"{dataset}_features_report.json"
    ff = FeatureFiles(summary.appearance, summary.motion, s.clips, s.frames, app_attrs, mot_attrs,
                      app_model.dim, mot_model.dim)
    try:
        # what earlier runs reported about the videos that are in the files (the others are redone)
        try:
            previous = json.loads(report_path.read_text()) if report_path.is_file() else {}
        except json.JSONDecodeError:
            previous = {}
        for key in ("unreadable", "padded", "warnings"):
            getattr(summary, key).extend(e for e in previous.get(key, []) if e.get("id") in ff.done)
        todo = sorted(v for v in targets if v not in ff.done)
        summary.total, summary.skipped = len(targets), len(targets) - len(todo)
        if s.random_weights:
            console.print("[yellow]--random-weights: the features are meaningless (for tests only)[/yellow]")
        console.print(f"{dataset}: {len(targets)} videos, {summary.skipped} already in {summary.appearance.name}, "
                      f"{len(todo)} to do on {dev} ({app_model.name} {app_model.weights}, "
                      f"{mot_model.name} {mot_model.weights})", highlight=False)

        def report() -> None:
            atomic_write_json(report_path, {
                "dataset": dataset, "videos": str(videos), "appearance": app_attrs, "motion": mot_attrs,
                "unreadable": summary.unreadable, "padded": summary.padded, "warnings": summary.warnings,
                "missing": summary.missing})

        def decode(v: int) -> DecodedVideo:
            p = targets[v]
            if p is None:
                return DecodedVideo(v, Path(f"<no file for video id {v}>"), None, 0, False, "no video file")
            return decode_clips(v, p, s.clips, s.frames)

        live = progress and console.is_terminal  # else a plain line every 500 videos (logs)
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=console, disable=not live)
        with bar, torch.inference_mode():
            task = bar.add_task("videos", total=len(targets), completed=summary.skipped, info="")
            batch: list[DecodedVideo] = []
            stream = prefetch(decode, todo, s.workers, depth=max(2 * s.workers, s.batch_size) + s.batch_size)
            for item in itertools.chain(stream, [None]):
                if item is not None:
                    batch.append(item)
                    if len(batch) < s.batch_size:
                        continue
                if not batch:
                    break
                new_issue = _run_batch(batch, ff, app_model, mot_model, s, dev, summary, console)
                summary.processed += len(batch)
                if new_issue:
                    report()
                bar.update(task, advance=len(batch), info=f"{len(summary.unreadable)} unreadable, "
                                                          f"{len(summary.padded)} padded")
                if progress and not live and summary.processed % 500 < len(batch):
                    console.print(f"{summary.processed}/{len(todo)} videos", highlight=False)
                batch = []
        summary.complete = all(v in ff.done for v in targets)
        report()
    finally:
        ff.close()
    _print_summary(summary, console)
    return summary


def _run_batch(batch: list[DecodedVideo], ff: FeatureFiles, app_model: Backbone, mot_model: Backbone,
               s: FeatureSettings, dev, summary: FeatureSummary, console) -> bool:
    """Features of a batch of decoded videos (one forward pass per backbone), appended to the files."""
    import torch

    C, F = s.clips, s.frames
    ok = [d for d in batch if d.clips is not None]
    app_out = np.zeros((len(batch), C, F, app_model.dim), dtype=np.float32)
    mot_out = np.zeros((len(batch), C, mot_model.dim), dtype=np.float32)
    if ok:
        app_in, mot_in = [], []
        for d in ok:  # videos differ in size: resize each, then batch
            frames = torch.from_numpy(d.clips.reshape(C * F, *d.clips.shape[2:])).to(dev, non_blocking=True)
            app_in.append(_preprocess(frames, app_model.size, app_model.mean, app_model.std))
            m = _preprocess(frames, mot_model.size, mot_model.mean, mot_model.std)
            mot_in.append(m.view(C, F, 3, mot_model.size, mot_model.size).transpose(1, 2))  # (C, 3, F, S, S)
        a = app_model.module(torch.cat(app_in)).float().view(len(ok), C, F, app_model.dim)
        m = mot_model.module(torch.cat(mot_in)).float().view(len(ok), C, mot_model.dim)
        rows = [i for i, d in enumerate(batch) if d.clips is not None]
        app_out[rows] = a.cpu().numpy()
        mot_out[rows] = m.cpu().numpy()
    new_issue = False
    for d in batch:
        name = str(d.path)
        if d.error is not None:
            summary.unreadable.append({"id": d.video_id, "file": name, "error": d.error})
            console.print(f"[red]unreadable[/red] video {d.video_id} ({name}): {d.error}; written as zeros",
                          highlight=False)
            new_issue = True
        elif d.padded:
            summary.padded.append({"id": d.video_id, "file": name, "frames": d.total_frames})
            console.print(f"[yellow]short[/yellow] video {d.video_id} ({name}): {d.total_frames} frames, fewer than "
                          f"{C} clips x {F} frames need; padded by repeating its first / last frame", highlight=False)
            new_issue = True
        if d.warning:
            summary.warnings.append({"id": d.video_id, "file": name, "warning": d.warning})
            console.print(f"[yellow]warning[/yellow] video {d.video_id} ({name}): {d.warning}", highlight=False)
            new_issue = True
    ids = np.asarray([d.video_id for d in batch], dtype=np.int64)
    nframes = np.asarray([d.total_frames for d in batch], dtype=np.int64)
    if not (np.isfinite(app_out).all() and np.isfinite(mot_out).all()):
        bad = [int(v) for v, a, m in zip(ids, app_out, mot_out) if not (np.isfinite(a).all() and np.isfinite(m).all())]
        raise PrepareError(f"NaN or Inf features for video id(s) {bad}: check the weights and the device")
    ff.append(ids, app_out, mot_out, nframes)
    return new_issue


def _print_summary(summary: FeatureSummary, console) -> None:
    console.print(f"{summary.processed} videos processed, {summary.skipped} already done; "
                  f"{'complete' if summary.complete else 'NOT complete'}: {summary.appearance}, {summary.motion}",
                  highlight=False)
    if summary.unreadable:
        console.print(f"[red]{len(summary.unreadable)} unreadable video(s), written as zero features[/red]: "
                      + ", ".join(f"{u['id']} ({Path(u['file']).name})" for u in summary.unreadable[:20]),
                      highlight=False)
    if summary.padded:
        console.print(f"[yellow]{len(summary.padded)} short video(s), padded[/yellow]: "
                      + ", ".join(f"{u['id']} ({Path(u['file']).name}, {u['frames']} frames)"
                                  for u in summary.padded[:20]),
                      highlight=False)
    if summary.unreadable or summary.padded or summary.warnings:
        console.print(f"details: {summary.appearance.parent}/{summary.appearance.name.split('_appearance')[0]}"
                      f"_features_report.json", highlight=False)


# ============================================================================= CLI


class Dataset(str, Enum):
    msvd = "msvd-qa"
    msrvtt = "msrvtt-qa"


def _cli():
    import typer
    from rich.console import Console

    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]},
                      help="From the public MSVD-QA / MSRVTT-QA release (QA json files, videos) and a GloVe file to "
                           "the HCRN / DualVGR feature format that harness.data loads. See docs/preparing-data.md.")
    console = Console(stderr=True, soft_wrap=True)  # no wrapping: messages hold file names

    def fail(e: Exception) -> None:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)

    @app.command()
    def questions(
        dataset: Dataset = typer.Option(..., help="Which release: names the output files ({dataset}_vocab.json ...)."),
        annotations: Path = typer.Option(..., help="Directory with the release's train_qa.json, val_qa.json, "
                                         "test_qa.json (records: question, answer, video_id, id)."),
        glove: Path = typer.Option(..., help="GloVe vectors, .txt format (glove.840B.300d.txt as in the reference)."),
        out: Path = typer.Option(..., help="Output directory (created if needed)."),
        answer_top: int = typer.Option(ANSWER_TOP, help="Answer vocabulary: the K most frequent training answers "
                                       "(the reference's default for both data sets)."),
        mapping: Optional[Path] = typer.Option(None, help="MSVD-QA's youtube_mapping.txt, to check that every "
                                               "question's video has a name [default: found in --annotations or "
                                               "its parent, else not checked]."),
    ):
        """Vocabulary json and question pickles (HCRN's preprocess_questions.py rules)."""
        try:
            prepare_questions(dataset.value, annotations, glove, out, answer_top=answer_top, mapping=mapping,
                              log=lambda m: console.print(m, highlight=False))
        except PrepareError as e:
            fail(e)

    @app.command()
    def features(
        videos: Path = typer.Option(..., help="Directory holding the videos (searched recursively): MSVD's "
                                    "YouTubeClips/*.avi or MSRVTT's TrainValVideo/ and TestVideo/ video<N>.mp4."),
        out: Path = typer.Option(..., help="Output directory (created if needed)."),
        dataset: Dataset = typer.Option(..., help="Which release: names the files and how video files map to ids."),
        annotations: Optional[Path] = typer.Option(None, help="The QA json directory: only the videos its questions "
                                                   "refer to, and a missing one is an error [default: every video "
                                                   "found]."),
        mapping: Optional[Path] = typer.Option(None, help="MSVD-QA's youtube_mapping.txt [default: found in "
                                               "--annotations, --videos or their parents]."),
        appearance: str = typer.Option("resnet101", help=f"Appearance backbone: {', '.join(APPEARANCE_MODELS)} "
                                       "(torchvision, ImageNet; pool5, 2048-d)."),
        motion: str = typer.Option("r2plus1d_18", help=f"Motion backbone: {', '.join(MOTION_MODELS)} (torchvision, "
                                   f"Kinetics-400; 512-d) or {RESNEXT3D}:PATH (the reference's ResNeXt-101 3D "
                                   "checkpoint resnext-101-kinetics.pth; 2048-d)."),
        clips: int = typer.Option(8, help="Clips per video (MSVD-QA 8; MSRVTT-QA configs use 16)."),
        frames: int = typer.Option(16, help="Consecutive frames per clip."),
        appearance_weights: Optional[Path] = typer.Option(None, help="State dict file for the appearance backbone "
                                                          "[default: torchvision's cached ImageNet weights]."),
        motion_weights: Optional[Path] = typer.Option(None, help="State dict / checkpoint file for the motion "
                                                      "backbone [default: torchvision's cached Kinetics weights]."),
        random_weights: bool = typer.Option(False, "--random-weights", help="Random backbones: meaningless features, "
                                            "for tests only."),
        image_size: int = typer.Option(224, help="Appearance frame size (square)."),
        motion_size: int = typer.Option(112, help="Motion frame size (square)."),
        batch_size: int = typer.Option(4, help="Videos per forward pass (x clips x frames images)."),
        device: str = typer.Option("auto", help="auto (cuda when available), cpu, cuda, cuda:N."),
        workers: int = typer.Option(min(4, os.cpu_count() or 1), help="Decoding threads."),
        allow_missing: bool = typer.Option(False, "--allow-missing", help="With --annotations: give referenced "
                                           "videos that have no file zero features instead of failing."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
    ):
        """Appearance and motion h5 files (HCRN's preprocess_features.py sampling); resumable."""
        settings = FeatureSettings(appearance, motion, clips, frames, image_size, motion_size, batch_size,
                                   appearance_weights, motion_weights, random_weights, device, workers, allow_missing)
        try:
            summary = extract_features(dataset.value, videos, out, settings, annotations=annotations, mapping=mapping,
                                       console=console, progress=progress)
        except PrepareError as e:
            fail(e)
        if not summary.complete:
            raise typer.Exit(1)

    return app


def main(argv: list[str] | None = None) -> None:
    _cli()(args=argv, prog_name="python -m harness.prepare")


if __name__ == "__main__":
    main(sys.argv[1:])
