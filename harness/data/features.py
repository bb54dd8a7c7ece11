"""The features of a data set (the h5 files of :mod:`harness.data.layout`), read by :func:`harness.data.dataset.load`:
held in memory (memory-mapped when the file allows it) or streamed per batch, checked (shapes, ids,
dims, finite values) and fingerprinted (size, time and hash of each file, cached beside it).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from harness.data import layout as L
from harness.digests import file_hash
from harness.errors import DataError
from harness.data.layout import DataPaths, require

# ----------------------------------------------------------------------------- features


#: the two feature streams; a model reads both or one of them (``variants.modality``)
MODALITIES = ("appearance", "motion")


class Features:
    """Appearance (V, clips, frames, dim) and motion (V, clips, dim) features, rows = videos. A
    stream left out of ``modalities`` is never read: its batches are empty (B, 0) tensors, and its
    shape (``num_*``, ``*_dim``) comes from the file's metadata."""

    num_videos: int
    num_clips: int
    num_frames: int
    vision_dim: int
    motion_dim: int
    streaming: bool = False
    modalities: tuple[str, ...] = MODALITIES

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class InMemoryFeatures(Features):
    """Features as two tensors. Loaded from files stored contiguously (HCRN's scripts, the
    synthetic sets) they are copy-on-write memory maps of the h5 files: the OS's page cache holds
    one copy, shared by every process that maps them (the workers of a ``--jobs N`` grid)."""

    def __init__(self, appearance: torch.Tensor, motion: torch.Tensor, mapped: bool = False,
                 shape: tuple[int, int, int, int] | None = None, motion_dim: int | None = None,
                 modalities: tuple[str, ...] = MODALITIES):
        self.appearance, self.motion, self.mapped = appearance, motion, mapped
        self.num_videos, self.num_clips, self.num_frames, self.vision_dim = shape or appearance.shape
        self.motion_dim = motion.shape[-1] if motion_dim is None else motion_dim
        self.modalities = modalities

    def to(self, device=None, dtype=None) -> "InMemoryFeatures":
        return InMemoryFeatures(self.appearance.to(device=device, dtype=dtype),
                                self.motion.to(device=device, dtype=dtype),
                                shape=(self.num_videos, self.num_clips, self.num_frames, self.vision_dim),
                                motion_dim=self.motion_dim, modalities=self.modalities)

    @property
    def nbytes(self) -> int:
        return self.appearance.nbytes + self.motion.nbytes

    def gather(self, rows):
        rows = rows.to(self.appearance.device)
        return self.appearance[rows], self.motion[rows]


class StreamingFeatures(Features):
    """Reads each batch's videos from the open h5 files (sorted unique rows, one read per file).
    Picklable for worker processes: the files are opened lazily in each process."""

    streaming = True

    def __init__(self, app_path: Path, motion_path: Path, shape: tuple[int, int, int, int],
                 motion_dim: int | None = None, modalities: tuple[str, ...] = MODALITIES):
        self.app_path, self.motion_path = app_path, motion_path
        self.num_videos, self.num_clips, self.num_frames, self.vision_dim = shape
        self.motion_dim = self.vision_dim if motion_dim is None else motion_dim
        self.modalities = modalities
        self._files: dict[str, h5py.File] | None = None

    def _open(self) -> dict[str, h5py.File]:
        """The h5 file of each stream read (a stream left out is not opened)."""
        if self._files is None:
            paths = {"appearance": self.app_path, "motion": self.motion_path}
            self._files = {m: h5py.File(paths[m], "r") for m in self.modalities}
        return self._files

    def gather(self, rows):
        files = self._open()
        r = rows.cpu().numpy()
        uniq, inverse = np.unique(r, return_inverse=True)
        inv = torch.from_numpy(inverse.reshape(-1))
        keys = {"appearance": L.APPEARANCE_KEY, "motion": L.MOTION_KEY}
        out = [torch.from_numpy(files[m][keys[m]][uniq]).float()[inv] if m in files
               else torch.zeros(len(r), 0) for m in MODALITIES]
        return out[0], out[1]


