"""A video-text transformer family with SViTT's sparsity (Li, Min, Tripathi, Vasconcelos, "SViTT: Temporal
Learning of Sparse Video-Text Transformers", CVPR 2023; code JerryYLi/svitt), over the features the harness
reads: one token per frame of each clip (appearance), one per clip (motion), one per question word.

Architecture (pre-LayerNorm blocks, GELU MLPs of 4x width, ``heads`` heads):

* **video encoder** (``video_layers``): a [CLS] token, then per clip its frame tokens followed by its motion
  token (time order), each a linear projection of its feature plus a learned position (global frame index, or
  clip index) and a type embedding;
* **text encoder** (``text_layers``): a [CLS] token and the question words (GloVe-sized embedding, projected);
* **multimodal encoder** (``fusion_layers``): the text tokens self-attend, then cross-attend to the visual
  tokens, then an MLP (BERT's cross-attention layers, as SViTT's ``xbert``);
* **heads** through the task registry: open-ended (answer scores) and count (one number) from the fused text
  [CLS]; multiple choice scores each candidate, encoded by the text encoder, against the fused [CLS].

SViTT's three mechanisms, each a setting (all off: the dense control of the same width):

* **edge sparsity** (``edge_sparse``; SViTT's ``sparse_local_attn`` / ``sparse_random_attn`` /
  ``attn_block_size``): the visual tokens but [CLS] are cut into blocks of ``edge_block`` tokens in time order
  (0: one clip's frames and motion token). Each block of queries attends to the [CLS] token (global), to the
  ``edge_local`` blocks centred on it (cyclic, as SViTT rolls the blocks) and to ``edge_random`` other blocks drawn
  without replacement among the non-local ones (one pattern per forward, shared by the batch and the heads, as
  SViTT's; drawn from the random state in training, from a fixed hash of the block indices in evaluation, so that
  evaluation is deterministic). The [CLS] query attends to every token. The attention is computed blockwise on
  gathered keys (:func:`block_sparse_attention`): its cost is ``blocks x block x (1 + kv_blocks x block)`` scores,
  not ``L x L``. SViTT pads the last block with zero keys that still receive attention; here padded keys are masked.
* **node sparsity** (``video_keep`` at ``video_drop_layers``, SViTT's ``token_keep_rate`` / ``token_drop_loc``
  with ``token_keep_strategy='cls_attn'``): after each listed video layer, the visual tokens but [CLS] are ranked
  by the attention the [CLS] query gave them (mean over heads) and the top ``ceil(keep x n)`` are kept in time
  order; the others are dropped (not merged: SViTT's ``sparsify``), so every later layer computes on fewer
  tokens. In the multimodal encoder (``fusion_keep`` at ``fusion_drop_layers``, SViTT's joint encoder), after a
  layer's cross-attention the visual tokens but the visual [CLS] are ranked by the attention from the text [CLS]
  and pruned the same way for the later layers.
* **temporal expansion** (``expand_stages``, ``expand_keep``, ``expand_epochs``; SViTT trains 4 frames, then
  8 with a lower keep rate, ...): training stage ``s`` of ``S`` (``expand_epochs`` epochs each, the last to the
  end) reads ``ceil(frames / 2^(S-1-s))`` frames per clip (evenly spaced, each keeping its position embedding)
  with keep rate ``expand_keep[s]``; the last stage, and evaluation, read every frame at ``video_keep``. The
  runner tells the model the epoch (:meth:`VideoTextTransformer.set_epoch`).

Outputs: ``logits``; ``video`` (B, D) the visual [CLS] after the video encoder; ``question`` (B, D) the text
[CLS] after the text encoder; ``fused`` (B, D) the text [CLS] after the multimodal encoder; ``visual_tokens``
(B, n, D) the visual tokens the video encoder kept (n depends on the sparsity). It has no DualVGR clip features
(``clip_fused``, ``clip_app``, ``clip_motion``): distillation losses reading them are refused when planned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED

# ----------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense scaled dot-product attention, (B, H, Lq, d) x (B, H, Lk, d): (output, probabilities (B, H, Lq, Lk)).
    ``key_mask`` (B, Lk) and ``mask`` (Lq, Lk): True where a query may attend."""
    sim = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        sim = sim.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if mask is not None:
        sim = sim.masked_fill(~mask, float("-inf"))
    attn = sim.softmax(-1)
    return torch.einsum("bhij,bhjd->bhid", attn, v), attn


