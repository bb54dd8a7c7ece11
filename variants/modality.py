"""One-modality DualVGR: TeachText's modality reduction (Croitoru et al., ICCV 2021) on DualVGR.

TeachText's students use fewer modalities at test time than the teachers they are distilled from,
and lose little accuracy while computing less. Here a student sees the appearance stream only or
the motion stream only: :class:`OneModalityDualVGR` is DualVGR (:mod:`variants.dualvgr`) with the
other stream's branch removed, not zeroed: no input encoder, query punishment, specific and common
graphs or graph attention for it, and no MFB fusion (with one stream there is nothing to fuse: the
clip features go to the pooling and the head as they are). Every module it keeps has the name and
the shape it has in DualVGR, so its parameters and FLOPs are DualVGR's less exactly those of the
missing branch and the fusion (``tests/variants/test_modality.py`` checks both).

Its forward takes DualVGR's arguments and never reads the missing stream's tensor (the loader hands
it an empty one: ``harness.data.features``, whose ``modalities`` the runner takes from
:func:`variants.modalities`). Outputs: DualVGR's keys for its stream (``clip_app`` or
``clip_motion``, ``specific_*`` and ``common_*`` per graph layer), ``clip_fused`` (the clip features
after graph reasoning), ``video``, ``question`` and ``logits``; its DualVGR loss has the HSIC term
of its stream and no common term (which compares the two streams' common graphs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dualvgr import (AttentionSFGCN, CandidateAggregation, ContextSelfAttn, DualVGR, DualVGRConfig,
                      LinguisticInputUnit, PunishGAT, QueryAttn, QueryPunish, VisualAppearanceEncoder,
                      full_graph_adjacency, init_reference, output_unit)
from .tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED

#: the stream a one-modality model reads -> (its input unit's name in DualVGR, the names of its unit's modules
#: in DualVGR: query punishment, specific graphs, common graphs, graph attention; its output key suffix)
BRANCHES = {
    "appearance": ("visual_appearance_input_unit",
                   ("queryPunish_appear", "appearance_GCN", "acGCN", "attention_appearance"), "app"),
    "motion": ("visual_motion_input_unit", ("queryPunish_motion", "motion_GCN", "mcGCN", "attention_motion"),
               "motion"),
}


@dataclass
class ModalityConfig(DualVGRConfig):
    """DualVGR's settings plus ``modality``, the one stream the model reads."""

    #: "appearance" (frame features through the clip BiLSTM) or "motion" (clip features through a linear layer)
    modality: str = "appearance"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modality not in BRANCHES:
            raise ValueError(f"one-modality DualVGR: modality must be one of {', '.join(BRANCHES)}, "
                             f"got {self.modality!r}")
        off = [f"{k} = {v!r}" for k, v, none in (("keep_ratio", self.keep_ratio, 1.0), ("edge_k", self.edge_k, 0),
                                                  ("decoder_hidden", self.decoder_hidden, 0)) if v != none]
        if off:
            raise ValueError(f"one-modality DualVGR: {', '.join(off)} is not built for one stream "
                             "(node and edge sparsity and the decoders are DualVGR's)")


