"""Training losses: DualVGR's own objective and the registry of distillation losses.

DualVGR's loss (reference ``train.py``)::

    CE(logits, answers) + alpha * mean_l common_loss(common_app_l, common_motion_l)
                        + beta  * mean_l [HSIC(specific_app_l, common_app_l)
                                          + HSIC(specific_motion_l, common_motion_l)]

over the graph layers l, with alpha = 1 and beta = 1e-8 by default. Both auxiliary terms are
computed for the whole batch at once; the reference's HSIC loops over the batch in Python and
copies every graph output to the CPU and back. ``tests/variants/test_losses.py`` pins both against the
direct (looped) formulas and against golden values on fixed tensors.

Precision: :class:`Objective` computes every term (CE, the auxiliary terms, each distillation
loss) in fp32 whatever the model ran in: autocast is disabled inside it and the model's and the
teachers' floating-point outputs are cast with ``.float()`` first. Under bf16 autocast the model
outputs are bf16; computing e.g. a batch similarity matrix, a KL or the HSIC trace in bf16 loses
most of its digits when student and teacher are close. The autoencoder's reconstruction MSE is
computed by the model (``recon_loss``) with ``F.mse_loss``, which autocast itself runs in fp32
(on the CPU and on CUDA): the same value as the MSE of the ``.float()`` reconstruction.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .registry import Registry
from .tasks import MC_LOSS_DEFAULT, MULTIPLE_CHOICE, OPEN_ENDED, task_loss

#: the terms of a variant's own objective and their values when its ``loss`` section leaves them out;
#: ``mc_loss`` (:data:`variants.tasks.MC_LOSSES`) acts on multiple-choice runs only
LOSS_TERMS = {"alpha": 0.0, "beta": 0.0, "ce_weight": 1.0, "recon_weight": 0.0, "ae_pretrain_steps": 0,
              "mc_loss": MC_LOSS_DEFAULT}
#: loss settings that act on one task only: setting -> that task (the run id leaves them out elsewhere)
TASK_LOSS_TERMS = {"mc_loss": MULTIPLE_CHOICE}

#: Distillation losses (filled by the distillation issue); one decorated function each.
LOSSES = Registry("distillation loss")


def common_loss(emb1: torch.Tensor, emb2: torch.Tensor) -> torch.Tensor:
    """Consistency of the common graphs: mean squared difference of the two (B, N, N) cosine
    similarity matrices of node features centred over the nodes (reference ``common_loss``)."""
    emb1 = F.normalize(emb1 - emb1.mean(dim=1, keepdim=True), p=2, dim=2)
    emb2 = F.normalize(emb2 - emb2.mean(dim=1, keepdim=True), p=2, dim=2)
    cov1 = emb1 @ emb1.transpose(1, 2)
    cov2 = emb2 @ emb2.transpose(1, 2)
    return ((cov1 - cov2) ** 2).mean()


def hsic_dependence(emb1: torch.Tensor, emb2: torch.Tensor) -> torch.Tensor:
    """HSIC dependence summed over the batch (reference ``loss_dependence``)::

        sum_b trace(R K1_b R K2_b),  K = E E^T,  R = I - 1/N

    ``R @ K`` is ``K`` minus its column means, and ``trace(A @ B) = sum(A * B^T)``, so no (N, N)
    centring matrix, no batched trace and no loop over the batch are needed.
    """
    k1 = emb1 @ emb1.transpose(1, 2)
    k2 = emb2 @ emb2.transpose(1, 2)
    rk1 = k1 - k1.mean(dim=1, keepdim=True)
    rk2 = k2 - k2.mean(dim=1, keepdim=True)
    return (rk1 * rk2.transpose(1, 2)).sum()


def dualvgr_loss(out: dict, answers: torch.Tensor, alpha: float = 1.0, beta: float = 1e-8,
                 ce_weight: float = 1.0, task: str = OPEN_ENDED,
                 mc_loss: str = MC_LOSS_DEFAULT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ce_weight`` x the task's loss (CE for open-ended answers, ``mc_loss`` for multiple choice:
    HCRN's hinge or CE, MSE for a count: :mod:`variants.tasks`) plus DualVGR's auxiliary terms; returns
    (total, parts). Models without graph outputs (question-only) get the task's loss alone; a model
    with the graphs of one modality only (``variants.modality``) gets that modality's HSIC term and no
    common term (which compares the two modalities' common graphs). All values stay on the device
    (no host sync)."""
    fn, key = task_loss(task, mc_loss)
    ce = fn(out["logits"], answers)
    parts = {key: ce.detach()}
    if ce_weight != 1.0:
        ce = ce_weight * ce
    if "common_app" in out and "common_motion" in out:
        return _dual_terms(out, ce, parts, alpha, beta)
    one = "app" if "common_app" in out else "motion" if "common_motion" in out else None
    if one is None or beta == 0 or not out[f"common_{one}"]:
        return ce, parts
    layers = len(out[f"common_{one}"])
    dep = sum(hsic_dependence(s, c) for s, c in zip(out[f"specific_{one}"], out[f"common_{one}"])) / layers
    parts["hsic"] = dep.detach()
    return ce + beta * dep, parts


