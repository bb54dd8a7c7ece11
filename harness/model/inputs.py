"""What the runner and the benchmark both ask of an untrained model: inputs shaped like the data
of its model config (random, seeded; for FLOPs counts, timings and the planner's check of the
teachers' outputs) and its parameter counts."""
from __future__ import annotations

import torch
from torch import nn

import variants
from variants.tasks import COUNT, COUNT_MAX, COUNT_MIN, MULTIPLE_CHOICE, OPEN_ENDED


def param_counts(model: nn.Module) -> dict:
    """Total, trainable and per top-level module parameter counts."""
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "by_module": {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}}


#: candidates per question in random multiple-choice inputs (TGIF-QA and NExT-QA have 5), and their length
RANDOM_CANDIDATES, RANDOM_CANDIDATE_LEN = 5, 4


def random_inputs(cfg: dict, batch_size: int, device, question_len: int = 12, seed: int = 0):
    """Inputs shaped like the data for a model config (lengths ragged, padded with 0), in the
    model's positional order: appearance, motion, questions, lengths, then the task's inputs
    (multiple choice: candidates, candidate_lengths; :func:`split_inputs` separates them)."""
    g = torch.Generator().manual_seed(seed)
    frames = cfg.get("num_frames") or 16
    app = torch.randn(batch_size, cfg["num_clips"], frames, cfg["vision_dim"], generator=g)
    mot = torch.randn(batch_size, cfg["num_clips"], cfg.get("motion_dim") or cfg["vision_dim"], generator=g)
    lengths = torch.randint(1, question_len + 1, (batch_size,), generator=g)
    q = torch.randint(1, cfg["question_vocab"], (batch_size, question_len), generator=g)
    q = q * (torch.arange(question_len) < lengths.unsqueeze(1))
    if cfg.get("modality") == "appearance":  # a one-modality model: the other stream is empty, as the loader gives it
        mot = torch.zeros(batch_size, 0)
    elif cfg.get("modality") == "motion":
        app = torch.zeros(batch_size, 0)
    extra = _random_candidates(cfg, batch_size, g) if cfg.get("task") == MULTIPLE_CHOICE else ()
    return tuple(t.to(device) for t in (app, mot, q, lengths, *extra))


def _random_candidates(cfg: dict, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    K, La = RANDOM_CANDIDATES, RANDOM_CANDIDATE_LEN
    lens = torch.randint(1, La + 1, (batch_size, K), generator=g)
    cand = torch.randint(1, cfg["question_vocab"], (batch_size, K, La), generator=g)
    return cand * (torch.arange(La) < lens.unsqueeze(-1)), lens


def split_inputs(inputs: tuple, cfg: dict) -> tuple[tuple, dict]:
    """(appearance, motion, questions, lengths) and the task's inputs by name, from :func:`random_inputs`."""
    names = variants.task(cfg.get("task", OPEN_ENDED)).inputs
    return tuple(inputs[:4]), dict(zip(names, inputs[4:]))


def random_answers(cfg: dict, batch_size: int, device, seed: int = 0) -> torch.Tensor:
    """Answers for a training step: answer class ids, candidate indices or counts (by the config's task)."""
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = {MULTIPLE_CHOICE: (0, RANDOM_CANDIDATES), COUNT: (COUNT_MIN, COUNT_MAX + 1)}.get(
        cfg.get("task", OPEN_ENDED), (0, cfg["answer_vocab"]))
    return torch.randint(lo, hi, (batch_size,), generator=g).to(device)