class OneModalityUnit(nn.Module):
    """DualVGR's reasoning unit (``variants.dualvgr.DualVGRUnit``) over one stream: per unit a
    question-word attention, the stream's query punishment, specific and common graphs and their
    attention, added to the clip features (residual). No fusion."""

    def __init__(self, modality: str, word_dim: int, module_dim: int, num_clips: int, graph_layers: int,
                 unit_layers: int):
        super().__init__()
        self.unit_layers, self.graph_layers = unit_layers, graph_layers
        self.names = BRANCHES[modality][1]
        n = unit_layers * graph_layers

        def gat() -> PunishGAT:
            return PunishGAT(module_dim, module_dim // 4, heads=4, dropout=0.15, alpha=0.01)

        punish, specific, common, attention = self.names
        self.queryAttn = nn.ModuleList(QueryAttn(module_dim) for _ in range(unit_layers))
        setattr(self, punish, nn.ModuleList(QueryPunish(word_dim, module_dim) for _ in range(unit_layers)))
        setattr(self, specific, nn.ModuleList(gat() for _ in range(n)))
        setattr(self, common, nn.ModuleList(gat() for _ in range(n)))
        setattr(self, attention, nn.ModuleList(AttentionSFGCN(module_dim, module_dim) for _ in range(unit_layers)))
        self.register_buffer("adj", full_graph_adjacency(num_clips), persistent=False)

    def forward(self, x: torch.Tensor, dynamic: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor,
                adj: torch.Tensor | None = None):
        punish, specific, common, attention = (getattr(self, n) for n in self.names)
        adj = self.adj if adj is None else adj
        specs, coms = [], []
        for i in range(self.unit_layers):
            v = x
            q, _ = self.queryAttn[i](words, dynamic, lengths)
            s = punish[i](q, v)
            for j in range(self.graph_layers):
                k = i * self.graph_layers + j
                com = common[k](v, adj, s)
                v = specific[k](v, adj, s)
                coms.append(com)
                specs.append(v)
            emb, _ = attention[i](torch.stack([com, v], dim=1))
            x = x + emb
        return x, specs, coms


class OneModalityDualVGR(nn.Module):
    """DualVGR over one stream, appearance or motion (TeachText's modality reduction; see the module docstring)."""

    SUPPORTED_TASKS = (OPEN_ENDED, MULTIPLE_CHOICE, COUNT)

    def __init__(self, cfg: ModalityConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.module_dim
        self.modality = cfg.modality
        self.feature_aggregation = ContextSelfAttn(D)
        self.linguistic_input_unit = LinguisticInputUnit(cfg.question_vocab, cfg.word_dim, D)
        if cfg.modality == "appearance":
            self.visual_appearance_input_unit = VisualAppearanceEncoder(cfg.vision_dim, D)
        else:
            self.visual_motion_input_unit = nn.Linear(cfg.motion_dim or cfg.vision_dim, D)
        self.visual_input_unit = OneModalityUnit(cfg.modality, cfg.word_dim, D, cfg.num_clips, cfg.graph_layers,
                                                 cfg.unit_layers)
        self.output_unit = output_unit(cfg)
        if cfg.task == MULTIPLE_CHOICE:
            self.candidate_aggregation = CandidateAggregation(D)
        init_reference(self)

    @property
    def word_embedding(self) -> nn.Embedding:
        return self.linguistic_input_unit.encoder_embed

    def encode(self, appearance: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """(B, N, D) clip features of the one stream read; the other argument is not touched."""
        if self.modality == "appearance":
            return self.visual_appearance_input_unit(appearance)
        return self.visual_motion_input_unit(motion)

    #: the head's output, DualVGR's own (the same head modules under the same names)
    answer = DualVGR.answer

    def forward(self, appearance: torch.Tensor, motion: torch.Tensor, questions: torch.Tensor,
                lengths: torch.Tensor, candidates: torch.Tensor | None = None,
                candidate_lengths: torch.Tensor | None = None, adj: torch.Tensor | None = None) -> dict:
        question, words, dynamic = self.linguistic_input_unit(questions, lengths)
        x = self.encode(appearance, motion)
        if adj is None and x.shape[1] != self.cfg.num_clips:
            adj = full_graph_adjacency(x.shape[1], x.device, x.dtype)
        fused, specs, coms = self.visual_input_unit(x, dynamic, words, lengths, adj)
        video = self.feature_aggregation(fused)
        logits = self.answer(question, video, fused, candidates, candidate_lengths)
        key = BRANCHES[self.modality][2]
        return {"logits": logits, "clip_fused": fused, f"clip_{key}": fused, "video": video, "question": question,
                f"specific_{key}": specs, f"common_{key}": coms}
