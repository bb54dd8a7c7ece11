"""Ablation grids: a TOML file that names variants, setting axes, seeds, a data set, training
settings and executor defaults; expanded into runs, ordered so teachers run before the students
that need them, resumable (complete runs are skipped) and run locally (processes) or on a SLURM
cluster through submitit.

Grid file (``grids/NAME.toml``)::

    description = "every distillation loss against the same teacher"
    data = "synthetic:tiny"            # a feature directory or synthetic:PRESET[:SEED], or a list of them
    seeds = [0, 1]
    variants = ["dualvgr", "student", "student-*"]   # names or shell wildcards

    [train]                            # RunSpec settings: epochs, batch_size, lr, lr_decay_every,
    epochs = 15                        # lr_decay, grad_clip, early_stop, glove, precision (fp32|tf32|bf16)
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
    kind = "local"                     # local | slurm | submitit-local (harness.execution.executor.EXECUTORS)
    jobs = 1
    partition = "gpu"                  # slurm only: partition, gpus_per_run, time_min, array_parallelism
    [log]                              # live logging sinks (harness.training.sinks), off by default
    tensorboard = true                 # event files under each run's directory
    wandb = false                      # W&B, offline unless W&B is configured
    [evaluate]                         # after training: each complete run evaluated compressed
    compress = ["dynamic-int8", "onnx"]  # harness.compression.compress.METHODS; recorded beside the run, not retrained

Every key is checked before anything runs; an error names the file and the key (TOML syntax
errors name the line). ``[set]``, ``[axes]``, ``[[include]]`` and ``[[exclude]]`` accept exactly
what ``--set`` accepts (:func:`variants.settings`): model and loss settings, ``teacher`` /
``teachers``, and ``LOSS.weight`` and every parameter of each distillation loss the variant uses,
whether or not the variant's ``params`` spell it out. An ``[[exclude]]`` entry's variant pattern
must match a variant of the grid, its values must fit their settings, and it must drop at least one
run (a setting a run leaves at its default matches that default).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import math
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import variants
from rich.console import Console

from harness.data import dataset as D
from harness.execution import executor as E
from harness.runs import identity
from harness.console import make_console, plural, progress_bar, say
from harness.errors import DataError, GridError, HarnessError
from harness.training.plan import Plan, RunSpec, check_plans, plan
from harness.training.runner import stale
from harness.execution.schedule import GridResult, Schedule
from harness.runs.settings import TRAIN_CHECKS, SettingError, check_train_settings, is_int
from harness.training.sinks import SINKS, check_sinks
from harness.runs.store import ResultsStore
from harness.files import StoreError

GRID_DIR = Path(__file__).resolve().parents[2] / "grids"
TOP_KEYS = {"description", "data", "seeds", "variants", "train", "set", "axes", "include", "exclude", "executor",
            "log", "evaluate"}
#: the keys of a grid's ``[evaluate]`` table
EVALUATE_KEYS = {"compress"}
TRAIN_KEYS = set(TRAIN_CHECKS)
#: the most runs a grid may expand to unless ``--max-runs`` raises it: the run count is computed from
#: the axes' lengths before anything is expanded (a few hundred bytes of axes can name millions)
MAX_RUNS = 10_000


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    data: str  # the first data set (the grid's only one, usually)
    seeds: list[int]
    runs: list[RunSpec]
    executor: dict = field(default_factory=dict)
    log: tuple[str, ...] = ()  # logging sinks of harness.training.sinks
    compress: tuple[str, ...] = ()  # compressed evaluations after training (harness.compression.compress.METHODS)
    datasets: list[str] = field(default_factory=list)  # every data set, in the file's order

    def __post_init__(self):
        self.datasets = self.datasets or [self.data]


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
    return set(variants.settings(name))  # exactly what --set accepts


def _read(path: Path) -> dict:
    where = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise GridError(f"{where}: not valid TOML: {e}") from None
    if "search" in doc:
        raise GridError(f"{where}: a [search] table makes this a study file, not a grid: run "
                        f"`python ablate.py search {path}` (harness/search/optimize.py)")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise GridError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    if "variants" not in doc:
        raise GridError(f"{where}: missing key 'variants'")
    for section in ("train", "set", "axes", "executor", "log", "evaluate"):
        if not isinstance(doc.get(section, {}), dict):
            raise GridError(f"{where}: [{section}] must be a table")
    train = doc.get("train", {})
    if set(train) - TRAIN_KEYS:
        raise GridError(f"{where}: [train] has unknown key(s) {', '.join(sorted(set(train) - TRAIN_KEYS))} "
                        f"(known: {', '.join(sorted(TRAIN_KEYS))})")
    try:
        check_train_settings(train, f"{where}: [train] ")
    except SettingError as e:
        raise GridError(str(e)) from None
    check_executor(where, doc.get("executor", {}))
    _compress_methods(where, doc.get("evaluate", {}))
    return doc


def _compress_methods(where: str, table: dict) -> tuple[str, ...]:
    """The compression methods a grid's ``[evaluate]`` table asks for (``compress = [...]``), checked."""
    from harness.compression.compress import CompressError, check_methods

    if set(table) - EVALUATE_KEYS:
        raise GridError(f"{where}: [evaluate] has unknown key(s) {', '.join(sorted(set(table) - EVALUATE_KEYS))} "
                        f"(known: {', '.join(sorted(EVALUATE_KEYS))})")
    try:
        return check_methods(table.get("compress", []), f"{where}: [evaluate] compress")
    except CompressError as e:
        raise GridError(str(e)) from None


