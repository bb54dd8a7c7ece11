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

``python ablate.py import teacher.tar`` treats the bundle as untrusted input (docs/untrusted-runs.md
says what is checked and what is not). Nothing is extracted by ``tarfile``: the manifest must come
first; each member must be one of the names above, a regular file (not sparse) with a relative name
(no absolute path, no ``..``, no link, no device; Python's ``tarfile.data_filter`` is applied as
well) whose size is the one the manifest lists; extended tar headers (pax, GNU long names) are
bounded in size before they are read and in number, and the bytes unpacked in all are bounded by a
cap (``--max-unpacked-mib``) before a member is read. Each member is read in chunks, hashed as it streams,
checked against the manifest's SHA-256, and only then written by the store's atomic writers into
``results/runs/<run_id>/``. The manifest and the record are JSON of a checked shape; the weights
are read with ``torch.load(weights_only=True)`` (no pickled code runs), must have the tensor
shapes of the model the record configures (compared on the meta device, before the model is built)
and must load into it. A synthetic data spec is checked (known preset, a seed in range, the spec, name
and split sizes the record claims) before its data set is generated in the data directory; the data
id must be that of the data set here (``--data`` names where it is, else the spec the record
names), and the run id is recomputed by :func:`harness.training.runner.plan` from the record's settings on
that data set: a bundle whose identity is not what it claims is refused. Then the weights are
evaluated on the local validation and test splits (:func:`harness.evaluation.evaluate.evaluate`) and the task's
metric must be the record's within evaluation noise (:func:`verify_metrics`). The record is written
last, so an import stopped midway leaves no complete run. The checksums detect a changed or damaged
bundle, not a forged one (the manifest is not signed); the re-evaluation shows that the weights
score what the record says on this data, not how they were trained: import bundles from people you
trust.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import re
import tarfile
import zlib
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import numpy as np
import torch

import variants

from harness.data import dataset as D
from harness.evaluation import metrics as M
from harness.runs import record as R
from harness.errors import HarnessError
from harness.evaluation.evaluate import evaluate
from harness.training.plan import RunSpec, plan
from harness.training.runner import run_lock
from harness.runs.store import ResultsStore
from harness.files import atomic_output, atomic_write_bytes, atomic_write_json

FORMAT, VERSION = "vqakd-run-bundle", 1
MANIFEST, RECORD, WEIGHTS = "manifest.json", "record.json", "best.pt"
OPTIONAL = ("predictions_val.csv", "predictions_test.csv")
MEMBERS = (MANIFEST, RECORD, WEIGHTS, *OPTIONAL)
#: the bytes a bundle may unpack to, in all, unless ``--max-unpacked-mib`` raises it (the best weights
#: of the largest teacher here are far below)
MAX_UNPACKED_MIB = 1024
#: the largest manifest or record (a record with a long history is a few hundred KB)
MAX_JSON_BYTES = 16 << 20
#: the largest tar header a member may have besides its own block (a pax header, a GNU long name):
#: a bundle's names are short, so these are a few hundred bytes when there are any
MAX_HEADER_BYTES = 64 << 10
#: the most extended headers (pax, GNU long names) a bundle may have in all
MAX_EXTENDED_HEADERS = 2 * len(MEMBERS)
_LONG_HEADERS = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK}
#: bytes read at a time from a member
CHUNK = 1 << 20
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


class _OversizedHeader(Exception):
    """A tar header longer than :data:`MAX_HEADER_BYTES` (raised before tarfile reads it)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header whose extended header (pax, GNU long name) is refused past
    :data:`MAX_HEADER_BYTES` before tarfile reads it whole."""

    def _proc_member(self, tf):  # tarfile's dispatch on the header's type
        if self.type in _LONG_HEADERS:
            what = "a pax header" if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) \
                else "a GNU long-name header"
            if self.size > MAX_HEADER_BYTES:
                raise _OversizedHeader(f"{what} of {self.size:,} bytes (at most {MAX_HEADER_BYTES:,}: a bundle's "
                                       f"names are short)")
            # tarfile reads a chain of extended headers recursively: a long chain is refused, not a RecursionError
            tf.extended_headers = getattr(tf, "extended_headers", 0) + 1
            if tf.extended_headers > MAX_EXTENDED_HEADERS:
                raise _OversizedHeader(f"more than {MAX_EXTENDED_HEADERS} extended headers (pax, GNU long names; "
                                       f"a bundle needs at most one per member)")
        return super()._proc_member(tf)


