"""Ablation grids: a TOML file that names variants, setting axes, seeds, a data set, training
settings and executor defaults; expanded into runs, ordered so teachers run before the students
that need them, resumable (complete runs are skipped) and run locally (processes) or on a SLURM
cluster through submitit.

Grid file (``grids/NAME.toml``)::

    description = "every distillation loss against the same teacher"
    data = "synthetic:tiny"            # a feature directory or synthetic:PRESET[:SEED]
    seeds = [0, 1]
    variants = ["dualvgr", "student", "student-*"]   # names or shell wildcards

    [train]                            # RunSpec settings: epochs, batch_size, lr, lr_decay_every,
    epochs = 15                        # lr_decay, grad_clip, early_stop, glove, precision (fp32|bf16)
    [set]                              # fixed variant settings, applied where the variant has them
    module_dim = 64
    [axes]                             # cartesian product over variant settings (where they apply)
    "logits.T" = [2.0, 4.0]
    [[include]]                        # extra runs: variant + settings (+ seeds)
    variant = "student-logits"
    "logits.T" = 8.0
    [[exclude]]                        # drop runs whose variant/settings match every key given
    variant = "student-logits"
    "logits.T" = 2.0
    [executor]                         # defaults for ablate.py options
    kind = "local"                     # local | slurm | submitit-local
    jobs = 1
    partition = "gpu"                  # slurm only: partition, gpus_per_run, time_min, array_parallelism

Every key is checked before anything runs; an error names the file and the key (TOML syntax
errors name the line).
"""
from __future__ import annotations

import fnmatch
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import variants

from .env import TRAIN_PRECISIONS
from .errors import HarnessError
from .runner import REFERENCE_TRAIN, RunSpec

GRID_DIR = Path(__file__).resolve().parent.parent / "grids"
TOP_KEYS = {"description", "data", "seeds", "variants", "train", "set", "axes", "include", "exclude", "executor"}
TRAIN_KEYS = set(REFERENCE_TRAIN) | {"early_stop", "glove", "precision"}
EXECUTOR_KEYS = {"kind", "jobs", "partition", "gpus_per_run", "time_min", "array_parallelism", "cpus_per_run",
                 "mem_gb", "device"}
EXECUTOR_KINDS = ("local", "slurm", "submitit-local")


class GridError(HarnessError, ValueError):
    """A bad grid file: the message names the file and the key."""


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    data: str
    seeds: list[int]
    runs: list[RunSpec]
    executor: dict = field(default_factory=dict)


def resolve_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise GridError(f"grid file {p} does not exist")
        return p
    p = GRID_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        known = sorted(q.stem for q in GRID_DIR.glob("*.toml"))
        raise GridError(f"no grid named {name_or_path!r} (looked for {p}; known: {', '.join(known) or 'none'})")
    return p


def _settings_of(name: str) -> set[str]:
    cfg = variants.get_config(name)
    keys = set(cfg.model) | set(cfg.loss)
    for d in cfg.distill:
        keys |= {f"{d['name']}.weight"} | {f"{d['name']}.{k}" for k in d["params"]}
    if cfg.teachers:
        keys.add("teacher")
    return keys