def hash_scores(rows: int, cols: int, device) -> torch.Tensor:
    """A fixed pseudo-random (rows, cols) matrix in [0, 1) from the indices alone (a multiplicative hash of
    ``i x cols + j``, squared modulo the prime 2^31 - 1 to break its linearity, in int64): evaluation's "random"
    blocks, computed on the device."""
    m = 2147483647
    x = torch.arange(rows * cols, device=device, dtype=torch.int64).view(rows, cols)
    h = (x * 2654435761 + 12345) % m
    h = (h * h + 40503) % m
    h = (h * h + 40503) % m
    return h.to(torch.float64).div(m).to(torch.float32)


def block_pattern(blocks: int, local: int, random: int, scores: torch.Tensor) -> torch.Tensor:
    """(blocks, local + random) key-block indices per query block, as SViTT draws them: the ``local`` blocks
    centred on the query block (cyclic: block 0's left neighbour is the last), then ``random`` blocks with the
    highest ``scores`` (a (blocks, blocks) matrix) among the non-local ones, in increasing order."""
    rows = torch.arange(blocks, device=scores.device).unsqueeze(1)
    half = local // 2
    near = (rows + torch.arange(-half, half + 1, device=scores.device).unsqueeze(0)) % blocks  # (blocks, local)
    if random == 0:
        return near
    is_local = (near.unsqueeze(-1) == torch.arange(blocks, device=scores.device)).any(1)  # (blocks, blocks)
    far = scores.masked_fill(is_local, -1.0).topk(random, dim=1).indices.sort(dim=1).values
    return torch.cat([near, far], dim=1)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                           pattern: torch.Tensor) -> torch.Tensor:
    """SViTT's edge-sparse attention for the non-global queries, computed blockwise: ``q``, ``k``, ``v``
    (B, H, 1 + L, d) with the global token first; query block ``i`` (``block`` tokens of the L) attends to the
    global key and the key blocks ``pattern[i]``. Only those scores are computed (gathered keys, one einsum):
    (B, H, L, d) out. Padding of the last block is masked."""
    B, H, n, d = q.shape
    L = n - 1
    nb = -(-L // block)
    pad = nb * block - L

    def blocks(x):
        return F.pad(x[:, :, 1:], (0, 0, 0, pad)).reshape(B, H, nb, block, d)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    kv = pattern.shape[1]
    k_sel = kb[:, :, pattern].reshape(B, H, nb, kv * block, d)  # (B, H, nb, kv*block, d)
    v_sel = vb[:, :, pattern].reshape(B, H, nb, kv * block, d)
    k_all = torch.cat([k[:, :, :1].unsqueeze(2).expand(B, H, nb, 1, d), k_sel], dim=3)
    v_all = torch.cat([v[:, :, :1].unsqueeze(2).expand(B, H, nb, 1, d), v_sel], dim=3)
    sim = torch.einsum("bhnid,bhnjd->bhnij", qb, k_all) / math.sqrt(d)
    pos = (pattern.unsqueeze(-1) * block + torch.arange(block, device=q.device)).reshape(nb, kv * block)
    valid = torch.cat([torch.ones(nb, 1, dtype=torch.bool, device=q.device), pos < L], dim=1)
    sim = sim.masked_fill(~valid[:, None, :], float("-inf"))
    out = torch.einsum("bhnij,bhnjd->bhnid", sim.softmax(-1), v_all)
    return out.reshape(B, H, nb * block, d)[:, :, :L]


def block_sparse_mask(length: int, block: int, pattern: torch.Tensor) -> torch.Tensor:
    """The (1 + L, 1 + L) boolean mask of the pattern of :func:`block_sparse_attention` on L non-global tokens:
    the global row and column all True; token t (block t // block) sees the tokens of blocks ``pattern[t // block]``.
    Dense attention with this mask computes what the blockwise attention computes."""
    blk = torch.arange(length, device=pattern.device) // block
    sees = (pattern.unsqueeze(-1) == torch.arange(pattern.shape[0], device=pattern.device)).any(1)
    inner = sees[blk][:, blk]  # (L, L)
    mask = torch.ones(length + 1, length + 1, dtype=torch.bool, device=pattern.device)
    mask[1:, 1:] = inner
    return mask


def keep_top(x: torch.Tensor, score: torch.Tensor, keep: float, first: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """SViTT's node sparsification: of ``x`` (B, first + n, D), keep the ``first`` tokens and the
    ``ceil(keep x n)`` others with the highest ``score`` (B, n), in their order; the rest are dropped.
    Returns (kept tokens, kept indices among the n (B, k))."""
    n = int(x.shape[1]) - first
    k = max(1, math.ceil(keep * n))
    idx = score.topk(k, dim=1).indices.sort(dim=1).values
    rest = x[:, first:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :first], rest], dim=1), idx


