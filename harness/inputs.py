"""What the runner and the benchmark both ask of an untrained model: inputs shaped like the data
of its model config (random, seeded; for FLOPs counts, timings and the planner's check of the
teachers' outputs) and its parameter counts."""
from __future__ import annotations

import torch
from torch import nn


def param_counts(model: nn.Module) -> dict:
    """Total, trainable and per top-level module parameter counts."""
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "by_module": {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}}


def random_inputs(cfg: dict, batch_size: int, device, question_len: int = 12, seed: int = 0):
    """Inputs shaped like the data for a model config (lengths ragged, padded with 0)."""
    g = torch.Generator().manual_seed(seed)
    frames = cfg.get("num_frames") or 16
    app = torch.randn(batch_size, cfg["num_clips"], frames, cfg["vision_dim"], generator=g)
    mot = torch.randn(batch_size, cfg["num_clips"], cfg.get("motion_dim") or cfg["vision_dim"], generator=g)
    lengths = torch.randint(1, question_len + 1, (batch_size,), generator=g)
    q = torch.randint(1, cfg["question_vocab"], (batch_size, question_len), generator=g)
    q = q * (torch.arange(question_len) < lengths.unsqueeze(1))
    return tuple(t.to(device) for t in (app, mot, q, lengths))


def random_answers(cfg: dict, batch_size: int, device, seed: int = 0) -> torch.Tensor:
    """Answer class ids for a training step."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, cfg["answer_vocab"], (batch_size,), generator=g).to(device)
