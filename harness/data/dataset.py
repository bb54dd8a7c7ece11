"""Feature data in the HCRN / DualVGR on-disk format (names defined in :mod:`harness.data.layout`).

A data set is a directory holding (``{name}`` is the data set name, e.g. ``msvd-qa``)::

    {name}_appearance_feat.h5   resnet_features (videos, clips, frames, dim), ids (videos)
    {name}_motion_feat.h5       resnext_features (videos, clips, motion_dim), ids (videos)
    {name}_vocab.json           question_token_to_idx, answer_token_to_idx, question_answer_token_to_idx
    {name}_{train,val,test}_questions.pt   pickle: questions (N, L) padded with 0, questions_len,
                                video_ids, question_id, answers, glove (vocab, word_dim),
                                optional question_category (SVQA)

Everything is validated when loaded, and every error names the file and what is wrong. Question
pickles come from third-party releases: they are read by :mod:`harness.data.question_pickle`, which admits
only plain containers and plain numpy arrays, scalars and dtypes, so loading never runs code. The
motion dim equals the appearance dim in files from HCRN's / DualVGR's scripts (ResNeXt-101 and
ResNet-101, both 2048); a motion file written by :mod:`harness.data.prepare` names its backbone in the
``model`` attribute of ``resnext_features`` and may have its own dim (512 for torchvision's video
models), which the model then takes as ``motion_dim``.
Features are read once (into memory, and onto the GPU when training there) and batches are
built by indexing: no file is opened per item. For feature sets larger than memory a streaming
mode keeps the two h5 files open and reads each batch's videos with one sorted, chunked read.

Data specs accepted by :func:`load`:

* a directory (the data set name is found from its single ``*_vocab.json``),
* ``synthetic:PRESET`` or ``synthetic:PRESET:SEED`` (generated on first use, then cached under
  ``$VQAKD_DATA_DIR`` or ``./data/synthetic``; see :mod:`harness.data.synthetic`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from variants.tasks import OPEN_ENDED

from harness.data import answers as A
from harness.data import layout as L
from harness.errors import DataError
from harness.data.features import MODALITIES, Features, check_features, load_features, open_h5, file_fingerprint
from harness.data.layout import DataPaths, require
from harness.data.question_pickle import PickleRefused, load_question_pickle

SPLITS = L.SPLITS
QUESTION_WORDS = L.QUESTION_WORDS
OTHER = L.OTHER_TYPE


# ----------------------------------------------------------------------------- vocab & questions


def load_vocab(path: Path) -> dict:
    require(path, "vocab")
    vocab = read_json(path)
    if not isinstance(vocab, dict):
        raise DataError(f"{path}: expected a JSON object (the vocabularies), got {type(vocab).__name__}")
    for key in L.VOCAB_KEYS:
        if key not in vocab:
            raise DataError(f"{path}: missing key {key!r} (has: {', '.join(vocab)})")
        if not isinstance(vocab[key], dict) or not vocab[key]:
            raise DataError(f"{path}: {key!r} must be a non-empty object (token -> index)")
        bad = next((v for v in vocab[key].values() if type(v) is not int or not 0 <= v < 2 ** 31), None)
        if bad is not None:
            raise DataError(f"{path}: {key!r} maps a token to {bad!r}, not an index")
    return vocab


def read_json(path: Path, error=DataError):
    """A JSON input file's value; ``error`` (naming the file) when it is not UTF-8 JSON, or nests
    deeper than the parser's recursion allows."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid JSON (not UTF-8: {e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def question_types(questions: np.ndarray, vocab: dict, category=None) -> tuple[np.ndarray, list[str]]:
    """Question type per question: ``question_category`` when the pickle has it (SVQA style),
    else the first question word (what, who, how, when, where; anything else is ``other``),
    as the reference validation does. Returns (type index per question, type names)."""
    if category is not None:
        cats = [str(c) for c in np.asarray(category).tolist()]
        names = sorted(set(cats))
        lut = {n: i for i, n in enumerate(names)}
        return np.array([lut[c] for c in cats], dtype=np.int64), names
    idx_to_token = {v: k for k, v in vocab[L.QUESTION_TOKENS_KEY].items()}
    names = list(QUESTION_WORDS) + [OTHER]
    lut = {w: i for i, w in enumerate(names)}
    first = questions[:, 0] if questions.size else np.zeros(0, dtype=np.int64)
    types = np.array([lut.get(idx_to_token.get(int(t), ""), lut[OTHER]) for t in first], dtype=np.int64)
    return types, names


