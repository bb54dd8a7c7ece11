"""Study files: what :mod:`harness.search.optimize` searches, read and checked before anything runs (every
error names the file and the key). The format is described in :mod:`harness.search.optimize`'s docstring;
the keys shared with grid files (``data``, ``variants``, ``[train]``, ``[set]``, ``[executor]``)
mean what they mean there (:mod:`harness.execution.grid`).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import optuna

import variants

from harness.execution.grid import TOP_KEYS as GRID_KEYS
from harness.errors import GridError
from harness.execution.grid import check_executor, variant_names
from harness.runs.settings import TRAIN_CHECKS, SettingError, check_train_settings, is_int

TOP_KEYS = {"description", "data", "variants", "train", "set", "executor", "search"}
SEARCH_DEFAULTS = {"n_trials": 20, "sampler": "tpe", "seed": 0, "pruner": "median", "startup_trials": 5,
                   "warmup_epochs": 2, "final_seeds": [1, 2, 3], "control": "student", "compare_default": True}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive-halving", "none")
PARAM_KEYS = {"low", "high", "log", "int", "choices"}


class StudyError(GridError):
    """A bad study file (the message names the file and the key) or a study that cannot go on."""


@dataclass
class Param:
    """One searched setting: a range (``low``..``high``, log-uniform with ``log``, integers with
    ``int``) or ``choices``."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    int: bool = False
    choices: list | None = None

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.int:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)


@dataclass
class Study:
    name: str
    path: Path
    description: str
    data: str
    variant: str
    train: dict
    fixed: dict  # [set]: the settings of every trial (and, where they apply, of the control)
    params: dict[str, Param]
    search: dict  # [search] with its defaults filled in
    executor: dict = field(default_factory=dict)

    def definition(self) -> dict:
        """What the study's trials are (not its budget or sampler): a journal holds one definition."""
        return {"variant": self.variant, "data": self.data, "train": self.train, "set": self.fixed,
                "seed": self.search["seed"], "params": {k: dataclasses.asdict(p) for k, p in self.params.items()}}


