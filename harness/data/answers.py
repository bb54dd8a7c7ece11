"""What a question file carries for its task (:mod:`variants.tasks`), read and validated: which task
a data set is, its answers' range, and the multiple-choice candidates. :mod:`harness.data.dataset` calls it
for every split; every error names the file and the key.

A data set's task is the ``task`` of its ``{name}_meta.json`` (:data:`harness.data.layout.TASK_META_KEY`)
when it names one; otherwise multiple choice when the train questions carry candidates
(``ans_candidates``, HCRN's TGIF-QA Action / Transition files) and open-ended answers when they do
not. HCRN's Count files look like open-ended ones with a one-word answer vocabulary, so a count set
names its task in its meta file (``harness.data.prepare`` and the synthetic presets write it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import variants
from variants.tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED

from harness.data import layout as L
from harness.errors import DataError

def detect_task(meta: dict, meta_path: Path | None, train_questions: dict) -> str:
    """The data set's task: the meta file's ``task``, else inferred from the train questions."""
    named = meta.get(L.TASK_META_KEY)
    if named is not None:
        if named not in variants.TASKS:
            raise DataError(f"{meta_path}: {L.TASK_META_KEY!r} is {named!r}; known tasks: "
                            f"{', '.join(variants.TASKS.list())}")
        return named
    return MULTIPLE_CHOICE if L.CANDIDATES_KEY in train_questions else OPEN_ENDED


def _ints(obj: dict, key: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(obj[key])
    except KeyError:
        raise DataError(f"{path}: missing key {key!r}, which multiple-choice questions carry "
                        f"(has: {', '.join(map(str, obj))})") from None
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0)):
        raise DataError(f"{path}: {key!r} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def candidates(obj: dict, path: Path, n: int, q_vocab: int, vocab_path: Path) -> dict[str, np.ndarray]:
    """The (N, K, La) candidate tokens and (N, K) lengths of a multiple-choice question file, checked:
    shapes against the N questions, lengths in 1..La, tokens in the question vocabulary."""
    cand = _ints(obj, L.CANDIDATES_KEY, path)
    lens = _ints(obj, L.CANDIDATES_LEN_KEY, path)
    if cand.ndim != 3 or cand.shape[0] != n or cand.shape[1] < 2:
        raise DataError(f"{path}: {L.CANDIDATES_KEY!r} must be (questions = {n}, candidates >= 2, max_len), "
                        f"got shape {cand.shape}")
    if lens.shape != cand.shape[:2]:
        raise DataError(f"{path}: {L.CANDIDATES_LEN_KEY!r} must be (questions, candidates) = {cand.shape[:2]}, "
                        f"got shape {lens.shape}")
    if lens.min() < 1 or lens.max() > cand.shape[2]:
        i, k = np.argwhere((lens < 1) | (lens > cand.shape[2]))[0]
        raise DataError(f"{path}: {L.CANDIDATES_LEN_KEY}[{i}, {k}] = {lens[i, k]} is outside 1..{cand.shape[2]}")
    if cand.min() < 0 or cand.max() >= q_vocab:
        i, k, j = np.argwhere((cand < 0) | (cand >= q_vocab))[0]
        raise DataError(f"{path}: token id {cand[i, k, j]} in candidate {k} of question {i} is outside the "
                        f"question vocabulary of {q_vocab} tokens in {vocab_path} (candidates are encoded in it)")
    return {"candidates": cand, "candidate_lengths": lens}


def answer_range(task: str, a_vocab: int, extra: dict) -> tuple[int, int, str]:
    """(lowest, highest, what) an answer of ``task`` may be."""
    if task == MULTIPLE_CHOICE:
        return 0, extra["candidates"].shape[1] - 1, "candidate index"
    if task == COUNT:
        return L.COUNT_RANGE[0], L.COUNT_RANGE[1], "count"
    return 0, a_vocab - 1, "answer id"


def check_answers(task: str, answers: np.ndarray, qid: np.ndarray, path: Path, a_vocab: int, extra: dict,
                  vocab_path: Path) -> None:
    """Every answer within its task's range; the error names the question and the range."""
    lo, hi, what = answer_range(task, a_vocab, extra)
    bad = (answers < lo) | (answers > hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = (f"the answer vocabulary of {a_vocab} answers in {vocab_path}" if task == OPEN_ENDED
                 else f"{lo}..{hi} (task {task})")
        raise DataError(f"{path}: {what} {answers[i]} of question {i} (question_id {qid[i]}) is outside {where}")


def task_arrays(task: str, obj: dict, path: Path, arrays: dict, q_vocab: int, a_vocab: int,
                vocab_path: Path) -> dict[str, np.ndarray]:
    """The task's extra per-question arrays (the batch's ``extra``), after checking the answers."""
    extra = candidates(obj, path, len(arrays["answers"]), q_vocab, vocab_path) if task == MULTIPLE_CHOICE else {}
    check_answers(task, arrays["answers"], arrays["question_id"], path, a_vocab, extra, vocab_path)
    return extra