@dataclass
class SplitData:
    """One split's questions as tensors; ``video_rows`` index the feature arrays."""

    name: str
    questions: torch.Tensor  # (N, L) int64, padded with 0
    lengths: torch.Tensor  # (N,) int64
    video_rows: torch.Tensor  # (N,) int64
    answers: torch.Tensor  # (N,) int64
    qtypes: torch.Tensor  # (N,) int64 index into VideoQAData.type_names
    question_ids: np.ndarray
    video_ids: np.ndarray
    #: what the task's questions carry besides (harness.data.answers): multiple choice's candidates and
    #: candidate_lengths, indexed like the questions; the model takes them as keyword inputs
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return self.questions.shape[0]

    def to(self, device) -> "SplitData":
        kw = {f: getattr(self, f) for f in ("questions", "lengths", "video_rows", "answers", "qtypes")}
        return SplitData(self.name, **{k: v.to(device) for k, v in kw.items()},
                         question_ids=self.question_ids, video_ids=self.video_ids,
                         extra={k: v.to(device) for k, v in self.extra.items()})


def _load_questions(path: Path, split: str) -> dict:
    require(path, f"{split} questions")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        raise DataError(f"{path}: a torch.save zip archive, not the pickle the HCRN/DualVGR format uses; "
                        f"load it with torch.load and write the dict with pickle.dump")
    try:
        obj = load_question_pickle(path)
    except PickleRefused as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # any unpickling failure is bad input
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    missing = [k for k in L.QUESTION_KEYS if k not in obj]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(map(repr, missing))} "
                        f"(has: {', '.join(map(str, obj))})")
    return obj