def load(name_or_path: str | Path, data: str | None = None, seeds: list[int] | None = None) -> Grid:
    """Read, check and expand a grid file. ``data`` / ``seeds`` override the file's."""
    path = resolve_path(name_or_path)
    where = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise GridError(f"{where}: not valid TOML: {e}") from None
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise GridError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    for key in ("variants",):
        if key not in doc:
            raise GridError(f"{where}: missing key {key!r}")
    train = doc.get("train", {})
    if not isinstance(train, dict) or set(train) - TRAIN_KEYS:
        raise GridError(f"{where}: [train] has unknown key(s) {', '.join(sorted(set(train) - TRAIN_KEYS))} "
                        f"(known: {', '.join(sorted(TRAIN_KEYS))})")
    if "precision" in train and train["precision"] not in TRAIN_PRECISIONS:
        raise GridError(f"{where}: [train] precision = {train['precision']!r} is not one of "
                        f"{', '.join(TRAIN_PRECISIONS)}")
    executor = doc.get("executor", {})
    if set(executor) - EXECUTOR_KEYS:
        raise GridError(f"{where}: [executor] has unknown key(s) {', '.join(sorted(set(executor) - EXECUTOR_KEYS))} "
                        f"(known: {', '.join(sorted(EXECUTOR_KEYS))})")
    if executor.get("kind", "local") not in EXECUTOR_KINDS:
        raise GridError(f"{where}: [executor] kind {executor['kind']!r} is not one of {', '.join(EXECUTOR_KINDS)}")

    names: list[str] = []
    for pattern in doc["variants"]:
        found = variants.list(pattern)
        if not found:
            raise GridError(f"{where}: variants: {pattern!r} matches no registered variant "
                            f"(known: {', '.join(variants.list())})")
        names += [n for n in found if n not in names]
    settings = {n: _settings_of(n) for n in names}

    fixed = doc.get("set", {})
    axes = doc.get("axes", {})
    for section, keys in (("set", fixed), ("axes", axes)):
        for key in keys:
            if not any(key in settings[n] for n in names):
                raise GridError(f"{where}: [{section}] key {key!r} is a setting of none of the grid's variants")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: [axes] {key!r} must be a non-empty list of values")

    seeds = list(seeds if seeds is not None else doc.get("seeds", [666]))
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise GridError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    data = data or doc.get("data", "synthetic:tiny")

    def make(variant: str, overrides: dict, seed: int) -> RunSpec:
        return RunSpec(variant=variant, data=data, seed=seed, overrides=dict(overrides),
                       **{k: v for k, v in train.items()})

    combos: list[tuple[str, dict]] = []
    for n in names:
        base = {k: v for k, v in fixed.items() if k in settings[n]}
        own = [(k, v) for k, v in axes.items() if k in settings[n]]
        for values in itertools.product(*[v for _, v in own]):
            combos.append((n, {**base, **dict(zip([k for k, _ in own], values))}))
    for i, inc in enumerate(doc.get("include", [])):
        inc = dict(inc)
        v = inc.pop("variant", None)
        if v is None or v not in variants.VARIANTS:
            raise GridError(f"{where}: [[include]] #{i + 1}: 'variant' must name a registered variant, got {v!r}")
        bad = set(inc) - settings[v] - {"seeds"}
        if bad:
            raise GridError(f"{where}: [[include]] #{i + 1}: {v} has no setting(s) {', '.join(sorted(bad))}")
        inc.pop("seeds", None)
        combos.append((v, {**{k: x for k, x in fixed.items() if k in settings[v]}, **inc}))
    excludes = [dict(e) for e in doc.get("exclude", [])]
    for i, ex in enumerate(excludes):
        if "variant" in ex and not variants.list(ex["variant"]):
            raise GridError(f"{where}: [[exclude]] #{i + 1}: variant {ex['variant']!r} matches nothing")

    def excluded(variant: str, ov: dict) -> bool:
        for ex in excludes:
            if all((fnmatch.fnmatchcase(variant, v) if k == "variant" else ov.get(k) == v) for k, v in ex.items()):
                return True
        return False

    runs: list[RunSpec] = []
    seen = set()
    for variant, ov in combos:
        if excluded(variant, ov):
            continue
        for seed in seeds:
            key = (variant, tuple(sorted(ov.items())), seed)
            if key not in seen:
                seen.add(key)
                runs.append(make(variant, ov, seed))
    if not runs:
        raise GridError(f"{where}: the grid expands to no runs")
    return Grid(name=path.stem, path=path, description=doc.get("description", ""), data=data, seeds=seeds,
                runs=order_runs(runs), executor=executor)


def order_runs(runs: list[RunSpec]) -> list[RunSpec]:
    """Teachers before the students that need them: variants with no teachers first (teacher
    variants among them first of all), students after; stable otherwise."""
    teacher_names = {t for r in runs for t in variants.get_config(r.variant).teachers}

    def rank(r: RunSpec) -> int:
        if r.variant in teacher_names:
            return 0
        return 2 if variants.get_config(r.variant).teachers else 1

    return sorted(runs, key=rank)
