"""Model variants: a registered name plus a small config (timm-style).

    >>> import variants
    >>> variants.list("teacher-*")
    >>> model = variants.create("dualvgr", question_vocab=100, answer_vocab=50, module_dim=64)

A variant is one decorated function in ``variants/zoo.py`` that returns its config: its model
family (``arch``: a name in :data:`MODEL_FAMILIES`, see :mod:`variants.families`), model settings
(``model``: fields of the family's config class) and loss settings (``loss``). Overrides
given to :func:`create` / :func:`get_config` go to whichever section defines the key; an
unknown key is an error that names it.
"""
from __future__ import annotations

import builtins
import copy
import dataclasses
import inspect
from dataclasses import dataclass, field

from torch import nn

from .families import DATA_KEYS, MODEL_FAMILIES, ModelFamily, family, register_family
from .losses import LOSSES, Objective
from .registry import VARIANTS, UnknownNameError, register_variant
from .tasks import MC_LOSS_DEFAULT, MC_LOSSES, MULTIPLE_CHOICE, OPEN_ENDED, TASKS, Task, register_task, task

class ConfigError(KeyError):
    """A variant setting that does not exist or does not fit; the message names it."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])



@dataclass
class VariantConfig:
    name: str
    #: the model family's name (a key of MODEL_FAMILIES; ``arch`` in records and run ids)
    arch: str
    description: str
    model: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    #: teacher variant names (students only); trained first if the store has none
    teachers: list = field(default_factory=list)
    #: distillation losses: [{"name": "fused", "weight": 1.0, "params": {...}}]
    distill: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def model_family(self) -> ModelFamily:
        return family(self.arch)

    def model_config(self):
        """The model settings as the family's config object."""
        return self.model_family.make_config(self.model)


def list(pattern: str | list[str] = "*") -> list[str]:  # timm-style name
    """Registered variant names matching shell wildcards (``list("teacher-*")``)."""
    return VARIANTS.list(pattern)


def describe(name: str) -> str:
    return VARIANTS.get(name).description


def get_config(name: str, **overrides) -> VariantConfig:
    """The variant's config with ``overrides`` applied (each key must exist in a section)."""
    entry = VARIANTS.get(name)
    spec = copy.deepcopy(entry.fn())
    arch = spec.pop("arch")
    fam, model = _model_settings(name, arch, spec.pop("model", {}))
    loss = dict(spec.pop("loss", {}))
    teachers = spec.pop("teachers", [])
    teachers = [teachers] if isinstance(teachers, str) else builtins.list(teachers)
    distill = [dict(d, params=dict(d.get("params", {}))) for d in spec.pop("distill", [])]
    if spec:
        raise ConfigError(f"variant {name!r}: unknown config sections {sorted(spec)}")
    defaults = {**model, **loss, **{f"{d['name']}.weight": d.get("weight", 1.0) for d in distill},
                **{f"{d['name']}.{k}": v for d in distill for k, v in loss_params(d["name"]).items()},
                **{f"{d['name']}.{k}": v for d in distill for k, v in d["params"].items()}}
    for key, value in overrides.items():
        loss_name, _, param = key.partition(".")
        if key in model:
            model[key] = value
        elif key in loss or key == "mc_loss":  # mc_loss: every variant's (the multiple-choice loss)
            loss[key] = value
        elif key == "task":  # set from the data set; a family without a task setting answers open-ended only
            if value != OPEN_ENDED:
                raise ConfigError(f"variant {name!r}: model family {arch!r} has no head for the {value} task "
                                  f"(it answers: {', '.join(fam.tasks)})")
        elif key in ("teacher", "teachers") and teachers:
            teachers = [value] if isinstance(value, str) else builtins.list(value)
        elif param and any(d["name"] == loss_name for d in distill):
            d = next(d for d in distill if d["name"] == loss_name)
            if param == "weight":
                d["weight"] = value
            elif param in loss_params(loss_name) or param in d["params"]:
                d["params"][param] = value
            else:
                known = ", ".join(["weight", *loss_params(loss_name)])
                raise ConfigError(f"variant {name!r}: distillation loss {loss_name!r} has no parameter "
                                  f"{param!r} (known: {known})")
        else:
            kd = [f"{d['name']}.<param>" for d in distill] + (["teacher"] if teachers else [])
            raise ConfigError(
                f"variant {name!r} has no setting {key!r}; model settings: {', '.join(model)}; "
                f"loss settings: {', '.join(loss) or '(none)'}"
                + (f"; distillation settings: {', '.join(kd)}" if kd else ""))
    for t in teachers:
        VARIANTS.get(t)  # unknown teacher: fail now, naming it
    _check_types(name, overrides, model, loss, distill, defaults)  # and the loss weights' signs
    try:
        fam.make_config(model)  # ranges (positive dims, keep_ratio in (0, 1]...), checked before anything runs
    except ValueError as e:
        raise ConfigError(f"variant {name!r}: {e}") from None
    return VariantConfig(name=name, arch=arch, description=entry.description, model=model, loss=loss,
                         teachers=teachers, distill=distill)


