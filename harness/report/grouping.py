"""Grouping a report's runs: by data set and variant configuration, one run per seed, in report
order (the baseline, the control, then the zoo's families), each group labelled with the settings
that tell it apart from the variant's other configurations."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

import variants
from variants.dualvgr import kept_clips
from variants.zoo import FAMILIES

from harness.data import layout as L
from harness.evaluation import metrics as M
from harness.runs import record as R

#: row order: the baseline, the control, then the zoo's families (the baseline family's other members first)
CATEGORIES = ("baseline", "control", *(f for f in FAMILIES if f != "baseline"), "other")



@dataclass
class Group:
    """The runs of one variant (one configuration) on one data set, one run per seed."""

    data_id: str
    variant: str
    label: str
    category: str
    runs: list[dict]  # sorted by seed
    superseded: list[str] = field(default_factory=list)  # same-seed duplicates left out
    settings: dict = field(default_factory=dict)  # the configuration, flattened (see _flat)
    missing_seeds: list = field(default_factory=list)  # seeds the grid plans for this configuration, not complete

    @property
    def seeds(self) -> list:
        """The seeds of the group's runs, in order."""
        return [r["seed"] for r in self.runs]

    def values(self, get) -> list[float]:
        """``get(record)`` of each run, where it is a number (missing and NaN values left out)."""
        out = []
        for r in self.runs:
            try:
                v = get(r)
            except (KeyError, TypeError, IndexError):
                v = None
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out.append(float(v))
        return out

    def acc(self, split: str = "test") -> list[float]:
        """The runs' accuracy on a split (the primary metric)."""
        return self.metric(M.PRIMARY, split)

    def metric(self, name: str, split: str = "test") -> list[float]:
        """A registered metric's values of the runs that have it (harness.evaluation.metrics)."""
        return self.values(lambda r: R.metric(r, split, name))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); the std is None for fewer than two values
    (it is not defined, which is not the same as 0)."""
    if not values:
        return None, None
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


def mean_or_none(values: list[float]) -> float | None:
    """The mean, None for no values."""
    return float(np.mean(values)) if values else None


def _fingerprint(r: dict) -> dict:
    """Everything that defines a run except its seed (and the teachers' run ids, which follow
    from their config and the seed); the free-text description is left out."""
    vc = {k: v for k, v in (r.get("variant_config") or {}).items() if k != "description"}
    return {"variant_config": vc, "train": r.get("train_config") or {}}


def _flat(fp: dict) -> dict:
    """A configuration's settings as ``--set`` names them (model, ``loss.*``, ``LOSS.PARAM``, ``train.*``)."""
    out = {}
    vc, train = fp["variant_config"], fp["train"]
    for k, v in (vc.get("model") or {}).items():
        out[k] = v
    for k, v in (vc.get("loss") or {}).items():
        out[f"loss.{k}"] = v
    for d in vc.get("distill") or []:  # one key per loss parameter, as --set names it: similarity.matrix
        known = variants.loss_params(d["name"]) if d["name"] in variants.LOSSES else {}
        out.update({f"{d['name']}.weight": d.get("weight", 1.0),
                    **{f"{d['name']}.{k}": v for k, v in {**known, **(d.get("params") or {})}.items()}})
    for k in sorted(set(vc) - {"model", "loss", "name", "distill"}):
        out[k] = json.dumps(vc[k], sort_keys=True)
    for k, v in train.items():
        out[f"train.{k}"] = v
    return out


def _same(a, b) -> bool:
    """Whether two setting values are equal as JSON."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _differing(flats: list[dict]) -> list[str]:
    """The settings whose values are not the same in every configuration."""
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if any(not _same(f.get(k), flats[0].get(k)) for f in flats[1:])]


def _family(variant: str) -> str | None:
    """The variant's family (its first tag in the zoo), None when it is no longer registered."""
    return variants.VARIANTS.get(variant).family if variant in variants.VARIANTS else None


def _category(variant: str, cfg: dict, baseline: str, control: str, used_as_teacher: set) -> str:
    """A group's row category: baseline, control, teacher, the zoo's family, else student/other."""
    if variant == baseline:
        return "baseline"
    if variant == control:
        return "control"
    if variant in used_as_teacher:
        return "teacher"
    family = _family(variant)
    if family in CATEGORIES:
        return family
    # a variant no longer registered: its record still says whether it was distilled
    return "student" if cfg.get("teachers") or cfg.get("distill") else "other"


