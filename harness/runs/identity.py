"""What a run is: the one owner of the run id, of the identity schemes a results store may hold,
and of the fingerprint of the code that computes a run.

A run id is ``<variant>-<hash of the resolved computation>``. The resolved computation
(:func:`computation`) is every setting the code acts on, with the values the code resolves them
to, not the settings a variant happens to spell out:

* ``arch`` and ``model``: the model family and every model setting of its config class
  (:mod:`variants.families`; for DualVGR ``variants.dualvgr.DualVGRConfig``), data dimensions included;
* ``loss``: every term of the variant's own objective (``variants.losses.LOSS_TERMS``), less the
  terms that act on another task than the run's (``variants.losses.TASK_LOSS_TERMS``: ``mc_loss``
  is in the id of multiple-choice runs only);
* ``distill``: each distillation loss with its weight and *every* parameter of its factory,
  defaults included (changing a loss's default changes the ids of the runs that use it);
* ``teachers``: the teachers' run ids (themselves resolved computations);
* ``train``: the resolved training settings; ``data``: the data set id; ``seed``.

Values are normalised first (:func:`normalise`): an int given for a float setting is that float,
a default spelled out is the default, so ``--set alpha=1`` and ``--set logits.T=4`` keep the id.

Settings added later keep the ids of before them when their default reproduces the old behaviour:
such a default is declared once in :data:`NEUTRAL` and a setting at its neutral value is left out
of the computation. Nothing else is exempt.

The id does not cover the code (a fix to the model keeps the ids, so a store keeps its runs); a
record carries the fingerprint of the code that computed it (:func:`code_fingerprint`: the files
that define the model, the losses, the data path and the training step), and what the id
deliberately leaves out but can change numbers (torch version, threads, CPU, device: see
``harness.env.environment``).

Identity schemes: ``1`` hashed the variant's config as spelled (its description included), the
training settings and ``record_version`` (run ids before this module); ``2`` hashes the resolved
computation, which records store under ``identity``. :func:`scheme_of` tells which scheme made a
record, :func:`migration` re-keys a scheme-1 record when its resolved computation is provably the
one it ran (every value its config left unspelled is a declared neutral value).
"""
from __future__ import annotations

import builtins
import functools
import hashlib
import json
import re
from pathlib import Path

import variants
from variants.losses import LOSS_TERMS, TASK_LOSS_TERMS

from harness.digests import file_hash
from harness.runs.settings import TRAIN_DEFAULTS

#: the identity scheme of run ids made now (see the module docstring)
SCHEME = 2
#: settings that did not always exist, and the value that reproduces what the code did before them:
#: left out of the computation when equal ("section.key"; distillation parameters as "distill.<loss>.<param>")
NEUTRAL: dict[str, object] = {
    "model.motion_dim": None,       # None = vision_dim, as the reference
    "model.keep_ratio": 1.0,        # every clip kept (node sparsity off)
    "model.edge_k": 0,              # full graph (edge sparsity off)
    "model.decoder_hidden": 0,      # no autoencoder decoders
    "model.task": "open-ended",     # the answer vocabulary's classification (variants.tasks)
    "loss.ce_weight": 1.0,          # plain cross entropy
    "loss.recon_weight": 0.0,       # no reconstruction term
    "loss.ae_pretrain_steps": 0,    # no reconstruction-only stage
    # multiple choice trained with cross entropy before HCRN's hinge became the reference recipe (its default):
    # a multiple-choice run with mc_loss = "ce" keeps its id, one with the hinge has a new one
    "loss.mc_loss": "ce",
    "train.precision": "fp32",
}
#: the files whose contents make up the code fingerprint: the model (and which class each model family
#: builds), the losses, the data path and the training step, the metrics computed from the predictions
#: (relative to the repository root)
CODE_FILES = ("variants/dualvgr.py", "variants/families.py", "variants/losses.py", "variants/kd_losses.py",
              "harness/data/dataset.py", "harness/data/features.py", "harness/model/step.py",
              "harness/training/plan.py", "harness/training/runner.py", "harness/evaluation/evaluate.py",
              "harness/evaluation/metrics.py", "harness/training/teacher_cache.py")
ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- values


