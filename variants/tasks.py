"""Tasks: what a model is asked to answer, registered. One :class:`Task` per kind of VideoQA question.

A task says what a batch carries beyond the video and the question (``inputs``: the model's extra
keyword arguments), what the model's ``logits`` output is (``output``), the training loss on it
(``loss``, computed in fp32 by :class:`variants.losses.Objective`), how predictions are read from
it (``predict``, on the device, no host sync), which metric ranks runs and selects the epoch
(``metric``, a name of :mod:`harness.evaluation.metrics`, with its direction) and whether the logits are class
scores that distillation losses may soften into a distribution (``scores``).

The three tasks:

* ``open-ended``: classification over the answer vocabulary (MSVD-QA, MSRVTT-QA, TGIF-QA FrameQA);
  ``logits`` (B, answers), cross entropy, argmax, accuracy.
* ``multiple-choice``: K candidate answers per question (TGIF-QA Action and Transition, NExT-QA);
  ``logits`` (B, K), one score per candidate, argmax, accuracy. The reference recipe is HCRN's loss
  (:func:`hinge_loss`, ``thaolmk54/hcrn-videoqa`` ``train.py``): a max-margin hinge summed over every
  candidate of every question, ``sum_j max(0, 1 + s_j - s_answer)``, the right candidate's own term
  (always 1) included. Cross entropy over the K scores (NExT-QA's baselines) stays a setting:
  ``mc_loss = "ce"`` (:data:`MC_LOSSES`); it makes the K scores a distribution, as logit KD and DKD
  read them, and both losses rank by the same argmax. The run record says which one a run used
  (``harness.runs.record.task_loss``).
* ``count``: a number 1-10 (TGIF-QA Count); ``logits`` (B, 1), mean squared error to the count,
  the prediction rounded and clamped to 1-10 as HCRN's evaluation does, scored by MSE (lower is
  better; the epoch with the lowest validation MSE is kept). A non-finite output (NaN, Inf) has no
  count: its prediction is :data:`NO_COUNT` (0, which no count is), and the MSE refuses to average it
  (``harness.evaluation.metrics.squared_error_by_type``).

A new task is one :func:`register_task` call; model families build a head per task they
support (``SUPPORTED_TASKS`` on the model class, default open-ended only), the loader reads what
the task's questions carry (:mod:`harness.data.dataset`), and a metric of :mod:`harness.evaluation.metrics` scores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .registry import Registry

OPEN_ENDED, MULTIPLE_CHOICE, COUNT = "open-ended", "multiple-choice", "count"
#: the counts TGIF-QA asks for, which predictions are clamped to (HCRN's evaluation)
COUNT_MIN, COUNT_MAX = 1, 10
#: the prediction read from a non-finite count output: no count is 0, so it is never right and never averaged
NO_COUNT = 0


@dataclass(frozen=True)
class Task:
    """One task (see the module docstring)."""

    name: str
    description: str
    output: str  # what ``logits`` is, for messages and docs
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (fp32 logits, answers) -> scalar
    loss_name: str  # the key of the loss in the objective's parts
    predict: Callable[[torch.Tensor], torch.Tensor]  # logits -> (B,) predictions, on the device
    metric: str  # the metric of harness.evaluation.metrics that ranks runs and selects the epoch
    scores: bool  # logits are class / candidate scores (distributional KD applies)
    inputs: tuple[str, ...] = ()  # the model's extra keyword inputs, carried by the batch


TASKS = Registry("task")


def register_task(task: Task) -> Task:
    """Add a task to the registry (a name taken twice is an error)."""
    TASKS.add(task.name, task, task.description)
    return task


def task(name: str) -> Task:
    """The registered task ``name``; an unknown name raises ``UnknownNameError`` listing the known."""
    return TASKS.get(name).fn


def names() -> list[str]:
    return TASKS.list()


def cross_entropy(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, answers)


def hinge_loss(scores: torch.Tensor, answers: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """HCRN's multiple-choice loss (``thaolmk54/hcrn-videoqa`` ``train.py``: ``torch.nn.MultiMarginLoss``
    would average; HCRN sums): over every question b and every candidate j, the right one included,
    ``sum_b sum_j max(0, margin + s_bj - s_b,answer)``. The right candidate's own term is ``margin``
    (a constant with zero gradient), so the loss of a batch of B questions is at least ``B * margin``."""
    right = scores.gather(1, answers.view(-1, 1))
    return (margin + scores - right).clamp(min=0).sum()


def count_loss(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """HCRN's count loss: MSE of the raw output to the count."""
    return F.mse_loss(logits.reshape(-1), answers.to(logits.dtype).reshape(-1))


def count_predictions(logits: torch.Tensor) -> torch.Tensor:
    """HCRN's count prediction: the output rounded (``floor(x + 0.5)``) and clamped to 1-10; a
    non-finite output (NaN, +-Inf) gives :data:`NO_COUNT` (the cast of a NaN would be -2**63). On the
    device, no host sync."""
    x = logits.reshape(-1).float()
    pred = torch.floor(torch.nan_to_num(x, nan=0.0) + 0.5).clamp(COUNT_MIN, COUNT_MAX).long()
    return torch.where(torch.isfinite(x), pred, torch.full_like(pred, NO_COUNT))


#: the multiple-choice losses a run may train with (the loss setting ``mc_loss``): name -> (loss, key in the
#: objective's parts, what the record and the report call it); the first is the reference recipe
MC_LOSSES = {
    "hinge": (hinge_loss, "hinge", "HCRN's summed max-margin hinge"),
    "ce": (cross_entropy, "ce", "cross entropy over the candidates"),
}
#: the multiple-choice loss of the reference recipe (HCRN's)
MC_LOSS_DEFAULT = "hinge"


def task_loss(task_name: str, mc_loss: str = MC_LOSS_DEFAULT) -> tuple[Callable, str]:
    """(loss, its key in the objective's parts) of a task: the task's own, or for multiple choice the
    ``mc_loss`` of :data:`MC_LOSSES` (a name it lacks is a ValueError naming the known)."""
    if task_name != MULTIPLE_CHOICE:
        t = task(task_name)
        return t.loss, t.loss_name
    if mc_loss not in MC_LOSSES:
        raise ValueError(f"mc_loss {mc_loss!r} is not one of {', '.join(MC_LOSSES)}")
    fn, key, _ = MC_LOSSES[mc_loss]
    return fn, key


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1)


register_task(Task(OPEN_ENDED, "open-ended answers: classification over the answer vocabulary (MSVD-QA, MSRVTT-QA, "
                               "TGIF-QA FrameQA)", "answer scores (B, answers)", cross_entropy, "ce", argmax,
                   metric="acc", scores=True))
register_task(Task(MULTIPLE_CHOICE, "multiple choice: one score per candidate answer (TGIF-QA Action and "
                                    "Transition, NExT-QA)", "candidate scores (B, K)", hinge_loss, "hinge", argmax,
                   metric="acc", scores=True, inputs=("candidates", "candidate_lengths")))
register_task(Task(COUNT, "count: a number 1-10, regressed (TGIF-QA Count)", "the count (B, 1)", count_loss, "mse",
                   count_predictions, metric="mse", scores=False))