def check_executor(where: str, table: dict) -> None:
    """The ``[executor]`` table against the registered executors (:mod:`harness.execution.executor`): a known
    kind, keys some kind reads, each value checked by the kinds that read it."""
    keys = E.executor_options()
    if set(table) - keys:
        raise GridError(f"{where}: [executor] has unknown key(s) {', '.join(sorted(set(table) - keys))} "
                        f"(known: {', '.join(sorted(keys))})")
    kind = table.get("kind", "local")
    if kind not in E.EXECUTORS:
        raise GridError(f"{where}: [executor] kind {kind!r} is not one of {', '.join(E.EXECUTORS.list())}")
    E.check_options(table, f"{where}: [executor]")


def variant_names(where: str, patterns) -> list[str]:
    if not isinstance(patterns, list) or not patterns:
        raise GridError(f"{where}: variants must be a non-empty list of names or wildcards, got {patterns!r}")
    names: list[str] = []
    for pattern in patterns:
        found = variants.list(pattern) if isinstance(pattern, str) else []
        if not found:
            raise GridError(f"{where}: variants: {pattern!r} matches no registered variant "
                            f"(known: {', '.join(variants.list())})")
        names += [n for n in found if n not in names]
    return names


def _combos(where: str, doc: dict, names: list[str], seeds: list[int], seeds_given: bool
            ) -> list[tuple[str, dict, list[int]]]:
    """(variant, settings, seeds) of every configuration: the cartesian product of the axes that
    apply to each variant, then the ``[[include]]`` entries."""
    settings = {n: _settings_of(n) for n in names}
    fixed, axes = doc.get("set", {}), doc.get("axes", {})
    for section, keys in (("set", fixed), ("axes", axes)):
        for key in keys:
            if not any(key in settings[n] for n in names):
                raise GridError(f"{where}: [{section}] key {key!r} is a setting of none of the grid's variants")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: [axes] {key!r} must be a non-empty list of values")
    combos: list[tuple[str, dict, list[int]]] = []
    for n in names:
        base = {k: v for k, v in fixed.items() if k in settings[n]}
        own = [(k, v) for k, v in axes.items() if k in settings[n]]
        for values in itertools.product(*[v for _, v in own]):
            combos.append((n, {**base, **dict(zip([k for k, _ in own], values))}, seeds))
    for i, inc in enumerate(doc.get("include", [])):
        combos.append(_include(where, i, dict(inc), fixed, seeds, seeds_given))
    for variant, ov, _ in combos:  # every value checked (types, ranges, loss parameters) before anything runs
        _check_values(f"{where}: ", variant, ov)
    return combos


def _check_values(at: str, variant: str, settings: dict) -> None:
    """``settings`` of ``variant`` as ``--set`` would check them, and as its losses check their
    parameters when built (``similarity.matrix`` one of its choices...); a GridError starting with ``at``."""
    try:
        cfg = variants.get_config(variant, **settings)
        variants.objective(cfg)  # the distillation losses check their parameters' values
    except variants.ConfigError as e:
        raise GridError(f"{at}{e}") from None
    except (ValueError, TypeError) as e:
        raise GridError(f"{at}variant {variant!r}: {e}") from None


