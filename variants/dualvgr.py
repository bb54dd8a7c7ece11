"""DualVGR (Wang et al., IEEE TMM 2021), re-implemented from the reference NJUPT-MCC/DualVGR-VideoQA.

Same modules, dimensions, dropouts, initialisation and forward semantics as the reference
``model/models.py::DualVGR`` with ``graph_module='GAT'``, so the parameter count (total and per
top-level module) equals the reference's for the same configuration
(``tests/variants/test_dualvgr_params.py`` checks every configuration in ``dualvgr_params.json``).

Where this file deliberately differs from the reference, it says so next to the code:

* Graph-layer indexing: the reference picks the GAT of unit ``i``, layer ``j`` as ``i + j``,
  which reuses modules and leaves others unused when both ``unit_layers`` and ``graph_layers``
  exceed 1. We use ``i * graph_layers + j`` (fixed bug; identical when either is 1).
* Ragged question lengths are handled with masks and per-sample index reversal instead of
  ``pack_padded_sequence`` (which needs the lengths on the host: a device->host sync per step).
  Outputs, final states and gradients are identical (``tests/variants/test_dualvgr_equivalence.py``).
* The four heads of a GAT are computed as one matrix product, and the attention logits
  ``a . [Wh_i || Wh_j]`` are computed as ``a_src . Wh_i + a_dst . Wh_j`` without materialising the
  (batch, N, N, 2F) pair tensor. Same parameters (count, shapes per head, init), same function
  (tested against the direct per-head pair formula).
* No hard-coded ``cuda:1``; no ``.cpu()`` copies of intermediate graph outputs; the word mask is
  built with a vectorised comparison instead of a Python loop over the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED

# ----------------------------------------------------------------------------- helpers


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True on real tokens. No host sync."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of a batch-first padded tensor within its own length.

    Position t < len maps to len-1-t; padding positions stay where they are. The map is its own
    inverse, so applying it twice restores ``x``.
    """
    B, L = x.shape[:2]
    t = torch.arange(L, device=x.device).unsqueeze(0).expand(B, L)
    lens = lengths.unsqueeze(1)
    idx = torch.where(t < lens, lens - 1 - t, t)
    return x.gather(1, idx.unsqueeze(-1).expand_as(x))


def run_lstm(lstm: nn.LSTM, x: torch.Tensor):
    """``lstm(x)``, except on CUDA under bf16 autocast: there PyTorch's autocast wrapper for cuDNN
    RNNs (ATen ``cudnn/AutocastRNN.cpp``) casts to fp16 whatever the autocast dtype, so "bf16"
    would train the LSTMs in fp16 without loss scaling. They run outside autocast instead, in
    fp32 (TF32 as ``harness.env.TF32`` sets it; ``harness.env.lstm_precision`` names it in every
    record). CPU autocast (oneDNN's bf16 LSTM) and fp16 autocast are left as they are."""
    if x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
        with torch.autocast("cuda", enabled=False):
            return lstm(x.float())
    return lstm(x)


