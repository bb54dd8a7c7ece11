"""``python -m harness.data.prepare questions``: the release's QA json files and a GloVe file to the
vocabulary json and the question pickles, by the rules of HCRN's ``preprocess_questions.py``
(listed in :mod:`harness.data.prepare`)."""
from __future__ import annotations

import itertools
import json
import pickle
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data import layout as L
from harness.data.dataset import read_json
from harness.files import atomic_write_bytes, atomic_write_json
from harness.data.prepare.common import MAX_ID, PrepareError, check_dataset, shown
from harness.data.prepare.text import question_tokens
from harness.data.prepare.video import find_mapping, read_youtube_mapping

#: the reference's ``--answer_top`` default, used for MSVD-QA and MSRVTT-QA alike
ANSWER_TOP = 4000
QUESTION_SPECIALS = {"<NULL>": 0, "<UNK>": 1}
ANSWER_SPECIALS = {"<UNK0>": 0, "<UNK1>": 1}
#: the most tokens a question keeps (``--max-question-tokens``): longer ones are cut to their first
#: tokens, counted in the summary, so that one oversized question cannot pad its whole split to its
#: length. The releases' longest questions are far shorter (MSVD-QA and MSRVTT-QA: under 40 tokens),
#: so the cap changes nothing on them.
MAX_QUESTION_TOKENS = 100
#: the release's QA file of a split (an input, not the harness's format)
QA_FILE = "{split}_qa.json"


# ----------------------------------------------------------------------------- QA records


@dataclass
class QARecord:
    question: str
    answer: str
    video_id: int
    question_id: int | None


_VIDEO_ID = re.compile(r"^(?:vid|video)?(\d{1,18})$")


def parse_video_id(value, where: str) -> int:
    """An integer video id from a release's ``video_id`` (``12``, ``"12"``, ``"vid12"``, ``"video12"``),
    0 .. 2**63 - 1 (the pickles store int64)."""
    if isinstance(value, bool):
        raise PrepareError(f"{where}: video_id {value!r} is not a video id")
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) <= MAX_ID:
            raise PrepareError(f"{where}: video_id {shown(value)} is outside 0..2**63-1")
        return int(value)
    m = _VIDEO_ID.match(str(value).strip()) if isinstance(value, str) else None
    if not m:
        raise PrepareError(f"{where}: video_id {shown(value)} is not an integer, 'vidN' or 'videoN' "
                           f"(at most 18 digits)")
    return int(m.group(1))


def _record(r, where: str) -> QARecord:
    if not isinstance(r, dict):
        raise PrepareError(f"{where} is not an object ({type(r).__name__})")
    missing = [k for k in ("question", "answer", "video_id") if k not in r]
    if missing:
        raise PrepareError(f"{where} has no {', '.join(map(repr, missing))} (has: {', '.join(r)})")
    for k in ("question", "answer"):
        if not isinstance(r[k], str):
            raise PrepareError(f"{where}: {k!r} must be a string, got {r[k]!r}")
    qid = r.get("id")
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (int, np.integer))
                            or not -2 ** 63 <= qid < 2 ** 63):
        raise PrepareError(f"{where}: 'id' must be an integer (64 bits), got {shown(qid)}")
    return QARecord(r["question"], r["answer"], parse_video_id(r["video_id"], where), None if qid is None else int(qid))


def read_qa(path: Path) -> list[QARecord]:
    """A release's ``{split}_qa.json``: a list of records with ``question``, ``answer``,
    ``video_id`` and (usually) ``id``."""
    if not path.is_file():
        raise PrepareError(f"QA file {path} does not exist")
    raw = read_json(path, PrepareError)
    if not isinstance(raw, list):
        raise PrepareError(f"{path}: expected a JSON list of QA records, got {type(raw).__name__}")
    out = [_record(r, f"{path}: record {i}") for i, r in enumerate(raw)]
    if not out:
        raise PrepareError(f"{path}: no QA records")
    return out


