"""Teacher outputs computed once: the frozen teachers of a distilled student, run over the
training split once per (teacher run, data set, split), stored beside the teacher run and fed to
every student of that teacher run (all seeds and all losses of a grid share one cache).

A frozen teacher in eval mode (no dropout, BatchNorm on its running statistics, no autograd)
gives the same output for the same question every epoch, so running it inside every training
step (:class:`harness.model.step.TrainStep` without a cache) repeats the same work each epoch. The
cache is an exact optimisation: the values are those the step would compute, stored in the
dtype the teacher produced them in (fp32 in fp32 training; bf16 outputs are stored widened to
fp32, which is exact, and narrowed back when read), so the run id does not change and a student
trained from the cache gives the same predictions as one trained without it
(``tests/training/test_teacher_cache.py``). The one source of difference: BLAS kernels may round a
batch of one or two rows differently from a larger batch (seen on CPU: up to 1e-7 for a batch
of 2), and the cache is built in batches of :data:`BUILD_BATCH`.

Which outputs: only the keys the student's distillation losses read. They are found by a dry
run (:func:`keys_read`): the student's objective is applied once, on a few training questions,
to teacher outputs wrapped in a dict that records which keys are read. (The losses in
``variants/kd_losses.py`` do not declare their keys, and a table of them here would be a second
copy of what the losses do.) A key a loss reads only in some other case is not cached, and the
loss then fails with its own message naming the missing key: never a silent difference.

On disk, beside the teacher run (``results/runs/<teacher run>/teacher_outputs/``), one ``.npy``
per key (:func:`cache_paths`)::

    {data_id}-{split}-{precision}-{device type}-{key}.npy    the outputs, rows = questions of the split
    {data_id}-{split}-{precision}-{device type}-{key}.json   its manifest, written last

The manifest holds the teacher run id and the sha1 of its weights (``best.pt``), the data set id,
the split and its size, the key, dtype and shape, the file's size and sha1, and when, where and
in how many seconds it was built. The ``.npy`` is written to a temporary file and renamed, then
the manifest is written (atomically): a file without a manifest, or whose size, sha1, shape,
teacher weights or data set differ from it, is damaged, partial or stale: it is rebuilt (with a
warning naming the file and why), never used. Builders take a lock per teacher run, so two
students starting together build a cache once.

Memory: the outputs are read through a memory map (the largest key at MSVD-QA size, 30,933 x 8
clips x 768 fp32, is 0.76 GB): on the CPU a batch's rows are gathered from the map (the OS pages
them in; nothing holds a second copy); on a GPU the cache is copied to the device once when it
takes less than half the free memory, and otherwise streamed: each batch's rows are gathered on
the host and copied, as streamed features are (which needs the batch's indices on the host: one
synchronisation per batch, as with streamed features).
"""
from __future__ import annotations

import json
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.data import dataset as D
from harness.digests import file_hash
from harness.env import autocast, device_name
from harness.errors import HarnessError
from harness.runs.store import WEIGHTS, ResultsStore
from harness.files import atomic_output, atomic_write_json, locked

#: batch size of the pass that builds a cache (larger batches are faster; see the module doc on rounding)
BUILD_BATCH = 256
#: the manifest's format version; a manifest of another version is rebuilt
FORMAT = 1
#: dtypes stored as they are; other floating dtypes (bf16, which numpy lacks) are stored as fp32
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                 torch.int64: np.int64, torch.int32: np.int32}


class TeacherCacheError(HarnessError):
    """The teacher outputs a loss reads cannot be cached (not a tensor with one row per question);
    the message names the teacher, the key and what it holds."""


# ----------------------------------------------------------------------------- which keys


class MissingTeacherOutput(HarnessError):
    """A student's distillation loss reads an output its teacher does not produce."""