def _mc_loss(name: str, model: dict, loss: dict) -> None:
    """A multiple-choice config spells its loss (``mc_loss``, default HCRN's hinge) so that its record
    says which it trained with; a loss that is not one of :data:`variants.tasks.MC_LOSSES` is refused."""
    if model.get("task") == MULTIPLE_CHOICE:
        loss.setdefault("mc_loss", MC_LOSS_DEFAULT)
    if "mc_loss" in loss and (not isinstance(loss["mc_loss"], str) or loss["mc_loss"] not in MC_LOSSES):
        raise ConfigError(f"variant {name!r}: setting mc_loss = {loss['mc_loss']!r} is not one of "
                          f"{', '.join(MC_LOSSES)} (the multiple-choice loss: {MC_LOSS_DEFAULT} is HCRN's)")


def _model_settings(name: str, arch: str, given: dict) -> tuple[ModelFamily, dict]:
    """The variant's model family and its model settings: the family's defaults, updated by the
    variant's registration (``given``), each of which must be a setting of the family."""
    if arch not in MODEL_FAMILIES:
        raise ConfigError(f"variant {name!r}: unknown model family (arch) {arch!r} "
                          f"(known: {', '.join(MODEL_FAMILIES.list())})")
    fam = family(arch)
    model = fam.defaults()
    unknown = sorted(set(given) - set(model))
    if unknown:
        raise ConfigError(f"variant {name!r}: model family {arch!r} has no settings {unknown}")
    return fam, {**model, **given}


def loss_params(loss: str) -> dict:
    """The parameters a registered distillation loss's factory accepts, with their defaults (None
    where the factory has none): every one can be set as ``LOSS.PARAM`` on a variant that uses the
    loss, by ``--set`` and in a grid, whether or not the variant's ``params`` spell it out."""
    sig = inspect.signature(LOSSES.get(loss).fn)  # follows functools.wraps, so _factory is optional
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in sig.parameters.values() if p.kind in kinds and p.name not in ("student_dim", "teacher_dim")}


def settings(name: str) -> dict:
    """Every setting :func:`get_config` accepts for variant ``name`` (what ``--set`` and a grid's
    ``[set]``, ``[axes]``, ``[[include]]`` and ``[[exclude]]`` may name), with its default: model and
    loss settings, ``teacher`` / ``teachers`` for students, and per distillation loss ``LOSS.weight``
    and every parameter of the loss (:func:`loss_params`)."""
    cfg = get_config(name)
    out = {**cfg.model, "mc_loss": MC_LOSS_DEFAULT, **cfg.loss}
    for d in cfg.distill:
        out[f"{d['name']}.weight"] = d.get("weight", 1.0)
        out.update({f"{d['name']}.{k}": v for k, v in {**loss_params(d["name"]), **d["params"]}.items()})
    if cfg.teachers:
        out.update(teacher=cfg.teachers[0], teachers=builtins.list(cfg.teachers))
    return out


def _type_ok(default, value) -> bool:
    """A setting's value must have its default's type (a float setting takes an int too); a
    setting whose default is None takes anything its model checks."""
    if default is None or isinstance(default, (builtins.list, dict)):
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _check_types(name: str, overrides: dict, model: dict, loss: dict, distill: list, defaults: dict) -> None:
    """Each override has its default's type; then the multiple-choice loss (:func:`_mc_loss`) and the loss
    weights are >= 0 (:func:`_check_weights`)."""
    _mc_loss(name, model, loss)
    for key, value in overrides.items():
        if key in ("teacher", "teachers") or key not in defaults:
            continue
        if not _type_ok(defaults[key], value):
            raise ConfigError(f"variant {name!r}: setting {key} = {value!r} must be "
                              f"{type(defaults[key]).__name__}, like its default {defaults[key]!r}")
    _check_weights(name, loss, distill)


