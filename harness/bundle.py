"""Run bundles: a complete run packed into one tar file to share it (a teacher that took a day to
train), and unpacked into another results store, where its students find it as if it had been
trained there.

``python ablate.py export RUN_ID -o teacher.tar`` writes::

    manifest.json   format, version, run id, variant, data id and spec, commit, the run's config
                    (variant config, training settings, seed, teacher runs) and the SHA-256 and size
                    of every other member
    record.json     the run's record, as the store holds it
    best.pt         the best-on-validation weights (a state dict of tensors)
    predictions_val.csv, predictions_test.csv   when the run has them

``python ablate.py import teacher.tar`` treats the bundle as untrusted input. Nothing is extracted
by ``tarfile``: each member must be one of the names above, a regular file with a relative name
(no absolute path, no ``..``, no link, no device; Python's ``tarfile.data_filter`` is applied as
well), of bounded size; it is read into memory, checked against the manifest's SHA-256, and only
then written by the store's atomic writers into ``results/runs/<run_id>/``. The record is JSON; the
weights are read with ``torch.load(weights_only=True)`` (no pickled code runs) and must load into
the variant's model. The data id must be that of the data set here (``--data`` names where it is,
else the spec the record names), and the run id is recomputed by :func:`harness.runner.plan` from
the record's settings on that data set: a bundle whose identity is not what it claims is refused.
The record is written last, so an import stopped midway leaves no complete run. The checksums
detect a changed or damaged bundle, not a forged one (the manifest is not signed): import bundles
from people you trust.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import torch

import variants

from . import data as D
from . import record as R
from .errors import HarnessError
from .runner import RunSpec, plan, run_lock
from .store import ResultsStore, atomic_output, atomic_write_bytes, atomic_write_json

FORMAT, VERSION = "vqakd-run-bundle", 1
MANIFEST, RECORD, WEIGHTS = "manifest.json", "record.json", "best.pt"
OPTIONAL = ("predictions_val.csv", "predictions_test.csv")
MEMBERS = (MANIFEST, RECORD, WEIGHTS, *OPTIONAL)
#: the largest member read (weights of the largest teacher are far below)
MAX_MEMBER_BYTES = 4 << 30
#: written beside an imported run's record: where it came from
IMPORTED = "imported.json"


class BundleError(HarnessError, ValueError):
    """A bundle that cannot be exported or is refused on import; the message names the file, the
    member and what failed."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- export


def export_run(store: ResultsStore, run_id: str, out: str | Path) -> dict:
    """Pack the complete run ``run_id`` of ``store`` into the tar file ``out`` (written atomically;
    gzip-compressed when its name ends in ``.gz`` or ``.tgz``); returns the manifest."""
    if not store.is_complete(run_id):
        raise BundleError(f"run {run_id!r} is not complete in {store.root} (nothing to export; "
                          f"`python ablate.py results` lists the complete runs)")
    run_dir = store.run_dir(run_id)
    files = {RECORD: (run_dir / RECORD).read_bytes()}
    if not (run_dir / WEIGHTS).is_file():
        raise BundleError(f"{run_dir / WEIGHTS}: missing; run {run_id} has no weights to export")
    files[WEIGHTS] = (run_dir / WEIGHTS).read_bytes()
    files.update({n: (run_dir / n).read_bytes() for n in OPTIONAL if (run_dir / n).is_file()})
    record = json.loads(files[RECORD])
    manifest = {
        "format": FORMAT, "version": VERSION, "run_id": run_id, "variant": record["variant"],
        "data_id": R.data_id(record), "data_spec": R.data_spec(record), "git_commit": record.get("git_commit"),
        "config": {k: record.get(k) for k in ("variant_config", "train_config", "seed", "teacher_runs")},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {n: {"sha256": sha256(b), "bytes": len(b)} for n, b in files.items()},
    }
    members = {MANIFEST: json.dumps(manifest, indent=1, sort_keys=True).encode(), **files}
    mode = "w:gz" if str(out).endswith((".gz", ".tgz")) else "w"
    with atomic_output(out, nbytes=sum(map(len, members.values()))) as tmp:
        with tarfile.open(tmp, mode) as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                tf.addfile(info, io.BytesIO(data))
    return manifest