def normalise(value, default):
    """``value`` as its setting's ``default`` types it: an int given for a float setting is that
    float; lists/tuples become lists (TOML and JSON give lists)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tuple):
        return builtins.list(value)
    return value


def _section(name: str, values: dict, defaults: dict) -> dict:
    """The section's values, normalised, with declared neutral values left out."""
    out = {}
    for k, v in sorted(values.items()):
        v = normalise(v, defaults.get(k))
        key = f"{name}.{k}"
        if key in NEUTRAL and v == NEUTRAL[key] and type(v) is type(NEUTRAL[key]):
            continue
        out[k] = v
    return out


def _distill(items: list) -> list:
    out = []
    for d in items:
        defaults = variants.loss_params(d["name"])
        params = {**defaults, **(d.get("params") or {})}
        params = _section(f"distill.{d['name']}", params, defaults)
        out.append({"name": d["name"], "weight": normalise(d.get("weight", 1.0), 1.0), "params": params})
    return out


def model_defaults(arch: str) -> dict:
    """Every model setting of the model family ``arch`` with its default (its config class's)."""
    return variants.family(arch).defaults()


def computation(cfg_dict: dict, data_id: str, seed: int, train: dict, teacher_runs: list | None = None) -> dict:
    """The resolved computation of a run (see the module docstring) from a variant config as
    ``VariantConfig.to_dict`` gives it (or a record's ``variant_config``)."""
    defaults = model_defaults(cfg_dict["arch"])
    model = {**defaults, **cfg_dict.get("model", {})}
    loss = {k: v for k, v in {**LOSS_TERMS, **cfg_dict.get("loss", {})}.items()
            if TASK_LOSS_TERMS.get(k, model.get("task")) == model.get("task")}
    return {"scheme": SCHEME, "arch": cfg_dict["arch"], "model": _section("model", model, defaults),
            "loss": _section("loss", loss, LOSS_TERMS), "distill": _distill(cfg_dict.get("distill", [])),
            "teachers": builtins.list(teacher_runs or []), "train": _section("train", train, TRAIN_DEFAULTS),
            "data": data_id, "seed": seed}