def _as_int_array(obj: dict, key: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(obj[key])
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and arr.size and np.all(np.mod(arr, 1) == 0):
                arr = arr.astype(np.int64)
            elif arr.size:
                raise TypeError(f"dtype {arr.dtype}")
        return arr.astype(np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: {key!r} must hold integers ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- the data set


@dataclass(frozen=True)
class DataInfo:
    """What planning a run needs to know of a data set, without its features: the id (which
    covers the vocab, the question files and the feature files' contents), the model settings
    the data dictates, and the data set's suggestions (``meta``). Cheap to compute
    (:func:`describe`) and recorded in the results store, so reports need no data at all."""

    spec: str
    name: str
    data_id: str
    dims: dict
    meta: dict
    sources: dict  # model setting -> "file:key" it comes from (for messages)
    task: str = OPEN_ENDED  # what its questions ask (variants.tasks; harness.data.answers.detect_task)

    def check_model_config(self, model_cfg: dict) -> None:
        """Fail with a clear message when a model config does not fit these features."""
        for key, have in self.dims.items():
            want = model_cfg.get(key)
            if key != "motion_dim" and want is not None and want != have:
                raise DataError(f"data set {self.name}: model setting {key}={want} does not match the "
                                f"data ({key}={have}, from {self.sources.get(key, 'memory')})")
        if model_cfg.get("task", OPEN_ENDED) != self.task:
            raise DataError(f"data set {self.name}: its questions are {self.task} questions, but the model's "
                            f"task setting is {model_cfg.get('task', OPEN_ENDED)!r}")
        # the motion width the model will have: motion_dim, or vision_dim when that is None
        have_motion = self.dims.get("motion_dim", self.dims.get("vision_dim"))
        want = model_cfg.get("motion_dim") or model_cfg.get("vision_dim")
        if want is not None and have_motion is not None and want != have_motion:
            raise DataError(f"data set {self.name}: model setting motion_dim={want} does not match the data "
                            f"(motion_dim={have_motion}, from {self.sources.get('motion_dim', 'memory')})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class VideoQAData:
    name: str
    info: DataInfo
    paths: DataPaths | None
    vocab: dict
    glove: torch.Tensor  # (question_vocab, word_dim)
    splits: dict[str, SplitData]
    features: Features
    type_names: list[str]

    @property
    def data_id(self) -> str:
        return self.info.data_id

    @property
    def meta(self) -> dict:
        return self.info.meta

    @property
    def dims(self) -> dict:
        return self.info.dims

    def check_model_config(self, model_cfg: dict) -> None:
        self.info.check_model_config(model_cfg)


def _sources(p: DataPaths) -> dict:
    return {"question_vocab": f"{p.vocab}:{L.QUESTION_TOKENS_KEY}", "answer_vocab": f"{p.vocab}:{L.ANSWER_TOKENS_KEY}",
            "word_dim": f"{p.questions['train']}:glove", "vision_dim": f"{p.appearance}:{L.APPEARANCE_KEY}",
            "num_clips": f"{p.appearance}:{L.APPEARANCE_KEY}", "num_frames": f"{p.appearance}:{L.APPEARANCE_KEY}",
            "motion_dim": f"{p.motion}:{L.MOTION_KEY}"}


def _dims(vocab: dict, app_shape: tuple, motion_dim: int, word_dim: int) -> dict:
    """Model settings dictated by the data (``variants.DATA_KEYS``). ``motion_dim`` is there only
    when it differs from ``vision_dim`` (a model's ``motion_dim=None`` means ``vision_dim``, so
    configs and run ids of equal-dim data sets stay as they were)."""
    _, clips, frames, dim = app_shape
    dims = {"question_vocab": len(vocab[L.QUESTION_TOKENS_KEY]), "answer_vocab": len(vocab[L.ANSWER_TOKENS_KEY]),
            "vision_dim": int(dim), "word_dim": int(word_dim), "num_clips": int(clips), "num_frames": int(frames)}
    if motion_dim != dim:
        dims["motion_dim"] = int(motion_dim)
    return dims


def _data_id(paths: DataPaths) -> str:
    """name + a hash of the vocab and question files' bytes and the feature files' fingerprints
    (:func:`file_fingerprint`: their whole contents, hashed once and cached)."""
    h = hashlib.sha1()
    for p in [paths.vocab, *paths.questions.values()]:
        if p.exists():
            h.update(p.read_bytes())
    for p in (paths.appearance, paths.motion):
        h.update(file_fingerprint(p)["sha1"].encode())
    return f"{paths.name}-{h.hexdigest()[:10]}"


def _resolve_paths(spec: str | Path, path_overrides: dict, generate: bool = True) -> DataPaths:
    spec_s = str(spec)
    if spec_s.startswith("synthetic:"):
        return DataPaths.from_dir(synthetic_dir(spec_s, generate=generate))
    overrides = dict(path_overrides)
    name = overrides.pop("name", None)
    return DataPaths.from_dir(spec_s, name, **overrides)


def _feature_shapes(paths: DataPaths) -> tuple[tuple, tuple]:
    """Shapes of the two feature datasets, validated against each other (reads no feature)."""
    fa = open_h5(paths.appearance, "appearance feature", L.APPEARANCE_KEY)
    fm = open_h5(paths.motion, "motion feature", L.MOTION_KEY)
    try:
        check_features(paths, fa, fm)
        return tuple(fa[L.APPEARANCE_KEY].shape), tuple(fm[L.MOTION_KEY].shape)
    finally:
        fa.close()
        fm.close()


def describe(spec: str | Path, *, generate: bool = True, **path_overrides) -> DataInfo:
    """The :class:`DataInfo` of a data set, reading its vocab and question files and the feature
    files' shapes, not the features (their fingerprints come from the cache when unchanged)."""
    paths = _resolve_paths(spec, path_overrides, generate)
    vocab = load_vocab(paths.vocab)
    app_shape, mot_shape = _feature_shapes(paths)
    obj = _load_questions(paths.questions["train"], "train")
    g = np.asarray(obj["glove"])
    word_dim = int(g.shape[1]) if g.ndim == 2 else -1
    meta = _read_meta(paths)
    task = A.detect_task(meta, paths.meta, obj)
    return _info(spec, paths, vocab, app_shape, mot_shape[-1], word_dim, meta, task)


def _info(spec, paths: DataPaths, vocab: dict, app_shape: tuple, motion_dim: int, word_dim: int, meta: dict,
          task: str) -> DataInfo:
    return DataInfo(str(spec), paths.name, _data_id(paths), _dims(vocab, app_shape, motion_dim, word_dim), meta,
                    _sources(paths), task)


def _read_meta(paths: DataPaths) -> dict:
    meta = {}
    if paths.meta:
        meta = read_json(paths.meta)
        if not isinstance(meta, dict):
            raise DataError(f"{paths.meta}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _split_arrays(path: Path, split: str, q_vocab: int, a_vocab: int, vocab_path: Path,
                  task: str | None, meta: tuple[dict, Path | None]) -> tuple[dict, np.ndarray, str]:
    """A question file's arrays, validated: shapes, lengths, token ids, the task's answers and
    candidates (``task`` None: detected from this file, see harness.data.answers)."""
    obj = _load_questions(path, split)
    task = task or A.detect_task(*meta, obj)
    qs = _as_int_array(obj, "questions", path)
    if qs.ndim != 2:
        raise DataError(f"{path}: 'questions' must be 2-D (questions, max_len), got shape {qs.shape}")
    n = qs.shape[0]
    if n == 0:
        raise DataError(f"{path}: the {split} split is empty (0 questions)")
    arrays = {"questions": qs}
    for key in ("questions_len", "video_ids", "question_id", "answers"):
        a = _as_int_array(obj, key, path).reshape(-1)
        if a.shape[0] != n:
            raise DataError(f"{path}: {key!r} has {a.shape[0]} entries but 'questions' has {n}")
        arrays[key] = a
    lens, qid = arrays["questions_len"], arrays["question_id"]
    if lens.min() < 1 or lens.max() > qs.shape[1]:
        i = int(np.flatnonzero((lens < 1) | (lens > qs.shape[1]))[0])
        raise DataError(f"{path}: questions_len[{i}] = {lens[i]} is outside 1..{qs.shape[1]} (question_id {qid[i]})")
    if qs.min() < 0 or qs.max() >= q_vocab:
        i, j = np.argwhere((qs < 0) | (qs >= q_vocab))[0]
        raise DataError(f"{path}: token id {qs[i, j]} in question {i} (question_id {qid[i]}) is outside the "
                        f"question vocabulary of {q_vocab} tokens in {vocab_path}")
    arrays["extra"] = A.task_arrays(task, obj, path, arrays, q_vocab, a_vocab, vocab_path)
    arrays["category"] = obj.get(L.QUESTION_CATEGORY_KEY)
    return arrays, _glove(obj, path, q_vocab), task


def _glove(obj: dict, path: Path, q_vocab: int) -> np.ndarray:
    g = np.asarray(obj["glove"], dtype=np.float32)
    if g.ndim != 2 or g.shape[0] != q_vocab:
        raise DataError(f"{path}: 'glove' must be (question vocab = {q_vocab}, word_dim), got shape {g.shape}")
    if not np.isfinite(g).all():
        i, j = np.argwhere(~np.isfinite(g))[0]
        raise DataError(f"{path}: 'glove' has NaN or Inf values (first at row {i}, column {j}: token {i} of the "
                        f"question vocabulary)")
    return g


def _video_rows(path: Path, arrays: dict, id_to_row: dict, app_path: Path) -> np.ndarray:
    rows = np.empty(len(arrays["video_ids"]), dtype=np.int64)
    for i, vid in enumerate(arrays["video_ids"].tolist()):
        r = id_to_row.get(int(vid))
        if r is None:
            raise DataError(f"{path}: question {i} (question_id {arrays['question_id'][i]}) refers to "
                            f"video id {vid}, which has no features in {app_path}")
        rows[i] = r
    return rows


def _load_splits(paths: DataPaths, splits: tuple[str, ...], vocab: dict, ids: np.ndarray, meta: dict
                 ) -> tuple[dict[str, SplitData], np.ndarray, list[str], str]:
    q_vocab, a_vocab = len(vocab[L.QUESTION_TOKENS_KEY]), len(vocab[L.ANSWER_TOKENS_KEY])
    id_to_row = {int(v): i for i, v in enumerate(ids.tolist())}
    out: dict[str, SplitData] = {}
    glove, type_names, task = None, None, None
    for split in splits:
        path = paths.questions[split]
        arrays, g, task = _split_arrays(path, split, q_vocab, a_vocab, paths.vocab, task, (meta, paths.meta))
        rows = _video_rows(path, arrays, id_to_row, paths.appearance)
        glove = g if glove is None else glove
        types, names = question_types(arrays["questions"], vocab, arrays["category"])
        if type_names is None:
            type_names = names
        elif names != type_names:
            # SVQA categories: align on the union, keeping indices consistent across splits
            union = sorted(set(type_names) | set(names))
            type_names, remap = union, {i: union.index(n) for i, n in enumerate(names)}
            types = np.array([remap[t] for t in types.tolist()], dtype=np.int64)
        out[split] = SplitData(split, *(torch.from_numpy(arrays[k]) for k in ("questions", "questions_len")),
                               torch.from_numpy(rows), torch.from_numpy(arrays["answers"]), torch.from_numpy(types),
                               arrays["question_id"], arrays["video_ids"],
                               {k: torch.from_numpy(v) for k, v in arrays["extra"].items()})
    return out, glove, type_names or [], task or OPEN_ENDED


#: how features are loaded (``none``: no features, for models without video; chosen by the harness, not a user)
FEATURE_MODES = ("auto", "memory", "stream")


def check_mode(mode: str, where: str = "feature mode", internal: bool = False) -> None:
    """A feature loading mode a user may ask for (``internal``: ``none`` too), else a DataError naming ``where``."""
    known = (*FEATURE_MODES, "none") if internal else FEATURE_MODES
    if mode not in known:
        raise DataError(f"{where} {mode!r} is not one of {', '.join(known)}")


def load(spec: str | Path, *, splits: tuple[str, ...] = SPLITS, mode: str = "auto",
         check_finite: bool = True, progress: bool = False, modalities: tuple[str, ...] = MODALITIES,
         **path_overrides) -> VideoQAData:
    """Load and validate a data set. ``mode``: ``memory`` (contiguous files memory-mapped, others
    read), ``stream`` (read per batch), ``auto`` (memory when the files can be mapped or fit in
    half of the available RAM, else stream) or ``none`` (no features: for models without video).
    ``modalities``: the feature streams to read (a one-modality model's: the other's batches are
    empty tensors, its features never read: :func:`harness.data.features.load_features`)."""
    check_mode(mode, internal=True)
    paths = _resolve_paths(spec, path_overrides)
    vocab = load_vocab(paths.vocab)
    features, ids = load_features(paths, mode, check_finite, tuple(modalities))
    meta = _read_meta(paths)
    split_data, glove, type_names, task = _load_splits(paths, splits, vocab, ids, meta)
    app_shape = (features.num_videos, features.num_clips, features.num_frames, features.vision_dim)
    info = _info(spec, paths, vocab, app_shape, features.motion_dim, int(glove.shape[1]), meta, task)
    return VideoQAData(paths.name, info, paths, vocab, torch.from_numpy(glove.copy()), split_data, features,
                       type_names)


def synthetic_dir(spec: str, generate: bool = True) -> Path:
    """``synthetic:PRESET[:SEED]`` -> the cached directory, generated on first use (unless
    ``generate`` is false: then the directory as it is)."""
    from harness.data import synthetic

    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "synthetic":
        raise DataError(f"bad data spec {spec!r}: expected synthetic:PRESET or synthetic:PRESET:SEED")
    preset = parts[1]
    if preset not in synthetic.PRESETS:
        raise DataError(f"bad data spec {spec!r}: unknown preset {preset!r} "
                        f"(known: {', '.join(synthetic.PRESETS)})")
    try:
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise DataError(f"bad data spec {spec!r}: seed {parts[2]!r} is not an integer") from None
    root = Path(os.environ.get("VQAKD_DATA_DIR", Path.cwd() / "data")) / "synthetic"
    out = root / f"{preset}-seed{seed}"
    if generate:
        synthetic.generate(out, preset=preset, seed=seed, name=f"synthetic-{preset}", progress=False)
    return out


# ----------------------------------------------------------------------------- batching


class _BatchFields(NamedTuple):
    appearance: torch.Tensor  # (B, clips, frames, dim)
    motion: torch.Tensor  # (B, clips, dim)
    questions: torch.Tensor  # (B, L)
    lengths: torch.Tensor  # (B,)
    answers: torch.Tensor  # (B,)
    qtypes: torch.Tensor  # (B,)
    index: torch.Tensor  # (B,) positions in the split


class Batch(_BatchFields):
    """A batch: its tensors (iterating it gives them), and ``extra``, the task's model inputs
    (SplitData.extra, e.g. multiple choice's candidates), an attribute outside the tuple."""

    def __new__(cls, *fields, extra: dict | None = None):
        self = super().__new__(cls, *fields[:7])
        self.extra = dict(fields[7]) if len(fields) > 7 else dict(extra or {})
        return self


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def iterate_batches(split: SplitData, features: Features, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None
                    ) -> Iterator[Batch]:
    """Batches by indexing tensors that already live on ``device`` (move ``split`` and in-memory
    ``features`` there once, beforehand). The permutation is drawn on the CPU from
    ``generator`` (reproducible and resumable) and moved once per epoch; nothing in the loop
    waits for the device."""
    n = len(split)
    dev = torch.device(device) if device is not None else split.questions.device
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(dev, non_blocking=True)
    for b in range(num_batches(n, batch_size, drop_last)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        rows = split.video_rows[idx]
        app, mot = features.gather(rows)
        app = app.to(dev, dtype=dtype, non_blocking=True)
        mot = mot.to(dev, dtype=dtype, non_blocking=True)
        yield Batch(app, mot, split.questions[idx], split.lengths[idx], split.answers[idx],
                    split.qtypes[idx], idx, {k: v[idx] for k, v in split.extra.items()})
