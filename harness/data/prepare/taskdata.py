"""The questions of a data set of any task (open-ended, multiple choice, count), from the records a
release's reader made (:mod:`.tgif`, :mod:`.nextqa`): vocabularies, encoding and the files
(:mod:`harness.data.layout`'s format; HCRN's encoding of TGIF-QA in ``preprocess/datautils/tgif_qa.py``).

* question vocabulary: ``<NULL>`` = 0, ``<UNK>`` = 1, then the training tokens in order of first
  appearance; for multiple choice the candidates' tokens come first, then the questions' (HCRN's
  ``question_answer_token_to_idx``, which encodes both; written under both keys);
* answer vocabulary: open-ended ``<UNK0>`` = 0, ``<UNK1>`` = 1 then the ``answer_top`` most frequent
  training answers (all by default); multiple choice HCRN's ``{<UNK0>: 0, <UNK1>: 1}`` (unused: the
  answer is the right candidate's index); count HCRN's ``{<UNK>: 0}`` (the answer is the count);
* an open-ended training question whose answer is outside the vocabulary is dropped, a val / test
  one is kept with ``<UNK1>`` (counted wrong), as in :mod:`.questions`;
* a question or candidate with no token left is one ``<UNK>`` (no encoder takes a length of 0);
* a question or candidate keeps at most ``max_tokens`` tokens (its first; ``--max-question-tokens``,
  :data:`~.questions.MAX_QUESTION_TOKENS` by default), in the vocabulary and the pickles alike, so that
  one oversized text cannot pad its split; the cut ones are counted;
* every split is padded with ``<NULL>`` to its own longest question and longest candidate.
"""
from __future__ import annotations

import csv
import json
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from variants.tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED

from harness.data import layout as L
from harness.files import atomic_write_bytes, atomic_write_json
from harness.data.prepare.common import MAX_ID, PrepareError, shown
from harness.data.prepare.questions import (ANSWER_SPECIALS, MAX_QUESTION_TOKENS, QUESTION_SPECIALS, glove_matrix,
    read_glove)

#: HCRN's answer vocabulary of a count data set (the answer is the count itself)
COUNT_ANSWERS = {"<UNK>": 0}
TASKS = (OPEN_ENDED, MULTIPLE_CHOICE, COUNT)


@dataclass
class TaskRecord:
    """One question of a release, tokenised; ``where`` names its file and line for messages."""

    tokens: list[str]
    #: open-ended: the answer text; multiple choice: the right candidate's index; count: the count
    answer: str | int
    video_id: int
    video_name: str
    question_id: int
    category: str
    where: str
    #: multiple choice: each candidate's tokens
    candidates: tuple[list[str], ...] = ()


# ----------------------------------------------------------------------------- reading a release's table


