"""TGIF-QA (Jang et al., CVPR 2017): its released question files to a data set per task,
``tgif-qa-{action,transition,count,frameqa}``, by HCRN's ``preprocess/datautils/tgif_qa.py``.

The release (``YunseokJANG/tgif-qa``, ``dataset/``) has ``{Train,Test}_{task}_question.csv`` files,
tab-separated despite the name, with a header line: ``gif_name``, ``question``, the candidates
``a1`` .. ``a5`` (Action, Transition), ``answer`` (the right candidate's index 0-4; the count; the
FrameQA answer word), ``type`` (FrameQA: 0 object, 1 number, 2 color, 3 location), ``vid_id``,
``key`` (the GIF's integer id, the same for a GIF in every task: the video id, as in HCRN) and
FrameQA's ``description``. Columns are found by name; fields are taken as they are (no quoting).

As HCRN: question tokens are the lower-cased question without its last character (the ``?``, after
a space in this release), candidates' tokens their lower-cased text, both split like
``nltk.word_tokenize``; the vocabularies come from the whole released Train file; a count is stored
as ``max(int(answer), 1)``; val is 10% of the Train file's questions. HCRN takes the last 10% after
an unseeded shuffle; here the shuffle is seeded (:data:`SPLIT_SEED`), so the split is the same on
every run, and each split keeps the file's order. A count outside 0..10 is an error (the format's
counts are 1..10). Question types: FrameQA's type names, else the task's name. ``question_id``: the
question's position among the data lines of its file.
"""
from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from variants.tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED

from harness.data import layout as L
from harness.console import plural
from harness.data.prepare.common import TGIF_TASKS, PrepareError
from harness.data.prepare.questions import MAX_QUESTION_TOKENS
from harness.data.prepare.taskdata import TaskRecord, encode_task, integer, read_table, write_task_dataset
from harness.data.prepare.text import question_tokens, tokenize

#: a release file: split "Train" or "Test", task as in TGIF_TASKS
TGIF_FILE = "{split}_{task}_question.csv"
TASK_OF = {"action": MULTIPLE_CHOICE, "transition": MULTIPLE_CHOICE, "count": COUNT, "frameqa": OPEN_ENDED}
CANDIDATE_COLUMNS = ("a1", "a2", "a3", "a4", "a5")
#: FrameQA's type column (the COCO-QA question generator's numbering)
FRAMEQA_TYPES = {"0": "object", "1": "number", "2": "color", "3": "location"}
VAL_FRACTION = 0.1
SPLIT_SEED = 0


def _check_task(task: str) -> None:
    if task not in TGIF_TASKS:
        raise PrepareError(f"unknown TGIF-QA task {task!r} (known: {', '.join(TGIF_TASKS)})")


def dataset_name(task: str) -> str:
    return f"tgif-qa-{task}"


def tgif_files(annotations: Path, task: str) -> dict[str, Path]:
    """{"Train": path, "Test": path} of a task's release files."""
    _check_task(task)
    return {s: Path(annotations) / TGIF_FILE.format(split=s, task=task) for s in ("Train", "Test")}


def _columns(task: str) -> tuple[str, ...]:
    return ("gif_name", "question", "answer", "key", *(CANDIDATE_COLUMNS if TASK_OF[task] == MULTIPLE_CHOICE else ()),
            *(("type",) if task == "frameqa" else ()))


def _answer(task: str, text: str, where: str) -> str | int:
    if task == "frameqa":
        return text
    if TASK_OF[task] == MULTIPLE_CHOICE:
        return integer(text, where, "answer", 0, len(CANDIDATE_COLUMNS) - 1)
    return max(integer(text, where, "answer", 0, L.COUNT_RANGE[1]), L.COUNT_RANGE[0])


def _record(task: str, row: dict[str, str], where: str, position: int) -> TaskRecord:
    gif = row["gif_name"].strip()
    if not gif:
        raise PrepareError(f"{where}, column 'gif_name': empty")
    category = task
    if task == "frameqa":
        category = FRAMEQA_TYPES.get(row["type"].strip())
        if category is None:
            raise PrepareError(f"{where}, column 'type': {row['type']!r} is not a FrameQA type "
                               f"({', '.join(f'{k} {v}' for k, v in FRAMEQA_TYPES.items())})")
    candidates = tuple(tokenize(row[c].lower()) for c in CANDIDATE_COLUMNS) if TASK_OF[task] == MULTIPLE_CHOICE else ()
    return TaskRecord(question_tokens(row["question"]), _answer(task, row["answer"], where),
                      integer(row["key"], where, "key", 0), gif, position, category, where, candidates)


def read_tgif(path: Path, task: str) -> list[TaskRecord]:
    """The records of one release file of ``task``."""
    _check_task(task)
    rows = read_table(path, _columns(task), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [_record(task, row, f"{path}: line {line}", i) for i, (line, row) in enumerate(rows)]


def split_train(records: list[TaskRecord], path: Path) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """(train, val): val is VAL_FRACTION of the questions, drawn by a shuffle seeded with SPLIT_SEED
    (HCRN: the last 10% after an unseeded shuffle); both keep the file's order."""
    n = len(records)
    if n < 2:
        raise PrepareError(f"{path}: {plural(n, 'question')}: a train and a val split need at least 2")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[int((1 - VAL_FRACTION) * n):]] = True
    return [r for r, v in zip(records, is_val) if not v], [r for r, v in zip(records, is_val) if v]


def _names(records: Iterable[TaskRecord]) -> dict[int, str]:
    names: dict[int, str] = {}
    for r in records:
        if names.setdefault(r.video_id, r.video_name) != r.video_name:
            raise PrepareError(f"{r.where}: key {r.video_id} names GIF {r.video_name!r}, an earlier line "
                               f"{names[r.video_id]!r}")
    return names


def tgif_video_names(annotations: Path, task: str) -> dict[int, str]:
    """{key: gif_name} of every GIF a task's release files refer to; a key with two names is an error."""
    return _names(r for path in tgif_files(annotations, task).values() for r in read_tgif(path, task))


def prepare_tgif(task: str, annotations: Path, glove: Path, out: Path, *, answer_top: int | None = None,
                 max_question_tokens: int = MAX_QUESTION_TOKENS, log: Callable[[str], None] = print) -> dict:
    """Write the ``tgif-qa-{task}`` data set's vocabulary, question pickles, report and meta file
    under ``out``; returns the summary (also in the questions report)."""
    files = tgif_files(annotations, task)
    if answer_top is not None and TASK_OF[task] != OPEN_ENDED:
        raise PrepareError(f"--answer-top is for FrameQA's answer vocabulary; {task} has none")
    full_train, test = read_tgif(files["Train"], task), read_tgif(files["Test"], task)
    _names(full_train + test)  # one GIF per key, or an error naming the line
    train, val = split_train(full_train, files["Train"])
    records = {"train": train, "val": val, "test": test}
    vocab, objs, summary = encode_task(records, TASK_OF[task], glove, answer_top, vocab_records=full_train,
                                       max_tokens=max_question_tokens)
    summary.update(dataset=dataset_name(task), annotations=str(annotations),
                   val_split=f"{VAL_FRACTION:.0%} of {files['Train'].name}, shuffle seed {SPLIT_SEED}")
    write_task_dataset(out, dataset_name(task), TASK_OF[task], vocab, objs, summary,
                       {"release": f"TGIF-QA {task}", "annotations": str(annotations)}, log)
    return summary
