"""What a run is, before it runs: its spec (:class:`RunSpec`), its resolved training settings
(explicit > the data set's suggestions > the reference recipe), its id (a hash of the resolved
computation, :mod:`harness.runs.identity`) and the plans of the teachers it needs, computed from the
data set's :class:`~harness.data.dataset.DataInfo` alone; and the checks that fail a bad plan before
anything trains. :mod:`harness.training.runner` trains what is planned here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

import variants
from variants.tasks import OPEN_ENDED

from harness.data import dataset as D
from harness.runs import identity
from harness.training import teacher_cache
from harness.errors import HarnessError
from harness.model.inputs import random_answers, random_inputs, split_inputs
from harness.runs.settings import REFERENCE_TRAIN, TRAIN_CHECKS, TRAIN_DEFAULTS, check_train_settings
from harness.model.step import make_objective
from harness.runs.store import ResultsStore


@dataclass
class RunSpec:
    variant: str
    data: str = "synthetic:tiny"
    seed: int = 666
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_decay_every: int | None = None
    lr_decay: float | None = None
    grad_clip: float | None = None
    early_stop: int | None = TRAIN_DEFAULTS["early_stop"]  # patience (epochs without a better val accuracy); None: off
    glove: bool = TRAIN_DEFAULTS["glove"]
    precision: str = TRAIN_DEFAULTS["precision"]  # fp32 (TF32 matmuls allowed on CUDA) or bf16 (autocast for
    # training and evaluation)
    overrides: dict = field(default_factory=dict)  # variant settings (module_dim=..., alpha=...)
    #: reuse a complete run only if this code fingerprint computed it (None: any); not part of the id
    require_code: str | None = None

    def resolved_train(self, suggested: dict | None = None) -> dict:
        """Explicit settings > the data set's suggestions > the reference recipe."""
        out = dict(REFERENCE_TRAIN)
        out.update({k: v for k, v in (suggested or {}).items() if k in REFERENCE_TRAIN})
        for k in REFERENCE_TRAIN:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out["early_stop"] = self.early_stop
        out["glove"] = self.glove
        check_train_settings({k: getattr(self, k) for k in TRAIN_CHECKS})
        out["precision"] = self.precision
        return out


class RunFailed(HarnessError, RuntimeError):
    """A run could not finish (NaN loss, bad config...); the message says why."""


class RunPruned(HarnessError, RuntimeError):
    """A run stopped early because its per-epoch callback asked it to (a search's pruner): it has
    ``pruned.json`` and no record, so it is not complete, and a later run of it resumes or retrains it."""


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What a run is, before it runs: its resolved config, training settings, id and the plans
    of the teachers it needs (their ids are part of its id)."""

    spec: RunSpec
    cfg: variants.VariantConfig
    train: dict
    run_id: str
    teachers: list["Plan"]
    #: the resolved computation the id hashes (:func:`harness.runs.identity.computation`)
    computation: dict = field(default_factory=dict)
    #: the outputs of each teacher that this run's losses read, found by :func:`check_plans`'s dry run
    #: (None until it ran; the runner caches exactly these)
    teacher_keys: list[list[str]] | None = None

    def all_run_ids(self) -> list[str]:
        """This run's id and its teachers' (recursively), teachers first."""
        out = [r for t in self.teachers for r in t.all_run_ids()]
        return [*dict.fromkeys([*out, self.run_id])]

    def all_plans(self) -> list["Plan"]:
        """This plan and its teachers' (recursively), teachers first, each run once."""
        seen: dict[str, Plan] = {}
        for t in self.teachers:
            for q in t.all_plans():
                seen.setdefault(q.run_id, q)
        seen.setdefault(self.run_id, self)
        return list(seen.values())


def plan(spec: RunSpec, data: D.DataInfo | D.VideoQAData) -> Plan:
    """Resolve a run's settings (explicit > data set suggestions > reference) and its id. Model
    settings given to a student that its teachers' registrations do not fix (``module_dim``...)
    reach its teachers (:func:`variants.teacher_settings`)."""
    info = data.info if isinstance(data, D.VideoQAData) else data
    train_cfg = spec.resolved_train(info.meta.get("suggested_train"))
    suggested_model = dict(info.meta.get("suggested_model", {}))
    dims = {k: v for k, v in info.dims.items() if k in variants.DATA_KEYS}
    if info.task != OPEN_ENDED:  # the head the data set's questions need (variants.tasks)
        dims["task"] = info.task
    cfg = variants.get_config(spec.variant, **{**suggested_model, **dims, **spec.overrides})
    info.check_model_config(cfg.model)
    teachers = [plan(dataclasses.replace(spec, variant=t, overrides=variants.teacher_settings(t, spec.overrides)), info)
                for t in cfg.teachers]
    _check_objective(cfg, teachers)
    comp = identity.computation(cfg.to_dict(), info.data_id, spec.seed, train_cfg, [t.run_id for t in teachers])
    return Plan(spec, cfg, train_cfg, identity.run_id(cfg.name, comp), teachers, comp)