def load_study(path: str | Path) -> Study:
    """Read and check a study file; every key is checked before anything runs."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{where}: not valid TOML: {e}") from None
    if "search" not in doc:
        grid = " (its keys are a grid file's)" if set(doc) <= GRID_KEYS else ""
        raise StudyError(f"{where}: no [search] table, so not a study file{grid}: a grid file runs with "
                         f"`python ablate.py --grid {path}`")
    if set(doc) - TOP_KEYS:
        raise StudyError(f"{where}: unknown key(s) {', '.join(sorted(set(doc) - TOP_KEYS))} "
                         f"(known: {', '.join(sorted(TOP_KEYS))})")
    for section in ("train", "set", "executor", "search"):
        if not isinstance(doc.get(section, {}), dict):
            raise StudyError(f"{where}: [{section}] must be a table")
    names = variant_names(where, doc.get("variants"))
    if len(names) != 1:
        raise StudyError(f"{where}: variants must name exactly one variant, got {', '.join(names)}")
    train = doc.get("train", {})
    if set(train) - set(TRAIN_CHECKS):
        raise StudyError(f"{where}: [train] has unknown key(s) {', '.join(sorted(set(train) - set(TRAIN_CHECKS)))}")
    try:
        check_train_settings(train, f"{where}: [train] ")
    except SettingError as e:
        raise StudyError(str(e)) from None
    check_executor(where, doc.get("executor", {}))
    variant, fixed = names[0], doc.get("set", {})
    _check_settings(where, "[set]", variant, fixed)
    search = _read_search(where, doc.get("search", {}))
    params = {k: _param(where, variant, fixed, k, v) for k, v in search.pop("params").items()}
    return Study(path.stem, path, doc.get("description", ""), doc.get("data", "synthetic:tiny"), variant, train,
                 fixed, params, search, doc.get("executor", {}))


def _check_settings(where: str, section: str, variant: str, values: dict) -> None:
    unknown = set(values) - set(variants.settings(variant))
    if unknown:
        raise StudyError(f"{where}: {section} key(s) {', '.join(sorted(unknown))} are not settings of {variant} "
                         f"(variants.settings({variant!r}) lists them)")
    try:
        variants.get_config(variant, **values)
    except variants.ConfigError as e:
        raise StudyError(f"{where}: {section}: {e}") from None


def _read_search(where: str, table: dict) -> dict:
    """``[search]``: known keys, each value checked; defaults filled in."""
    unknown = set(table) - set(SEARCH_DEFAULTS) - {"params"}
    if unknown:
        raise StudyError(f"{where}: [search] has unknown key(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted([*SEARCH_DEFAULTS, 'params']))})")
    s = {**SEARCH_DEFAULTS, **table}
    for key, ok, want in (("n_trials", is_int(s["n_trials"]) and s["n_trials"] >= 1, "an integer >= 1"),
                          ("seed", is_int(s["seed"]), "an integer"),
                          ("startup_trials", is_int(s["startup_trials"]) and s["startup_trials"] >= 0,
                           "an integer >= 0"),
                          ("warmup_epochs", is_int(s["warmup_epochs"]) and s["warmup_epochs"] >= 0, "an integer >= 0"),
                          ("sampler", s["sampler"] in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
                          ("pruner", s["pruner"] in PRUNERS, f"one of {', '.join(PRUNERS)}"),
                          ("compare_default", isinstance(s["compare_default"], bool), "true or false"),
                          ("control", s["control"] in variants.VARIANTS, "a registered variant")):
        if not ok:
            raise StudyError(f"{where}: [search] {key} = {s[key]!r} must be {want}")
    seeds = s["final_seeds"]
    if (not isinstance(seeds, list) or len(seeds) < 3 or not all(is_int(x) for x in seeds)
            or len(set(seeds)) != len(seeds) or s["seed"] in seeds):
        raise StudyError(f"{where}: [search] final_seeds = {seeds!r} must be >= 3 distinct integers, none of them "
                         f"the study's seed {s['seed']} (fresh seeds for the test comparison)")
    if not isinstance(s.get("params"), dict) or not s["params"]:
        raise StudyError(f"{where}: [search.params] must be a non-empty table of settings to search")
    return s


def _param(where: str, variant: str, fixed: dict, name: str, spec) -> Param:
    """One ``[search.params]`` entry, checked: a setting of the variant, not fixed by ``[set]``, a
    range or choices whose every value the variant accepts."""
    at = f"{where}: [search.params] {name!r}"
    if name not in variants.settings(variant):
        raise StudyError(f"{at} is not a setting of {variant} (variants.settings({variant!r}) lists them)")
    if name in fixed:
        raise StudyError(f"{at} is also fixed in [set]")
    if not isinstance(spec, dict) or set(spec) - PARAM_KEYS:
        raise StudyError(f"{at} must be a table of {', '.join(sorted(PARAM_KEYS))}, got {spec!r}")
    p = Param(name, spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("int", False),
              spec.get("choices"))
    if p.choices is not None:
        if set(spec) != {"choices"} or not isinstance(p.choices, list) or not p.choices:
            raise StudyError(f"{at}: choices must be a non-empty list, and alone (no low/high/log/int)")
        values = p.choices
    else:
        nums = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (p.low, p.high))
        if not nums or not p.low < p.high or (p.log and p.low <= 0) or not isinstance(p.log, bool) \
                or not isinstance(p.int, bool) or (p.int and not (is_int(p.low) and is_int(p.high))):
            raise StudyError(f"{at}: needs numbers low < high (> 0 with log = true, integers with int = true), "
                             f"got {spec!r}")
        values = [p.low, p.high]
    for v in values:
        try:
            variants.get_config(variant, **{**fixed, name: v})
        except variants.ConfigError as e:
            raise StudyError(f"{at}: {v!r}: {e}") from None
    return p