def qa_paths(annotations: Path) -> dict[str, Path]:
    return {s: Path(annotations) / QA_FILE.format(split=s) for s in L.SPLITS}


def video_ids_of(annotations: Path) -> set[int]:
    """Every video id the QA files under ``annotations`` refer to."""
    return {r.video_id for p in qa_paths(annotations).values() for r in read_qa(p)}


# ----------------------------------------------------------------------------- vocab & encoding


def capped_tokens(question: str, max_tokens: int = MAX_QUESTION_TOKENS) -> list[str]:
    """The reference's tokens of a question, at most ``max_tokens`` of them (the first)."""
    return question_tokens(question)[:max_tokens]


def build_vocab(train: list[QARecord], answer_top: int = ANSWER_TOP, max_tokens: int = MAX_QUESTION_TOKENS) -> dict:
    """The reference's vocabularies from the training records."""
    counts = Counter()  # insertion order = first appearance; most_common keeps it for ties
    for r in train:
        counts[r.answer] += 1
    answers = dict(ANSWER_SPECIALS)
    for a, _ in counts.most_common(answer_top):
        answers[a] = len(answers)
    questions = dict(QUESTION_SPECIALS)
    for r in train:
        for t in capped_tokens(r.question, max_tokens):
            questions.setdefault(t, len(questions))
    return {L.QUESTION_TOKENS_KEY: questions, L.ANSWER_TOKENS_KEY: answers,
            L.QUESTION_ANSWER_TOKENS_KEY: dict(QUESTION_SPECIALS)}


def _uses_record_ids(records: list[QARecord]) -> bool:
    """Question ids are the records' ``id`` when every record has a distinct one, else the position
    in the file (what the reference always uses)."""
    ids = [r.question_id for r in records]
    return None not in ids and len(set(ids)) == len(ids)


def _encode_records(records: list[QARecord], vocab: dict, split: str, stats: dict, max_tokens: int) -> list[tuple]:
    """(token ids, question id, video id, answer id) per kept record; counts into ``stats``."""
    q_vocab, a_vocab = vocab[L.QUESTION_TOKENS_KEY], vocab[L.ANSWER_TOKENS_KEY]
    unk, unk_answer = QUESTION_SPECIALS["<UNK>"], ANSWER_SPECIALS["<UNK1>"]
    use_ids = _uses_record_ids(records)
    rows = []
    for i, r in enumerate(records):
        answer = a_vocab.get(r.answer)
        if answer is None:
            if split == "train":
                stats["dropped_oov_answer"] += 1
                continue
            answer = unk_answer
            stats["oov_answer_as_unk1"] += 1
        words = question_tokens(r.question)
        stats["truncated_questions"] += len(words) > max_tokens
        tokens = [q_vocab.get(t, unk) for t in words[:max_tokens]]
        stats["unknown_tokens"] += sum(t == unk for t in tokens)
        if not tokens:  # the reference would write a 0-length question, which no encoder accepts
            tokens = [unk]
            stats["empty_questions"] += 1
        rows.append((tokens, r.question_id if use_ids else i, r.video_id, answer))
    return rows