def _check_objective(cfg: variants.VariantConfig, teachers: list["Plan"]) -> None:
    """Build the variant's objective once, so that a bad loss setting (``--set logits.T=-1``) fails
    when the run is planned, before its teachers train, not hours later."""
    width = variants.teacher_width(cfg, [t.cfg.model["module_dim"] for t in teachers])
    try:
        variants.objective(cfg, teacher_dim=width)
    except (ValueError, TypeError) as e:
        raise variants.ConfigError(f"variant {cfg.name!r}: {e}") from None


def teacher_outputs_read(p: Plan) -> list[list[str]]:
    """The outputs of each of ``p``'s teachers that its distillation losses read; fails, before
    anything trains, when a loss reads an output its teacher does not produce. Found by a dry run: the
    objective applied once to untrained models of the planned size on two random questions (CPU, no
    grad, the random state untouched)."""
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = variants.build(p.cfg)
        teachers = [variants.build(t.cfg).eval() for t in p.teachers]
        # the batch carries the streams the teachers read too (feature_modalities), whatever the student reads
        inputs = random_inputs({k: v for k, v in p.cfg.model.items() if k != "modality"}, 2, cpu)
        answers = random_answers(p.cfg.model, 2, cpu)
        base, extra = split_inputs(inputs, p.cfg.model)
        batch = D.Batch(*base, answers, torch.zeros(2, dtype=torch.long), torch.arange(2), extra)
        try:
            return teacher_cache.keys_read(make_objective(p.cfg, teachers, cpu), model, teachers, batch,
                                           names=[f"{t.spec.variant} ({t.cfg.arch})" for t in p.teachers])
        except (teacher_cache.MissingTeacherOutput, ValueError) as e:  # the losses name a missing output
            raise variants.ConfigError(f"variant {p.cfg.name!r} (teachers: {', '.join(p.cfg.teachers)}): {e}") from None


def check_plans(plans: list[Plan]) -> None:
    """Set :attr:`Plan.teacher_keys` of every plan of ``plans`` that has teachers (theirs included, teachers
    first) by :func:`teacher_outputs_read`: one dry run per distinct student configuration, none for a plan
    already checked. A bad plan fails here, before anything trains."""
    seen: dict[str, list[list[str]]] = {}
    for p in (q for top in plans for q in top.all_plans()):
        if not p.teachers or p.teacher_keys is not None:
            continue
        key = json.dumps([p.cfg.to_dict(), [t.cfg.to_dict() for t in p.teachers]], sort_keys=True, default=str)
        if key not in seen:
            seen[key] = teacher_outputs_read(p)
        p.teacher_keys = seen[key]


def recorded_info(spec: str, store: ResultsStore) -> D.DataInfo:
    """A data set's info as the results store last recorded it (no data read at all), else
    described from its files (vocab, questions, feature shapes; never generated)."""
    rec = store.read_data_info(spec)
    if rec is not None:
        return D.DataInfo(**rec)
    return D.describe(spec, generate=False)


def feature_mode(spec: RunSpec, mode: str = "auto") -> str:
    """The feature loading mode a run needs: ``none`` for a model that reads no video."""
    return mode if variants.uses_video(variants.get_config(spec.variant)) else "none"


def feature_modalities(spec: RunSpec) -> tuple[str, ...]:
    """The feature streams a run reads: its model's (:func:`variants.modalities`) and its teachers'
    (a one-modality student distilled from a two-stream teacher reads both in training, for the
    teacher; its model never touches the other), in ``MODALITIES`` order; both when none reads video
    (then ``feature_mode`` reads nothing anyway)."""
    from harness.data.features import MODALITIES

    def streams(name: str, overrides: dict) -> set[str]:
        cfg = variants.get_config(name, **overrides)
        out = set(variants.modalities(cfg))
        for t in cfg.teachers:
            out |= streams(t, variants.teacher_settings(t, overrides))
        return out

    read = streams(spec.variant, {k: v for k, v in spec.overrides.items() if k != "task"})
    return tuple(m for m in MODALITIES if m in read) or MODALITIES


def golden_run_ids(data_id: str = "golden-data", seed: int = 666) -> dict[str, str]:
    """The run id of every registered variant (default settings, the reference training recipe) at
    a fixed data id and seed: ``tests/golden/run_ids.json`` pins them. Rewrite it with
    ``python -m harness.training.plan`` only to change what a run computes, saying why in the commit."""

    def one(name: str) -> str:
        cfg = variants.get_config(name)
        comp = identity.computation(cfg.to_dict(), data_id, seed, RunSpec(name).resolved_train(),
                                    [one(t) for t in cfg.teachers])
        return identity.run_id(name, comp)

    return {"data_id": data_id, "seed": seed, "run_ids": {v: one(v) for v in variants.list()}}


if __name__ == "__main__":
    out = identity.ROOT / "tests" / "golden" / "run_ids.json"
    out.write_text(json.dumps(golden_run_ids(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