class NoFeatures(Features):
    """For models that use no video (question-only): batches carry empty feature tensors, and no
    feature is read or held in memory."""

    def __init__(self, shape: tuple[int, int, int, int], motion_dim: int):
        self.num_videos, self.num_clips, self.num_frames, self.vision_dim = shape
        self.motion_dim = motion_dim

    def gather(self, rows):
        n = rows.shape[0]
        return rows.new_zeros((n, 0), dtype=torch.float32), rows.new_zeros((n, 0), dtype=torch.float32)


def _first_non_finite(arr, chunk_bytes: int = 64 << 20) -> int | None:
    """The first video row with a NaN or Inf (None if all finite), read in blocks of rows so that
    no full-size temporary is made (arr: an h5 dataset, a numpy array or a memory map)."""
    per_row = max(1, int(np.prod(arr.shape[1:])) * 4)
    step = max(1, chunk_bytes // per_row)
    for s in range(0, arr.shape[0], step):
        block = np.asarray(arr[s:s + step])
        ok = np.isfinite(block.reshape(block.shape[0], -1)).all(1)
        if not ok.all():
            return s + int(np.argmin(ok))
    return None


def _foreign_storage(name: str, obj) -> str | None:
    if isinstance(obj, h5py.Dataset):
        if obj.is_virtual:
            return f"{name!r} is a virtual dataset (its data lives in other files)"
        if obj.external:
            return f"{name!r} stores its data in an external file ({obj.external[0][0]!r})"
    return None


#: how many times its stored bytes a dataset that is read may declare (plus :data:`H5_SLACK_BYTES`):
#: compressed features and ids expand a few times, never this much; beyond it the bytes would come
#: from storage never written (HDF5 fills it in) or from a compression bomb
H5_MAX_EXPANSION = 64
H5_SLACK_BYTES = 64 << 20


def check_h5_storage(f: h5py.File, path: Path, keys: tuple[str, ...], error=DataError) -> None:
    """Refuse an input h5 file that would make reading touch anything but itself: a dataset with
    external storage (raw bytes read from another file: /etc/passwd, a FIFO that blocks forever),
    a virtual dataset (mapped from other files), or one of ``keys`` reached by a soft or external
    link; and one of ``keys`` that declares far more bytes than it stores (:data:`H5_MAX_EXPANSION`).
    Checked on the file's metadata, before any data is read."""
    for k in keys:
        link = f.get(k, getlink=True)
        if link is not None and not isinstance(link, h5py.HardLink):
            raise error(f"{path}: {k!r} is a {type(link).__name__}, not a dataset stored in this file")
    problem = f.visititems(_foreign_storage)
    if problem:
        raise error(f"{path}: {problem}; only datasets stored in the file itself are read")
    for k in keys:
        ds = f.get(k)
        if not isinstance(ds, h5py.Dataset):
            continue
        declared, stored = ds.size * ds.dtype.itemsize, ds.id.get_storage_size()
        if declared > stored * H5_MAX_EXPANSION + H5_SLACK_BYTES:
            raise error(f"{path}: {k!r} declares shape {ds.shape} of {ds.dtype} ({declared:,} bytes) and stores "
                        f"{stored:,} bytes; more than {H5_MAX_EXPANSION}x its stored size is refused (storage "
                        f"never written, or compressed past what features compress to)")


def open_h5(path: Path, what: str, key: str) -> h5py.File:
    require(path, what)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        for k in (key, L.IDS_KEY):
            if k not in f:
                raise DataError(f"{path}: missing HDF5 dataset {k!r} (has: {', '.join(f.keys()) or 'none'})")
        check_h5_storage(f, path, (key, L.IDS_KEY))
        ids = f[L.IDS_KEY]
        if not isinstance(ids, h5py.Dataset) or ids.dtype.kind not in "iu":
            kind = ids.dtype if isinstance(ids, h5py.Dataset) else "a group"
            raise DataError(f"{path}: {L.IDS_KEY!r} must hold integer video ids, got {kind}")
    except BaseException:
        f.close()
        raise
    return f


def _mappable_offset(ds: h5py.Dataset) -> int | None:
    """Byte offset of a dataset that can be memory-mapped as it is (contiguous, uncompressed,
    little-endian float32, allocated), else None."""
    if ds.chunks is not None or ds.compression is not None or ds.dtype != np.dtype("<f4"):
        return None
    try:
        return ds.id.get_offset()
    except Exception:  # h5py raises various errors for unallocated / external storage
        return None


def _read_features(ds: h5py.Dataset, path: Path) -> tuple[torch.Tensor, bool]:
    """A dataset as a float32 tensor: a copy-on-write memory map of the file when the layout
    allows (shared between processes, nothing read until used), else read into memory."""
    offset = _mappable_offset(ds)
    if offset is not None:
        arr = np.memmap(path, dtype="<f4", mode="c", offset=offset, shape=ds.shape)
        return torch.from_numpy(arr), True
    return torch.from_numpy(np.asarray(ds[()], dtype=np.float32)), False


# ----------------------------------------------------------------------------- fingerprints


#: name of the per-directory cache of file fingerprints
FINGERPRINT_FILE = ".vqakd-fingerprints.json"


def _fingerprint_cache(directory: Path) -> Path:
    """Beside the data when the directory is writable, else under ``$XDG_CACHE_HOME/vqakd``."""
    if os.access(directory, os.W_OK):
        return directory / FINGERPRINT_FILE
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqakd" / "fingerprints"
    return root / f"{hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:16]}.json"


def _read_fingerprints(cache_path: Path) -> dict:
    """The fingerprint cache, or ``{}`` when it is missing, unreadable or not a JSON object (it sits
    beside the data, which may come from elsewhere: a bad one is only recomputed)."""
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return cache if isinstance(cache, dict) else {}


def file_fingerprint(path: Path) -> dict:
    """``{"sha1", "size", "mtime_ns", "ctime_ns"}`` of a file; the SHA-1 of every byte is computed
    once and cached (keyed by size, modification and status-change time), so a changed file, even
    one of the same shape re-extracted with another backbone, gets a new fingerprint. The status-change
    time cannot be set by a file's writer, and unpacking or copying a file sets it anew: a cache that
    came with the data from elsewhere (claiming another file's hash, or that NaN was checked) is
    never taken for this file's. The whole file is hashed rather
    than a sample of rows: a sample can miss a change confined to some videos, and one pass at
    disk speed (about 2 s for the 2.2 GB msvd-sized set here) is paid once per change."""
    from harness.files import atomic_write_json

    st = path.stat()
    cache_path = _fingerprint_cache(path.parent)
    cache = _read_fingerprints(cache_path)
    entry = cache.get(path.name)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            and entry.get("ctime_ns") == st.st_ctime_ns and isinstance(entry.get("sha1"), str)
            and isinstance(entry.get("finite", {}), dict)):
        return entry
    entry = {"sha1": file_hash(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    cache[path.name] = entry
    try:
        atomic_write_json(cache_path, cache)
    except OSError:
        pass  # a read-only place: the fingerprint is recomputed next time
    return entry


def _checked_finite(path: Path, key: str, arr) -> None:
    """Fail naming the file, key and first bad row when ``arr`` holds NaN or Inf. The verdict is
    cached with the file's fingerprint, so unchanged files are not read again for it."""
    from harness.files import atomic_write_json

    fp = file_fingerprint(path)
    if fp.get("finite", {}).get(key):
        return
    bad = _first_non_finite(arr)
    if bad is not None:
        raise DataError(f"{path}: {key!r} has NaN or Inf values (first at video row {bad})")
    cache_path = _fingerprint_cache(path.parent)
    cache = _read_fingerprints(cache_path)
    entry = cache.get(path.name)
    if isinstance(entry, dict) and entry.get("sha1") == fp["sha1"] and isinstance(entry.get("finite", {}), dict):
        entry.setdefault("finite", {})[key] = True
        try:
            atomic_write_json(cache_path, cache)
        except OSError:
            pass



def _memory_budget_bytes() -> int:
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(avail * 0.5)


def check_features(paths: DataPaths, fa: h5py.File, fm: h5py.File) -> None:
    """The two feature files agree with each other (shapes, ids, dims)."""
    app_ds, mot_ds = fa[L.APPEARANCE_KEY], fm[L.MOTION_KEY]
    if app_ds.ndim != 4:
        raise DataError(f"{paths.appearance}: {L.APPEARANCE_KEY!r} must be (videos, clips, frames, dim), "
                        f"got shape {app_ds.shape}")
    if mot_ds.ndim != 3:
        raise DataError(f"{paths.motion}: {L.MOTION_KEY!r} must be (videos, clips, dim), got shape {mot_ds.shape}")
    app_ids = np.asarray(fa[L.IDS_KEY][()]).reshape(-1)
    mot_ids = np.asarray(fm[L.IDS_KEY][()]).reshape(-1)
    for ids, ds, path, key in ((app_ids, app_ds, paths.appearance, L.APPEARANCE_KEY),
                               (mot_ids, mot_ds, paths.motion, L.MOTION_KEY)):
        if ids.shape[0] != ds.shape[0]:
            raise DataError(f"{path}: {L.IDS_KEY!r} has {ids.shape[0]} entries but {key!r} has {ds.shape[0]} videos")
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
                        f"backbone in the {L.MOTION_MODEL_ATTR!r} attribute of {L.MOTION_KEY!r}, "
                        f"as harness.data.prepare does)")
    if D < 1 or Dm < 1:
        raise DataError(f"{paths.appearance if D < 1 else paths.motion}: feature dim is 0")
    if V == 0:
        raise DataError(f"{paths.appearance}: no videos")


def load_features(paths: DataPaths, mode: str, check_finite: bool,
                  modalities: tuple[str, ...] = MODALITIES) -> tuple[Features, np.ndarray]:
    """The features in ``mode`` (memory: mapped or read; stream: read per batch; none: nothing
    read) and the video ids (row order). ``modalities``: the streams the model reads; the other's
    file is checked against the first (shapes, ids: metadata) but its features are never mapped,
    read or checked for NaN (their bytes are hashed once for the data set's id, and cached)."""
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities {modalities!r}: each must be one of {', '.join(MODALITIES)}")
    fa = open_h5(paths.appearance, "appearance feature", L.APPEARANCE_KEY)
    fm = open_h5(paths.motion, "motion feature", L.MOTION_KEY)
    try:
        check_features(paths, fa, fm)
        app_ds, mot_ds = fa[L.APPEARANCE_KEY], fm[L.MOTION_KEY]
        ids = np.asarray(fa[L.IDS_KEY][()]).reshape(-1)
        shape, motion_dim = tuple(app_ds.shape), mot_ds.shape[2]
        if mode == "none":
            return NoFeatures(shape, motion_dim), ids
        wanted = {m: (ds, path, key) for m, ds, path, key in (
            ("appearance", app_ds, paths.appearance, L.APPEARANCE_KEY), ("motion", mot_ds, paths.motion, L.MOTION_KEY))
            if m in modalities}
        nbytes = sum(ds.size for ds, _, _ in wanted.values()) * 4
        stream = mode == "stream" or (mode == "auto" and nbytes > _memory_budget_bytes()
                                      and _mappable_offset(app_ds) is None)
        if stream:
            if check_finite:
                for ds, path, key in wanted.values():
                    _checked_finite(path, key, ds)
            return StreamingFeatures(paths.appearance, paths.motion, shape, motion_dim, tuple(modalities)), ids
        read = {m: _read_features(ds, path) for m, (ds, path, _) in wanted.items()}
    finally:
        fa.close()
        fm.close()
    if check_finite:
        for m, (_, path, key) in wanted.items():
            _checked_finite(path, key, read[m][0].numpy())
    empty = (torch.zeros(shape[0], 0), False)
    (app, app_mapped), (mot, _) = read.get("appearance", empty), read.get("motion", empty)
    return InMemoryFeatures(app, mot, mapped=app_mapped, shape=shape, motion_dim=motion_dim,
                            modalities=tuple(modalities)), ids