# ----------------------------------------------------------------------------- import


def _check_member(where: str, m: tarfile.TarInfo, seen: set[str]) -> None:
    """Refuse a member that is not one of the bundle's plain files (the tar path traversal)."""
    name = m.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")):
        raise BundleError(f"{where}: member {name!r} has an absolute path; refused, nothing imported")
    if ".." in path.parts or "\\" in name:
        raise BundleError(f"{where}: member {name!r} points outside the bundle ('..'); refused, nothing imported")
    kinds = ((m.issym(), "a symbolic link"), (m.islnk(), "a hard link"), (m.isdev(), "a device or FIFO"),
             (m.isdir(), "a directory"))
    for bad, what in kinds:
        if bad:
            raise BundleError(f"{where}: member {name!r} is {what}; a bundle holds regular files only: refused, "
                              f"nothing imported")
    if not m.isfile():
        raise BundleError(f"{where}: member {name!r} is not a regular file; refused, nothing imported")
    if name not in MEMBERS:
        raise BundleError(f"{where}: unexpected member {name!r} (a bundle holds {', '.join(MEMBERS)}); refused")
    if name in seen:
        raise BundleError(f"{where}: member {name!r} appears twice; refused")
    if m.size > MAX_MEMBER_BYTES:
        raise BundleError(f"{where}: member {name!r} is {m.size:,} bytes (at most {MAX_MEMBER_BYTES:,}); refused")
    if hasattr(tarfile, "data_filter"):  # Python's own checks too (3.11.4+)
        try:
            tarfile.data_filter(m, "/nonexistent-bundle-root")
        except tarfile.FilterError as e:
            raise BundleError(f"{where}: member {name!r} refused by tarfile's data filter: {e}") from None


def read_members(path: str | Path) -> dict[str, bytes]:
    """Every member of a bundle, checked (:func:`_check_member`) and read into memory; nothing is
    written anywhere."""
    where = str(path)
    try:
        tf = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"{where}: not a readable bundle (tar file): {e}") from None
    out: dict[str, bytes] = {}
    with tf:
        try:
            for m in tf:
                _check_member(where, m, set(out))
                out[m.name] = tf.extractfile(m).read()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise BundleError(f"{where}: damaged tar file: {e}") from None
    return out