def encode_split(records: list[QARecord], vocab: dict, split: str, glove: np.ndarray, where: str,
                 max_tokens: int = MAX_QUESTION_TOKENS) -> tuple[dict, dict]:
    """The question pickle of one split (as a dict of arrays) and its counts."""
    stats = {"records": len(records), "dropped_oov_answer": 0, "oov_answer_as_unk1": 0, "unknown_tokens": 0,
             "empty_questions": 0, "truncated_questions": 0,
             "question_id": "record id" if _uses_record_ids(records) else "position in the file"}
    rows = _encode_records(records, vocab, split, stats, max_tokens)
    if not rows:
        raise PrepareError(f"{where}: no question left in the {split} split (every answer is outside the "
                           f"answer vocabulary)")
    enc, qids, vids, answers = zip(*rows)
    max_len = max(len(t) for t in enc)
    questions = np.zeros((len(enc), max_len), dtype=np.int32)  # <NULL> = 0 pads
    for i, t in enumerate(enc):
        questions[i, :len(t)] = t
    stats["questions"] = len(enc)
    stats["max_len"] = max_len
    vids_arr = np.asarray(vids, dtype=np.int64)
    obj = {L.QUESTIONS_KEY: questions, L.QUESTIONS_LEN_KEY: np.asarray([len(t) for t in enc], dtype=np.int32),
           L.QUESTION_ID_KEY: np.asarray(qids, dtype=np.int64), L.VIDEO_IDS_KEY: vids_arr,
           L.VIDEO_NAMES_KEY: vids_arr.copy(), L.ANSWERS_KEY: np.asarray(answers, dtype=np.int64),
           L.GLOVE_KEY: glove}
    return obj, stats


# ----------------------------------------------------------------------------- GloVe

#: the widest word vectors read (GloVe's are 50 to 300 wide; the matrix is question vocab x D floats)
MAX_WORD_DIM = 4096
#: a GloVe line may have this many values more than D: an entry whose "word" has spaces (". . .")
_MAX_EXTRA_WORDS = 16


def _glove_dim(path: Path, head: list[str]) -> int:
    """D from the first lines, checked against them: the first line has D values (a multi-word entry
    a few more), most lines have exactly D, and D is at most :data:`MAX_WORD_DIM`."""
    counts = [line.rstrip("\n").rstrip(" ").count(" ") for line in head if line.strip()]
    if not counts:
        raise PrepareError(f"{path}: empty GloVe file")
    dim = min(counts)
    if dim < 1:
        raise PrepareError(f"{path}: a line has no vector (expected 'word v1 ... vD' per line)")
    if counts[0] > dim + _MAX_EXTRA_WORDS:
        raise PrepareError(f"{path}: the first line has {counts[0]:,} values, the next lines' vectors have {dim}")
    if dim > MAX_WORD_DIM:
        raise PrepareError(f"{path}: vectors of {dim:,} values; word vectors wider than {MAX_WORD_DIM} are refused")
    if 2 * counts.count(dim) < len(counts):
        raise PrepareError(f"{path}: the first {len(counts)} lines do not agree on a vector size "
                           f"(only {counts.count(dim)} have {dim} values, the fewest)")
    return dim


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
        dim = _glove_dim(path, head)
        for lineno, line in enumerate(itertools.chain(head, f), 1):
            line = line.rstrip("\n").rstrip(" ")
            word = line.split(" ", 1)[0]
            if not line or word not in want or word in found:
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
    tokens = vocab[L.QUESTION_TOKENS_KEY]
    g = np.zeros((len(tokens), dim), dtype=np.float32)
    for t, i in tokens.items():
        v = vectors.get(t)
        if v is not None:
            g[i] = v
    return g


# ----------------------------------------------------------------------------- the command


def _check_mapping(records: dict[str, list[QARecord]], paths: dict[str, Path], mapping: Path) -> None:
    """Every question's video has a name in MSVD's mapping (or it could get no features)."""
    names = read_youtube_mapping(mapping)
    for s in L.SPLITS:
        bad = sorted({r.video_id for r in records[s]} - set(names))
        if bad:
            raise PrepareError(f"{paths[s]}: video id(s) {', '.join(f'vid{v}' for v in bad[:10])}"
                               f"{' ...' if len(bad) > 10 else ''} are not in {mapping}")