def _dual_terms(out: dict, ce: torch.Tensor, parts: dict, alpha: float, beta: float):
    """DualVGR's common and HSIC terms over both modalities' graph layers, added to ``ce``."""
    layers = len(out.get("common_app", ()))
    if layers == 0 or (alpha == 0 and beta == 0):
        return ce, parts
    com = sum(common_loss(a, m) for a, m in zip(out["common_app"], out["common_motion"])) / layers
    dep = sum(hsic_dependence(s, c) + hsic_dependence(sm, cm)
              for s, c, sm, cm in zip(out["specific_app"], out["common_app"],
                                      out["specific_motion"], out["common_motion"])) / layers
    parts["common"] = com.detach()
    parts["hsic"] = dep.detach()
    return ce + alpha * com + beta * dep, parts


#: floating-point dtypes the objective casts up to fp32 (float64 stays float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)


class _Fp32View(Mapping):
    """A read-only view of an output dict whose values are cast by :func:`to_fp32` when first
    read. Lazy on purpose: only the outputs a loss reads are cast, and the dict underneath sees
    exactly which keys were read (the teacher-output cache's dry run,
    ``harness.training.teacher_cache.keys_read``, relies on that; an eager copy reads every key)."""

    def __init__(self, d: dict):
        self._d = d
        self._cast: dict = {}

    def __getitem__(self, key):
        if key not in self._cast:
            self._cast[key] = to_fp32(self._d[key])
        return self._cast[key]

    def __contains__(self, key) -> bool:
        return key in self._d

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


def to_fp32(x):
    """``x`` with every bf16 / fp16 tensor (also inside dicts, lists and tuples) cast to fp32;
    other values unchanged; a dict becomes a lazily casting read-only view (:class:`_Fp32View`).
    ``.float()`` is differentiable: gradients flow back to the bf16 graph."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in LOW_PRECISION else x
    if isinstance(x, Mapping):
        return _Fp32View(x)
    if isinstance(x, (list, tuple)):
        return type(x)(to_fp32(v) for v in x)
    return x


def no_autocast(device: torch.device):
    """A context with autocast disabled on ``device``'s type (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class Objective(torch.nn.Module):
    """A variant's whole training objective: DualVGR's loss plus ``weight * loss`` for each
    distillation loss (whose learnable parts, e.g. a hint regressor, are trained with the
    student). ``forward(out, answers, teacher_outs, epoch=...) -> (total, parts)``, computed in
    fp32 outside autocast (see the module docstring)."""

    def __init__(self, loss_cfg: dict, distill: list[dict] | None = None, student_dim: int = 768,
                 teacher_dim: int = 768, task: str = OPEN_ENDED):
        super().__init__()
        self.task = task
        terms = {**LOSS_TERMS, **loss_cfg}
        self.alpha = float(terms["alpha"])
        self.beta = float(terms["beta"])
        self.ce_weight = float(terms["ce_weight"])
        self.recon_weight = float(terms["recon_weight"])
        self.pretrain_steps = int(terms["ae_pretrain_steps"])
        self.mc_loss = str(terms["mc_loss"])
        task_loss(task, self.mc_loss)  # an unknown multiple-choice loss fails here, naming it
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.kd = torch.nn.ModuleList()
        self.kd_names: list[str] = []
        self.kd_weights: list[float] = []
        for item in distill or []:
            entry = LOSSES.get(item["name"])
            try:
                module = entry.fn(student_dim=student_dim, teacher_dim=teacher_dim, **item.get("params", {}))
            except TypeError as e:
                raise ValueError(f"distillation loss {item['name']!r}: "
                                 f"bad parameters {item.get('params')}: {e}") from None
            self.kd.append(module.for_task(task))
            self.kd_names.append(item["name"])
            self.kd_weights.append(float(item.get("weight", 1.0)))

    def forward(self, out: dict, answers: torch.Tensor, teacher_outs: list[dict] | None = None, epoch: int = 0):
        """``epoch``: the 0-based training epoch (a Python int, so no host sync), passed to the
        losses whose weight follows the schedule (``progress_aware``; mdistiller passes the epoch
        the same way). Every term is computed in fp32 with autocast disabled, from fp32 copies of
        the outputs, so a bf16 run's losses equal the fp32 computation on its (bf16) outputs."""
        with no_autocast(answers.device):
            return self._forward(to_fp32(out), answers, to_fp32(teacher_outs or []), epoch)

    def _forward(self, out: dict, answers: torch.Tensor, teacher_outs: list[dict], epoch: int):
        total, parts = dualvgr_loss(out, answers, self.alpha, self.beta, self.ce_weight, self.task,
                                    self.mc_loss)
        for name, weight, module in zip(self.kd_names, self.kd_weights, self.kd):
            progress = {"epoch": epoch} if getattr(module, "progress_aware", False) else {}
            value, kd_parts = module(out, teacher_outs, answers, **progress)
            total = total + weight * value
            parts[f"kd_{name}"] = value.detach()
            parts.update({f"kd_{k}": v for k, v in kd_parts.items() if f"kd_{k}" not in parts})
        if "recon_loss" in out:
            recon = out["recon_loss"]
            parts["recon"] = recon.detach()
            total = total + self.recon_weight * recon
            if self.pretrain_steps and self.training:
                # MSVQA stage 1: reconstruction only for the first ae_pretrain_steps steps (decided on
                # the device: no host sync); stage 2 trains the whole model on the full objective
                total = torch.where(self.step < self.pretrain_steps, recon, total)
                self.step += 1
        return total, parts
