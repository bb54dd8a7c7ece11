"""Feature data in the HCRN / DualVGR on-disk format (names defined in :mod:`harness.layout`).

A data set is a directory holding (``{name}`` is the data set name, e.g. ``msvd-qa``)::

    {name}_appearance_feat.h5   resnet_features (videos, clips, frames, dim), ids (videos)
    {name}_motion_feat.h5       resnext_features (videos, clips, motion_dim), ids (videos)
    {name}_vocab.json           question_token_to_idx, answer_token_to_idx, question_answer_token_to_idx
    {name}_{train,val,test}_questions.pt   pickle: questions (N, L) padded with 0, questions_len,
                                video_ids, question_id, answers, glove (vocab, word_dim),
                                optional question_category (SVQA)

Everything is validated when loaded, and every error names the file and what is wrong. The
motion dim equals the appearance dim in files from HCRN's / DualVGR's scripts (ResNeXt-101 and
ResNet-101, both 2048); a motion file written by :mod:`harness.prepare` names its backbone in the
``model`` attribute of ``resnext_features`` and may have its own dim (512 for torchvision's video
models), which the model then takes as ``motion_dim``.
Features are read once (into memory, and onto the GPU when training there) and batches are
built by indexing: no file is opened per item. For feature sets larger than memory a streaming
mode keeps the two h5 files open and reads each batch's videos with one sorted, chunked read.

Data specs accepted by :func:`load`:

* a directory (the data set name is found from its single ``*_vocab.json``),
* ``synthetic:PRESET`` or ``synthetic:PRESET:SEED`` (generated on first use, then cached under
  ``$VQAKD_DATA_DIR`` or ``./data/synthetic``; see :mod:`harness.synthetic`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import h5py
import numpy as np
import torch

from . import layout as L
from .errors import HarnessError

SPLITS = L.SPLITS
QUESTION_WORDS = ("what", "who", "how", "when", "where")
OTHER = "other"


class DataError(HarnessError, ValueError):
    """Bad input data: the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- paths


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
                name = L.name_from_vocab_file(vocab)
            else:
                found = sorted(L.name_from_vocab_file(p) for p in d.glob(L.VOCAB_GLOB))
                if len(found) != 1:
                    raise DataError(
                        f"{d}: cannot tell the data set name: expected exactly one {L.VOCAB_GLOB}, "
                        f"found {found or 'none'}; pass the name explicitly")
                name = found[0]
        q = {s: Path(questions[s]) if questions and s in questions else L.questions_file(d, name, s)
             for s in SPLITS}
        meta = L.meta_file(d, name)
        return cls(name=name,
                   appearance=Path(appearance) if appearance else L.appearance_file(d, name),
                   motion=Path(motion) if motion else L.motion_file(d, name),
                   vocab=Path(vocab) if vocab else L.vocab_file(d, name),
                   questions=q, meta=meta if meta.exists() else None)


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")


# ----------------------------------------------------------------------------- vocab & questions


def load_vocab(path: Path) -> dict:
    _require(path, "vocab")
    try:
        vocab = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for key in L.VOCAB_KEYS:
        if key not in vocab:
            raise DataError(f"{path}: missing key {key!r} (has: {', '.join(vocab)})")
        if not vocab[key]:
            raise DataError(f"{path}: {key!r} is empty")
    return vocab


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

    def __len__(self) -> int:
        return self.questions.shape[0]

    def to(self, device) -> "SplitData":
        kw = {f: getattr(self, f) for f in ("questions", "lengths", "video_rows", "answers", "qtypes")}
        return SplitData(self.name, **{k: v.to(device) for k, v in kw.items()},
                         question_ids=self.question_ids, video_ids=self.video_ids)


def _load_questions(path: Path, split: str) -> dict:
    _require(path, f"{split} questions")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is bad input
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
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {key!r} must hold integers ({e})") from None


# ----------------------------------------------------------------------------- features