class _KeyRecorder(dict):
    """A teacher's output dict that notes which keys are read (``[]``, ``get``); iterating over
    it (``items()``, ``sorted(out)``...) counts as reading every key. Reading a key the teacher
    does not produce with ``[]`` raises :class:`MissingTeacherOutput` naming the teacher."""

    def __init__(self, out: dict, teacher: str = "the teacher"):
        super().__init__(out)
        self.read: list[str] = []
        self.teacher = teacher

    def __missing__(self, key):
        raise MissingTeacherOutput(f"a distillation loss reads output {key!r} of {self.teacher}, which does not "
                                   f"produce it (its outputs: {', '.join(map(str, dict.keys(self)))})")

    def _note(self, key) -> None:
        if key not in self.read and dict.__contains__(self, key):
            self.read.append(key)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def _all(self) -> None:
        for k in dict.keys(self):
            self._note(k)

    def __iter__(self):
        self._all()
        return super().__iter__()

    def keys(self):
        self._all()
        return super().keys()

    def values(self):
        self._all()
        return super().values()

    def items(self):
        self._all()
        return super().items()


def keys_read(objective: nn.Module, model: nn.Module, teachers: list[nn.Module], batch: D.Batch,
              precision: str = "fp32", names: list[str] | None = None) -> list[list[str]]:
    """The output keys of each teacher that ``objective`` reads, found by applying it once to
    ``batch`` (a few questions): the student forward in eval mode, everything under ``no_grad``,
    the random number generators' state restored, the model's and objective's modes restored, so
    that training after it is exactly as without it."""
    dev = next(model.parameters()).device
    was = (model.training, objective.training)
    rng_devices = [dev] if dev.type == "cuda" else []
    inputs = (batch.appearance, batch.motion, batch.questions, batch.lengths)
    try:
        model.eval()
        objective.eval()
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            with autocast(dev, precision):
                s_out = model(*inputs, **batch.extra)
                t_outs = [_KeyRecorder(t(*inputs, **batch.extra), f"teacher {n}") for t, n in
                          zip(teachers, names or [f"{i + 1}" for i in range(len(teachers))])]
            objective(s_out, batch.answers, t_outs)
    finally:
        model.train(was[0])
        objective.train(was[1])
    return [list(t.read) for t in t_outs]


# ----------------------------------------------------------------------------- on disk


def cache_dir(store: ResultsStore, teacher_run: str) -> Path:
    return store.run_dir(teacher_run) / "teacher_outputs"


def cache_paths(store: ResultsStore, teacher_run: str, data_id: str, split: str, precision: str,
                device_type: str, key: str) -> tuple[Path, Path]:
    """The ``.npy`` of one key's outputs and its manifest (``.json``)."""
    stem = f"{data_id}-{split}-{precision}-{device_type}-{key}"
    d = cache_dir(store, teacher_run)
    return d / f"{stem}.npy", d / f"{stem}.json"


@dataclass
class _Identity:
    """What a cache file must have been built from: a manifest that differs is stale."""

    teacher_run: str
    teacher_weights_sha1: str
    data_id: str
    split: str
    rows: int
    precision: str
    device_type: str

    def check(self, manifest: dict) -> str | None:
        if manifest.get("format") != FORMAT:
            return f"manifest format {manifest.get('format')!r}, expected {FORMAT}"
        for k, want in vars(self).items():
            if manifest.get(k) != want:
                return f"{k} is {manifest.get(k)!r}, expected {want!r}"
        return None


