"""NExT-QA (Xiao et al., CVPR 2021), multiple choice: its released question files and features to
the ``next-qa`` data set.

Questions: ``train.csv``, ``val.csv``, ``test.csv`` (``doc-doc/NExT-QA``, ``dataset/nextqa/``),
comma-separated with a header: ``video`` (the integer video id), ``frame_count``, ``width``,
``height``, ``question`` (no ``?``), ``answer`` (the right candidate's index 0-4), ``qid`` (the
question's number within its video), ``type`` (CW, CH, TN, TC, TP, DC, DL, DO: layout.TYPE_GROUPS
groups them into causal, temporal, descriptive) and the candidates ``a0`` .. ``a4``. Tokens are
those of NExT-QA's loader: the lower-cased question and candidates, whole, split like
``nltk.word_tokenize``. The vocabulary comes from train.csv (NExT-QA has its own val split).
``question_id``: the question's position among the data lines of its file (``video`` and ``qid``
together name it in NExT-QA's own results).

Features: NExT-QA's ``vid_feat/app_mot_{train,val,test}.h5`` (made with HCRN's code), as its
loader reads them: ``ids`` (videos,) integer video ids and ``feat`` (videos, 16 clips, 4096),
each clip's 2048-d appearance (ResNet-101) followed by its 2048-d motion (ResNeXt-101) feature.
They become the appearance file (videos, clips, 1 frame, 2048): one appearance vector per clip,
since the release has no per-frame features, and the motion file (videos, clips, 2048), without
re-extraction.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from variants.tasks import MULTIPLE_CHOICE

from harness.data import layout as L
from harness.data.features import check_h5_storage
from harness.files import atomic_write_json
from harness.data.prepare.backbones import RESNEXT3D
from harness.data.prepare.common import NEXTQA, PrepareError, shown
from harness.data.prepare.questions import MAX_QUESTION_TOKENS
from harness.data.prepare.taskdata import TaskRecord, encode_task, integer, read_table, write_task_dataset
from harness.data.prepare.text import tokenize

NEXTQA_FILE = "{split}.csv"
CANDIDATE_COLUMNS = ("a0", "a1", "a2", "a3", "a4")
COLUMNS = ("video", "question", "answer", "qid", "type", *CANDIDATE_COLUMNS)
TYPES = tuple(t for group in L.TYPE_GROUPS.values() for t in group)
#: the released feature file of a split, and its data sets
FEATURE_FILE = "app_mot_{split}.h5"
FEATURE_KEY, FEATURE_IDS_KEY = "feat", "ids"
#: the appearance part of each clip's feature (NExT-QA's loader: feat[:, :2048])
APPEARANCE_DIM = 2048
#: videos copied at a time
CHUNK = 256


# ----------------------------------------------------------------------------- questions


def _record(row: dict[str, str], where: str, position: int) -> TaskRecord:
    kind = row["type"].strip()
    if kind not in TYPES:
        raise PrepareError(f"{where}, column 'type': {row['type']!r} is not a NExT-QA type ({', '.join(TYPES)})")
    video = integer(row["video"], where, "video", 0)
    integer(row["qid"], where, "qid", 0)
    return TaskRecord(tokenize(row["question"].lower()),
                      integer(row["answer"], where, "answer", 0, len(CANDIDATE_COLUMNS) - 1), video, str(video),
                      position, kind, where, tuple(tokenize(row[c].lower()) for c in CANDIDATE_COLUMNS))


def read_nextqa(path: Path) -> list[TaskRecord]:
    rows = read_table(path, COLUMNS)
    return [_record(row, f"{path}: line {line}", i) for i, (line, row) in enumerate(rows)]


def nextqa_files(annotations: Path) -> dict[str, Path]:
    return {s: Path(annotations) / NEXTQA_FILE.format(split=s) for s in L.SPLITS}


def nextqa_video_ids(annotations: Path) -> set[int]:
    """Every video id the question files refer to."""
    return {r.video_id for p in nextqa_files(annotations).values() for r in read_nextqa(p)}


def prepare_nextqa(annotations: Path, glove: Path, out: Path, *, max_question_tokens: int = MAX_QUESTION_TOKENS,
                   log: Callable[[str], None] = print) -> dict:
    """Write the ``next-qa`` data set's vocabulary, question pickles, report and meta file under
    ``out``; returns the summary (also in the questions report)."""
    records = {s: read_nextqa(p) for s, p in nextqa_files(annotations).items()}
    vocab, objs, summary = encode_task(records, MULTIPLE_CHOICE, glove, max_tokens=max_question_tokens)
    summary.update(dataset=NEXTQA, annotations=str(annotations))
    write_task_dataset(out, NEXTQA, MULTIPLE_CHOICE, vocab, objs, summary,
                       {"release": "NExT-QA multiple choice", "annotations": str(annotations)}, log)
    return summary


# ----------------------------------------------------------------------------- features


def _feature_ids(f: h5py.File, path: Path) -> np.ndarray:
    """The integer video ids of a released feature file (integers, or digit strings)."""
    raw = f[FEATURE_IDS_KEY][()]
    if raw.ndim != 1:
        raise PrepareError(f"{path}: {FEATURE_IDS_KEY!r} must be 1-D (videos,), got shape {raw.shape}")
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    try:
        return np.asarray([int(v.decode() if isinstance(v, bytes) else v) for v in raw.tolist()], dtype=np.int64)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise PrepareError(f"{path}: {FEATURE_IDS_KEY!r} holds {raw.dtype} values that are not integer video ids "
                           f"(first: {shown(raw[0])})") from None


def _open_release(path: Path, app_dim: int) -> tuple[h5py.File, np.ndarray]:
    """A released feature file, checked: its ids and (videos, clips, > app_dim) features."""
    if not path.is_file():
        raise PrepareError(f"NExT-QA feature file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PrepareError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        missing = [k for k in (FEATURE_KEY, FEATURE_IDS_KEY) if k not in f]
        if missing:
            raise PrepareError(f"{path}: no data set {', '.join(map(repr, missing))} (has: {', '.join(f)})")
        check_h5_storage(f, path, (FEATURE_KEY, FEATURE_IDS_KEY), PrepareError)
        ids, feat = _feature_ids(f, path), f[FEATURE_KEY]
        if feat.ndim != 3 or feat.shape[0] != len(ids) or feat.shape[2] <= app_dim:
            raise PrepareError(f"{path}: {FEATURE_KEY!r} must be (videos = {len(ids)} ids, clips, {app_dim} "
                               f"appearance + motion dims), got shape {feat.shape}")
        if len(set(ids.tolist())) != len(ids):
            raise PrepareError(f"{path}: {FEATURE_IDS_KEY!r} repeats a video id")
        return f, ids
    except BaseException:
        f.close()
        raise


def _plan(sources: dict[str, tuple[h5py.File, np.ndarray]], paths: dict[str, Path]) -> tuple[int, int, list]:
    """(clips, dim, [(split, rows of that file to copy)]): every video once, in split order."""
    shapes = {s: f[FEATURE_KEY].shape[1:] for s, (f, _) in sources.items()}
    first = next(iter(shapes.values()))
    for s, shp in shapes.items():
        if shp != first:
            raise PrepareError(f"{paths[s]}: {FEATURE_KEY!r} rows are {shp}, {paths[next(iter(shapes))]}'s {first}")
    seen: set[int] = set()
    plan = []
    for s, (_, ids) in sources.items():
        rows = [i for i, v in enumerate(ids.tolist()) if v not in seen]
        seen.update(ids.tolist())
        plan.append((s, np.asarray(rows, dtype=np.int64)))
    return first[0], first[1], plan


def _h5_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _copy(sources: dict, plan: list, app_dim: int, tmps: tuple[Path, Path], clips: int, dim: int,
          attrs: dict) -> int:
    """Write both feature files (temporary names) from the release; returns the number of videos."""
    n = sum(len(rows) for _, rows in plan)
    with h5py.File(tmps[0], "w") as fa, h5py.File(tmps[1], "w") as fm:
        app = fa.create_dataset(L.APPEARANCE_KEY, (n, clips, 1, app_dim), dtype=np.float32)
        mot = fm.create_dataset(L.MOTION_KEY, (n, clips, dim - app_dim), dtype=np.float32)
        for ds, extra in ((app, {}), (mot, {L.MOTION_MODEL_ATTR: RESNEXT3D})):
            ds.attrs.update({**attrs, **extra})
        ids_out, at = np.empty(n, dtype=np.int64), 0
        for split, rows in plan:
            f, ids = sources[split]
            for k in range(0, len(rows), CHUNK):
                sel = rows[k:k + CHUNK]
                block = f[FEATURE_KEY][sel[0]:sel[-1] + 1][sel - sel[0]].astype(np.float32)
                if not np.isfinite(block).all():
                    bad = ids[sel[~np.isfinite(block).all(axis=(1, 2))]].tolist()
                    raise PrepareError(f"{f.filename}: NaN or Inf features for video id(s) {bad[:10]}")
                app[at:at + len(sel)] = block[:, :, None, :app_dim]
                mot[at:at + len(sel)] = block[:, :, app_dim:]
                ids_out[at:at + len(sel)] = ids[sel]
                at += len(sel)
        fa[L.IDS_KEY], fm[L.IDS_KEY] = ids_out, ids_out
    return n


def adapt_nextqa_features(features: Path, out: Path, *, app_dim: int = APPEARANCE_DIM,
                          log: Callable[[str], None] = print) -> dict:
    """The appearance and motion files of ``next-qa`` under ``out`` from the released
    ``app_mot_{split}.h5`` files in ``features``; each written under a temporary name and renamed."""
    paths = {s: Path(features) / FEATURE_FILE.format(split=s) for s in L.SPLITS}
    sources: dict[str, tuple[h5py.File, np.ndarray]] = {}
    out = Path(out)
    targets = (L.appearance_file(out, NEXTQA), L.motion_file(out, NEXTQA))
    tmps = (_h5_tmp(targets[0]), _h5_tmp(targets[1]))
    try:
        for s, p in paths.items():
            sources[s] = _open_release(p, app_dim)
        clips, dim, plan = _plan(sources, paths)
        out.mkdir(parents=True, exist_ok=True)
        n = _copy(sources, plan, app_dim, tmps, clips, dim, {"source": "NExT-QA app_mot features", "frames": 1})
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
    finally:
        for f, _ in sources.values():
            f.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    report = {"dataset": NEXTQA, "features": {s: str(p) for s, p in paths.items()}, "videos": n, "clips": clips,
              "appearance_dim": app_dim, "motion_dim": dim - app_dim}
    atomic_write_json(L.features_report_file(out, NEXTQA), report)
    log(f"{NEXTQA}: {n} videos x {clips} clips: wrote {targets[0]} (appearance, 1 frame per clip, {app_dim}-d) "
        f"and {targets[1]} (motion, {dim - app_dim}-d)")
    return report