class Features:
    """Appearance (V, clips, frames, dim) and motion (V, clips, dim) features, rows = videos."""

    num_videos: int
    num_clips: int
    num_frames: int
    vision_dim: int
    motion_dim: int
    streaming: bool = False

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class InMemoryFeatures(Features):
    def __init__(self, appearance: torch.Tensor, motion: torch.Tensor):
        self.appearance, self.motion = appearance, motion
        self.num_videos, self.num_clips, self.num_frames, self.vision_dim = appearance.shape
        self.motion_dim = motion.shape[-1]

    def to(self, device=None, dtype=None) -> "InMemoryFeatures":
        return InMemoryFeatures(self.appearance.to(device=device, dtype=dtype),
                                self.motion.to(device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.appearance.device

    @property
    def nbytes(self) -> int:
        return self.appearance.nbytes + self.motion.nbytes

    def gather(self, rows):
        rows = rows.to(self.appearance.device)
        return self.appearance[rows], self.motion[rows]


class StreamingFeatures(Features):
    """Reads each batch's videos from the open h5 files (sorted unique rows, one read per file)."""

    streaming = True

    def __init__(self, app_path: Path, motion_path: Path, shape: tuple[int, int, int, int],
                 motion_dim: int | None = None):
        self.app_path, self.motion_path = app_path, motion_path
        self.num_videos, self.num_clips, self.num_frames, self.vision_dim = shape
        self.motion_dim = self.vision_dim if motion_dim is None else motion_dim
        self._files: tuple[h5py.File, h5py.File] | None = None

    def _open(self):
        if self._files is None:
            self._files = (h5py.File(self.app_path, "r"), h5py.File(self.motion_path, "r"))
        return self._files

    def gather(self, rows):
        fa, fm = self._open()
        r = rows.cpu().numpy()
        uniq, inverse = np.unique(r, return_inverse=True)
        app = torch.from_numpy(fa[L.APPEARANCE_KEY][uniq]).float()
        mot = torch.from_numpy(fm[L.MOTION_KEY][uniq]).float()
        inv = torch.from_numpy(inverse.reshape(-1))
        return app[inv], mot[inv]

    def __getstate__(self):  # picklable for worker processes: reopen lazily
        d = dict(self.__dict__)
        d["_files"] = None
        return d


def _check_finite_h5(ds: h5py.Dataset, path: Path, key: str, chunk: int = 64) -> None:
    for s in range(0, ds.shape[0], chunk):
        block = ds[s:s + chunk]
        if not np.isfinite(block).all():
            bad = s + int(np.argwhere(~np.isfinite(block.reshape(block.shape[0], -1)).all(1))[0, 0])
            raise DataError(f"{path}: {key!r} has NaN or Inf values (first at video row {bad})")


def _open_h5(path: Path, what: str, key: str) -> h5py.File:
    _require(path, what)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    for k in (key, L.IDS_KEY):
        if k not in f:
            keys = list(f.keys())
            f.close()
            raise DataError(f"{path}: missing HDF5 dataset {k!r} (has: {', '.join(keys) or 'none'})")
    return f


# ----------------------------------------------------------------------------- the data set


@dataclass
class VideoQAData:
    name: str
    data_id: str
    paths: DataPaths | None
    vocab: dict
    glove: torch.Tensor  # (question_vocab, word_dim)
    splits: dict[str, SplitData]
    features: Features
    type_names: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def dims(self) -> dict:
        """Model settings dictated by the data (see ``variants.DATA_KEYS``). ``motion_dim`` is
        there only when it differs from ``vision_dim`` (a model's ``motion_dim=None`` means
        ``vision_dim``, so configs and run ids of equal-dim data sets stay as they were)."""
        f = self.features
        dims = {"question_vocab": len(self.vocab[L.QUESTION_TOKENS_KEY]),
                "answer_vocab": len(self.vocab[L.ANSWER_TOKENS_KEY]),
                "vision_dim": f.vision_dim, "word_dim": int(self.glove.shape[1]),
                "num_clips": f.num_clips, "num_frames": f.num_frames}
        if f.motion_dim != f.vision_dim:
            dims["motion_dim"] = f.motion_dim
        return dims

    def check_model_config(self, model_cfg: dict) -> None:
        """Fail with a clear message when a model config does not fit these features."""
        for key, have in self.dims.items():
            want = model_cfg.get(key)
            if key != "motion_dim" and want is not None and want != have:
                raise DataError(f"data set {self.name}: model setting {key}={want} does not match the "
                                f"data ({key}={have}, from {self._source_of(key)})")
        # the motion width the model will have: motion_dim, or vision_dim when that is None
        want = model_cfg.get("motion_dim") or model_cfg.get("vision_dim")
        if want is not None and want != self.features.motion_dim:
            raise DataError(f"data set {self.name}: model setting motion_dim={want} does not match the data "
                            f"(motion_dim={self.features.motion_dim}, from {self._source_of('motion_dim')})")

    def _source_of(self, key: str) -> str:
        p = self.paths
        if p is None:
            return "memory"
        return {"question_vocab": f"{p.vocab}:{L.QUESTION_TOKENS_KEY}",
                "answer_vocab": f"{p.vocab}:{L.ANSWER_TOKENS_KEY}",
                "word_dim": f"{p.questions['train']}:glove",
                "num_frames": f"{p.appearance}:{L.APPEARANCE_KEY}",
                "motion_dim": f"{p.motion}:{L.MOTION_KEY}"}.get(key, f"{p.appearance}:{L.APPEARANCE_KEY}")


def _memory_budget_bytes() -> int:
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(avail * 0.5)


def load(spec: str | Path, *, splits: tuple[str, ...] = SPLITS, mode: str = "auto",
         check_finite: bool = True, progress: bool = False, **path_overrides) -> VideoQAData:
    """Load and validate a data set. ``mode``: ``memory``, ``stream`` or ``auto`` (memory when
    the features fit in half of the available RAM)."""
    if mode not in ("auto", "memory", "stream"):
        raise ValueError(f"mode must be auto, memory or stream, got {mode!r}")
    spec_s = str(spec)
    if spec_s.startswith("synthetic:"):
        paths = DataPaths.from_dir(synthetic_dir(spec_s))
    else:
        name = path_overrides.pop("name", None)
        paths = DataPaths.from_dir(spec_s, name, **path_overrides)

    vocab = load_vocab(paths.vocab)
    q_vocab = len(vocab[L.QUESTION_TOKENS_KEY])
    a_vocab = len(vocab[L.ANSWER_TOKENS_KEY])

    fa = _open_h5(paths.appearance, "appearance feature", L.APPEARANCE_KEY)
    fm = _open_h5(paths.motion, "motion feature", L.MOTION_KEY)
    try:
        app_ds, mot_ds = fa[L.APPEARANCE_KEY], fm[L.MOTION_KEY]
        if app_ds.ndim != 4:
            raise DataError(f"{paths.appearance}: {L.APPEARANCE_KEY!r} must be (videos, clips, frames, dim), "
                            f"got shape {app_ds.shape}")
        if mot_ds.ndim != 3:
            raise DataError(f"{paths.motion}: {L.MOTION_KEY!r} must be (videos, clips, dim), "
                            f"got shape {mot_ds.shape}")
        app_ids = np.asarray(fa[L.IDS_KEY][()]).reshape(-1)
        mot_ids = np.asarray(fm[L.IDS_KEY][()]).reshape(-1)
        if app_ids.shape[0] != app_ds.shape[0]:
            raise DataError(f"{paths.appearance}: 'ids' has {app_ids.shape[0]} entries but "
                            f"{L.APPEARANCE_KEY!r} has {app_ds.shape[0]} videos")
        if mot_ids.shape[0] != mot_ds.shape[0]:
            raise DataError(f"{paths.motion}: 'ids' has {mot_ids.shape[0]} entries but "
                            f"{L.MOTION_KEY!r} has {mot_ds.shape[0]} videos")
        if app_ids.shape != mot_ids.shape:
            raise DataError(f"video ids disagree between {paths.appearance} ({app_ids.shape[0]} videos) "
                            f"and {paths.motion} ({mot_ids.shape[0]} videos)")
        if not np.array_equal(app_ids, mot_ids):
            r = int(np.flatnonzero(app_ids != mot_ids)[0])
            raise DataError(f"video ids disagree between {paths.appearance} and {paths.motion}: "
                            f"row {r} is id {app_ids[r]} in one and {mot_ids[r]} in the other")
        V, C, T, D = app_ds.shape
        if mot_ds.shape[1] != C:
            raise DataError(f"clip counts disagree: {paths.appearance} has {C} clips per video, "
                            f"{paths.motion} has {mot_ds.shape[1]}")
        Dm = mot_ds.shape[2]
        if Dm != D and L.MOTION_MODEL_ATTR not in mot_ds.attrs:
            # HCRN's / DualVGR's scripts write 2048 for both: unequal dims without a named motion
            # backbone mean mixed-up files
            raise DataError(f"feature dims disagree: {paths.appearance} has dim {D}, "
                            f"{paths.motion} has dim {Dm} (a motion file with its own dim must name its "
                            f"backbone in the {L.MOTION_MODEL_ATTR!r} attribute of {L.MOTION_KEY!r}, as harness.prepare does)")
        if D < 1 or Dm < 1:
            raise DataError(f"{paths.appearance if D < 1 else paths.motion}: feature dim is 0")
        if V == 0:
            raise DataError(f"{paths.appearance}: no videos")
        nbytes = (app_ds.size + mot_ds.size) * 4
        stream = mode == "stream" or (mode == "auto" and nbytes > _memory_budget_bytes())
        if check_finite:
            if stream:
                _check_finite_h5(app_ds, paths.appearance, L.APPEARANCE_KEY)
                _check_finite_h5(mot_ds, paths.motion, L.MOTION_KEY)
        if stream:
            features: Features = StreamingFeatures(paths.appearance, paths.motion, (V, C, T, D), Dm)
        else:
            app = torch.from_numpy(np.asarray(app_ds[()], dtype=np.float32))
            mot = torch.from_numpy(np.asarray(mot_ds[()], dtype=np.float32))
            for t, p, k in ((app, paths.appearance, L.APPEARANCE_KEY), (mot, paths.motion, L.MOTION_KEY)):
                if check_finite and not bool(torch.isfinite(t).all()):
                    bad = int(torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(1))[0, 0])
                    raise DataError(f"{p}: {k!r} has NaN or Inf values (first at video row {bad})")
            features = InMemoryFeatures(app, mot)
    finally:
        fa.close()
        fm.close()

    id_to_row = {int(v): i for i, v in enumerate(app_ids.tolist())}
    split_data: dict[str, SplitData] = {}
    glove = None
    type_names: list[str] | None = None
    for split in splits:
        path = paths.questions[split]
        obj = _load_questions(path, split)
        qs = _as_int_array(obj, "questions", path)
        if qs.ndim != 2:
            raise DataError(f"{path}: 'questions' must be 2-D (questions, max_len), got shape {qs.shape}")
        n = qs.shape[0]
        if n == 0:
            raise DataError(f"{path}: the {split} split is empty (0 questions)")
        arrays = {}
        for key in ("questions_len", "video_ids", "question_id", "answers"):
            a = _as_int_array(obj, key, path).reshape(-1)
            if a.shape[0] != n:
                raise DataError(f"{path}: {key!r} has {a.shape[0]} entries but 'questions' has {n}")
            arrays[key] = a
        lens = arrays["questions_len"]
        if lens.min() < 1 or lens.max() > qs.shape[1]:
            i = int(np.flatnonzero((lens < 1) | (lens > qs.shape[1]))[0])
            raise DataError(f"{path}: questions_len[{i}] = {lens[i]} is outside 1..{qs.shape[1]} "
                            f"(question_id {arrays['question_id'][i]})")
        if qs.min() < 0 or qs.max() >= q_vocab:
            i, j = np.argwhere((qs < 0) | (qs >= q_vocab))[0]
            raise DataError(f"{path}: token id {qs[i, j]} in question {i} (question_id "
                            f"{arrays['question_id'][i]}) is outside the question vocabulary of "
                            f"{q_vocab} tokens in {paths.vocab}")
        ans = arrays["answers"]
        if ans.min() < 0 or ans.max() >= a_vocab:
            i = int(np.flatnonzero((ans < 0) | (ans >= a_vocab))[0])
            raise DataError(f"{path}: answer id {ans[i]} of question {i} (question_id "
                            f"{arrays['question_id'][i]}) is outside the answer vocabulary of "
                            f"{a_vocab} answers in {paths.vocab}")
        rows = np.empty(n, dtype=np.int64)
        for i, vid in enumerate(arrays["video_ids"].tolist()):
            r = id_to_row.get(int(vid))
            if r is None:
                raise DataError(f"{path}: question {i} (question_id {arrays['question_id'][i]}) refers to "
                                f"video id {vid}, which has no features in {paths.appearance}")
            rows[i] = r
        g = np.asarray(obj["glove"], dtype=np.float32)
        if g.ndim != 2 or g.shape[0] != q_vocab:
            raise DataError(f"{path}: 'glove' must be (question vocab = {q_vocab}, word_dim), got shape {g.shape}")
        if glove is None:
            glove = torch.from_numpy(g.copy())
        types, names = question_types(qs, vocab, obj.get(L.QUESTION_CATEGORY_KEY))
        if type_names is None:
            type_names = names
        elif names != type_names:
            # SVQA categories: align on the union, keeping indices consistent across splits
            union = sorted(set(type_names) | set(names))
            type_names, remap = union, {i: union.index(n) for i, n in enumerate(names)}
            types = np.array([remap[t] for t in types.tolist()], dtype=np.int64)
        split_data[split] = SplitData(
            split, torch.from_numpy(qs), torch.from_numpy(lens), torch.from_numpy(rows),
            torch.from_numpy(ans), torch.from_numpy(types), arrays["question_id"], arrays["video_ids"])

    meta = json.loads(paths.meta.read_text()) if paths.meta else {}
    data_id = _data_id(paths, features, spec_s)
    return VideoQAData(paths.name, data_id, paths, vocab, glove, split_data, features,
                       type_names or [], meta)


def _data_id(paths: DataPaths, features: Features, spec: str) -> str:
    """A short id for the data set: name + hash of the vocab, the question files and the
    feature shapes (cheap; the feature values are not hashed)."""
    h = hashlib.sha1()
    for p in [paths.vocab, *paths.questions.values()]:
        if p.exists():
            h.update(p.read_bytes())
    h.update(str((features.num_videos, features.num_clips, features.num_frames, features.vision_dim)).encode())
    if features.motion_dim != features.vision_dim:  # only then, so that ids of equal-dim sets stay as they were
        h.update(f"motion_dim={features.motion_dim}".encode())
    return f"{paths.name}-{h.hexdigest()[:10]}"


def synthetic_dir(spec: str) -> Path:
    """``synthetic:PRESET[:SEED]`` -> the cached directory, generated on first use."""
    from . import synthetic

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
    synthetic.generate(out, preset=preset, seed=seed, name=f"synthetic-{preset}", progress=False)
    return out


# ----------------------------------------------------------------------------- batching


class Batch(NamedTuple):
    appearance: torch.Tensor  # (B, clips, frames, dim)
    motion: torch.Tensor  # (B, clips, dim)
    questions: torch.Tensor  # (B, L)
    lengths: torch.Tensor  # (B,)
    answers: torch.Tensor  # (B,)
    qtypes: torch.Tensor  # (B,)
    index: torch.Tensor  # (B,) positions in the split


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
                    split.qtypes[idx], idx)
