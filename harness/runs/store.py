"""The results store: one directory per run under ``results/runs/<run_id>/``.

A run directory holds ``record.json`` (written once, atomically, when the run is complete),
``state.pt`` (the resumable training state, rewritten atomically after every epoch),
``best.pt`` (the best-on-validation weights) and ``predictions_{val,test}.csv``; a teacher run
also holds ``teacher_outputs/``, its outputs on a data set's training split computed once for the
students that distil from it (:mod:`harness.training.teacher_cache`).
A run killed midway therefore never leaves a partial record: either ``record.json`` exists and
is complete, or the run is resumed from ``state.pt`` when started again. The record holds the size
and SHA-1 of ``best.pt`` as written; a run whose weights no longer match is set aside and retrained
before anything reuses them (:meth:`ResultsStore.usable`). A run that failed, or that a grid gave up
on, has ``failed.json`` (the reason); one a search's pruner stopped has ``pruned.json`` and no record.
Files are written atomically, with the mode the umask gives.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import traceback
import warnings
from datetime import datetime, timezone

import pandas as pd
import torch

from harness.evaluation import metrics as M
from harness.runs import record as R
from harness.errors import HarnessError
from harness.files import StoreError, atomic_write_json, file_digest, store_error


class DamagedRun(StoreError):
    """A complete run's files are damaged (weights truncated or changed) and may not be reused."""


class StateError(HarnessError, ValueError):
    """A run's ``state.pt`` is not a resume state the runner wrote; the message names the file."""


#: what a resume state holds (the runner writes more; these are what resuming reads): key -> type(s)
STATE_KEYS = {"model": dict, "objective": dict, "optimizer": dict, "scheduler": dict, "rng_cpu": torch.Tensor,
              "history": list, "best": dict, "epoch": int, "train_time": (int, float), "train_samples": int,
              "started_at": str}


def read_state(path: str | Path, run_id: str | None = None) -> dict:
    """A run's resume state (``state.pt``), read with ``torch.load(weights_only=True)``: tensors,
    dicts, lists, numbers and strings only, no pickled code runs. Raises StateError naming the file
    when it cannot be read so, is not of the runner's shape, or (``run_id``) is another run's."""
    def bad(what: str) -> StateError:
        return StateError(f"{path}: {what}; refused, nothing resumed (delete it to train the run from its start)")

    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch refuses (a pickle that would run code, a damaged zip)
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise bad(f"not a resume state this harness wrote (torch.load with weights_only=True: {first.strip()[:200]})") \
            from None
    if not isinstance(st, dict):
        raise bad(f"a {type(st).__name__}, not a resume state")
    for key, kind in STATE_KEYS.items():
        if not isinstance(st.get(key), kind) or isinstance(st.get(key), bool):
            raise bad(f"{key} is {type(st.get(key)).__name__}, not {getattr(kind, '__name__', 'a number')}")
    rng_cuda = st.get("rng_cuda")
    for name, t in (("rng_cpu", st["rng_cpu"]), ("rng_cuda", rng_cuda)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1):
            raise bad(f"{name} is not an RNG state (a 1-d byte tensor)")
    if st["epoch"] < 0 or not all(isinstance(h, dict) for h in st["history"]):
        raise bad("epoch or history is not of a run's epochs")
    best = st["best"]
    if type(best.get("epoch")) is not int or isinstance(best.get("acc"), bool) \
            or not isinstance(best.get("acc"), (int, float)):
        raise bad("best is not a best epoch (acc, epoch)")
    if run_id is not None and st.get("run_id", run_id) != run_id:
        raise bad(f"it is the state of run {str(st.get('run_id'))[:80]!r}, not of {run_id}")
    return st


#: a run a search's pruner stopped early (:meth:`ResultsStore.write_pruned`); it has no record
PRUNED = "pruned.json"

#: a run's weights, as a student's teacher and for the final evaluation; their size and SHA-1 are in its record
WEIGHTS = "best.pt"


#: where a store keeps complete runs of other code that a check trains again (``other-code/<fingerprint>/<run id>``)
OTHER_CODE = "other-code"