def digest(comp: dict) -> str:
    blob = json.dumps(comp, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def run_id(name: str, comp: dict) -> str:
    return f"{name}-{digest(comp)}"


# ----------------------------------------------------------------------------- code


@functools.lru_cache(maxsize=None)
def _fingerprint(root: Path, files: tuple[str, ...], stamps: tuple) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def code_fingerprint() -> str:
    """A hash of the contents of :data:`CODE_FILES` (not of the git commit: the same on every
    machine, and it changes with an uncommitted edit)."""
    stamps = tuple((ROOT / f).stat().st_mtime_ns for f in CODE_FILES)
    return _fingerprint(ROOT, CODE_FILES, stamps)


@functools.lru_cache(maxsize=None)
def _digests(root: Path, files: tuple[str, ...], stamps: tuple) -> tuple[tuple[str, str], ...]:
    return tuple((rel, file_hash(root / rel, "sha256")[:12]) for rel in files)


def code_record() -> dict:
    """What a record keeps of the code that computed it: the fingerprint, the files it covers and
    each file's digest (the first 12 hex digits of its SHA-256), so that a report over runs of other
    code can say which files differ from the checkout's."""
    stamps = tuple((ROOT / f).stat().st_mtime_ns for f in CODE_FILES)
    return {"fingerprint": code_fingerprint(), "files": builtins.list(CODE_FILES),
            "digests": dict(_digests(ROOT, CODE_FILES, stamps))}


#: the most changed files a sentence of :func:`against_checkout` names
NAMED_FILES = 8


def _changed_files(record: dict, mine: dict[str, str]) -> list[str] | None:
    """The code files whose digest in ``record`` differs from the checkout's (a file only one side has
    counts), or None when the record keeps no digests. The record is input: only plain path names count."""
    theirs = (record.get("code") or {}).get("digests")
    if not isinstance(theirs, dict):
        return None
    theirs = {k: v for k, v in theirs.items() if isinstance(k, str) and re.fullmatch(r"[\w./-]{1,200}", k)}
    return sorted(f for f in set(theirs) | set(mine) if theirs.get(f) != mine.get(f))


def against_checkout(records) -> list[str]:
    """Per code fingerprint of ``records`` other than this checkout's, a sentence saying it differs
    from the checkout's and, where the records keep each file's digest, which files changed."""
    here, mine = code_fingerprint(), code_record()["digests"]
    out = []
    for fp, recs in sorted(_by_code(records).items()):
        changed = next((c for r in recs if (c := _changed_files(r, mine)) is not None), None)
        what = (f"changed: {', '.join(f'`{f}`' for f in changed[:NAMED_FILES])}"
                + (f" and {len(changed) - NAMED_FILES} more" if len(changed) > NAMED_FILES else "")
                if changed else "its records do not say which files changed")
        out.append(f"code {fp} is not this checkout's ({here}); {what}")
    return out


def _by_code(records) -> dict[str, list[dict]]:
    """The records of a known fingerprint other than this checkout's, by fingerprint."""
    here, out = code_fingerprint(), {}
    for r in records:
        fp = code_of(r)
        if fp and fp != here:
            out.setdefault(str(fp), []).append(r)
    return out


def code_of(record: dict) -> str | None:
    """The code fingerprint a record was computed with; None for a record from before fingerprints."""
    return (record.get("code") or {}).get("fingerprint")


def describe_code(records) -> str:
    """Which code fingerprints computed ``records``: ``code abc (3 runs), unknown code (1 run)``."""
    counts: dict[str, int] = {}
    for r in records:
        fp = code_of(r)
        key = f"code {fp}" if fp else "unknown code (a record from before fingerprints)"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n} run{'s' if n > 1 else ''})" for k, n in sorted(counts.items())) or "no runs"


# ----------------------------------------------------------------------------- schemes of stored records


def legacy_run_id(record: dict) -> str:
    """The scheme-1 run id of a record (the variant config as spelled, training settings,
    ``record_version``)."""
    key = {"variant": record["variant_config"], "data": record["data"]["id"], "seed": record["seed"],
           "train": record["train_config"], "v": record.get("record_version", 1)}
    if record.get("teacher_runs"):
        key["teachers"] = builtins.list(record["teacher_runs"])
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return f"{record['variant_config']['name']}-{hashlib.sha1(blob).hexdigest()[:12]}"


def scheme_of(record: dict) -> str:
    """``"2"`` (current: the stored computation reproduces the id), ``"1"`` (scheme 1: the id
    reproduces from the stored config), or ``"unknown"`` (no scheme reproduces the id: never reused)."""
    ident = record.get("identity") or {}
    comp = ident.get("computation")
    if ident.get("scheme") == SCHEME and comp is not None and run_id(record["variant"], comp) == record["run_id"]:
        return str(SCHEME)
    try:
        if legacy_run_id(record) == record["run_id"]:
            return "1"
    except (KeyError, TypeError):
        pass
    return "unknown"


def _unspelled(record: dict) -> list[str]:
    """Settings the resolution of a scheme-1 record fills in from today's code without the record
    spelling them out, other than declared neutral values: what cannot be proved unchanged."""
    cfg = record["variant_config"]
    defaults = model_defaults(cfg["arch"])
    out = [f"model.{k}" for k in defaults if k not in cfg.get("model", {})
           and NEUTRAL.get(f"model.{k}", object()) != defaults[k]]
    task = cfg.get("model", {}).get("task", defaults.get("task"))
    out += [f"loss.{k}" for k in LOSS_TERMS if k not in cfg.get("loss", {})
            and NEUTRAL.get(f"loss.{k}", object()) != LOSS_TERMS[k] and TASK_LOSS_TERMS.get(k, task) == task]
    for d in cfg.get("distill", []):
        given = d.get("params") or {}
        out += [f"{d['name']}.{k}" for k, v in variants.loss_params(d["name"]).items() if k not in given
                and NEUTRAL.get(f"distill.{d['name']}.{k}", object()) != v]
    return out + _train_unspelled(record["train_config"])


