"""Model families: each a registered (model class, config class) pair. A variant names its family
(the ``arch`` of its config, kept under that key so run ids and stored records stay as they are),
and :func:`variants.get_config`, :func:`variants.build` and the run id read the family's config
class for the model settings it has, their defaults and their ranges.

Adding a family (a transformer student, an HCRN-style model) is one call::

    register_family("my-model", MyModel, MyConfig)

* ``MyConfig`` is a dataclass whose every field has a default: its fields are the family's model
  settings (what ``--set`` and a grid may name), and ``__post_init__`` raises ``ValueError`` for a
  value out of range (checked when a variant is configured, before anything runs). It has the
  data-dictated settings :data:`DATA_KEYS` (the runner fills them in from the feature set) and
  ``module_dim``, the width distillation losses see (:data:`REQUIRED_SETTINGS`).
* ``MyModel(config)`` is an ``nn.Module`` that keeps its config as ``self.cfg`` (a student reads
  its teachers' ``module_dim`` there) and whose ``forward(appearance, motion, questions, lengths)``
  returns a dict with at least ``logits``; distillation losses read the other keys they name (a
  student whose teacher lacks one fails when planned). ``uses_video = False`` on the class lets
  the runner read no features; ``word_embedding`` (an ``nn.Embedding``) receives GloVe.
* Tasks (:mod:`variants.tasks`): a family answers open-ended questions unless its model class lists
  ``SUPPORTED_TASKS`` and its config has a ``task`` setting (the runner sets it from the data set);
  the forward then takes the task's extra inputs as keyword arguments (multiple choice:
  ``candidates``, ``candidate_lengths``) and ``logits`` is the task's output.

DualVGR and the question-only sanity model are the first two families; they share one config
class, so a question-only run id hashes the same settings it always did.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from .dualvgr import DualVGR, DualVGRConfig, QuestionOnly
from .modality import ModalityConfig, OneModalityDualVGR
from .registry import Registry
from .tasks import OPEN_ENDED
from .transformer import TransformerConfig, VideoTextTransformer

#: data-dependent model settings the runner fills in from the feature set
DATA_KEYS = ("question_vocab", "answer_vocab", "vision_dim", "motion_dim", "word_dim", "num_clips", "num_frames")
#: the settings every family's config has: the data's dims and the width distillation losses see
REQUIRED_SETTINGS = (*DATA_KEYS, "module_dim")


@dataclass(frozen=True)
class ModelFamily:
    """A model class and the config class it takes (see the module docstring)."""

    name: str
    model: type[nn.Module]
    config: type

    def defaults(self) -> dict[str, Any]:
        """Every model setting of the family with its default (a fresh dict)."""
        return {f.name: _default(f) for f in dataclasses.fields(self.config)}

    def make_config(self, settings: dict) -> Any:
        """The config object of ``settings``; ``ValueError`` names a value out of range or a task
        the family has no head for."""
        task = settings.get("task", OPEN_ENDED)
        if task not in self.tasks:
            raise ValueError(f"model family {self.name!r} has no head for the {task} task "
                             f"(it answers: {', '.join(self.tasks)})")
        return self.config(**settings)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks (:mod:`variants.tasks`) the family builds a head for: ``SUPPORTED_TASKS`` of its
        model class (a ``task`` setting in its config picks one), else open-ended only."""
        return tuple(getattr(self.model, "SUPPORTED_TASKS", (OPEN_ENDED,)))

    def build(self, settings: dict) -> nn.Module:
        return self.model(self.make_config(settings))

    @property
    def uses_video(self) -> bool:
        """Whether the model reads the video features (the question-only sanity model does not)."""
        return getattr(self.model, "uses_video", True)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"model config field {f.name!r} has no default")


MODEL_FAMILIES = Registry("model family")


def register_family(name: str, model: type[nn.Module], config: type, description: str = "") -> ModelFamily:
    """Register a model family (see the module docstring); ``description`` (default: the first line
    of the model class's docstring) is what ``ablate.py list`` shows. Fails, naming it, for a
    config that is not a dataclass, has a field without a default or lacks a required setting."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"model family {name!r}: config {config.__name__} must be a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config)}
    missing = [k for k in REQUIRED_SETTINGS if k not in fields]
    if missing:
        raise TypeError(f"model family {name!r}: config {config.__name__} lacks the settings {missing} "
                        f"(every family has {', '.join(REQUIRED_SETTINGS)})")
    for f in fields.values():
        _default(f)
    fam = ModelFamily(name, model, config)
    doc = (model.__doc__ or "").strip().splitlines()
    MODEL_FAMILIES.add(name, fam, description or (doc[0] if doc else ""))
    return fam


def family(name: str) -> ModelFamily:
    """The registered family ``name``; an unknown name raises ``UnknownNameError`` listing the known."""
    return MODEL_FAMILIES.get(name).fn


register_family("dualvgr", DualVGR, DualVGRConfig, "DualVGR (NJUPT-MCC/DualVGR-VideoQA): question-guided graph "
                "reasoning (GAT) over appearance and motion clips; sparse and autoencoder variants are its settings.")
register_family("question-only", QuestionOnly, DualVGRConfig)
register_family("transformer", VideoTextTransformer, TransformerConfig,
                "Video-text transformer (video, text and multimodal encoders over frame, clip and word tokens) with "
                "SViTT's edge sparsity, node sparsity and temporal expansion as settings (variants/transformer.py).")
register_family("dualvgr-1m", OneModalityDualVGR, ModalityConfig, "DualVGR over one stream, appearance or motion "
                "(TeachText's modality reduction): the other stream's branch and the fusion removed, its features "
                "never read.")