def expansion_frames(frames: int, stage: int, stages: int) -> int:
    """Frames per clip read at temporal-expansion stage ``stage`` of ``stages``: halved per stage before the last."""
    return max(1, math.ceil(frames / 2 ** (stages - 1 - stage)))


def frame_indices(frames: int, used: int, device) -> torch.Tensor:
    """``used`` evenly spaced frames of ``frames`` (the middle of each of ``used`` equal segments)."""
    return (torch.arange(used, device=device) * frames + frames // 2) // used


# ----------------------------------------------------------------------------- layers


class MLP(nn.Sequential):
    def __init__(self, dim: int, dropout: float):
        super().__init__(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))


class SelfAttention(nn.Module):
    """Multi-head self-attention; dense, or SViTT's edge-sparse pattern for the non-global tokens."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def split(self, x):
        B, n, D = x.shape
        return x.view(B, n, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x, key_mask=None, sparse: tuple[int, torch.Tensor] | None = None):
        """(output, probabilities of the first query over every key (B, H, L))."""
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        if sparse is None:
            out, attn = attention(q, k, v, key_mask)
            first = attn[:, :, 0]
        else:
            out0, attn0 = attention(q[:, :, :1], k, v)  # the global query sees every token
            out = torch.cat([out0, block_sparse_attention(q, k, v, *sparse)], dim=2)
            first = attn0[:, :, 0]
        B, H, n, d = out.shape
        return self.drop(self.out(out.transpose(1, 2).reshape(B, n, H * d))), first


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory):
        """(output, probabilities (B, H, Lq, Lm))."""
        def split(t):
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        k, v = (split(t) for t in self.kv(memory).chunk(2, dim=-1))
        out, attn = attention(split(self.q(x)), k, v)
        B, H, n, d = out.shape
        return self.drop(self.out(out.transpose(1, 2).reshape(B, n, H * d))), attn


class EncoderLayer(nn.Module):
    """Pre-LN transformer block; returns (tokens, the first query's attention (B, H, L))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = MLP(dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_mask=None, sparse=None):
        a, first = self.attn(self.ln1(x), key_mask, sparse)
        x = x + a
        return x + self.drop(self.mlp(self.ln2(x))), first


class FusionLayer(nn.Module):
    """BERT-style cross-modal block: text self-attention, cross-attention to the visual tokens, MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_layer = EncoderLayer(dim, heads, dropout)
        self.ln_x, self.ln_m, self.ln_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads, dropout)
        self.mlp = MLP(dim, dropout)

    def forward(self, text, key_mask, visual):
        t, _ = self.self_layer.attn(self.self_layer.ln1(text), key_mask)
        text = text + t
        c, attn = self.cross(self.ln_x(text), self.ln_m(visual))
        text = text + c
        return text + self.mlp(self.ln_out(text)), attn


# ----------------------------------------------------------------------------- config


@dataclass
class TransformerConfig:
    question_vocab: int = 4000
    answer_vocab: int = 1000
    vision_dim: int = 2048
    motion_dim: int | None = None  # None: vision_dim
    module_dim: int = 256  # the width of every encoder (and what distillation losses see)
    word_dim: int = 300
    num_clips: int = 8
    num_frames: int | None = None  # frames per clip; None: 16 (sizes the frame position embedding)
    heads: int = 4
    video_layers: int = 4
    text_layers: int = 1
    fusion_layers: int = 2
    dropout: float = 0.1
    #: edge sparsity (SViTT): local window + random blocks + the global [CLS] (see the module docstring)
    edge_sparse: bool = False
    edge_block: int = 0  # tokens per block; 0: one clip's tokens (its frames and motion token)
    edge_local: int = 1  # odd
    edge_random: int = 2
    #: node sparsity (SViTT): keep rate after each listed layer (0-based) of the video / multimodal encoder
    video_keep: float = 1.0
    video_drop_layers: list = field(default_factory=lambda: [0, 1, 2])
    fusion_keep: float = 1.0
    fusion_drop_layers: list = field(default_factory=lambda: [0])
    #: temporal expansion (SViTT): training stages, keep rates of the stages before the last, epochs per stage
    expand_stages: int = 1
    expand_keep: list = field(default_factory=list)
    expand_epochs: int = 1
    task: str = OPEN_ENDED

    def __post_init__(self) -> None:
        def bad(msg):
            raise ValueError(f"transformer config: {msg}")

        if self.task not in (OPEN_ENDED, MULTIPLE_CHOICE, COUNT):
            bad(f"task must be one of {OPEN_ENDED}, {MULTIPLE_CHOICE}, {COUNT}; got {self.task!r}")
        for k in ("question_vocab", "answer_vocab", "vision_dim", "module_dim", "word_dim", "num_clips", "heads",
                  "video_layers", "text_layers", "fusion_layers", "edge_local", "expand_stages", "expand_epochs"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{k} must be a positive integer, got {v!r}")
        for k in ("motion_dim", "num_frames"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(f"{k} must be a positive integer or None, got {v!r}")
        if self.module_dim % self.heads:
            bad(f"module_dim {self.module_dim} must be divisible by heads {self.heads}")
        if not 0.0 <= float(self.dropout) < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.edge_block, int) or self.edge_block < 0:
            bad(f"edge_block must be a non-negative integer (0: one clip's tokens), got {self.edge_block!r}")
        if self.edge_local % 2 == 0:
            bad(f"edge_local must be odd (a window centred on the block, as SViTT's), got {self.edge_local}")
        if not isinstance(self.edge_random, int) or self.edge_random < 0:
            bad(f"edge_random must be a non-negative integer, got {self.edge_random!r}")
        self.check_sparsity(bad)

    def check_sparsity(self, bad) -> None:
        for name, layers, count in (("video", self.video_drop_layers, self.video_layers),
                                    ("fusion", self.fusion_drop_layers, self.fusion_layers)):
            keep = getattr(self, f"{name}_keep")
            if not 0.0 < float(keep) <= 1.0:
                bad(f"{name}_keep must be in (0, 1], got {keep!r}")
            if not isinstance(layers, list) or any(not isinstance(i, int) or not 0 <= i < count for i in layers):
                bad(f"{name}_drop_layers must list layer indices in 0..{count - 1}, got {layers!r}")
        if not isinstance(self.expand_keep, list) or len(self.expand_keep) != self.expand_stages - 1:
            bad(f"expand_keep must list one keep rate per stage before the last ({self.expand_stages - 1} for "
                f"expand_stages = {self.expand_stages}), got {self.expand_keep!r}")
        if any(not isinstance(k, (int, float)) or not 0.0 < k <= 1.0 for k in self.expand_keep):
            bad(f"expand_keep rates must be in (0, 1], got {self.expand_keep!r}")


# ----------------------------------------------------------------------------- model


class VideoTextTransformer(nn.Module):
    """Video-text transformer (SViTT-style: edge and node sparsity, temporal expansion as settings)."""

    SUPPORTED_TASKS = (OPEN_ENDED, MULTIPLE_CHOICE, COUNT)

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.module_dim, cfg.dropout
        frames = cfg.num_frames or 16
        self.app_proj = nn.Linear(cfg.vision_dim, D)
        self.motion_proj = nn.Linear(cfg.motion_dim or cfg.vision_dim, D)
        self.frame_pos = nn.Parameter(torch.zeros(cfg.num_clips * frames, D))
        self.clip_pos = nn.Parameter(torch.zeros(cfg.num_clips, D))
        self.type_emb = nn.Parameter(torch.zeros(2, D))  # appearance, motion
        self.video_cls = nn.Parameter(torch.zeros(1, 1, D))
        self.video_layers = nn.ModuleList(EncoderLayer(D, cfg.heads, p) for _ in range(cfg.video_layers))
        self.video_norm = nn.LayerNorm(D)
        self.embed = nn.Embedding(cfg.question_vocab, cfg.word_dim)
        self.word_proj = nn.Linear(cfg.word_dim, D)
        self.text_cls = nn.Parameter(torch.zeros(1, 1, D))
        self.text_pos = nn.Parameter(torch.zeros(64, D))
        self.text_layers = nn.ModuleList(EncoderLayer(D, cfg.heads, p) for _ in range(cfg.text_layers))
        self.text_norm = nn.LayerNorm(D)
        self.fusion_layers = nn.ModuleList(FusionLayer(D, cfg.heads, p) for _ in range(cfg.fusion_layers))
        self.fusion_norm = nn.LayerNorm(D)
        out = {MULTIPLE_CHOICE: 1, COUNT: 1}.get(cfg.task, cfg.answer_vocab)
        width = 3 * D if cfg.task == MULTIPLE_CHOICE else D
        self.head = nn.Sequential(nn.Linear(width, D), nn.GELU(), nn.LayerNorm(D), nn.Dropout(p), nn.Linear(D, out))
        self.epoch: int | None = None
        for prm in (self.frame_pos, self.clip_pos, self.type_emb, self.video_cls, self.text_cls, self.text_pos):
            nn.init.normal_(prm, std=0.02)

    @property
    def word_embedding(self) -> nn.Embedding:
        return self.embed

    def set_epoch(self, epoch: int | None) -> None:
        """The 0-based training epoch (temporal expansion's stage); None: the last stage."""
        self.epoch = epoch

    def stage(self) -> tuple[int | None, float]:
        """(frames per clip to read or None for all, video keep rate) of the current expansion stage."""
        c = self.cfg
        if c.expand_stages == 1 or not self.training or self.epoch is None:
            return None, c.video_keep
        s = min(self.epoch // c.expand_epochs, c.expand_stages - 1)
        if s == c.expand_stages - 1:
            return None, c.video_keep
        return expansion_frames(c.num_frames or 16, s, c.expand_stages), float(c.expand_keep[s])

    def visual_tokens(self, appearance, motion, used: int | None):
        """(B, 1 + N (t + 1), D): [CLS], then per clip its t frame tokens and its motion token; t = frames read."""
        B, N, T = int(appearance.shape[0]), int(appearance.shape[1]), int(appearance.shape[2])
        frame_pos = self.frame_pos[: N * T].view(N, T, -1)
        if used is not None and used < T:
            idx = frame_indices(T, used, appearance.device)
            appearance, frame_pos = appearance.index_select(2, idx), frame_pos.index_select(1, idx)
        app = self.app_proj(appearance) + frame_pos + self.type_emb[0]
        mot = (self.motion_proj(motion) + self.clip_pos[:N] + self.type_emb[1]).unsqueeze(2)
        tokens = torch.cat([app, mot], dim=2).reshape(B, -1, app.shape[-1])
        return torch.cat([self.video_cls.expand(B, -1, -1), tokens], dim=1), int(app.shape[2]) + 1

    def encode_video(self, appearance, motion) -> torch.Tensor:
        c = self.cfg
        used, keep = self.stage()
        x, per_clip = self.visual_tokens(appearance, motion, used)
        block = c.edge_block or per_clip
        for i, layer in enumerate(self.video_layers):
            x, first = layer(x, sparse=self.edge_pattern(int(x.shape[1]) - 1, block, x.device))
            if keep < 1.0 and i in c.video_drop_layers:
                x, _ = keep_top(x, first.mean(1)[:, 1:], keep)
        return self.video_norm(x)

    def edge_pattern(self, length: int, block: int, device):
        """(block, pattern) of the edge-sparse attention on ``length`` tokens, or None when every block would
        see every other (dense attention computes the same, cheaper)."""
        c = self.cfg
        blocks = -(-length // block)
        if not c.edge_sparse or c.edge_local + c.edge_random >= blocks:
            return None
        scores = torch.rand(blocks, blocks, device=device) if self.training else hash_scores(blocks, blocks, device)
        return block, block_pattern(blocks, c.edge_local, c.edge_random, scores)

    def encode_text(self, words, lengths):
        """(tokens (B, 1 + L, D), key mask (B, 1 + L)): [CLS] and the words, through the text encoder."""
        B, L = int(words.shape[0]), int(words.shape[1])
        x = torch.cat([self.text_cls.expand(B, -1, -1), self.word_proj(self.embed(words))], dim=1)
        x = x + self.text_pos[: L + 1]
        mask = torch.arange(L + 1, device=words.device).unsqueeze(0) < (lengths.unsqueeze(1) + 1)
        for layer in self.text_layers:
            x, _ = layer(x, mask)
        return self.text_norm(x), mask

    def fuse(self, text, mask, visual):
        c = self.cfg
        for i, layer in enumerate(self.fusion_layers):
            text, attn = layer(text, mask, visual)
            if c.fusion_keep < 1.0 and i in c.fusion_drop_layers and i < len(self.fusion_layers) - 1:
                visual, _ = keep_top(visual, attn[:, :, 0, 1:].mean(1), c.fusion_keep)
        return self.fusion_norm(text[:, 0])

    def answer(self, fused, candidates=None, candidate_lengths=None):
        if self.cfg.task != MULTIPLE_CHOICE:
            return self.head(fused)
        if candidates is None or candidate_lengths is None:
            raise ValueError("a multiple-choice model needs candidates (B, K, La) and candidate_lengths (B, K)")
        B, K, La = candidates.shape
        cand, _ = self.encode_text(candidates.reshape(B * K, La), candidate_lengths.reshape(B * K))
        f = fused.repeat_interleave(K, 0)
        return self.head(torch.cat([f, cand[:, 0], f * cand[:, 0]], dim=-1)).view(B, K)

    def forward(self, appearance, motion, questions, lengths, candidates=None, candidate_lengths=None,
                adj=None) -> dict:
        visual = self.encode_video(appearance, motion)
        text, mask = self.encode_text(questions, lengths)
        fused = self.fuse(text, mask, visual)
        return {"logits": self.answer(fused, candidates, candidate_lengths), "video": visual[:, 0],
                "question": text[:, 0], "fused": fused, "visual_tokens": visual[:, 1:]}
