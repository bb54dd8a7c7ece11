"""The resumable writer of the two feature files (:mod:`harness.data.layout`'s format).

Both files grow one batch of videos at a time (resizable data sets). A batch is committed in two
phases: first its feature rows (and ``num_frames``) are written to both files and flushed, then
its ids, again flushed file by file. A row therefore counts as done only when its id is in both
files at the same row, and an id is written only after its features reached both files (a
whole flush earlier, so this holds whatever order HDF5 writes in within one flush). A run killed at
any point leaves readable files in which every video that has an id is complete
(tests/data/prepare/test_video.py copies the files before each flush of a run, what a kill then leaves,
and checks it; a new file is written complete before anything is appended, see ``_open``).
Opening the files again drops whatever lies past the rows both files' ids agree on (an interrupted
batch), so those videos are extracted again. Attributes on the feature data sets record the
backbone and sampling settings; resuming with other settings is refused."""
from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np

from harness.data import layout as L
from harness.files import atomic_write_bytes
from harness.data.prepare.common import PrepareError

#: not compared on resuming: the same weights may have moved
WEIGHTS_PATH_ATTR = "weights_path"


def feature_attrs(model: str, weights: str, weights_path: str, image_size: int, clips: int, frames: int) -> dict:
    """The attributes of a feature data set recording how it was made (the model's name under
    layout's attribute name, which :mod:`harness.data.dataset` reads from the motion file)."""
    return {L.MOTION_MODEL_ATTR: model, "weights": weights, WEIGHTS_PATH_ATTR: weights_path,
            "image_size": image_size, "clips": clips, "frames": frames}


class FeatureFiles:
    """The two feature files, opened for appending (see the module's docstring)."""

    def __init__(self, app_path: Path, motion_path: Path, num_clips: int, num_frames: int,
                 app_attrs: dict, motion_attrs: dict, app_dim: int, motion_dim: int):
        self.paths = (Path(app_path), Path(motion_path))
        ids = (L.IDS_KEY, (), None, np.int64)
        layouts = ([(L.APPEARANCE_KEY, (num_clips, num_frames, app_dim), app_attrs, np.float32), ids,
                    (L.NUM_FRAMES_KEY, (), None, np.int64)],
                   [(L.MOTION_KEY, (num_clips, motion_dim), motion_attrs, np.float32), ids])
        self.files: list[h5py.File] = []
        try:
            opened = [self._open(p, layout) for p, layout in zip(self.paths, layouts)]
            (self.app, self.app_ids, self.nframes), (self.mot, self.mot_ids) = opened
            self.done: set[int] = self._drop_unfinished()
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, layout: list[tuple]) -> list[h5py.Dataset]:
        """Open ``path`` for appending, created first (empty, complete, written atomically: a kill
        while a new file is set up leaves no file rather than an unreadable one)."""
        if not path.exists():
            buf = io.BytesIO()
            with h5py.File(buf, "w") as f:
                for spec in layout:
                    _dataset(f, *spec)
            atomic_write_bytes(path, buf.getvalue())
        try:
            f = h5py.File(path, "a")
        except OSError as e:
            raise PrepareError(f"{path}: not a readable HDF5 file ({e}); delete it to start again") from None
        self.files.append(f)
        return [_dataset(f, *spec) for spec in layout]

    def _drop_unfinished(self) -> set[int]:
        """Truncate every data set to the rows both files' ids agree on; the ids of those rows."""
        n = min(self.app_ids.shape[0], self.mot_ids.shape[0])
        a, m = self.app_ids[:n], self.mot_ids[:n]
        if not np.array_equal(a, m):
            r = int(np.flatnonzero(a != m)[0])
            raise PrepareError(f"{self.paths[0]} and {self.paths[1]} disagree at row {r} (ids {a[r]} and {m[r]}): "
                               f"they were not written together; delete both to start again")
        for ds in (self.app, self.app_ids, self.nframes, self.mot, self.mot_ids):
            if ds.shape[0] > n:  # an interrupted batch
                ds.resize(n, axis=0)
        if self.nframes.shape[0] < n:  # files of an older version; -1 = unknown
            old = self.nframes.shape[0]
            self.nframes.resize(n, axis=0)
            self.nframes[old:] = -1
        if self.app.shape[0] < n or self.mot.shape[0] < n:
            raise PrepareError(f"{self.paths[0]}, {self.paths[1]}: {n} ids but {self.app.shape[0]} appearance and "
                               f"{self.mot.shape[0]} motion rows: not written by this tool; delete both to start again")
        for f in self.files:
            f.flush()
        return set(a.tolist())

    def append(self, ids: np.ndarray, app: np.ndarray, mot: np.ndarray, nframes: np.ndarray) -> None:
        """Commit one batch: features to both files, flushed; then the ids, flushed."""
        fa, fm = self.files
        _append(self.app, app)
        _append(self.nframes, nframes)
        fa.flush()
        _append(self.mot, mot)
        fm.flush()
        _append(self.app_ids, ids)
        fa.flush()
        _append(self.mot_ids, ids)
        fm.flush()
        self.done.update(int(i) for i in ids)

    def close(self) -> None:
        for f in self.files:
            try:
                f.close()
            except Exception:  # closing what is left after an error
                pass
        self.files = []


def _dataset(f: h5py.File, key: str, row_shape: tuple, attrs: dict | None, dtype) -> h5py.Dataset:
    """``f[key]``, resizable along its first axis with rows of ``row_shape``: created, or checked
    against this run's settings (``attrs``)."""
    if key not in f:
        ds = f.create_dataset(key, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                              chunks=(1, *row_shape) if row_shape else (4096,))
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v
        return ds
    ds = f[key]
    if ds.shape[1:] != row_shape or ds.maxshape[0] is not None:
        raise PrepareError(f"{f.filename}: data set {key!r} has shape {ds.shape} (max {ds.maxshape}), this run "
                           f"writes rows of {row_shape} to a resizable data set: it was written with other "
                           f"settings or by another tool; use another --out or delete the file")
    for k, v in (attrs or {}).items():
        have = ds.attrs.get(k)
        have = have.item() if hasattr(have, "item") else have
        if k != WEIGHTS_PATH_ATTR and have != v:
            raise PrepareError(f"{f.filename}: {key!r} was written with {k}={have!r}, this run uses {k}={v!r}; "
                               f"use another --out or delete the file")
    return ds


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + values.shape[0], axis=0)
    ds[n:] = values
