"""The HCRN / DualVGR on-disk feature format, defined once: split names, file names, HDF5 dataset
keys and the keys of the vocab and question files. The reader (:mod:`harness.data.dataset`) and both
writers (:mod:`harness.data.synthetic`, :mod:`harness.data.prepare`) use these names; no other module spells
them out.

A data set ``{name}`` (e.g. ``msvd-qa``) is a directory holding::

    {name}_appearance_feat.h5   APPEARANCE_KEY (videos, clips, frames, dim) float32, IDS_KEY (videos)
    {name}_motion_feat.h5       MOTION_KEY (videos, clips, motion_dim) float32, IDS_KEY (videos);
                                optional attribute MOTION_MODEL_ATTR on MOTION_KEY names the backbone
    {name}_vocab.json           VOCAB_KEYS (+ question_answer_token_to_idx in the reference's files)
    {name}_{split}_questions.pt pickle of a dict with QUESTION_KEYS (+ optional QUESTION_CATEGORY_KEY)
    {name}_meta.json            optional: how the set was made (synthetic presets write it last);
                                its TASK_META_KEY names the task (see harness.tasks)
    {name}_{questions,features}_report.json  optional: what harness.data.prepare found (not read by
                                             harness.data.dataset)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")

APPEARANCE_KEY = "resnet_features"
MOTION_KEY = "resnext_features"
IDS_KEY = "ids"
#: attribute of MOTION_KEY naming the motion backbone; a motion dim unlike the appearance dim needs it
MOTION_MODEL_ATTR = "model"
#: optional in the appearance file (written by harness.data.prepare): frames decoded per video, 0 = unreadable
NUM_FRAMES_KEY = "num_frames"

QUESTION_TOKENS_KEY = "question_token_to_idx"
ANSWER_TOKENS_KEY = "answer_token_to_idx"
VOCAB_KEYS: tuple[str, ...] = (QUESTION_TOKENS_KEY, ANSWER_TOKENS_KEY)
#: the reference's third vocabulary (specials only); written by harness.data.prepare, not read
QUESTION_ANSWER_TOKENS_KEY = "question_answer_token_to_idx"
QUESTIONS_KEY, QUESTIONS_LEN_KEY, VIDEO_IDS_KEY = "questions", "questions_len", "video_ids"
QUESTION_ID_KEY, ANSWERS_KEY, GLOVE_KEY = "question_id", "answers", "glove"
QUESTION_KEYS: tuple[str, ...] = (QUESTIONS_KEY, QUESTIONS_LEN_KEY, VIDEO_IDS_KEY, QUESTION_ID_KEY, ANSWERS_KEY,
                                  GLOVE_KEY)
#: the reference's copy of VIDEO_IDS_KEY; written by harness.data.prepare, not read
VIDEO_NAMES_KEY = "video_names"

#: multiple choice (HCRN's TGIF-QA Action / Transition files, NExT-QA): per question K candidate answers,
#: tokens in the question vocabulary padded with 0, (N, K, La) int, and their lengths (N, K); ``answers`` is
#: then the index of the right candidate, 0..K-1
CANDIDATES_KEY, CANDIDATES_LEN_KEY = "ans_candidates", "ans_candidates_len"
#: count (HCRN's TGIF-QA Count files): ``answers`` holds the count itself, an integer in COUNT_RANGE; the
#: answer vocabulary is HCRN's single ``{"<UNK>": 0}``
COUNT_RANGE: tuple[int, int] = (1, 10)
#: the key of ``{name}_meta.json`` naming a data set's task (open-ended, multiple-choice, count); without
#: it the task is inferred from the files (harness.tasks.detect)
TASK_META_KEY = "task"
#: NExT-QA's question types and the three groups its papers report
TYPE_GROUPS: dict[str, tuple[str, ...]] = {"causal": ("CW", "CH"), "temporal": ("TN", "TC", "TP"),
                                           "descriptive": ("DC", "DL", "DO")}

#: question types: a question's first word, as the reference evaluation reads it (anything else is
#: OTHER_TYPE) unless the questions file has QUESTION_CATEGORY_KEY; the synthetic sets ask these
QUESTION_WORDS: tuple[str, ...] = ("what", "who", "how", "when", "where")
OTHER_TYPE = "other"
#: SVQA-style question types; without it the type is the question's first word
QUESTION_CATEGORY_KEY = "question_category"


def appearance_file(root: str | Path, name: str) -> Path:
    return Path(root) / f"{name}_appearance_feat.h5"


def motion_file(root: str | Path, name: str) -> Path:
    return Path(root) / f"{name}_motion_feat.h5"


def vocab_file(root: str | Path, name: str) -> Path:
    return Path(root) / f"{name}_vocab.json"


def questions_file(root: str | Path, name: str, split: str) -> Path:
    return Path(root) / f"{name}_{split}_questions.pt"


def meta_file(root: str | Path, name: str) -> Path:
    return Path(root) / f"{name}_meta.json"


def questions_report_file(root: str | Path, name: str) -> Path:
    """What ``harness.data.prepare questions`` found (vocabulary sizes, dropped questions); not read."""
    return Path(root) / f"{name}_questions_report.json"


def features_report_file(root: str | Path, name: str) -> Path:
    """What ``harness.data.prepare features`` found (unreadable and short videos); it reads it back on resuming."""
    return Path(root) / f"{name}_features_report.json"


def name_from_vocab_file(path: str | Path) -> str:
    """The data set name of a ``{name}_vocab.json`` file."""
    return Path(path).name.removesuffix("_vocab.json")


VOCAB_GLOB = "*_vocab.json"


def dataset_files(root: str | Path, name: str) -> dict[str, Path]:
    """Every file of a data set by role: appearance, motion, vocab, one per split, meta."""
    files = {"appearance": appearance_file(root, name), "motion": motion_file(root, name),
             "vocab": vocab_file(root, name)}
    files.update({s: questions_file(root, name, s) for s in SPLITS})
    files["meta"] = meta_file(root, name)
    return files


# ----------------------------------------------------------------------------- a data set's paths


@dataclass
class DataPaths:
    name: str
    appearance: Path
    motion: Path
    vocab: Path
    questions: dict[str, Path]
    meta: Path | None = None

    @classmethod
    def from_dir(cls, data_dir: str | Path, name: str | None = None, *,
                 appearance: str | Path | None = None, motion: str | Path | None = None,
                 vocab: str | Path | None = None, questions: dict[str, str | Path] | None = None
                 ) -> "DataPaths":
        """Reference file names under ``data_dir``; any file can be given explicitly instead."""
        d = Path(data_dir)
        if not d.is_dir():
            raise DataError(f"data directory {d} does not exist")
        if name is None:
            if vocab is not None:
                name = name_from_vocab_file(vocab)
            else:
                found = sorted(name_from_vocab_file(p) for p in d.glob(VOCAB_GLOB))
                if len(found) != 1:
                    raise DataError(
                        f"{d}: cannot tell the data set name: expected exactly one {VOCAB_GLOB}, "
                        f"found {found or 'none'}; pass the name explicitly")
                name = found[0]
        q = {s: Path(questions[s]) if questions and s in questions else questions_file(d, name, s)
             for s in SPLITS}
        meta = meta_file(d, name)
        return cls(name=name,
                   appearance=Path(appearance) if appearance else appearance_file(d, name),
                   motion=Path(motion) if motion else motion_file(d, name),
                   vocab=Path(vocab) if vocab else vocab_file(d, name),
                   questions=q, meta=meta if meta.exists() else None)


def require(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
