"""The training step, defined once: the runner trains with it and ``bench.py`` (through
:func:`harness.measurement.measure.make_train_step`) times it, so a benchmark's training throughput is what
training does, a student's teacher forward included.

One step: the model's forward in train mode (under autocast for bf16), the frozen teachers'
forwards under ``no_grad`` (or, for a student trained from the teacher-output cache of
:mod:`harness.training.teacher_cache`, the batch's precomputed teacher outputs instead: the same values,
without running the teachers), the variant's objective (computed in fp32 by the objective
itself), backward, grad-norm clip, the optimizer's step. Nothing waits for the device: the step
returns the detached loss and the logits, and the caller sums on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import variants

from harness.env import autocast


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam, as the reference; fused on CUDA (one kernel for all parameters), for-each elsewhere."""
    return torch.optim.Adam(params, lr=lr, fused=device.type == "cuda")


def make_objective(cfg: variants.VariantConfig, teachers: list[nn.Module], device: torch.device) -> nn.Module:
    """The variant's objective on ``device``; distillation losses need the teachers' width, and
    every teacher of a student must have the same one."""
    width = variants.teacher_width(cfg, [t.cfg.module_dim for t in teachers])
    return variants.objective(cfg, teacher_dim=width).to(device)


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached, fp32, on the device
    logits: torch.Tensor  # detached
    parts: dict[str, torch.Tensor]  # the objective's detached terms


@dataclass
class TrainStep:
    """``step(app, motion, questions, lengths, answers, epoch=0, teacher_outputs=None, extra=None) -> StepOutput``.

    ``extra``: the task's model inputs (``Batch.extra``: a multiple-choice batch's candidates).

    ``teachers`` are frozen (eval mode, no autograd) and run forward every step, unless the
    caller passes ``teacher_outputs``: one dict of output tensors per teacher, for this batch's
    questions in this batch's order (:meth:`harness.training.teacher_cache.TeacherOutputs.gather`); the
    teachers are then not run. ``objective`` may learn (a hint regressor) and is optimised with
    the model. fp16 (benchmarks only) uses a GradScaler on CUDA."""

    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    teachers: list[nn.Module] = field(default_factory=list)
    grad_clip: float | None = 12.0
    precision: str = "fp32"
    forward: nn.Module | None = None  # a compiled model, or None for ``model`` itself
    scaler: torch.amp.GradScaler | None = None

    def __post_init__(self):
        self.params = [*self.model.parameters(), *self.objective.parameters()]
        self.device = next(self.model.parameters()).device
        if self.scaler is None and self.precision == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def __call__(self, app, motion, questions, lengths, answers, epoch: int = 0,
                 teacher_outputs: list[dict[str, torch.Tensor]] | None = None,
                 extra: dict[str, torch.Tensor] | None = None) -> StepOutput:
        self.model.train()
        run = self.forward or self.model
        extra = extra or {}  # the task's model inputs (multiple choice: the candidates)
        with autocast(self.device, self.precision):
            out = run(app, motion, questions, lengths, **extra)
            t_outs = teacher_outputs
            if t_outs is None and self.teachers:
                with torch.no_grad():
                    t_outs = [t(app, motion, questions, lengths, **extra) for t in self.teachers]
        loss, parts = self.objective(out, answers, t_outs, epoch=epoch)
        loss = loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return StepOutput(loss.detach(), out["logits"].detach(), parts)


def build_step(cfg: variants.VariantConfig, model: nn.Module, teachers: list[nn.Module] | None = None, *,
               lr: float = 1e-4, grad_clip: float | None = 12.0, precision: str = "fp32",
               forward: nn.Module | None = None) -> TrainStep:
    """A :class:`TrainStep` for a variant: its objective (with the teachers' width) and Adam over
    the model's and the objective's parameters."""
    dev = next(model.parameters()).device
    teachers = list(teachers or [])
    if cfg.teachers and not teachers:
        raise ValueError(f"variant {cfg.name!r} distils from {cfg.teachers}: pass its teachers")
    objective = make_objective(cfg, teachers, dev)
    opt = make_optimizer([*model.parameters(), *objective.parameters()], lr, dev)
    return TrainStep(model, objective, opt, teachers, grad_clip, precision, forward)