def _check_member(where: str, m: tarfile.TarInfo, seen: set[str]) -> None:
    """Refuse a member that is not one of the bundle's plain files (the tar path traversal)."""
    name = m.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")):
        raise BundleError(f"{where}: member {name!r} has an absolute path; refused, nothing imported")
    if ".." in path.parts or "\\" in name:
        raise BundleError(f"{where}: member {name!r} points outside the bundle ('..'); refused, nothing imported")
    kinds = ((m.issym(), "a symbolic link"), (m.islnk(), "a hard link"), (m.isdev(), "a device or FIFO"),
             (m.isdir(), "a directory"), (m.issparse(), "a sparse file"))
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
    if hasattr(tarfile, "data_filter"):  # Python's own checks too (3.11.4+)
        try:
            tarfile.data_filter(m, "/nonexistent-bundle-root")
        except tarfile.FilterError as e:
            raise BundleError(f"{where}: member {name!r} refused by tarfile's data filter: {e}") from None


def _stream(tf: tarfile.TarFile, m: tarfile.TarInfo) -> tuple[bytes, str]:
    """A member's bytes, read in chunks and hashed as they stream: (bytes, SHA-256)."""
    f, h, buf = tf.extractfile(m), hashlib.sha256(), bytearray()
    while chunk := f.read(min(CHUNK, m.size - len(buf))):
        h.update(chunk)
        buf += chunk
    if len(buf) != m.size:
        raise EOFError(f"member {m.name!r} ends after {len(buf):,} of its {m.size:,} bytes")
    return bytes(buf), h.hexdigest()