#: the loss settings that weigh a term of the objective (or count its steps): never negative
WEIGHT_TERMS = ("alpha", "beta", "ce_weight", "recon_weight", "ae_pretrain_steps")


def _check_weights(name: str, loss: dict, distill: list) -> None:
    """Loss weights (DualVGR's ``alpha``, ``beta``..., each distillation loss's ``weight``) are >= 0:
    a negative weight maximises its term."""
    weights = {k: loss[k] for k in WEIGHT_TERMS if k in loss}
    weights.update({f"{d['name']}.weight": d.get("weight", 1.0) for d in distill})
    for key, value in weights.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
            raise ConfigError(f"variant {name!r}: setting {key} = {value!r}: loss weights must be >= 0 "
                              "(a negative weight maximises its term)")


def build(cfg: VariantConfig) -> nn.Module:
    """The untrained model of a variant config, built by its model family."""
    return cfg.model_family.build(cfg.model)


def create(name: str, **overrides) -> nn.Module:
    """Build the model of a registered variant (timm's ``create_model``)."""
    return build(get_config(name, **overrides))


def objective(cfg: VariantConfig, teacher_dim: int | None = None) -> Objective:
    """The training objective of a variant (an ``nn.Module``: distillation losses may learn):
    ``objective(outputs, answers, teacher_outputs) -> (total, parts)``."""
    return Objective(cfg.loss, cfg.distill, student_dim=cfg.model["module_dim"],
                     teacher_dim=teacher_dim or cfg.model["module_dim"], task=task_of(cfg))


def task_of(cfg: VariantConfig) -> str:
    """The task a variant config answers (:mod:`variants.tasks`)."""
    return cfg.model.get("task", OPEN_ENDED)


def teacher_width(cfg: VariantConfig, widths) -> int | None:
    """The one ``module_dim`` of a student's teachers (``widths``: theirs, from planned configs or
    built models), what its distillation losses take; None without teachers. Teachers of different
    widths are a ConfigError naming them."""
    dims = sorted(set(widths))
    if len(dims) > 1:
        raise ConfigError(f"{cfg.name}: teachers {cfg.teachers} have different module_dim {dims}; "
                          f"distillation losses take one teacher width")
    return dims[0] if dims else None


def uses_video(cfg: VariantConfig) -> bool:
    """Whether the variant's model reads the video features (the question-only sanity model does not)."""
    return cfg.model_family.uses_video


def modalities(cfg: VariantConfig) -> tuple[str, ...]:
    """The feature streams the variant's model reads (``harness.data.features.MODALITIES``): both,
    one (a one-modality student, :mod:`variants.modality`) or none (the question-only sanity model)."""
    if not uses_video(cfg):
        return ()
    one = cfg.model.get("modality")
    return (one,) if one else ("appearance", "motion")


def teacher_settings(teacher: str, settings: dict) -> dict:
    """The model settings among ``settings`` (a student's overrides, e.g. a grid's ``[set]`` or
    ``--set``) that reach its teacher ``teacher``: every model setting that the teacher's own
    registration does not fix. ``module_dim = 32`` reaches teacher-g4; ``graph_layers`` does not
    (it is what makes teacher-g4 a teacher)."""
    spec = VARIANTS.get(teacher).fn()
    fixed = set(spec.get("model", {}))
    keys = family(spec["arch"]).defaults()
    return {k: v for k, v in settings.items() if k in keys and k not in fixed}


def loss_fn(cfg: VariantConfig):
    """``fn(outputs, answers) -> (total, parts)`` for variants without teachers."""
    obj = objective(cfg)
    return lambda out, answers: obj(out, answers)


from . import kd_losses  # noqa: E402,F401  (registers the distillation losses)
from . import zoo  # noqa: E402,F401  (registers the variants)

__all__ = ["VARIANTS", "LOSSES", "MODEL_FAMILIES", "ModelFamily", "register_family", "family", "VariantConfig",
           "register_variant", "list", "describe",
           "get_config", "settings", "loss_params", "build", "create", "objective", "loss_fn", "uses_video",
           "modalities",
           "teacher_width", "teacher_settings", "ConfigError", "UnknownNameError", "DATA_KEYS",
           "TASKS", "Task", "register_task", "task", "task_of"]