def _json(where: str, name: str, data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise BundleError(f"{where}: {name} is not valid JSON ({e}); refused") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: {name} is not a JSON object; refused")
    return obj


def verify_checksums(where: str, members: dict[str, bytes]) -> dict:
    """The manifest, once every member is what it lists (SHA-256 and size) and nothing else is there."""
    if MANIFEST not in members:
        raise BundleError(f"{where}: no {MANIFEST}; not a run bundle")
    manifest = _json(where, MANIFEST, members[MANIFEST])
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BundleError(f"{where}: {MANIFEST} says format {manifest.get('format')!r} version "
                          f"{manifest.get('version')!r}; this harness reads {FORMAT!r} version {VERSION}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or RECORD not in listed or WEIGHTS not in listed:
        raise BundleError(f"{where}: {MANIFEST} lists no {RECORD} and {WEIGHTS}; refused")
    for name in sorted(set(members) - {MANIFEST} | set(listed)):
        if name not in members:
            raise BundleError(f"{where}: {name} is listed in {MANIFEST} but missing from the bundle; refused")
        if name not in listed:
            raise BundleError(f"{where}: {name} is in the bundle but not in {MANIFEST}; refused")
        got, want = sha256(members[name]), (listed[name] or {}).get("sha256")
        if got != want:
            raise BundleError(f"{where}: {name}: checksum mismatch (SHA-256 {got[:16]}..., {MANIFEST} says "
                              f"{str(want)[:16]}...): the bundle was changed or damaged after export; refused")
    return manifest


def _local_data(where: str, record: dict, data: str | None) -> D.DataInfo:
    spec = data or R.data_spec(record)
    try:
        return D.describe(spec)
    except HarnessError as e:
        raise BundleError(f"{where}: cannot check the data id: the data set {spec!r} is not readable here ({e}); "
                          f"give --data with the path of this data set here") from None


def verify_identity(where: str, manifest: dict, record: dict, info: D.DataInfo) -> None:
    """The record is the run the manifest names, on the data set ``info``, with the id the runner
    plans for its settings here."""
    rid = manifest.get("run_id")
    if record.get("run_id") != rid or record.get("status") != "complete":
        raise BundleError(f"{where}: {RECORD} is run {record.get('run_id')!r} ({record.get('status')}); "
                          f"{MANIFEST} says {rid!r}; refused")
    claimed = manifest.get("data_id")
    if R.data_id(record) != claimed:
        raise BundleError(f"{where}: {RECORD} says data id {R.data_id(record)!r}, "
                          f"{MANIFEST} says {claimed!r}; refused")
    if info.data_id != claimed:
        raise BundleError(f"{where}: data id mismatch: the run was trained on data {claimed!r}; the data set "
                          f"{info.spec!r} here is {info.data_id!r}; refused (--data names the right copy)")
    try:
        planned = plan(RunSpec(**{**record["spec"], "data": info.spec}), info)
    except (HarnessError, variants.UnknownNameError, variants.ConfigError, TypeError, KeyError) as e:
        raise BundleError(f"{where}: the record's settings cannot be planned here ({type(e).__name__}: {e}); "
                          f"refused") from None
    if planned.run_id != rid:
        raise BundleError(f"{where}: identity mismatch: the bundle claims run {rid!r}, but its record's settings "
                          f"(variant, config, seed, training, teachers) on data {claimed!r} are run "
                          f"{planned.run_id!r} here; refused")
    # what the record and the manifest say of the run is what planning gives (the model is built from it)
    planned_facts = {"variant_config": planned.cfg.to_dict(), "train_config": planned.train,
                     "seed": planned.spec.seed, "teacher_runs": [t.run_id for t in planned.teachers]}
    for key, want in planned_facts.items():
        for name, said in ((RECORD, record.get(key)), (MANIFEST, (manifest.get("config") or {}).get(key))):
            if _normal(said) != _normal(want):
                raise BundleError(f"{where}: identity mismatch: {name} says {key} = {said!r}, but run {rid!r} "
                                  f"is planned here with {want!r}; refused")


def _normal(obj):
    """``obj`` as JSON reads it back (tuples as lists...), to compare a record with a plan."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def load_weights(where: str, record: dict, data: bytes) -> None:
    """Check the weights: plain tensors (``weights_only``: no pickled code runs) that load into the
    record's variant."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch refuses, the bundle is refused
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{where}: {WEIGHTS} refused: not a plain state dict of tensors (torch.load with "
                          f"weights_only=True: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{where}: {WEIGHTS} refused: not a state dict of tensors")
    model = variants.build(variants.VariantConfig(**record["variant_config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise BundleError(f"{where}: {WEIGHTS} does not fit variant {record['variant']!r}: "
                          f"{str(e).splitlines()[0]}; refused") from None


def import_bundle(path: str | Path, store: ResultsStore, data: str | None = None) -> tuple[dict, bool]:
    """Verify the bundle ``path`` and add its run to ``store``; returns (its record, whether it was
    added: False when the store already had the run complete). ``data``: where the run's data set is
    here [default: the spec its record names]."""
    where = str(path)
    members = read_members(path)
    manifest = verify_checksums(where, members)
    record = _json(where, RECORD, members[RECORD])
    info = _local_data(where, record, data)
    verify_identity(where, manifest, record, info)
    load_weights(where, record, members[WEIGHTS])
    run_id = record["run_id"]
    run_dir = store.run_dir(run_id)
    store.write_data_info(info.to_dict())
    with run_lock(run_dir):
        if store.is_complete(run_id):
            return store.read_record(run_id), False
        for name in (WEIGHTS, *OPTIONAL):
            if name in members:
                atomic_write_bytes(run_dir / name, members[name])
        atomic_write_json(run_dir / IMPORTED, {
            "bundle": str(Path(path).resolve()), "bundle_sha256": {n: sha256(b) for n, b in members.items()},
            "exported_at": manifest.get("exported_at"), "git_commit": manifest.get("git_commit"),
            "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        atomic_write_bytes(run_dir / RECORD, members[RECORD])  # last: the run is complete from here on
    return record, True
