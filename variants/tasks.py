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
  ``logits`` (B, K), one score per candidate, argmax, accuracy. The loss is cross entropy over the
  K scores, where HCRN trains with a hinge on the margin between the right candidate's score and
  each wrong one's (``max(0, 1 + s_wrong - s_right)``). We take cross entropy, as NExT-QA's
  baselines do, because it makes the K scores a distribution: logit KD, DKD and every loss that
  softens logits then apply to multiple choice unchanged, and both losses rank by the same
  argmax. (:func:`hinge_loss` is HCRN's loss, kept for comparison and tested.)
* ``count``: a number 1-10 (TGIF-QA Count); ``logits`` (B, 1), mean squared error to the count,
  the prediction rounded and clamped to 1-10 as HCRN's evaluation does, scored by MSE (lower is
  better; the epoch with the lowest validation MSE is kept).

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
    """HCRN's multiple-choice loss: the mean over wrong candidates of ``max(0, margin + s_wrong -
    s_right)`` (HCRN's ``train.py``: its ``out_false`` (B, K-1) against the right score)."""
    right = scores.gather(1, answers.view(-1, 1))
    wrong = torch.ones_like(scores, dtype=torch.bool).scatter_(1, answers.view(-1, 1), False)
    return (margin + scores - right).clamp(min=0)[wrong].mean()


def count_loss(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """HCRN's count loss: MSE of the raw output to the count."""
    return F.mse_loss(logits.reshape(-1), answers.to(logits.dtype).reshape(-1))


def count_predictions(logits: torch.Tensor) -> torch.Tensor:
    """HCRN's count prediction: the output rounded (``floor(x + 0.5)``) and clamped to 1-10."""
    return torch.floor(logits.reshape(-1).float() + 0.5).clamp(COUNT_MIN, COUNT_MAX).long()


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1)


register_task(Task(OPEN_ENDED, "open-ended answers: classification over the answer vocabulary (MSVD-QA, MSRVTT-QA, "
                               "TGIF-QA FrameQA)", "answer scores (B, answers)", cross_entropy, "ce", argmax,
                   metric="acc", scores=True))
register_task(Task(MULTIPLE_CHOICE, "multiple choice: one score per candidate answer (TGIF-QA Action and "
                                    "Transition, NExT-QA)", "candidate scores (B, K)", cross_entropy, "ce", argmax,
                   metric="acc", scores=True, inputs=("candidates", "candidate_lengths")))
register_task(Task(COUNT, "count: a number 1-10, regressed (TGIF-QA Count)", "the count (B, 1)", count_loss, "mse",
                   count_predictions, metric="mse", scores=False))
