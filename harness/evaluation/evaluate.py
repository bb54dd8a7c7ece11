"""Evaluation: argmax predictions for a split, per-question-type accuracy, and the
evaluation-time ablations that show which evidence each question type uses."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from harness.data import dataset as D
import variants
from variants.tasks import OPEN_ENDED

from harness.env import autocast
from harness.evaluation import metrics as M

#: evaluation-time ablations and their labels (runner, report and CLI use these)
ABLATIONS: dict[str, str] = {"shuffle_video": "videos shuffled", "zero_appearance": "appearance zeroed",
                             "zero_motion": "motion zeroed"}


@torch.no_grad()
def predict(model: torch.nn.Module, split: D.SplitData, features: D.Features, batch_size: int,
            device: torch.device, feature_transform=None, precision: str = "fp32",
            task: str = OPEN_ENDED) -> tuple[torch.Tensor, dict]:
    """The task's predictions for a split (argmax over answers or candidates, a rounded count:
    :mod:`variants.tasks`), kept on the device until the end (one transfer), and the
    split's mean of each scalar model output a registered metric needs (``harness.evaluation.metrics``; e.g.
    the reconstruction error of models that reconstruct their input), for the outputs the model gives."""
    model.eval()
    preds, sums = [], {}
    wanted = M.needed_outputs()
    read = variants.task(task).predict
    for b in D.iterate_batches(split, features, batch_size, device=device):
        app, mot = (b.appearance, b.motion) if feature_transform is None else feature_transform(b)
        with autocast(device, precision):
            out = model(app, mot, b.questions, b.lengths, **b.extra)
        preds.append(read(out["logits"]))
        for k in wanted & out.keys():
            sums.setdefault(k, []).append(out[k].float() * b.answers.shape[0])
    means = {k: float(torch.stack(v).sum()) / len(split) for k, v in sums.items()}
    return torch.cat(preds).cpu(), means


def ablated(split: D.SplitData, name: str, seed: int = 0):
    """(split, feature_transform) for an evaluation-time ablation: ``shuffle_video`` pairs every
    question with another question's video (a fixed permutation), ``zero_appearance`` /
    ``zero_motion`` replace that stream by zeros."""
    if name == "shuffle_video":
        perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).to(split.video_rows.device)
        return dataclasses.replace(split, video_rows=split.video_rows[perm]), None
    if name == "zero_appearance":
        return split, lambda b: (torch.zeros_like(b.appearance), b.motion)
    if name == "zero_motion":
        return split, lambda b: (b.appearance, torch.zeros_like(b.motion))
    raise ValueError(f"unknown ablation {name!r} (known: {', '.join(ABLATIONS)})")


def evaluate(model, split: D.SplitData, features: D.Features, type_names: list[str], batch_size: int,
             device: torch.device, ablation: str | None = None, precision: str = "fp32",
             task: str = OPEN_ENDED) -> tuple[dict, np.ndarray]:
    """Every registered metric of ``model`` on ``split`` (``harness.evaluation.metrics``: per-type accuracy, the
    reconstruction error...), as a record stores them, and its predictions."""
    transform = None
    if ablation is not None:
        split, transform = ablated(split, ablation)
    pred, outputs = predict(model, split, features, batch_size, device, transform, precision, task)
    pred = pred.numpy()
    ev = M.Evaluated(pred, split.answers.cpu().numpy(), split.qtypes.cpu().numpy(), type_names, outputs, task)
    return M.compute_all(ev), pred