def _labels(by_key: dict, fps: dict) -> dict:
    """A label per (data, variant, config): the variant's name, plus the settings that differ
    when the variant ran with several configurations on the data set."""
    configs: dict[tuple, list[str]] = {}
    for d, v, fkey in by_key:
        configs.setdefault((d, v), []).append(fkey)
    labels = {}
    for (d, v), fkeys in configs.items():
        fkeys.sort()
        if len(fkeys) == 1:
            labels[(d, v, fkeys[0])] = v
            continue
        flats = [_flat(fps[k]) for k in fkeys]
        diff = _differing(flats)
        for fkey, f in zip(fkeys, flats):
            parts = [f"{k}={f.get(k)}" for k in diff[:4]] + ([f"+{len(diff) - 4} more"] if len(diff) > 4 else [])
            labels[(d, v, fkey)] = f"{v} [{', '.join(parts)}]"
    return labels


def _keep_latest(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """One run per seed (the latest finished), sorted by seed; and the run ids left out."""
    by_seed: dict = {}
    for r in sorted(runs, key=lambda r: (r.get("finished_at") or "", r["run_id"])):
        by_seed.setdefault(r["seed"], []).append(r)
    kept = [rs[-1] for rs in by_seed.values()]
    kept.sort(key=lambda r: (r["seed"] if isinstance(r["seed"], (int, float)) else math.inf, str(r["seed"])))
    return kept, sorted(r["run_id"] for rs in by_seed.values() for r in rs[:-1])


def _clips_label(fp: dict) -> str:
    """' (2 of 4 clips)' for a node-sparse configuration: keep_ratio is rounded to whole clips."""
    model = fp["variant_config"].get("model", {})
    ratio, n = model.get("keep_ratio", 1.0), model.get("num_clips")
    return f" ({kept_clips(ratio, n)} of {n} clips)" if ratio < 1.0 and n else ""


def group_runs(records: list[dict], baseline: str = "dualvgr", control: str = "student") -> dict[str, list[Group]]:
    """``{data_id: [Group, ...]}``, groups in report order (:data:`CATEGORIES`, alphabetically
    within each); data sets by name then id."""
    used_as_teacher = {t["variant"] for r in records for t in r.get("teachers", [])}
    by_key: dict[tuple, list[dict]] = {}
    fps: dict[str, dict] = {}
    for r in records:
        fp = _fingerprint(r)
        fkey = json.dumps(fp, sort_keys=True, default=str)
        fps[fkey] = fp
        by_key.setdefault((R.data_id(r), r["variant"], fkey), []).append(r)
    labels = _labels(by_key, fps)
    groups: dict[str, list[Group]] = {}
    for (d, v, fkey), runs in by_key.items():
        kept, superseded = _keep_latest(runs)
        cat = _category(v, fps[fkey]["variant_config"], baseline, control, used_as_teacher)
        groups.setdefault(d, []).append(Group(d, v, labels[(d, v, fkey)] + _clips_label(fps[fkey]), cat, kept,
                                              superseded, _flat(fps[fkey])))
    for d in groups:
        groups[d].sort(key=lambda g: (CATEGORIES.index(g.category), g.variant, g.label))
    names = {R.data_id(r): R.data_name(r) for r in records}
    return {d: groups[d] for d in sorted(groups, key=lambda d: (names[d], d))}


def reference(groups: list[Group], variant: str) -> Group | None:
    """The group a variant name refers to. When the variant ran with several configurations: the
    one with the registered defaults in every setting that differs between them (a grid's
    ``[axes]``), else the one with the most runs (the first of ties)."""
    cands = [g for g in groups if g.variant == variant]
    if len(cands) > 1 and variant in variants.VARIANTS:
        default = _flat({"variant_config": variants.get_config(variant).to_dict(), "train": {}})
        diff = [k for k in _differing([g.settings for g in cands]) if not k.startswith("train.")]
        match = [g for g in cands if all(_same(g.settings.get(k), default.get(k)) for k in diff)]
        if len(match) == 1:
            return match[0]
    return max(cands, key=lambda g: len(g.runs)) if cands else None


def type_groups(types: list[str]) -> dict[str, list[str]]:
    """The groups of question types a benchmark reports besides its types (NExT-QA: causal, temporal,
    descriptive; :data:`harness.data.layout.TYPE_GROUPS`), when every type belongs to one; else none."""
    known = {t for members in L.TYPE_GROUPS.values() for t in members}
    if not types or not set(types) <= known:
        return {}
    return {g: [t for t in types if t in members] for g, members in L.TYPE_GROUPS.items()
            if any(t in members for t in types)}


def type_names(groups: list[Group]) -> list[str]:
    """Question types in the data set's order, those with test questions only."""
    names: list[str] = []
    for g in groups:
        for r in g.runs:
            for t in R.type_names(r):
                if t not in names:
                    names.append(t)
    present = {t for g in groups for r in g.runs for t in R.per_type(r)}
    return [t for t in names if t in present] + sorted(present - set(names))