def _problem(npy: Path, man: Path, ident: _Identity, key: str) -> tuple[str | None, dict | None]:
    """Why the cached ``key`` cannot be used (None, manifest when it can)."""
    if not man.exists():
        return ("no manifest (a build that did not finish)" if npy.exists() else "not built"), None
    try:
        manifest = json.loads(man.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return f"unreadable manifest {man.name} ({e})", None
    why = ident.check(manifest) or (None if manifest.get("key") == key else f"key is {manifest.get('key')!r}")
    if why:
        return why, None
    try:
        size = npy.stat().st_size
    except FileNotFoundError:
        return "the manifest names no file (the .npy is missing)", None
    if size != manifest.get("nbytes"):
        return f"{size:,} bytes, the manifest says {manifest.get('nbytes')!r}", None
    if file_hash(npy) != manifest.get("sha1"):
        return "sha1 differs from the manifest's (damaged)", None
    try:
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"not a readable .npy ({e})", None
    if list(arr.shape) != manifest.get("shape") or str(arr.dtype) != manifest.get("dtype"):
        return f"shape {tuple(arr.shape)} {arr.dtype}, the manifest says {manifest.get('shape')} " \
               f"{manifest.get('dtype')}", None
    return None, manifest


def _to_numpy_dtype(t: torch.Tensor) -> np.dtype:
    if t.dtype in _NUMPY_DTYPES:
        return np.dtype(_NUMPY_DTYPES[t.dtype])
    if t.is_floating_point():
        return np.dtype(np.float32)  # bf16: widened exactly, narrowed back when read
    raise TypeError(f"dtype {t.dtype}")


def _build(store: ResultsStore, teacher: nn.Module, ident: _Identity, keys: list[str], split: D.SplitData,
           features: D.Features, device: torch.device, teacher_variant: str) -> float:
    """One pass of ``teacher`` over ``split`` (in order, eval mode, no_grad, the run's autocast)
    writing ``keys`` into memory-mapped temporary files; each is renamed into place, then its
    manifest is written. Returns the pass's seconds."""
    n = len(split)
    build_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    with _atomic_npys(store, ident, keys) as tmps:
        maps: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        teacher.eval()
        lo = 0  # an in-order pass: the batch holds rows lo .. lo + B
        with torch.no_grad():
            for b in D.iterate_batches(split, features, BUILD_BATCH, device=device):
                with autocast(device, ident.precision):
                    out = teacher(b.appearance, b.motion, b.questions, b.lengths, **b.extra)
                rows = b.answers.shape[0]
                for k in keys:
                    v = out.get(k)
                    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != rows:
                        what = type(v).__name__ if not isinstance(v, torch.Tensor) else f"shape {tuple(v.shape)}"
                        raise TeacherCacheError(
                            f"teacher {teacher_variant} (run {ident.teacher_run}): output {k!r} is {what}, not a "
                            f"tensor with one row per question; it cannot be cached (train with --no-teacher-cache)")
                    if k not in maps:
                        try:
                            dt = _to_numpy_dtype(v)
                        except TypeError as e:
                            raise TeacherCacheError(f"teacher {teacher_variant}: output {k!r} has {e}, "
                                                    f"which cannot be cached") from None
                        maps[k] = np.lib.format.open_memmap(tmps[k], mode="w+", dtype=dt, shape=(n, *v.shape[1:]))
                        dtypes[k] = str(v.dtype).removeprefix("torch.")
                    maps[k][lo:lo + rows] = v.detach().to("cpu", torch.float32 if v.dtype == torch.bfloat16
                                                          else v.dtype).numpy()
                lo += rows
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for k in list(maps):
            maps.pop(k).flush()
    build_s = time.perf_counter() - t0
    built_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for k in keys:
        npy, man = cache_paths(store, ident.teacher_run, ident.data_id, ident.split, ident.precision,
                               ident.device_type, k)
        arr = np.load(npy, mmap_mode="r")
        atomic_write_json(man, {
            "format": FORMAT, **vars(ident), "key": k, "teacher_variant": teacher_variant,
            "dtype": str(arr.dtype), "torch_dtype": dtypes[k], "shape": list(arr.shape),
            "nbytes": npy.stat().st_size, "sha1": file_hash(npy),
            "build_id": build_id, "build_keys": list(keys), "build_s": build_s, "build_batch_size": BUILD_BATCH,
            "device": str(device), "device_name": device_name(device), "built_at": built_at,
            "torch_version": torch.__version__})
    return build_s


class _atomic_npys:
    """Temporary files for several keys, renamed into place together when the block succeeds
    (each with :func:`harness.files.atomic_output`); the old manifests are removed first, so a
    file replaced but not yet described is never taken for a complete one."""

    def __init__(self, store: ResultsStore, ident: _Identity, keys: list[str]):
        self.paths = {k: cache_paths(store, ident.teacher_run, ident.data_id, ident.split, ident.precision,
                                     ident.device_type, k) for k in keys}

    def __enter__(self) -> dict[str, Path]:
        from contextlib import ExitStack

        for _, man in self.paths.values():
            man.unlink(missing_ok=True)
        self.stack = ExitStack()
        self.stack.__enter__()
        return {k: self.stack.enter_context(atomic_output(npy)) for k, (npy, _) in self.paths.items()}

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


# ----------------------------------------------------------------------------- use


@dataclass
class TeacherOutputs:
    """The cached outputs of a student's teachers. ``gather(index)`` gives, for the questions at
    ``index`` (positions in the split, :attr:`harness.data.dataset.Batch.index`), one dict per teacher of
    the keys its losses read, on the device, in the dtype the teacher produced."""

    tables: list[dict[str, torch.Tensor]]
    dtypes: list[dict[str, torch.dtype]]
    device: torch.device
    streaming: bool
    info: list[dict] = field(default_factory=list)  # per teacher: run, keys, files, build (for the record)

    def gather(self, index: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if self.streaming:
            index = index.cpu()  # rows are read on the host, as streamed features are
        out = []
        for tab, dts in zip(self.tables, self.dtypes):
            d = {}
            for k, v in tab.items():
                x = v[index]
                if x.device != self.device:
                    x = x.to(self.device, non_blocking=True)
                d[k] = x if x.dtype == dts[k] else x.to(dts[k])
            out.append(d)
        return out

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for tab in self.tables for v in tab.values())


def _open(npy: Path) -> torch.Tensor:
    # copy-on-write map: writable for torch (no warning), and nothing ever writes to it
    return torch.from_numpy(np.load(npy, mmap_mode="c"))


def prepare(store: ResultsStore, teacher_records: list[dict], teachers: list[nn.Module], keys: list[list[str]],
            split: D.SplitData, features: D.Features, data_id: str, device: torch.device,
            precision: str = "fp32", on_build=None) -> TeacherOutputs:
    """The cached outputs (``keys[i]`` of teacher ``i``) of ``teachers`` over ``split``: used as
    they are when complete and valid, built (or rebuilt) otherwise. ``on_build(message)`` is told
    before each build."""
    split_name = split.name
    tables, dtypes, info = [], [], []
    for trec, teacher, tkeys in zip(teacher_records, teachers, keys):
        run_id = trec["run_id"]
        ident = _Identity(run_id, file_hash(store.run_dir(run_id) / WEIGHTS), data_id, split_name, len(split),
                          precision, device.type)
        with locked(cache_dir(store, run_id) / ".lock"):
            for stale in cache_dir(store, run_id).glob(".*.tmp"):  # left by a build that was killed
                stale.unlink(missing_ok=True)
            todo, damaged = [], []
            for k in tkeys:
                npy, man = cache_paths(store, run_id, data_id, split_name, precision, device.type, k)
                why, _ = _problem(npy, man, ident, k)
                if why is not None:
                    if why != "not built":
                        warnings.warn(f"{npy}: {why}; rebuilding it", stacklevel=2)
                        damaged.append(f"{k}: {why}")
                    todo.append(k)
            built_s = None
            if todo:
                if on_build:
                    on_build(f"teacher {trec['variant']} (run {run_id}): computing its outputs "
                             f"{', '.join(todo)} on the {split_name} split once ({len(split):,} questions)"
                             + (f"; rebuilt because {'; '.join(damaged)}" if damaged else ""))
                built_s = _build(store, teacher, ident, todo, split, features, device, trec["variant"])
            tab, dts, files = {}, {}, []
            for k in tkeys:
                npy, man = cache_paths(store, run_id, data_id, split_name, precision, device.type, k)
                manifest = json.loads(man.read_text())  # valid: checked above, or just built and hashed
                tab[k], dts[k] = _open(npy), getattr(torch, manifest["torch_dtype"])
                files.append({"key": k, "file": str(npy), "build_id": manifest["build_id"],
                              "build_s": manifest["build_s"], "build_device": manifest["device"],
                              "build_device_name": manifest["device_name"], "built_at": manifest["built_at"],
                              "nbytes": manifest["nbytes"], "built_now": k in todo})
        tables.append(tab)
        dtypes.append(dts)
        info.append({"teacher_run": run_id, "teacher_variant": trec["variant"], "keys": list(tkeys),
                     "rows": len(split), "split": split_name, "files": files, "build_s_now": built_s or 0.0})
    cache = TeacherOutputs(tables, dtypes, device, streaming=False, info=info)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if cache.nbytes < 0.5 * free:
            cache.tables = [{k: v.to(device) for k, v in tab.items()} for tab in tables]
        else:
            cache.streaming = True
    return cache