def _summary(dataset: str, annotations: Path, glove: Path, answer_top: int, records: dict, vocab: dict,
             vectors: dict, dim: int, stats: dict) -> dict:
    counts = Counter(r.answer for r in records["train"])
    in_vocab = sum(n for a, n in counts.items() if a in vocab[L.ANSWER_TOKENS_KEY])
    return {
        "dataset": dataset, "annotations": str(annotations), "glove": str(glove), "answer_top": answer_top,
        "question_vocab": len(vocab[L.QUESTION_TOKENS_KEY]), "answer_vocab": len(vocab[L.ANSWER_TOKENS_KEY]),
        "unique_train_answers": len(counts), "train_answer_coverage": in_vocab / max(1, sum(counts.values())),
        "word_dim": dim, "glove_found": len(vectors),
        "glove_missing": sorted(t for t in vocab[L.QUESTION_TOKENS_KEY] if t not in vectors
                                and t not in QUESTION_SPECIALS),
        "splits": stats,
    }


def _log_summary(summary: dict, out: Path, log: Callable[[str], None]) -> None:
    n_tokens = summary["question_vocab"] - len(QUESTION_SPECIALS)
    log(f"question vocabulary: {summary['question_vocab']} tokens ({summary['glove_found']} of {n_tokens} with a "
        f"GloVe vector, the others zeros); answer vocabulary: {summary['answer_vocab']} (top {summary['answer_top']} "
        f"of {summary['unique_train_answers']} training answers, {100 * summary['train_answer_coverage']:.2f}% of "
        f"training questions)")
    for s in L.SPLITS:
        st = summary["splits"][s]
        extra = (f", {st['dropped_oov_answer']} dropped (answer outside the vocabulary)" if s == "train"
                 else f", {st['oov_answer_as_unk1']} with an answer outside the vocabulary (<UNK1>, counted wrong)")
        n_cut = st["truncated_questions"]
        cut = f", {n_cut} cut to their first tokens (longer than the cap)" if n_cut else ""
        log(f"{s}: {st['questions']} of {st['records']} questions{extra}; {st['unknown_tokens']} unknown tokens{cut}")
    name = summary["dataset"]
    log(f"wrote {L.vocab_file(out, name)} and {', '.join(L.questions_file(out, name, s).name for s in L.SPLITS)}")


def prepare_questions(dataset: str, annotations: Path, glove: Path, out: Path, *, answer_top: int = ANSWER_TOP,
                      mapping: Path | None = None, max_question_tokens: int = MAX_QUESTION_TOKENS,
                      log: Callable[[str], None] = print) -> dict:
    """Write the vocabulary json and the three question pickles (:mod:`harness.data.layout`'s names) under
    ``out``; returns the summary (also written to the questions report file)."""
    check_dataset(dataset)
    if answer_top < 1:
        raise PrepareError(f"answer_top must be at least 1, got {answer_top}")
    if max_question_tokens < 1:
        raise PrepareError(f"max_question_tokens must be at least 1, got {max_question_tokens}")
    annotations, out = Path(annotations), Path(out)
    paths = qa_paths(annotations)
    records = {s: read_qa(p) for s, p in paths.items()}
    if dataset == "msvd-qa":
        mapping = mapping or find_mapping(annotations)
        if mapping is not None:
            _check_mapping(records, paths, mapping)
    vocab = build_vocab(records["train"], answer_top, max_question_tokens)
    vectors, dim = read_glove(glove, vocab[L.QUESTION_TOKENS_KEY])
    g = glove_matrix(vocab, vectors, dim)
    objs, stats = {}, {}
    for s in L.SPLITS:
        objs[s], stats[s] = encode_split(records[s], vocab, s, g, str(paths[s]), max_question_tokens)
    summary = _summary(dataset, annotations, glove, answer_top, records, vocab, vectors, dim, stats)
    out.mkdir(parents=True, exist_ok=True)
    for s in L.SPLITS:
        atomic_write_bytes(L.questions_file(out, dataset, s), pickle.dumps(objs[s], protocol=4))
    atomic_write_bytes(L.vocab_file(out, dataset), (json.dumps(vocab, indent=1) + "\n").encode())
    atomic_write_json(L.questions_report_file(out, dataset), summary)
    _log_summary(summary, out, log)
    return summary