def _excluder(where: str, doc: dict, names: list[str]):
    """The ``[[exclude]]`` entries, each checked as ``--set`` would check it (its variant pattern
    matches a variant of the grid, every key is a setting of a matching variant, every value fits
    its type and range); returns ``excluded(variant, settings) -> index of the entry or None``."""
    excludes = [dict(e) for e in doc.get("exclude", [])]
    grid_variants = names + [i["variant"] for i in doc.get("include", []) if isinstance(i.get("variant"), str)]
    for i, ex in enumerate(excludes):
        pattern = ex.get("variant", "*")
        matching = [n for n in grid_variants if isinstance(pattern, str) and fnmatch.fnmatchcase(n, pattern)]
        if not matching:
            raise GridError(f"{where}: [[exclude]] #{i + 1}: variant {pattern!r} matches none of the grid's variants "
                            f"({', '.join(dict.fromkeys(grid_variants))})")
        keys = {k: v for k, v in ex.items() if k != "variant"}
        for k in keys:
            if not any(k in _settings_of(n) for n in matching):
                raise GridError(f"{where}: [[exclude]] #{i + 1}: {k!r} is a setting of none of its variants "
                                f"({', '.join(dict.fromkeys(matching))})")
        spelled = ", ".join(f"{k} = {v!r}" for k, v in keys.items())
        for n in (n for n in matching if set(keys) <= _settings_of(n)):
            _check_values(f"{where}: [[exclude]] #{i + 1} ({spelled}): ", n, keys)

    def excluded(variant: str, ov: dict) -> int | None:
        own = {**variants.settings(variant), **ov}  # a setting the run leaves at its default matches the default
        return next((i for i, ex in enumerate(excludes)
                     if all((fnmatch.fnmatchcase(variant, v) if k == "variant" else k in own and own[k] == v)
                            for k, v in ex.items())), None)

    return excluded


def run_count(doc: dict, names: list[str], seeds: list[int], datasets: list[str], seeds_given: bool) -> int:
    """How many runs the grid's axes, ``[[include]]`` entries, seeds and data sets make before
    ``[[exclude]]`` drops any: computed from their lengths, nothing expanded."""
    axes = doc.get("axes", {})
    configs = sum(math.prod(len(v) if isinstance(v, list) else 1 for k, v in axes.items() if k in _settings_of(n))
                  for n in names)
    count = configs * len(seeds) * len(datasets)
    for inc in doc.get("include", []):
        own = seeds if seeds_given else inc.get("seeds", seeds)
        count += (len(own) if isinstance(own, list) else 1) * len(datasets)
    return count