def read_table(path: Path, required: tuple[str, ...], *, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL
               ) -> list[tuple[int, dict[str, str]]]:
    """A release's csv / tsv file with a header line: (line number, {column: text}) per data row.
    Every ``required`` column must be in the header and every row must have the header's fields."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"question file {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM is not part of the header
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if header is None:
                raise PrepareError(f"{path}: empty file (expected a header line)")
            missing = [c for c in required if c not in header]
            if missing:
                raise PrepareError(f"{path}: no column {', '.join(map(repr, missing))} in the header line "
                                   f"(has: {', '.join(header)}; separated by {delimiter!r})")
            rows = []
            for fields in reader:
                if not fields or fields == [""]:
                    continue
                if len(fields) != len(header):
                    raise PrepareError(f"{path}: line {reader.line_num} has {len(fields)} fields, the header "
                                       f"{len(header)} (separated by {delimiter!r})")
                rows.append((reader.line_num, dict(zip(header, fields))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise PrepareError(f"{path}: not a readable {delimiter!r}-separated text file ({e})") from None
    if not rows:
        raise PrepareError(f"{path}: no question (only a header line)")
    return rows


def integer(text: str, where: str, column: str, lo: int | None = None, hi: int | None = None) -> int:
    """A table cell that must be an integer in lo..hi (hi: at most :data:`~.common.MAX_ID`, what the
    pickles store); the message names the file, line and column."""
    hi = MAX_ID if hi is None else hi
    try:
        v = int(text.strip())
    except ValueError:
        raise PrepareError(f"{where}, column {column!r}: {shown(text)} is not an integer") from None
    if (lo is not None and v < lo) or v > hi:
        raise PrepareError(f"{where}, column {column!r}: {shown(v)} is outside {lo}..{hi}")
    return v


# ----------------------------------------------------------------------------- vocabularies and encoding


def build_task_vocab(task: str, train: list[TaskRecord], answer_top: int | None = None,
                     max_tokens: int = MAX_QUESTION_TOKENS) -> dict:
    """The three vocabularies of a ``task`` data set from its training records (each text's first
    ``max_tokens`` tokens)."""
    if task not in TASKS:
        raise PrepareError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    q = dict(QUESTION_SPECIALS)
    if task == MULTIPLE_CHOICE:
        for r in train:
            for c in r.candidates:
                for t in c[:max_tokens]:
                    q.setdefault(t, len(q))
    for r in train:
        for t in r.tokens[:max_tokens]:
            q.setdefault(t, len(q))
    if task == MULTIPLE_CHOICE:
        return {L.QUESTION_TOKENS_KEY: q, L.ANSWER_TOKENS_KEY: dict(ANSWER_SPECIALS),
                L.QUESTION_ANSWER_TOKENS_KEY: dict(q)}
    if task == COUNT:
        answers = dict(COUNT_ANSWERS)
    else:
        answers = dict(ANSWER_SPECIALS)
        for a, _ in Counter(r.answer for r in train).most_common(answer_top):
            answers[a] = len(answers)
    return {L.QUESTION_TOKENS_KEY: q, L.ANSWER_TOKENS_KEY: answers,
            L.QUESTION_ANSWER_TOKENS_KEY: dict(QUESTION_SPECIALS)}


def _ids(tokens: list[str], vocab: dict, stats: dict, max_tokens: int) -> list[int]:
    unk = QUESTION_SPECIALS["<UNK>"]
    stats["truncated_texts"] += len(tokens) > max_tokens
    ids = [vocab.get(t, unk) for t in tokens[:max_tokens]]
    stats["unknown_tokens"] += ids.count(unk)
    if not ids:
        stats["empty_texts"] += 1
        ids = [unk]
    return ids


def _padded(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(len(seqs), longest) int32 padded with <NULL> = 0, and the lengths."""
    out = np.zeros((len(seqs), max(len(s) for s in seqs)), dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out, np.asarray([len(s) for s in seqs], dtype=np.int32)


def _answer(r: TaskRecord, task: str, answers: dict, split: str, stats: dict) -> int | None:
    """The stored answer of a record; None: dropped (an open-ended training answer outside the vocabulary)."""
    if task != OPEN_ENDED:
        return int(r.answer)
    a = answers.get(r.answer)
    if a is None:
        if split == "train":
            stats["dropped_oov_answer"] += 1
            return None
        stats["oov_answer_as_unk1"] += 1
        return ANSWER_SPECIALS["<UNK1>"]
    return a


def _candidates(kept: list[TaskRecord], q_vocab: dict, stats: dict, max_tokens: int) -> dict:
    """HCRN's ans_candidates (N, K, La) and ans_candidates_len (N, K), int32, <NULL>-padded."""
    k = len(kept[0].candidates)
    for r in kept:
        if len(r.candidates) != k:
            raise PrepareError(f"{r.where}: {len(r.candidates)} candidate answers, the first question has {k}")
    flat, lens = _padded([_ids(c, q_vocab, stats, max_tokens) for r in kept for c in r.candidates])
    return {L.CANDIDATES_KEY: flat.reshape(len(kept), k, -1), L.CANDIDATES_LEN_KEY: lens.reshape(len(kept), k)}


def encode_task_split(records: list[TaskRecord], vocab: dict, task: str, split: str, glove: np.ndarray,
                      max_tokens: int = MAX_QUESTION_TOKENS) -> tuple[dict, dict]:
    """The question pickle of one split (a dict of arrays) and its counts."""
    stats = {"records": len(records), "dropped_oov_answer": 0, "oov_answer_as_unk1": 0, "unknown_tokens": 0,
             "empty_texts": 0, "truncated_texts": 0}
    q_vocab = vocab[L.QUESTION_TOKENS_KEY]
    kept, answers = [], []
    for r in records:
        a = _answer(r, task, vocab[L.ANSWER_TOKENS_KEY], split, stats)
        if a is not None:
            kept.append(r)
            answers.append(a)
    if not kept:
        source = records[0].where.rsplit(": line", 1)[0] if records else "no question file"
        raise PrepareError(f"{source}: no question left in the {split} split (every answer is outside the answer "
                           f"vocabulary)")
    questions, lens = _padded([_ids(r.tokens, q_vocab, stats, max_tokens) for r in kept])
    obj = {L.QUESTIONS_KEY: questions, L.QUESTIONS_LEN_KEY: lens,
           L.QUESTION_ID_KEY: np.asarray([r.question_id for r in kept], dtype=np.int64),
           L.VIDEO_IDS_KEY: np.asarray([r.video_id for r in kept], dtype=np.int64),
           L.VIDEO_NAMES_KEY: np.asarray([r.video_name for r in kept]),
           L.ANSWERS_KEY: np.asarray(answers, dtype=np.int64), L.GLOVE_KEY: glove,
           L.QUESTION_CATEGORY_KEY: np.asarray([r.category for r in kept])}
    if task == MULTIPLE_CHOICE:
        obj.update(_candidates(kept, q_vocab, stats, max_tokens))
    stats.update(questions=len(kept), max_len=int(questions.shape[1]),
                 categories=dict(sorted(Counter(r.category for r in kept).items())))
    return obj, stats


def encode_task(records: dict[str, list[TaskRecord]], task: str, glove: Path, answer_top: int | None = None,
                vocab_records: list[TaskRecord] | None = None, max_tokens: int = MAX_QUESTION_TOKENS
                ) -> tuple[dict, dict[str, dict], dict]:
    """Vocabularies (from ``vocab_records``, by default the training split's), the three splits'
    pickles (as dicts) and a summary, from records per split."""
    if answer_top is not None and answer_top < 1:
        raise PrepareError(f"answer_top must be at least 1, got {answer_top}")
    if max_tokens < 1:
        raise PrepareError(f"max_question_tokens must be at least 1, got {max_tokens}")
    vocab = build_task_vocab(task, records["train"] if vocab_records is None else vocab_records, answer_top,
                             max_tokens)
    vectors, dim = read_glove(glove, vocab[L.QUESTION_TOKENS_KEY])
    g = glove_matrix(vocab, vectors, dim)
    objs, stats = {}, {}
    for s in L.SPLITS:
        objs[s], stats[s] = encode_task_split(records[s], vocab, task, s, g, max_tokens)
    q = vocab[L.QUESTION_TOKENS_KEY]
    summary = {"task": task, "glove": str(glove), "answer_top": answer_top, "max_question_tokens": max_tokens,
               "question_vocab": len(q),
               "answer_vocab": len(vocab[L.ANSWER_TOKENS_KEY]), "word_dim": dim, "glove_found": len(vectors),
               "glove_missing": sorted(t for t in q if t not in vectors and t not in QUESTION_SPECIALS),
               "splits": stats}
    return vocab, objs, summary


def write_task_dataset(out: Path, name: str, task: str, vocab: dict, objs: dict[str, dict], summary: dict,
                       meta: dict, log: Callable[[str], None] = print) -> None:
    """The vocabulary json, three question pickles, the questions report and ``{name}_meta.json``
    (naming the task under layout.TASK_META_KEY), each written atomically, the meta file last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for s in L.SPLITS:
        atomic_write_bytes(L.questions_file(out, name, s), pickle.dumps(objs[s], protocol=4))
    atomic_write_bytes(L.vocab_file(out, name), (json.dumps(vocab, indent=1) + "\n").encode())
    atomic_write_json(L.questions_report_file(out, name), summary)
    atomic_write_json(L.meta_file(out, name), {L.TASK_META_KEY: task, "generator": "harness.data.prepare", **meta})
    n_tokens = summary["question_vocab"] - len(QUESTION_SPECIALS)
    log(f"{name} ({task}): question vocabulary {summary['question_vocab']} tokens ({summary['glove_found']} of "
        f"{n_tokens} with a GloVe vector, the others zeros), answer vocabulary {summary['answer_vocab']}")
    for s in L.SPLITS:
        st = summary["splits"][s]
        extra = (f", {st['dropped_oov_answer']} dropped (answer outside the vocabulary)" if st["dropped_oov_answer"]
                 else f", {st['oov_answer_as_unk1']} with an answer outside the vocabulary (<UNK1>, counted wrong)"
                 if st["oov_answer_as_unk1"] else "")
        cut = (f", {st['truncated_texts']} texts cut to their first {summary['max_question_tokens']} tokens"
               if st["truncated_texts"] else "")
        log(f"{s}: {st['questions']} of {st['records']} questions{extra}; {st['unknown_tokens']} unknown tokens{cut}")
    log(f"wrote {L.vocab_file(out, name)}, {', '.join(L.questions_file(out, name, s).name for s in L.SPLITS)} "
        f"and {L.meta_file(out, name).name}")