class ResultsStore:
    RECORD = "record.json"

    def __init__(self, root: str | Path = "results"):
        self.root = Path(root)
        self.runs = self.root / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def is_complete(self, run_id: str) -> bool:
        """A run is complete when its record exists and parses; a damaged record is set aside
        (``record.json.damaged-<time>``, with a warning naming it) and the run counts as incomplete,
        so it is redone and every other run goes on."""
        return self._load(self.run_dir(run_id) / self.RECORD) is not None

    def _load(self, path: Path) -> dict | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict) or "run_id" not in rec:
                raise ValueError("not a run record")
            return rec
        except ValueError as e:
            aside = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:  # another process set it aside first
                return None
            warnings.warn(f"{path}: damaged record ({e}); kept as {aside.name}, the run counts as incomplete "
                          f"and will be redone", stacklevel=3)
            return None

    def weights_problem(self, run_id: str, record: dict | None = None) -> str | None:
        """What is wrong with a complete run's weights (missing, or their size or SHA-1 differs from
        what its record says was written), or None. A record from before checksums: only missing."""
        rec = record or self.read_record(run_id)
        path = self.run_dir(run_id) / WEIGHTS
        if not path.is_file():
            return f"{path} is missing"
        want = (rec.get("weights") or {}).get(WEIGHTS)
        if not want:
            return None
        have = file_digest(path)
        if have["nbytes"] != want["nbytes"]:
            return f"{path} has {have['nbytes']:,} bytes, {want['nbytes']:,} were written (truncated or replaced)"
        if have["sha1"] != want["sha1"]:
            return f"{path}: SHA-1 {have['sha1'][:12]} differs from the {want['sha1'][:12]} written (damaged)"
        return None

    def usable(self, run_id: str, refuse: bool = False) -> bool:
        """Whether a run is complete with intact weights, checked before anything reuses it. A damaged
        one is set aside (its record, weights and state renamed ``*.damaged-<time>``, with a warning
        naming them) and counts as incomplete, so it is retrained; with ``refuse``, DamagedRun."""
        rec = self._load(self.run_dir(run_id) / self.RECORD)
        if rec is None:
            return False
        problem = self.weights_problem(run_id, rec)
        if problem is None:
            return True
        if refuse:
            raise DamagedRun(f"run {run_id} is complete but damaged: {problem}; refused (--refuse-damaged): "
                             f"without the flag it is set aside and retrained")
        self.set_aside(run_id, problem)
        return False

    def set_aside(self, run_id: str, problem: str) -> list[str]:
        """Rename a damaged run's record, weights and training state ``NAME.damaged-<time>`` so that it
        is retrained from scratch; warn naming them; returns the new names."""
        stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
        moved = []
        for name in (self.RECORD, WEIGHTS, "state.pt"):
            path = self.run_dir(run_id) / name
            try:
                os.replace(path, path.with_name(f"{name}.damaged-{stamp}"))
                moved.append(f"{name}.damaged-{stamp}")
            except FileNotFoundError:
                pass
        warnings.warn(f"run {run_id}: {problem}; set aside in {self.run_dir(run_id)} as {', '.join(moved) or '-'}: "
                      f"the run counts as incomplete and is retrained", stacklevel=2)
        return moved

    def keep_other_code(self, run_id: str) -> Path:
        """Move a complete run computed by other code than this checkout's out of the store's runs, to
        ``other-code/<its fingerprint>/<run id>`` (``-<time>`` appended if that is taken), so that training
        it again with this code keeps its record, weights and predictions; returns where it went."""
        fp = str((self.read_record(run_id).get("code") or {}).get("fingerprint") or "")
        folder = fp if fp.isalnum() and len(fp) <= 64 else "unknown"  # the record is input: never a path
        dest = self.root / OTHER_CODE / folder / run_id
        if dest.exists():
            dest = dest.with_name(f"{run_id}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.run_dir(run_id), dest)
        except OSError as e:
            err = store_error(dest, None, e)
            raise (err if err is not e else StoreError(f"{dest}: cannot move run {run_id} here ({e})")) from e
        return dest

    def write_failure(self, run_id: str, info: dict, exc: BaseException) -> dict:
        """Record why a run failed (``failed.json``: reason, traceback, time) and return it."""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            reason = f"out of GPU memory: {exc}"
        return self.record_failure({"run_id": run_id, **info, "status": "failed", "reason": reason,
                                    "traceback": "".join(traceback.format_exception(exc))})

    def record_failure(self, failure: dict) -> dict:
        """Write ``failure`` (``run_id``, ``reason``...: a run the grid gave up on, or one that raised)
        as the run's ``failed.json``, with the time; return it, with ``failed_json``: the file's path,
        or None when it could not be written (a full disk: the failure is still returned and reported,
        with ``not_recorded``, why)."""
        failure = {**failure, "status": "failed",
                   "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = self.run_dir(failure["run_id"]) / "failed.json"
        try:
            atomic_write_json(path, failure)
        except (StoreError, OSError) as e:
            return {**failure, "failed_json": None, "not_recorded": str(e)}
        return {**failure, "failed_json": str(path)}

    def read_failure(self, run_id: str) -> dict | None:
        """The run's ``failed.json``, or None (none, or unreadable)."""
        try:
            rec = json.loads((self.run_dir(run_id) / "failed.json").read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def write_record(self, record: dict) -> Path:
        """Write a complete run's record; a ``pruned.json`` of an earlier, stopped attempt goes."""
        path = self.run_dir(record["run_id"]) / self.RECORD
        atomic_write_json(path, record)
        (path.parent / PRUNED).unlink(missing_ok=True)
        return path

    def write_pruned(self, run_id: str, info: dict) -> dict:
        """Record that a search's pruner stopped the run (``pruned.json``: the epoch, the accuracies and
        compute so far, the time); the run stays incomplete (no record), and a later run of it resumes."""
        info = {**info, "run_id": run_id, "status": "pruned",
                "pruned_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(self.run_dir(run_id) / PRUNED, info)
        return info

    def read_pruned(self, run_id: str) -> dict | None:
        """The run's ``pruned.json`` (None: never pruned, since completed, or unreadable)."""
        try:
            rec = json.loads((self.run_dir(run_id) / PRUNED).read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    # -- data sets: what planning needs (harness.data.dataset.DataInfo), so reports read no feature file

    def _data_info_path(self, spec: str) -> Path:
        key = str(Path(spec).resolve()) if not str(spec).startswith("synthetic:") else str(spec)
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(spec)).name)[:40]
        return self.root / "datasets" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"

    def write_data_info(self, info: dict) -> None:
        """Record a data set's info under its spec (rewritten only when it changed)."""
        path = self._data_info_path(info["spec"])
        if self.read_data_info(info["spec"]) != info:
            atomic_write_json(path, info)

    def read_data_info(self, spec: str) -> dict | None:
        """The info last recorded for a data spec, or None."""
        try:
            return json.loads(self._data_info_path(spec).read_text())
        except (OSError, ValueError):
            return None

    def read_record(self, run_id: str) -> dict:
        rec = self._load(self.run_dir(run_id) / self.RECORD)
        if rec is None:
            raise StoreError(f"{self.run_dir(run_id) / self.RECORD}: no complete record")
        return rec

    def iter_records(self) -> Iterator[dict]:
        if not self.runs.is_dir():
            return
        for d in sorted(self.runs.iterdir()):
            rec = self._load(d / self.RECORD)
            if rec is not None:
                yield rec

    def records(self, **match) -> list[dict]:
        """Complete records whose top-level fields equal ``match`` (e.g. ``variant="dualvgr"``)."""
        return [r for r in self.iter_records() if all(r.get(k) == v for k, v in match.items())]

    def to_frame(self) -> pd.DataFrame:
        """One row per complete run: identity columns plus each registered metric
        (:mod:`harness.evaluation.metrics`) of each split, flattened: ``<split>_<metric>`` and, for a metric with
        a per-type breakdown, ``<split>_<metric>_<type>`` (``test_acc``, ``test_acc_what``,
        ``val_acc``, ``test_last_acc``, ``test_recon_mse``...)."""
        rows = []
        for r in self.iter_records():
            row = {k: r.get(k) for k in ("run_id", "variant", "seed", "epochs_run", "wall_time_s",
                                         "train_samples_per_s", "device_name", "git_commit", "finished_at")}
            row["data"] = R.data_id(r)
            row["teachers"] = ",".join(t["variant"] for t in r.get("teachers", [])) or None
            row["teacher_runs"] = ",".join(r.get("teacher_runs", [])) or None
            ov = r.get("spec", {}).get("overrides") or {}
            row["overrides"] = ", ".join(f"{k}={v}" for k, v in sorted(ov.items())) or None
            row["params"] = R.params_total(r)
            row["best_epoch"] = R.best_epoch(r)
            for split in M.SPLITS:
                for metric in M.METRICS.values():
                    if (v := R.metric(r, split, metric.name)) is not None:
                        row[f"{split}_{metric.name}"] = v
                    for t, a in R.per_type(r, split, metric.name).items():
                        row[f"{split}_{metric.name}_{t}"] = a
            rows.append(row)
        return pd.DataFrame(rows)