class MaskedBiLSTM(nn.Module):
    """A one-layer bidirectional LSTM over right-padded, batch-first sequences.

    Equivalent to ``nn.LSTM(bidirectional=True)`` applied to ``pack_padded_sequence(x, lengths)``
    followed by ``pad_packed_sequence`` (outputs zero past each length, padded to ``x.size(1)``),
    and returning the final hidden state of both directions. The reference packs, which needs the
    lengths on the CPU; here the forward direction runs over the padded sequence (positions
    before ``len`` never see padding) and the backward direction runs over each sequence
    reversed within its length. Parameters: two unidirectional ``nn.LSTM`` with exactly the
    shapes of the reference's forward and ``_reverse`` weights.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.fwd = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.bwd = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = x.shape[:2]
        out_f, _ = run_lstm(self.fwd, x)
        out_b_rev, _ = run_lstm(self.bwd, reverse_padded(x, lengths))
        last = (lengths - 1).clamp(min=0).view(B, 1, 1)
        h_f = out_f.gather(1, last.expand(B, 1, out_f.size(-1))).squeeze(1)
        h_b = out_b_rev.gather(1, last.expand(B, 1, out_b_rev.size(-1))).squeeze(1)
        out_b = reverse_padded(out_b_rev, lengths)
        mask = length_mask(lengths, L).unsqueeze(-1).to(x.dtype)
        out = torch.cat([out_f, out_b], dim=-1) * mask
        return out, torch.cat([h_f, h_b], dim=-1)


# ----------------------------------------------------------------------------- input units


class LinguisticInputUnit(nn.Module):
    """Reference ``InputUnitLinguisticDynamic``: word embedding, tanh(dropout), two BiLSTMs.

    ``concatRNN`` gives the per-word (dynamic) question features; ``encoder`` gives the sentence
    embedding (final hidden states of both directions, dropout 0.18).
    """

    def __init__(self, vocab_size: int, word_dim: int = 300, module_dim: int = 768):
        super().__init__()
        self.encoder_embed = nn.Embedding(vocab_size, word_dim)
        self.concatRNN = MaskedBiLSTM(word_dim, module_dim // 2)
        self.encoder = MaskedBiLSTM(word_dim, module_dim // 2)
        self.embedding_dropout = nn.Dropout(0.15)
        self.final_dropout = nn.Dropout(0.18)

    def forward(self, questions: torch.Tensor, lengths: torch.Tensor):
        words = torch.tanh(self.embedding_dropout(self.encoder_embed(questions)))
        dynamic, _ = self.concatRNN(words, lengths)
        _, sentence = self.encoder(words, lengths)
        return self.final_dropout(sentence), words, dynamic


class VisualAppearanceEncoder(nn.Module):
    """Reference ``VisualAppearanceEncoder``: a BiLSTM over the frames of each clip; the clip
    feature is the concatenated final hidden state of both directions."""

    def __init__(self, vision_dim: int = 2048, module_dim: int = 768):
        super().__init__()
        self.module_dim = module_dim
        self.encoder = nn.LSTM(vision_dim, module_dim // 2, batch_first=True, bidirectional=True)
        self.embedding_dropout = nn.Dropout(0.15)
        self.finalvisual_dropout = nn.Dropout(0.18)

    def forward(self, appearance: torch.Tensor) -> torch.Tensor:
        B, N, T, D = appearance.shape
        x = torch.tanh(self.embedding_dropout(appearance)).reshape(B * N, T, D)
        _, (h, _) = run_lstm(self.encoder, x)
        h = torch.cat([h[0], h[1]], dim=-1)
        return self.finalvisual_dropout(h).view(B, N, self.module_dim)


# ----------------------------------------------------------------------------- reasoning unit


class QueryAttn(nn.Module):
    """Question-word attention: a weighted sum of the word embeddings, masked to real words."""

    def __init__(self, module_dim: int = 768):
        super().__init__()
        self.feat_enhance = nn.Linear(module_dim, module_dim)
        self.fc = nn.Linear(module_dim, 1)

    def forward(self, words: torch.Tensor, dynamic: torch.Tensor, lengths: torch.Tensor):
        h = F.normalize(self.feat_enhance(dynamic), p=2, dim=-1)
        attn = torch.softmax(self.fc(h).squeeze(-1), dim=1)
        attn = attn * length_mask(lengths, attn.size(1)).to(attn.dtype)
        attn = attn / (attn.sum(1, keepdim=True) + 1e-5)
        return torch.bmm(attn.unsqueeze(1), words).squeeze(1), attn


class QueryPunish(nn.Module):
    """Question-guided clip relevance in (0, 1): sigmoid(<clip, W q>), one score per clip.

    The reference expands the (B, N, 1) scores to (B, N, module_dim // 4) before multiplying
    the per-head features; broadcasting the (B, N, 1) tensor is the same product.
    """

    def __init__(self, word_dim: int = 300, module_dim: int = 768):
        super().__init__()
        self.query_weight = nn.Linear(word_dim, module_dim)

    def forward(self, question: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        query = self.query_weight(question)
        return torch.sigmoid(torch.bmm(visual, query.unsqueeze(2)))


class PunishGAT(nn.Module):
    """Multi-head graph attention with query punishment (reference ``punishGAT``).

    Per head h (the reference's ``attention_h`` = ``PunishGraphAttentionLayer``)::

        Wh = W_h x;  e_ij = LeakyReLU_0.01(a_h . [Wh_i || Wh_j] + b_h), masked by adj > 0
        out_h = ELU(dropout(softmax_j(e)) @ (Wh * scores))

    and the heads are concatenated, with dropout on input and output. Parameters per head:
    ``W_h`` (F x D weight, F bias) and ``a_h`` (2F weight, 1 bias), as in the reference; they
    are stored stacked over heads (``W``: (H*F, D), ``a``: (H, 2F), ``a_bias``: (H,)), so the
    heads run as one product, and ``a_h . [Wh_i || Wh_j]`` is split into a source term plus a
    target term (no (B, N, N, 2F) tensor).
    """

    def __init__(self, in_dim: int, head_dim: int, heads: int = 4, dropout: float = 0.15,
                 alpha: float = 0.01):
        super().__init__()
        self.in_dim, self.head_dim, self.heads = in_dim, head_dim, heads
        self.dropout, self.alpha = dropout, alpha
        self.W = nn.Linear(in_dim, heads * head_dim)
        self.a = nn.Parameter(torch.empty(heads, 2 * head_dim))
        self.a_bias = nn.Parameter(torch.empty(heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's final init (``init_modules(..., 'xavier_uniform')`` over every
        ``nn.Linear``), applied per head: W_h ~ U(+-sqrt(6/(D+F))), a_h ~ U(+-sqrt(6/(2F+1))),
        biases zero."""
        bw = math.sqrt(6.0 / (self.in_dim + self.head_dim))
        ba = math.sqrt(6.0 / (2 * self.head_dim + 1))
        with torch.no_grad():
            self.W.weight.uniform_(-bw, bw)
            self.W.bias.zero_()
            self.a.uniform_(-ba, ba)
            self.a_bias.zero_()

    def attention_logits(self, wh: torch.Tensor) -> torch.Tensor:
        """wh: (B, H, N, F) -> e: (B, H, N, N), e[b,h,i,j] = a_h . [wh_i || wh_j] + b_h."""
        src = torch.einsum("bhnf,hf->bhn", wh, self.a[:, : self.head_dim])
        dst = torch.einsum("bhnf,hf->bhn", wh, self.a[:, self.head_dim:])
        e = src.unsqueeze(-1) + dst.unsqueeze(-2) + self.a_bias.view(1, -1, 1, 1)
        return F.leaky_relu(e, self.alpha)

    def forward(self, x: torch.Tensor, adj: torch.Tensor | None, scores: torch.Tensor | None):
        B, N, _ = x.shape
        x = F.dropout(x, self.dropout, self.training)
        wh = self.W(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, F)
        e = self.attention_logits(wh)
        if adj is not None:  # (N, N) shared, or (B, N, N) per sample
            e = e.masked_fill((adj if adj.dim() == 2 else adj.unsqueeze(1)) <= 0, -9e15)
        if scores is not None:
            wh = wh * scores.unsqueeze(1)  # (B, 1, N, 1)
        attn = F.dropout(torch.softmax(e, dim=-1), self.dropout, self.training)
        h = F.elu(attn @ wh)  # (B, H, N, F)
        h = h.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        return F.dropout(h, self.dropout, self.training)


class AttentionSFGCN(nn.Module):
    """Attention over {common, specific} graph outputs (reference ``AttentionSFGCN``)."""

    def __init__(self, in_size: int, hidden_size: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_size, hidden_size), nn.Tanh(),
                                     nn.Linear(hidden_size, 1, bias=False))

    def forward(self, z: torch.Tensor):  # z: (B, 2, N, D)
        beta = torch.softmax(self.project(z), dim=1)
        return (beta * z).sum(1), beta


class MFB(nn.Module):
    """Multi-modal factorised bilinear pooling (reference ``fusions.MFB``, ELU in and out)."""

    def __init__(self, input_dims: tuple[int, int], output_dim: int, mm_dim: int = 256,
                 factor: int = 2):
        super().__init__()
        self.mm_dim, self.factor = mm_dim, factor
        self.linear0 = nn.Linear(input_dims[0], mm_dim * factor)
        self.linear1 = nn.Linear(input_dims[1], mm_dim * factor)
        self.linear_out = nn.Linear(mm_dim, output_dim)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        z = F.elu(self.linear0(x0)) * F.elu(self.linear1(x1))
        z = z.view(*z.shape[:-1], self.mm_dim, self.factor).sum(-1)
        return F.elu(self.linear_out(z))


def full_graph_adjacency(num_nodes: int, device: torch.device | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference's adjacency: all-ones plus self loops, row-normalised (every entry > 0).
    Built where it is used (``device``): no host-to-device copy, which would block every forward."""
    adj = torch.ones(num_nodes, num_nodes, device=device, dtype=dtype) + torch.eye(num_nodes, device=device,
                                                                                    dtype=dtype)
    return adj / adj.sum(1, keepdim=True)


class DualVGRUnit(nn.Module):
    """Reference ``DualVGRUnit_multiple`` with GAT graphs (the ``visual_input_unit``)."""

    def __init__(self, word_dim: int = 300, module_dim: int = 768, num_clips: int = 8,
                 graph_layers: int = 1, unit_layers: int = 1, mm_dim: int = 256):
        super().__init__()
        self.unit_layers, self.graph_layers = unit_layers, graph_layers
        n = unit_layers * graph_layers

        def gat() -> PunishGAT:
            return PunishGAT(module_dim, module_dim // 4, heads=4, dropout=0.15, alpha=0.01)

        self.queryAttn = nn.ModuleList(QueryAttn(module_dim) for _ in range(unit_layers))
        self.queryPunish_appear = nn.ModuleList(QueryPunish(word_dim, module_dim) for _ in range(unit_layers))
        self.queryPunish_motion = nn.ModuleList(QueryPunish(word_dim, module_dim) for _ in range(unit_layers))
        self.appearance_GCN = nn.ModuleList(gat() for _ in range(n))  # specific graphs
        self.motion_GCN = nn.ModuleList(gat() for _ in range(n))
        self.acGCN = nn.ModuleList(gat() for _ in range(n))  # common graphs
        self.mcGCN = nn.ModuleList(gat() for _ in range(n))
        self.attention_appearance = nn.ModuleList(AttentionSFGCN(module_dim, module_dim) for _ in range(unit_layers))
        self.attention_motion = nn.ModuleList(AttentionSFGCN(module_dim, module_dim) for _ in range(unit_layers))
        # mm_dim stays 256 whatever module_dim is, as in the reference.
        self.visualfusion = MFB((module_dim, module_dim), module_dim, mm_dim=mm_dim)
        self.register_buffer("adj", full_graph_adjacency(num_clips), persistent=False)

    def forward(self, app: torch.Tensor, motion: torch.Tensor, dynamic: torch.Tensor,
                words: torch.Tensor, lengths: torch.Tensor, adj: torch.Tensor | None = None):
        adj = self.adj if adj is None else adj
        aux: dict[str, list[torch.Tensor]] = {"specific_app": [], "common_app": [],
                                              "specific_motion": [], "common_motion": []}
        for i in range(self.unit_layers):
            a, m = app, motion
            q, _ = self.queryAttn[i](words, dynamic, lengths)
            s_app = self.queryPunish_appear[i](q, a)
            s_mot = self.queryPunish_motion[i](q, m)
            for j in range(self.graph_layers):
                k = i * self.graph_layers + j  # reference: i + j (wrong when both > 1)
                com_a = self.acGCN[k](a, adj, s_app)
                a = self.appearance_GCN[k](a, adj, s_app)
                aux["common_app"].append(com_a)
                aux["specific_app"].append(a)
            for j in range(self.graph_layers):
                k = i * self.graph_layers + j
                com_m = self.mcGCN[k](m, adj, s_mot)
                m = self.motion_GCN[k](m, adj, s_mot)
                aux["common_motion"].append(com_m)
                aux["specific_motion"].append(m)
            a_emb, _ = self.attention_appearance[i](torch.stack([com_a, a], dim=1))
            m_emb, _ = self.attention_motion[i](torch.stack([com_m, m], dim=1))
            app = app + a_emb
            motion = motion + m_emb
        fused = self.visualfusion(app, motion)
        return fused, app, motion, aux


class ContextSelfAttn(nn.Module):
    """Self-attention pooling over clips (reference ``ContextSelfAttn``, the ``feature_aggregation``)."""

    def __init__(self, module_dim: int = 768):
        super().__init__()
        self.v_proj = nn.Linear(module_dim, module_dim, bias=False)
        self.attn = nn.Linear(module_dim, 1)
        self.dropout = nn.Dropout(0.15)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        visual = self.dropout(visual)
        attn = torch.softmax(self.attn(F.elu(self.v_proj(visual))), dim=1)
        return (attn * visual).sum(1)


class OutputUnitOpenEnded(nn.Module):
    """Reference ``SimpleOutputUnitOpenEnded``: concat(video, projected question) -> MLP.

    ``visual_dim=0`` gives the question-only classifier (no video input).
    """

    def __init__(self, module_dim: int = 768, num_answers: int = 1000, visual_dim: int | None = None):
        super().__init__()
        visual_dim = module_dim if visual_dim is None else visual_dim
        self.question_proj = nn.Linear(module_dim, module_dim)
        self.classifier = nn.Sequential(
            nn.Dropout(0.15), nn.Linear(visual_dim + module_dim, module_dim), nn.ELU(),
            nn.BatchNorm1d(module_dim), nn.Dropout(0.15), nn.Linear(module_dim, num_answers))

    def forward(self, question: torch.Tensor, visual: torch.Tensor | None = None) -> torch.Tensor:
        q = self.question_proj(question)
        x = q if visual is None else torch.cat([visual, q], dim=1)
        return self.classifier(x)


class CandidateAggregation(nn.Module):
    """HCRN's ``FeatureAggregation``: the clip features pooled by attention conditioned on a query
    (here each encoded candidate answer), for the multiple-choice head. DualVGR's own pooling
    (:class:`ContextSelfAttn`) takes no query: its clips are already question-conditioned."""

    def __init__(self, module_dim: int = 768):
        super().__init__()
        self.q_proj = nn.Linear(module_dim, module_dim, bias=False)
        self.v_proj = nn.Linear(module_dim, module_dim, bias=False)
        self.cat = nn.Linear(2 * module_dim, module_dim)
        self.attn = nn.Linear(module_dim, 1)
        self.dropout = nn.Dropout(0.15)

    def forward(self, query: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        visual = self.dropout(visual)
        v = self.v_proj(visual)
        x = F.elu(self.cat(torch.cat([v, self.q_proj(query).unsqueeze(1) * v], dim=-1)))
        attn = torch.softmax(self.attn(x), dim=1)
        return (attn * visual).sum(1)


class OutputUnitMultiChoices(nn.Module):
    """HCRN's ``OutputUnitMultiChoices``: one score per (question, candidate) pair from the
    question-conditioned video, the question, the candidate-conditioned video and the candidate.
    ``visual=False``: the question-only model's head (question and candidate only)."""

    def __init__(self, module_dim: int = 768, visual: bool = True):
        super().__init__()
        self.question_proj = nn.Linear(module_dim, module_dim)
        self.ans_candidates_proj = nn.Linear(module_dim, module_dim)
        width = module_dim * (4 if visual else 2)
        self.classifier = nn.Sequential(nn.Dropout(0.15), nn.Linear(width, module_dim), nn.ELU(),
                                        nn.BatchNorm1d(module_dim), nn.Dropout(0.15), nn.Linear(module_dim, 1))

    def forward(self, question, candidates, q_visual=None, a_visual=None) -> torch.Tensor:
        parts = [self.question_proj(question), self.ans_candidates_proj(candidates)]
        if q_visual is not None:
            parts = [q_visual, parts[0], a_visual, parts[1]]  # HCRN's order
        return self.classifier(torch.cat(parts, dim=1))


def output_unit(cfg: "DualVGRConfig", visual: bool = True) -> nn.Module:
    """The head of ``cfg.task``: open-ended classification over the answers (the reference's), one
    score per candidate (multiple choice), or one number (count: HCRN's ``OutputUnitCount``, which
    is the open-ended unit with a single output)."""
    D, vdim = cfg.module_dim, None if visual else 0
    if cfg.task == MULTIPLE_CHOICE:
        return OutputUnitMultiChoices(D, visual)
    return OutputUnitOpenEnded(D, 1 if cfg.task == COUNT else cfg.answer_vocab, visual_dim=vdim)


def encode_candidates(linguistic: "LinguisticInputUnit", candidates: torch.Tensor, lengths: torch.Tensor):
    """(B*K, D) sentence embeddings of (B, K, La) candidate answers, sample-major (HCRN's ``batch_agg``)."""
    B, K, La = candidates.shape
    emb, _, _ = linguistic(candidates.reshape(B * K, La), lengths.reshape(B * K))
    return emb


def need_candidates(candidates, lengths) -> None:
    if candidates is None or lengths is None:
        raise ValueError("a multiple-choice model needs candidates (B, K, La) and candidate_lengths (B, K)")


# ----------------------------------------------------------------------------- init


def init_reference(model: nn.Module) -> None:
    """The reference's initialisation: xavier_uniform for every Linear and LSTM weight, zero
    biases (``init_modules(model.modules(), 'xavier_uniform')``), then the word embedding
    ~ U(-1, 1). Modules with a ``reset_parameters`` of their own that stacks reference
    sub-modules (``PunishGAT``) re-apply it so bounds are per reference sub-module."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LSTM, nn.GRU)):
            for name, p in m.named_parameters():
                if "bias" in name:
                    nn.init.zeros_(p)
                elif "weight" in name:
                    nn.init.xavier_uniform_(p)
    for m in model.modules():
        if isinstance(m, PunishGAT):
            m.reset_parameters()
        if isinstance(m, LinguisticInputUnit):
            nn.init.uniform_(m.encoder_embed.weight, -1.0, 1.0)


# ----------------------------------------------------------------------------- models


def kept_clips(keep_ratio: float, num_clips: int) -> int:
    """Clips node sparsity keeps: ``keep_ratio * num_clips`` rounded to a whole clip (at least 1),
    e.g. 2 of 4 and 5 of 8 at 0.6. Records and report labels state this count."""
    return max(1, int(round(keep_ratio * int(num_clips))))


@dataclass
class DualVGRConfig:
    question_vocab: int = 4000
    answer_vocab: int = 1000
    vision_dim: int = 2048
    #: motion feature dim when it differs from the appearance dim (e.g. 512 for torchvision's video
    #: models, see ``harness.data.prepare``); None = vision_dim, as in the reference (ResNeXt-101, 2048)
    motion_dim: int | None = None
    module_dim: int = 768
    word_dim: int = 300
    num_clips: int = 8
    num_frames: int | None = None  # not a parameter shape; recorded for validation only
    unit_layers: int = 1
    graph_layers: int = 1
    mm_dim: int = 256
    #: node sparsity (SViTT): keep this fraction of clips, the most question-relevant, before
    #: the appearance encoder and graph reasoning (1.0 = all clips, the reference)
    keep_ratio: float = 1.0
    #: edge sparsity (SViTT): each clip attends to itself and its edge_k nearest clips, by
    #: ``edge_by`` = "time" (clip index) or "feature" (cosine similarity); 0 = full graph
    edge_k: int = 0
    edge_by: str = "time"
    #: autoencoder (MSVQA): hidden width of the decoders that reconstruct each clip's appearance
    #: frames and motion feature from its clip representation; 0 = no decoders (the reference)
    decoder_hidden: int = 0
    #: what the model answers (variants.tasks): its head; set from the data set, not by hand
    task: str = OPEN_ENDED

    def __post_init__(self) -> None:
        if self.task not in (OPEN_ENDED, MULTIPLE_CHOICE, COUNT):
            raise ValueError(f"DualVGR config: task must be one of {OPEN_ENDED}, {MULTIPLE_CHOICE}, {COUNT}; "
                             f"got {self.task!r}")
        for k in ("question_vocab", "answer_vocab", "vision_dim", "module_dim", "word_dim",
                  "num_clips", "unit_layers", "graph_layers", "mm_dim"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DualVGR config: {k} must be a positive integer, got {v!r}")
        if self.motion_dim is not None and (not isinstance(self.motion_dim, int) or self.motion_dim < 1):
            raise ValueError(f"DualVGR config: motion_dim must be a positive integer or None, got {self.motion_dim!r}")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"DualVGR config: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if not isinstance(self.edge_k, int) or self.edge_k < 0:
            raise ValueError(f"DualVGR config: edge_k must be a non-negative integer, got {self.edge_k!r}")
        if self.edge_by not in ("time", "feature"):
            raise ValueError(f"DualVGR config: edge_by must be 'time' or 'feature', got {self.edge_by!r}")
        if not isinstance(self.decoder_hidden, int) or self.decoder_hidden < 0:
            raise ValueError("DualVGR config: decoder_hidden must be a non-negative integer, "
                             f"got {self.decoder_hidden!r}")
        if self.keep_ratio < 1.0 and kept_clips(self.keep_ratio, self.num_clips) >= self.num_clips:
            raise ValueError(f"DualVGR config: keep_ratio {self.keep_ratio!r} keeps all {self.num_clips} clips "
                             f"(round({self.keep_ratio!r} x {self.num_clips}) = {self.num_clips}): node sparsity "
                             f"would drop nothing and cost more than the dense model; use a keep_ratio below "
                             f"{(self.num_clips - 0.5) / self.num_clips:g}, or 1.0")
        if self.decoder_hidden and self.keep_ratio < 1.0:
            raise ValueError("DualVGR config: the autoencoder (decoder_hidden > 0) reconstructs every clip; "
                             "it cannot be combined with node sparsity (keep_ratio < 1)")
        if self.module_dim % 8:
            raise ValueError(f"DualVGR config: module_dim must be divisible by 8 (4 GAT heads of "
                             f"module_dim/4, BiLSTMs of module_dim/2), got {self.module_dim}")


class DualVGR(nn.Module):
    """DualVGR with GAT graphs. ``forward`` returns a dict:

    ``logits`` (B, answers); ``clip_fused`` (B, N, D) the MFB-fused per-clip visual feature;
    ``clip_app`` / ``clip_motion`` (B, N, D) the clip features just before that fusion;
    ``video`` (B, D) pooled visual embedding; ``question`` (B, D) sentence embedding;
    ``specific_app``, ``common_app``, ``specific_motion``, ``common_motion``: one (B, N, D)
    tensor per graph layer (inputs of the DualVGR auxiliary losses).

    Tasks (``cfg.task``, :mod:`variants.tasks`): open-ended (the reference), multiple choice
    (``logits`` (B, K): HCRN's head on the candidates, which take ``candidates`` (B, K, La) and
    ``candidate_lengths`` (B, K) and are encoded by the question encoder) and count (``logits`` (B, 1)).
    """

    SUPPORTED_TASKS = (OPEN_ENDED, MULTIPLE_CHOICE, COUNT)

    def __init__(self, cfg: DualVGRConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.module_dim
        self.feature_aggregation = ContextSelfAttn(D)
        self.linguistic_input_unit = LinguisticInputUnit(cfg.question_vocab, cfg.word_dim, D)
        self.visual_appearance_input_unit = VisualAppearanceEncoder(cfg.vision_dim, D)
        motion_dim = cfg.motion_dim or cfg.vision_dim
        self.visual_motion_input_unit = nn.Linear(motion_dim, D)
        self.visual_input_unit = DualVGRUnit(cfg.word_dim, D, cfg.num_clips, cfg.graph_layers,
                                             cfg.unit_layers, cfg.mm_dim)
        self.output_unit = output_unit(cfg)
        if cfg.task == MULTIPLE_CHOICE:
            self.candidate_aggregation = CandidateAggregation(D)
        if cfg.decoder_hidden:
            frames = cfg.num_frames or 16
            self.appearance_decoder = nn.Sequential(nn.Linear(D, cfg.decoder_hidden), nn.ELU(),
                                                    nn.Linear(cfg.decoder_hidden, frames * cfg.vision_dim))
            self.motion_decoder = nn.Sequential(nn.Linear(D, cfg.decoder_hidden), nn.ELU(),
                                                nn.Linear(cfg.decoder_hidden, motion_dim))
        init_reference(self)

    @property
    def word_embedding(self) -> nn.Embedding:
        return self.linguistic_input_unit.encoder_embed

    def kept_clips(self, num_clips: int) -> int:
        return kept_clips(self.cfg.keep_ratio, num_clips)

    def select_clips(self, appearance, motion, mot, words, dynamic, lengths):
        """Node sparsity: keep the k most question-relevant clips (relevance = unit 1's query
        punishment score on the motion clip features, cheap to compute before the appearance
        BiLSTM), in temporal order. Everything after runs on k clips only."""
        unit = self.visual_input_unit
        q, _ = unit.queryAttn[0](words, dynamic, lengths)
        rel = unit.queryPunish_motion[0](q, mot).squeeze(-1)  # (B, N)
        idx = rel.topk(self.kept_clips(motion.shape[1]), dim=1).indices.sort(dim=1).values
        mot = mot.gather(1, idx.unsqueeze(-1).expand(-1, -1, mot.shape[-1]))
        appearance = appearance.gather(1, idx.view(*idx.shape, 1, 1).expand(-1, -1, *appearance.shape[2:]))
        return appearance, mot, idx

    def graph_adjacency(self, app: torch.Tensor, mot: torch.Tensor) -> torch.Tensor | None:
        """None (the reference's full graph) unless the clip count changed or edges are sparse."""
        B, N, _ = app.shape
        k = self.cfg.edge_k
        if not k or k >= N - 1:
            return None if N == self.cfg.num_clips else full_graph_adjacency(N, app.device, app.dtype)
        if self.cfg.edge_by == "time":
            t = torch.arange(N, device=app.device, dtype=app.dtype)
            score = -(t.view(-1, 1) - t.view(1, -1)).abs() - 1e-3 * t.view(1, -1)  # nearest, earlier first
            nearest = score.topk(k + 1, dim=1).indices  # includes the clip itself
            return torch.zeros(N, N, device=app.device, dtype=app.dtype).scatter_(1, nearest, 1.0)
        x = F.normalize((app + mot).detach(), dim=-1)
        score = x @ x.transpose(1, 2)
        score = score + 2.0 * torch.eye(N, device=app.device, dtype=app.dtype)  # self always kept
        nearest = score.topk(k + 1, dim=2).indices
        return torch.zeros(B, N, N, device=app.device, dtype=app.dtype).scatter_(2, nearest, 1.0)

    def answer(self, question, video, fused, candidates=None, candidate_lengths=None) -> torch.Tensor:
        """The head's output: answer scores, candidate scores (B, K) or the count (B, 1)."""
        if self.cfg.task != MULTIPLE_CHOICE:
            return self.output_unit(question, video)
        need_candidates(candidates, candidate_lengths)
        K = candidates.shape[1]
        cand = encode_candidates(self.linguistic_input_unit, candidates, candidate_lengths)
        a_visual = self.candidate_aggregation(cand, fused.repeat_interleave(K, 0))
        scores = self.output_unit(question.repeat_interleave(K, 0), cand, video.repeat_interleave(K, 0), a_visual)
        return scores.view(-1, K)

    def forward(self, appearance: torch.Tensor, motion: torch.Tensor, questions: torch.Tensor,
                lengths: torch.Tensor, candidates: torch.Tensor | None = None,
                candidate_lengths: torch.Tensor | None = None, adj: torch.Tensor | None = None) -> dict:
        question, words, dynamic = self.linguistic_input_unit(questions, lengths)
        mot = self.visual_motion_input_unit(motion)
        extra = {}
        if self.cfg.keep_ratio < 1.0:
            appearance, mot, extra["kept_clips"] = self.select_clips(appearance, motion, mot, words, dynamic, lengths)
        app = self.visual_appearance_input_unit(appearance)
        if adj is None:
            adj = self.graph_adjacency(app, mot)
        fused, clip_app, clip_mot, aux = self.visual_input_unit(app, mot, dynamic, words, lengths, adj)
        video = self.feature_aggregation(fused)
        logits = self.answer(question, video, fused, candidates, candidate_lengths)
        if self.cfg.decoder_hidden:
            recon_app = self.appearance_decoder(clip_app).view_as(appearance)
            recon_mot = self.motion_decoder(clip_mot)
            extra["recon_loss"] = F.mse_loss(recon_app, appearance) + F.mse_loss(recon_mot, motion)
        return {"logits": logits, "clip_fused": fused, "clip_app": clip_app,
                "clip_motion": clip_mot, "video": video, "question": question, **aux, **extra}


class QuestionOnly(nn.Module):
    """Sanity baseline: DualVGR's question encoder and classifier, no video input."""

    #: the runner reads no features for a model that ignores them
    uses_video = False
    SUPPORTED_TASKS = (OPEN_ENDED, MULTIPLE_CHOICE, COUNT)

    def __init__(self, cfg: DualVGRConfig):
        super().__init__()
        self.cfg = cfg
        self.linguistic_input_unit = LinguisticInputUnit(cfg.question_vocab, cfg.word_dim, cfg.module_dim)
        self.output_unit = output_unit(cfg, visual=False)
        init_reference(self)

    @property
    def word_embedding(self) -> nn.Embedding:
        return self.linguistic_input_unit.encoder_embed

    def forward(self, appearance: torch.Tensor, motion: torch.Tensor, questions: torch.Tensor,
                lengths: torch.Tensor, candidates: torch.Tensor | None = None,
                candidate_lengths: torch.Tensor | None = None, adj: torch.Tensor | None = None) -> dict:
        question, _, _ = self.linguistic_input_unit(questions, lengths)
        if self.cfg.task != MULTIPLE_CHOICE:
            return {"logits": self.output_unit(question), "question": question}
        need_candidates(candidates, candidate_lengths)
        K = candidates.shape[1]
        cand = encode_candidates(self.linguistic_input_unit, candidates, candidate_lengths)
        return {"logits": self.output_unit(question.repeat_interleave(K, 0), cand).view(-1, K), "question": question}