def migration(record: dict, new_teacher_ids: dict[str, str]) -> tuple[str | None, str]:
    """The scheme-2 id of a scheme-1 record, or None and why it cannot be re-keyed (its resolved
    computation cannot be proved to be the one it ran, or a teacher was not re-keyed)."""
    if scheme_of(record) != "1":
        return None, f"identity scheme {scheme_of(record)}, not 1"
    missing = [t for t in record.get("teacher_runs", []) if t not in new_teacher_ids]
    if missing:
        return None, "teacher runs not re-keyed: " + ", ".join(missing)
    unspelled = _unspelled(record)
    if unspelled:
        return None, ("resolved from today's defaults, not recorded (may have changed since): "
                      + ", ".join(unspelled))
    comp = computation(record["variant_config"], record["data"]["id"], record["seed"], record["train_config"],
                       [new_teacher_ids[t] for t in record.get("teacher_runs", [])])
    return run_id(record["variant_config"]["name"], comp), "every resolved value recorded or neutral"


def _train_unspelled(train: dict) -> list[str]:
    return [f"train.{k}" for k in TRAIN_DEFAULTS if k not in train and f"train.{k}" not in NEUTRAL]


def _rekeyed(record: dict, new_id: str, mapping: dict[str, str]) -> dict:
    from datetime import datetime, timezone

    rec = dict(record, run_id=new_id, teacher_runs=[mapping[t] for t in record.get("teacher_runs", [])])
    rec["teachers"] = [dict(t, run_id=mapping.get(t["run_id"], t["run_id"])) for t in record.get("teachers", [])]
    rec["identity"] = {"scheme": SCHEME, "computation": computation(
        record["variant_config"], record["data"]["id"], record["seed"], record["train_config"], rec["teacher_runs"])}
    rec["migrated_from"] = {"run_id": record["run_id"], "scheme": scheme_of(record),
                            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return rec


def migrate_store(store, apply: bool = True) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Re-key the scheme-1 records of ``store`` (a ``ResultsStore``) whose resolved computation is
    provably unchanged (:func:`migration`), teachers before their students: the run directory is
    renamed to the new id, the record rewritten (``migrated_from`` names the old id) and the
    teacher-output cache, keyed by the old id, dropped. Returns (re-keyed: old, new) and (left:
    run id, why); ``apply=False`` only says what it would do."""
    import shutil

    from harness.files import atomic_write_json

    records = {r["run_id"]: r for r in store.iter_records() if scheme_of(r) != str(SCHEME)}
    mapping: dict[str, str] = {r["run_id"]: r["run_id"] for r in store.iter_records() if scheme_of(r) == str(SCHEME)}
    done, left, pending = [], {}, dict(records)
    while pending:
        progressed = False
        for old, rec in list(pending.items()):
            if any(t in pending for t in rec.get("teacher_runs", [])):
                continue  # its teachers first
            del pending[old]
            progressed = True
            new, why = migration(rec, mapping)
            if new is None:
                left[old] = why
            elif store.run_dir(new).exists():
                left[old] = f"a run {new} already exists"
            else:
                mapping[old] = new
                done.append((old, new))
                if apply:
                    store.run_dir(old).rename(store.run_dir(new))
                    shutil.rmtree(store.run_dir(new) / "teacher_outputs", ignore_errors=True)
                    atomic_write_json(store.run_dir(new) / store.RECORD, _rekeyed(rec, new, mapping))
        if not progressed:  # a teacher run missing from the store
            left.update({k: "teacher runs not in the store" for k in pending})
            break
    return done, sorted(left.items())