def read_members(path: str | Path, max_unpacked_mib: float = MAX_UNPACKED_MIB) -> dict[str, bytes]:
    """Every member of a bundle, checked (:func:`_check_member`), its size the manifest's (which comes
    first), the bytes unpacked in all at most ``max_unpacked_mib`` MiB, each read in chunks and its
    SHA-256 checked as it streams; nothing is written anywhere."""
    where = str(path)
    cap = int(max_unpacked_mib * 2 ** 20)
    try:
        tf = tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo)
    except _OversizedHeader as e:
        raise BundleError(f"{where}: refused: {e}; nothing imported") from None
    except (OSError, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise BundleError(f"{where}: not a readable bundle (tar file): {' '.join(str(e).split())}") from None
    out: dict[str, bytes] = {}
    listed: dict = {}
    total = 0
    with tf:
        try:
            for m in tf:
                _check_member(where, m, set(out))
                if not out and m.name != MANIFEST:
                    raise BundleError(f"{where}: the first member is {m.name!r}, not {MANIFEST} (export writes the "
                                      f"manifest first); refused")
                if m.name in (MANIFEST, RECORD) and m.size > MAX_JSON_BYTES:
                    raise BundleError(f"{where}: {m.name} is {m.size:,} bytes (at most {MAX_JSON_BYTES:,}); refused")
                if m.name != MANIFEST:
                    if m.name not in listed:
                        raise BundleError(f"{where}: {m.name} is in the bundle but not in {MANIFEST}; refused")
                    if m.size != listed[m.name]["bytes"]:
                        raise BundleError(f"{where}: {m.name}: checksum mismatch ({m.size:,} bytes, {MANIFEST} says "
                                          f"{listed[m.name]['bytes']:,}): the bundle was changed or damaged after "
                                          f"export; refused")
                total += m.size
                if total > cap:
                    raise BundleError(f"{where}: unpacks to more than {max_unpacked_mib:g} MiB (member {m.name!r} "
                                      f"is {m.size:,} bytes); refused before reading it (--max-unpacked-mib raises "
                                      f"the cap)")
                data, digest = _stream(tf, m)
                if m.name == MANIFEST:
                    listed = _listing(where, _json(where, MANIFEST, data))
                elif digest != listed[m.name]["sha256"]:
                    raise BundleError(f"{where}: {m.name}: checksum mismatch (SHA-256 {digest[:16]}..., {MANIFEST} "
                                      f"says {listed[m.name]['sha256'][:16]}...): the bundle was changed or damaged "
                                      f"after export; refused")
                out[m.name] = data
        except _OversizedHeader as e:
            raise BundleError(f"{where}: refused: {e}; nothing imported") from None
        except (OSError, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise BundleError(f"{where}: damaged tar file: {' '.join(str(e).split())}") from None
    return out


def _json(where: str, name: str, data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except RecursionError:
        raise BundleError(f"{where}: {name} is nested too deeply to be a bundle's JSON; refused") from None
    except ValueError as e:
        raise BundleError(f"{where}: {name} is not valid JSON ({e}); refused") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: {name} is not a JSON object; refused")
    return obj


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _listing(where: str, manifest: dict) -> dict:
    """The manifest's ``files`` (name -> sha256, bytes), checked: the format, each entry's shape."""
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BundleError(f"{where}: {MANIFEST} says format {str(manifest.get('format'))[:80]!r} version "
                          f"{str(manifest.get('version'))[:80]!r}; this harness reads {FORMAT!r} version {VERSION}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or RECORD not in listed or WEIGHTS not in listed:
        raise BundleError(f"{where}: {MANIFEST} lists no {RECORD} and {WEIGHTS}; refused")
    for name, entry in listed.items():
        if name not in MEMBERS or name == MANIFEST:
            raise BundleError(f"{where}: {MANIFEST} lists {str(name)[:80]!r}, not a member of a bundle; refused")
        ok = isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]) \
            and type(entry.get("bytes")) is int and entry["bytes"] >= 0
        if not ok:
            raise BundleError(f"{where}: {MANIFEST}: files[{name!r}] is {type(entry).__name__} "
                              f"{str(entry)[:80]!r}, not {{\"sha256\": 64 hex digits, \"bytes\": a size}}; refused")
    return listed


def verify_checksums(where: str, members: dict[str, bytes]) -> dict:
    """The manifest, once every member it lists is there (:func:`read_members` checked each one's
    size and SHA-256 as it streamed)."""
    if MANIFEST not in members:
        raise BundleError(f"{where}: no {MANIFEST}; not a run bundle")
    manifest = _json(where, MANIFEST, members[MANIFEST])
    for name in _listing(where, manifest):
        if name not in members:
            raise BundleError(f"{where}: {name} is listed in {MANIFEST} but missing from the bundle; refused")
    return manifest


#: what a record must hold for import to read it: key -> (type(s), what it is)
_RECORD_SHAPE = {"run_id": (str, "a run id"), "status": (str, "a status"), "variant": (str, "a variant name"),
                 "variant_config": (dict, "a variant config"), "train_config": (dict, "training settings"),
                 "seed": (int, "an integer"), "spec": (dict, "the run's settings"), "data": (dict, "the data set"),
                 "metrics": (dict, "the run's metrics"), "teacher_runs": (list, "a list of run ids")}


def check_record(where: str, record: dict) -> None:
    """The record's fields that import reads, of the types it reads them as."""
    for key, (kind, what) in _RECORD_SHAPE.items():
        v = record.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise BundleError(f"{where}: {RECORD}: {key} is {type(v).__name__} {str(v)[:60]!r}, not {what}; refused")
    for key in ("spec", "id"):
        if not isinstance(record["data"].get(key), str):
            raise BundleError(f"{where}: {RECORD}: data.{key} is not a string; refused")
    for split in ("val", "test"):
        if not isinstance(record["metrics"].get(split), dict):
            raise BundleError(f"{where}: {RECORD}: metrics.{split} is not an object; refused")


#: the largest seed of a synthetic data spec (numpy's legacy seeds are 32-bit)
MAX_SYNTHETIC_SEED = 2 ** 32 - 1


def check_synthetic_spec(where: str, manifest: dict, record: dict) -> None:
    """Before a synthetic data set is generated for a bundle: its spec is ``synthetic:PRESET[:SEED]``
    of a known preset and a seed in range, the manifest says the same spec, and the record's data
    name and split sizes are the preset's (a bundle cannot make import generate any data set)."""
    from harness.data import synthetic

    spec = record["data"]["spec"]
    parts = spec.split(":")
    if manifest.get("data_spec") != spec:
        raise BundleError(f"{where}: {RECORD} names data {spec[:80]!r}, {MANIFEST} "
                          f"{str(manifest.get('data_spec'))[:80]!r}; refused")
    bad = len(parts) not in (2, 3) or parts[1] not in synthetic.PRESETS or \
        (len(parts) == 3 and not (parts[2].isdigit() and len(parts[2]) <= 10 and int(parts[2]) <= MAX_SYNTHETIC_SEED))
    if bad:
        raise BundleError(f"{where}: {RECORD}: data spec {spec[:80]!r} is not synthetic:PRESET[:SEED] with a known "
                          f"preset ({', '.join(synthetic.PRESETS)}) and a seed 0..{MAX_SYNTHETIC_SEED}; refused, no "
                          f"data set generated")
    p = synthetic.PRESETS[parts[1]]
    sizes = {"train": p.n_train, "val": p.n_val, "test": p.n_test}
    claimed = record["data"].get("sizes")
    if record["data"].get("name") != f"synthetic-{parts[1]}" or claimed != sizes:
        raise BundleError(f"{where}: {RECORD}: data {str(record['data'].get('name'))[:40]!r} with split sizes "
                          f"{str(claimed)[:80]} is not {spec} (synthetic-{parts[1]}, {sizes}); refused, no data set "
                          f"generated")


def _local_data(where: str, manifest: dict, record: dict, data: str | None) -> D.DataInfo:
    spec = data or R.data_spec(record)
    if data is None and spec.startswith("synthetic:"):
        check_synthetic_spec(where, manifest, record)
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


def load_weights(where: str, record: dict, data: bytes) -> torch.nn.Module:
    """The record's variant with the bundle's weights, once they are plain tensors (``weights_only``:
    no pickled code runs) that load into it."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch refuses, the bundle is refused
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{where}: {WEIGHTS} refused: not a plain state dict of tensors (torch.load with "
                          f"weights_only=True: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{where}: {WEIGHTS} refused: not a state dict of tensors")
    cfg = variants.VariantConfig(**record["variant_config"])
    with torch.device("meta"):  # shapes only: a record's sizes (module_dim...) cannot make import allocate GiBs
        shapes = {k: tuple(v.shape) for k, v in variants.build(cfg).state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if given != shapes:
        wrong = sorted(set(shapes) ^ set(given)) or sorted(k for k in shapes if shapes[k] != given[k])
        raise BundleError(f"{where}: {WEIGHTS} does not fit variant {record['variant']!r} as its record configures it "
                          f"({len(wrong)} tensor(s) missing, unexpected or of another shape, e.g. {wrong[0][:80]!r}: "
                          f"{given.get(wrong[0])} here, {shapes.get(wrong[0])} in the model); refused")
    model = variants.build(cfg)  # its tensors are those of best.pt: as large as the bundle, no larger
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise BundleError(f"{where}: {WEIGHTS} does not fit variant {record['variant']!r}: "
                          f"{str(e).splitlines()[0]}; refused") from None
    return model


#: the least a re-evaluated accuracy may differ from the record's by, in questions (a tie broken
#: the other way on another CPU's kernels)
MIN_FLIPS = 2


def metric_tolerance(scores: np.ndarray, percent: bool) -> float:
    """How far a re-evaluated metric may be from the record's: one standard error of the mean of the
    per-question ``scores`` (1/0 correct, or squared errors), at least :data:`MIN_FLIPS` questions'
    worth for an accuracy (in percentage points when ``percent``), and 1e-6 of the value otherwise."""
    n = max(len(scores), 1)
    se = float(np.std(scores, ddof=1) / math.sqrt(n)) if len(scores) > 1 else float(np.abs(scores).max(initial=0))
    if percent:
        return 100 * max(se, MIN_FLIPS / n)
    return max(se, 1e-6 * abs(float(np.mean(scores))) if len(scores) else 0.0)


def verify_metrics(where: str, record: dict, model: torch.nn.Module, spec: str) -> str:
    """Evaluate the bundle's weights on the local validation and test splits of ``spec`` with the
    harness's evaluation (:func:`harness.evaluation.evaluate.evaluate`, fp32, CPU) and refuse them unless the
    task's metric (accuracy, a count's MSE) is the record's within :func:`metric_tolerance`: the same
    weights on the same questions differ only where rounding flips a near tie. Returns what was
    verified, for the import message."""
    task = variants.task_of(variants.VariantConfig(**record["variant_config"]))
    metric = M.task_metric(task)
    data = D.load(spec)
    said = []
    for split in ("val", "test"):
        s = data.splits[split]
        got, pred = evaluate(model, s, data.features, data.type_names, 256, torch.device("cpu"), task=task)
        answers = s.answers.cpu().numpy()
        percent = metric.name == M.PRIMARY
        scores = (pred == answers).astype(np.float64) if percent else \
            (pred.astype(np.float64) - answers.astype(np.float64)) ** 2
        tol = metric_tolerance(scores, percent)
        claimed, value = R.metric(record, split, metric.name), got.get(metric.key)
        if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or not math.isfinite(claimed) \
                or value is None or abs(value - claimed) > tol:
            raise BundleError(f"{where}: {RECORD} says {split} {metric.name} {str(claimed)[:40]}, but its weights "
                              f"give {metric.fmt(value)} on the {len(s):,} {split} questions of {spec} here "
                              f"(tolerance {tol:.3g}: one standard error, at least {MIN_FLIPS} questions); refused: "
                              f"a forged or damaged run")
        said.append(f"{split} {metric.name} {metric.fmt(value)} (record {metric.fmt(claimed)}, tolerance "
                    f"{tol:.2g}, {len(s):,} questions)")
    return "re-evaluated on this data set: " + ", ".join(said)


def import_bundle(path: str | Path, store: ResultsStore, data: str | None = None,
                  max_unpacked_mib: float = MAX_UNPACKED_MIB) -> tuple[dict, bool, str]:
    """Verify the bundle ``path`` and add its run to ``store``; returns (its record, whether it was
    added: False when the store already had the run complete, what was verified). ``data``: where
    the run's data set is here [default: the spec its record names]; ``max_unpacked_mib``: the
    most the bundle may unpack to."""
    where = str(path)
    members = read_members(path, max_unpacked_mib)
    manifest = verify_checksums(where, members)
    record = _json(where, RECORD, members[RECORD])
    check_record(where, record)
    info = _local_data(where, manifest, record, data)
    verify_identity(where, manifest, record, info)
    model = load_weights(where, record, members[WEIGHTS])
    run_id = record["run_id"]
    run_dir = store.run_dir(run_id)
    if store.is_complete(run_id):
        return store.read_record(run_id), False, "already in the store"
    verified = verify_metrics(where, record, model, info.spec)
    store.write_data_info(info.to_dict())
    with run_lock(run_dir):
        if store.is_complete(run_id):
            return store.read_record(run_id), False, "already in the store"
        for name in (WEIGHTS, *OPTIONAL):
            if name in members:
                atomic_write_bytes(run_dir / name, members[name])
        atomic_write_json(run_dir / IMPORTED, {
            "bundle": str(Path(path).resolve()), "bundle_sha256": {n: sha256(b) for n, b in members.items()},
            "exported_at": manifest.get("exported_at"), "git_commit": manifest.get("git_commit"),
            "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "verified": verified})
        atomic_write_bytes(run_dir / RECORD, members[RECORD])  # last: the run is complete from here on
    return record, True, verified