def load(name_or_path: str | Path, data: str | None = None, seeds: list[int] | None = None,
         max_runs: int = MAX_RUNS) -> Grid:
    """Read, check and expand a grid file. ``data`` / ``seeds`` override the file's; a grid of more
    than ``max_runs`` runs (:func:`run_count`, before it is expanded) is refused."""
    path = resolve_path(name_or_path)
    where = str(path)
    doc = _read(path)
    names = variant_names(where, doc["variants"])
    seeds_given = seeds is not None  # the command line's seeds replace every seed list of the file
    seeds = list(seeds if seeds is not None else doc.get("seeds", [666]))
    if not seeds or not all(is_int(s) for s in seeds):
        raise GridError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    datasets = [data] if data else _datasets(where, doc.get("data", "synthetic:tiny"))
    for d in datasets:  # a synthetic spec's preset and seed, checked now (a directory is looked at when planned)
        if d.startswith("synthetic:"):
            try:
                D.synthetic_dir(d, generate=False)
            except DataError as e:
                raise GridError(f"{where}: {'--data' if data else 'data'}: {e}") from None
    for section in ("include", "exclude"):
        entries = doc.get(section, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise GridError(f"{where}: {section} must be [[{section}]] tables, got {str(entries)[:80]!r}")
    if (count := run_count(doc, names, seeds, datasets, seeds_given)) > max_runs:
        raise GridError(f"{where}: the grid makes {count:,} runs (before [[exclude]]), more than the limit of "
                        f"{max_runs:,}; refused before expanding it (--max-runs N raises the limit)")
    excluded = _excluder(where, doc, names)
    train = doc.get("train", {})
    runs: list[RunSpec] = []
    seen, used = set(), set()
    for variant, ov, run_seeds in _combos(where, doc, names, seeds, seeds_given):
        if (hit := excluded(variant, ov)) is not None:
            used.add(hit)
            continue
        for d, seed in itertools.product(datasets, run_seeds):
            key = (d, variant, json.dumps(ov, sort_keys=True), seed)
            if key not in seen:
                seen.add(key)
                runs.append(RunSpec(variant=variant, data=d, seed=seed, overrides=dict(ov), **train))
    unused = [str(i + 1) for i in range(len(doc.get("exclude", []))) if i not in used]
    if unused:
        verb = "matches" if len(unused) == 1 else "match"
        raise GridError(f"{where}: [[exclude]] #{', #'.join(unused)} {verb} no run of the grid (each key must "
                        f"equal the run's setting, given in [set], [axes] or [[include]])")
    if not runs:
        raise GridError(f"{where}: the grid expands to no runs")
    return Grid(name=path.stem, path=path, description=doc.get("description", ""), data=datasets[0], seeds=seeds,
                runs=order_runs(runs), executor=doc.get("executor", {}), log=_log_sinks(where, doc.get("log", {})),
                datasets=datasets, compress=_compress_methods(where, doc.get("evaluate", {})))


@contextmanager
def naming_file(grid: Grid) -> Iterator[None]:
    """Errors raised while a grid's runs are planned (a data set that is missing, a setting its data
    set's sizes refuse, e.g. a ``keep_ratio`` that keeps every clip) name the grid file; the
    results store's own errors (a full disk) are left as they are."""
    try:
        yield
    except StoreError:
        raise
    except (HarnessError, variants.ConfigError, variants.UnknownNameError) as e:
        if str(e).startswith(str(grid.path)):
            raise
        raise GridError(f"{grid.path}: {e}") from None


def _datasets(where: str, value) -> list[str]:
    """The grid's ``data``: one data spec, or a list of them (every run on each, e.g. one per task)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(d, str) and d for d in items) \
            or len(set(items)) != len(items):
        raise GridError(f"{where}: data must be a data spec or a non-empty list of distinct data specs, got {value!r}")
    return items


def _log_sinks(where: str, table: dict) -> tuple[str, ...]:
    """The sinks a grid's ``[log]`` table turns on (``tensorboard = true``...)."""
    for k, v in table.items():
        if k not in SINKS:
            raise GridError(f"{where}: [log] has unknown key {k!r} (known: {', '.join(SINKS)})")
        if not isinstance(v, bool):
            raise GridError(f"{where}: [log] {k} = {v!r} is not true or false")
    return tuple(k for k in SINKS if table.get(k))


def _include(where: str, i: int, inc: dict, fixed: dict, seeds: list[int], seeds_given: bool
             ) -> tuple[str, dict, list[int]]:
    """One ``[[include]]`` entry: (variant, settings, seeds); its own ``seeds`` replace the grid's
    (unless seeds were given on the command line)."""
    v = inc.pop("variant", None)
    if not isinstance(v, str) or v not in variants.VARIANTS:
        known = ", ".join(variants.list())
        raise GridError(f"{where}: [[include]] #{i + 1}: 'variant' must name a registered variant, got {v!r} "
                        f"(known: {known})")
    own = _settings_of(v)
    bad = set(inc) - own - {"seeds"}
    if bad:
        raise GridError(f"{where}: [[include]] #{i + 1}: {v} has no setting(s) {', '.join(sorted(bad))}")
    inc_seeds = inc.pop("seeds", seeds)
    inc_seeds = seeds if seeds_given else inc_seeds
    if not isinstance(inc_seeds, list) or not inc_seeds or not all(isinstance(x, int) for x in inc_seeds):
        raise GridError(f"{where}: [[include]] #{i + 1}: seeds must be a non-empty list of integers, "
                        f"got {inc_seeds!r}")
    return v, {**{k: x for k, x in fixed.items() if k in own}, **inc}, list(inc_seeds)


def order_runs(runs: list[RunSpec]) -> list[RunSpec]:
    """Teachers before the students that need them: variants with no teachers first (teacher
    variants among them first of all), students after; stable otherwise."""
    teacher_names = {t for r in runs for t in variants.get_config(r.variant).teachers}

    def rank(r: RunSpec) -> int:
        if r.variant in teacher_names:
            return 0
        return 2 if variants.get_config(r.variant).teachers else 1

    return sorted(runs, key=rank)


def grid_plans(grid: Grid, info: Callable[[str], D.DataInfo], require_code: str | None = None) -> list[Plan]:
    """The plan of each of the grid's runs against its own data set (every data set of the grid):
    ``info`` describes a data set once (:func:`harness.data.dataset.describe`, or the store's record of it:
    :func:`harness.training.plan.recorded_info`). ``require_code``: each run reuses only a complete run of
    that code. Errors name the grid file."""
    with naming_file(grid):
        infos = {d: info(d) for d in grid.datasets}
        return [plan(dataclasses.replace(s, require_code=require_code) if require_code else s, infos[s.data])
                for s in grid.runs]


def run_grid(grid: Grid, store: ResultsStore, *, executor: str = "local", jobs: int = 1, device: str = "auto",
             mode: str = "auto", console: Console | None = None, options: dict | None = None,
             poll_s: float = 2.0, reuse_other_code: bool = True, refuse_damaged: bool = False,
             log: tuple[str, ...] | None = None) -> GridResult:
    """Run the grid's runs that are not complete, with the teacher runs they need that are not
    (each once, before its students): in this process (``local``, ``jobs`` 1), in ``jobs`` worker
    processes (``local``), as submitit job arrays (``slurm``, ``submitit-local``), or by any kind
    registered with :func:`harness.execution.executor.register_executor`; ``options``: the kind's (e.g. SLURM requests).
    ``reuse_other_code=False``: complete runs computed by other code than this checkout's (their
    records' code fingerprint) are trained again; either way the header says how many there are. A
    complete teacher run whose weights are damaged is set aside and retrained before its students
    (with ``refuse_damaged``: DamagedRun, before anything trains). ``log``: the runs' logging sinks
    (:mod:`harness.training.sinks`) [default: the grid's ``[log]``]."""
    log = check_sinks(grid.log if log is None else log)
    D.check_mode(mode, "--mode")
    kind = E.executor_kind(executor)
    console = console or make_console(stderr=True)
    code = identity.code_fingerprint()

    def described(d: str) -> D.DataInfo:  # run ids from the data sets' info: no feature is read here
        info = D.describe(d)
        store.write_data_info(info.to_dict())
        return info

    plans = grid_plans(grid, described, None if reuse_other_code else code)
    with naming_file(grid):
        check_plans(plans)  # every student's losses read outputs its teachers produce: checked before anything trains
    every = list({q.run_id: q for p in plans for q in p.all_plans()}.values())  # teachers first, each once
    own = {p.run_id for p in plans}
    teacher_ids = {t.run_id for p in every for t in p.teachers}  # their weights are checked before reuse
    done = {p.run_id for p in every if (store.usable(p.run_id, refuse_damaged) if p.run_id in teacher_ids
                                        else store.is_complete(p.run_id))}
    other = [r for r in done if stale(store, r, code)]
    todo = [p for p in every if p.run_id not in done or (not reuse_other_code and p.run_id in other)]
    kept = [] if reuse_other_code else [store.keep_other_code(r) for r in other]  # trained again: kept, not overwritten
    todo_own = sum(p.run_id in own for p in todo)
    teachers = [p for p in every if p.run_id not in own]
    say(console, f"grid {grid.name}: {plural(len(plans), 'run')} on {', '.join(grid.datasets)} "
                 f"({len(plans) - todo_own} already complete, "
                 f"{todo_own} to run)" + (f", and {plural(len(teachers), 'teacher run')} they need ("
                                          f"{len(todo) - todo_own} to train)" if teachers else "")
        + f"; executor {executor} x {jobs}")
    if other:
        say(console, f"{plural(len(other), 'complete run')} {'was' if len(other) == 1 else 'were'} "
                     "computed by other code than this checkout's (code "
                     f"{code}): " + ("reused (--no-reuse-other-code trains them again)" if reuse_other_code
                                     else f"trained again; theirs kept in {E.kept_in(kept)}"), "yellow")
    result = GridResult([p.run_id for p in every],
                        [p.run_id for p in plans if p.run_id not in {q.run_id for q in todo}],
                        [], len(plans) - todo_own)
    if not todo:
        return result
    with progress_bar(console) as progress:
        sched = Schedule(grid.name, todo, own, result, console, progress, store=store, log=log)
        try:
            kind.run(sched, E.Launch(grid.name, store, jobs, device, mode, dict(options or {}), poll_s))
        except KeyboardInterrupt:
            result.interrupted = True  # the caller says so (ablate.py: "interrupted; rerun to resume")
    return result
