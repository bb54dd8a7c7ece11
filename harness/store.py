"""The results store: one directory per run under ``results/runs/<run_id>/``.

A run directory holds ``record.json`` (written once, atomically, when the run is complete),
``state.pt`` (the resumable training state, rewritten atomically after every epoch),
``best.pt`` (the best-on-validation weights) and ``predictions_{val,test}.csv``.
A run killed midway therefore never leaves a partial record: either ``record.json`` exists and
is complete, or the run is resumed from ``state.pt`` when started again.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class ResultsStore:
    RECORD = "record.json"

    def __init__(self, root: str | Path = "results"):
        self.root = Path(root)
        self.runs = self.root / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def is_complete(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / self.RECORD).is_file()

    def write_record(self, record: dict) -> Path:
        path = self.run_dir(record["run_id"]) / self.RECORD
        atomic_write_json(path, record)
        return path

    # -- data sets: what planning needs (harness.data.DataInfo), so reports read no feature file

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
        return json.loads((self.run_dir(run_id) / self.RECORD).read_text())

    def iter_records(self) -> Iterator[dict]:
        if not self.runs.is_dir():
            return
        for d in sorted(self.runs.iterdir()):
            p = d / self.RECORD
            if p.is_file():
                yield json.loads(p.read_text())

    def records(self, **match) -> list[dict]:
        """Complete records whose top-level fields equal ``match`` (e.g. ``variant="dualvgr"``)."""
        return [r for r in self.iter_records() if all(r.get(k) == v for k, v in match.items())]

    def to_frame(self) -> pd.DataFrame:
        """One row per complete run: identity columns plus flattened metrics
        (``test_acc``, ``test_acc_<type>``, ``val_acc``, ``test_last_acc``...)."""
        rows = []
        for r in self.iter_records():
            row = {k: r.get(k) for k in ("run_id", "variant", "seed", "epochs_run", "wall_time_s",
                                         "train_samples_per_s", "device_name", "git_commit", "finished_at")}
            row["data"] = r.get("data", {}).get("id")
            row["teachers"] = ",".join(t["variant"] for t in r.get("teachers", [])) or None
            row["teacher_runs"] = ",".join(r.get("teacher_runs", [])) or None
            row["params"] = r.get("params", {}).get("total")
            m = r.get("metrics", {})
            row["best_epoch"] = m.get("best_epoch")
            for split in ("val", "test", "test_last"):
                if split in m:
                    row[f"{split}_acc"] = m[split]["overall"]
                    for t, a in m[split]["per_type"].items():
                        row[f"{split}_acc_{t}"] = a
            rows.append(row)
        return pd.DataFrame(rows)
