"""Distillation losses: a student DualVGR learns from frozen DualVGR teachers.

Each loss is a registered factory (``@LOSSES.register()``) returning a :class:`KDLoss`::

    module = LOSSES.get("fused").fn(student_dim=768, teacher_dim=768, t_app=1.0)
    loss, parts = module(student_outputs, [teacher_outputs, ...], answers)

The runner adds ``weight * loss`` to the student's own objective (cross entropy plus DualVGR's
auxiliary terms), so no loss here contains a cross-entropy term. A loss whose weight follows the
training schedule (``dkd``'s warm-up) sets ``progress_aware = True`` and is called with the 0-based
``epoch`` as a keyword (``variants.losses.Objective`` routes it); the others are called without it.
The objective computes every loss in fp32, outside autocast (see ``variants.losses``). ``parts`` holds detached scalars
for logging (the components of losses that have several; single-term losses return ``{}``, the
runner logs the total as ``kd_<name>``).

Conventions shared by every loss:

* Teacher tensors are detached here (the runner also runs the teachers under ``no_grad``): no
  gradient ever reaches a teacher. Learnable parts (the FitNets regressor) are submodules, which
  the runner trains with the student.
* Several teachers: the loss is the mean over teachers of the one-teacher loss, except
  ``similarity``, which (as TeachText) compares the student with the element-wise mean of the
  teachers' similarity matrices.
* Everything stays on the device: no ``.item()``, no boolean-mask indexing, no loop over the batch.
* Unknown parameters raise a ``TypeError`` naming the loss and the key; bad values and shape
  mismatches raise a ``ValueError`` naming the loss (and the two shapes).

Model outputs used (see ``DualVGR.forward``): ``logits`` (B, A); ``clip_fused`` (B, N, D) the
MFB-fused clip features; ``clip_app`` / ``clip_motion`` (B, N, D) the clip features just before
that fusion; ``video`` (B, D); ``question`` (B, D). ``"joint"`` (where accepted) is
``cat([video, question], -1)``.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .losses import LOSSES
from .tasks import COUNT, MULTIPLE_CHOICE, OPEN_ENDED

#: output keys holding a (B, ..., D) feature tensor
FEATURE_KEYS = ("clip_fused", "clip_app", "clip_motion", "video", "question")
#: what the batch-relation losses (similarity, relational, sp, pkt) may compare
EMBEDDING_KEYS = FEATURE_KEYS + ("joint",)
#: the shape each output a loss may read has, and which model families produce it (said when one is missing)
OUTPUT_SHAPES = {
    "logits": "(B, answers), (B, candidates) or (B, 1): every family",
    "clip_fused": "(B, clips, D) per-clip features: DualVGR only (the transformer family has no clips)",
    "clip_app": "(B, clips, D) per-clip appearance features: DualVGR only",
    "clip_motion": "(B, clips, D) per-clip motion features: DualVGR only",
    "video": "(B, D) video embedding: DualVGR and the transformer family",
    "question": "(B, D) question embedding: DualVGR and the transformer family",
}
#: dkd's default warm-up in epochs: mdistiller's CIFAR-100 share (20 of 240 epochs) of a 25-epoch schedule
DKD_WARMUP = 2.0


# ----------------------------------------------------------------------------- helpers


def _factory(fn):
    """Wrap a loss factory so that an unknown parameter raises a ``TypeError`` naming the loss
    and the key (and listing the known ones), rather than Python's generic message."""
    sig = inspect.signature(fn)
    name = fn.__name__.replace("_", "-")
    known = [p for p in sig.parameters if p not in ("student_dim", "teacher_dim")]

    @functools.wraps(fn)
    def make(*args, **kwargs):
        bad = [k for k in kwargs if k not in sig.parameters]
        if bad:
            raise TypeError(f"distillation loss {name!r}: unknown parameter{'s' if len(bad) > 1 else ''} "
                            f"{', '.join(map(repr, bad))} (known: {', '.join(known) or 'none'})")
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"distillation loss {name!r}: {e}") from None
        return fn(*args, **kwargs)

    return make


def _number(loss: str, key: str, v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"distillation loss {loss!r}: {key} must be a number, got {v!r}") from None


def _positive(loss: str, **values) -> None:
    for key, v in values.items():
        if not _number(loss, key, v) > 0:
            raise ValueError(f"distillation loss {loss!r}: {key} must be > 0, got {v!r}")


def _non_negative(loss: str, **values) -> None:
    for key, v in values.items():
        if not _number(loss, key, v) >= 0:
            raise ValueError(f"distillation loss {loss!r}: {key} must be >= 0, got {v!r}")


def _choice(loss: str, key: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"distillation loss {loss!r}: {key}={value!r} is not one of {', '.join(allowed)}")
    return value


def _same_shape(loss: str, what: str, s: torch.Tensor, t: torch.Tensor, why: str = "") -> None:
    if s.shape != t.shape:
        raise ValueError(f"distillation loss {loss!r}: student {what} has shape {tuple(s.shape)} but the "
                         f"teacher's has shape {tuple(t.shape)}{why}")


class KDLoss(nn.Module):
    """forward(student: dict, teachers: list[dict], answers: LongTensor(B))
    -> (loss: scalar Tensor, parts: dict[str, Tensor])"""

    #: registered name (set by each subclass), used in error messages
    name = "kd"
    #: True: ``forward`` also takes ``epoch`` (the 0-based training epoch, a Python int)
    progress_aware = False
    #: the tasks (:mod:`variants.tasks`) whose outputs the loss has a meaning for; None: every task
    tasks: tuple[str, ...] | None = None
    #: why it has none for the other tasks (said in the error)
    why_not = ""

    def for_task(self, task: str) -> "KDLoss":
        """The loss a run of ``task`` uses: this one where it has a meaning, else a ValueError naming
        the loss and the task (the planner turns it into a ConfigError before anything trains)."""
        if self.tasks is None or task in self.tasks:
            return self
        raise ValueError(f"distillation loss {self.name!r} has no meaning for the {task} task: {self.why_not}")

    def forward(self, student: dict, teachers: list[dict], answers: torch.Tensor):
        raise NotImplementedError

    # -- access to the outputs

    def _get(self, out: dict, key: str, who: str) -> torch.Tensor:
        if key not in out:
            needs = f"; it needs {key!r} = {OUTPUT_SHAPES[key]}" if key in OUTPUT_SHAPES else ""
            raise ValueError(f"distillation loss {self.name!r}: the {who}'s outputs have no {key!r} "
                             f"(keys: {', '.join(sorted(out))}){needs}")
        return out[key]

    def student(self, out: dict, key: str) -> torch.Tensor:
        return self._get(out, key, "student")

    def teacher(self, out: dict, key: str) -> torch.Tensor:
        """A teacher tensor, detached: teachers never receive gradient."""
        return self._get(out, key, "teacher").detach()

    def embedding(self, out: dict, key: str, who: str) -> torch.Tensor:
        """(B, F): ``key``'s tensor flattened per sample, or ``cat([video, question], -1)`` for
        ``"joint"``; detached for a teacher."""
        get = self.teacher if who == "teacher" else self.student
        if key == "joint":
            return torch.cat([get(out, "video"), get(out, "question")], dim=-1)
        x = get(out, key)
        return x.reshape(x.shape[0], -1)

    def check_teachers(self, teachers: list[dict]) -> list[dict]:
        if not teachers:
            raise ValueError(f"distillation loss {self.name!r} needs at least one teacher's outputs")
        return teachers

    def same_batch(self, s: torch.Tensor, t: torch.Tensor, what: str) -> None:
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"distillation loss {self.name!r}: student {what} has batch size {s.shape[0]} "
                             f"but the teacher's has {t.shape[0]}")

    def mean_over_teachers(self, teachers: list[dict], fn) -> dict[str, torch.Tensor]:
        """Mean over teachers of ``fn(teacher_out) -> dict of scalar tensors``."""
        teachers = self.check_teachers(teachers)
        acc: dict[str, torch.Tensor] = {}
        for t in teachers:  # a loop over teachers (usually one), not over the batch
            for k, v in fn(t).items():
                acc[k] = acc[k] + v if k in acc else v
        return acc if len(teachers) == 1 else {k: v / len(teachers) for k, v in acc.items()}


# ----------------------------------------------------------------------------- 1. fused (VQAKD)


class FusedKD(KDLoss):
    """VQAKD's fused-feature distillation (see :func:`fused`)."""

    name = "fused"

    def __init__(self, t_app: float = 1.0, t_mo: float = 1.0, kd_alpha: float = 1.0, kd_beta: float = 1.0):
        super().__init__()
        self.t_app, self.t_mo = float(t_app), float(t_mo)
        self.kd_alpha, self.kd_beta = float(kd_alpha), float(kd_beta)

    def extra_repr(self) -> str:
        return f"t_app={self.t_app}, t_mo={self.t_mo}, kd_alpha={self.kd_alpha}, kd_beta={self.kd_beta}"

    def forward(self, student, teachers, answers):
        s_app, s_mo = self.student(student, "clip_app"), self.student(student, "clip_motion")
        log_app = F.log_softmax(s_app / self.t_app, dim=-1)
        log_mo = F.log_softmax(s_mo / self.t_mo, dim=-1)
        why = " (VQAKD compares the student's clip features with the teacher's fused clip features: " \
              "same clip count and module_dim needed)"

        def one(t_out):
            fused = self.teacher(t_out, "clip_fused")
            _same_shape(self.name, "clip_app", s_app, fused, why)
            _same_shape(self.name, "clip_motion", s_mo, fused, why)
            # nn.KLDivLoss(reduction='batchmean') on the (B, N, D) tensors: sum over clips and
            # features, divided by B only (as in train_kd_2.py); no t^2 factor
            app = F.kl_div(log_app, F.softmax(fused / self.t_app, dim=-1), reduction="batchmean")
            mo = F.kl_div(log_mo, F.softmax(fused / self.t_mo, dim=-1), reduction="batchmean")
            return {"fused_app": app, "fused_motion": mo}

        m = self.mean_over_teachers(teachers, one)
        loss = self.kd_alpha * m["fused_app"] + self.kd_beta * m["fused_motion"]
        return loss, {k: v.detach() for k, v in m.items()}


@LOSSES.register()
@_factory
def fused(student_dim: int = 768, teacher_dim: int = 768, *, t_app: float = 1.0, t_mo: float = 1.0,
          kd_alpha: float = 1.0, kd_beta: float = 1.0) -> KDLoss:
    """VQAKD: KL from the teacher's MFB-fused clip features to the student's appearance and motion clip features.

    Formula (VQAKD, Information 2023; ``c1393428962/VQAKD``, ``train_kd_2.py``)::

        kd_alpha * KL(softmax(F_t / t_app) || softmax(A_s / t_app))
      + kd_beta  * KL(softmax(F_t / t_mo)  || softmax(M_s / t_mo))

    with ``F_t`` = teacher ``clip_fused`` (the teacher DualVGR's first output, the MFB fusion of its
    final appearance and motion clip features; train_kd_2.py calls it ``teacher_logits``),
    ``A_s`` / ``M_s`` = student ``clip_app`` / ``clip_motion`` (KD_2's features just before its own
    MFB fusion), all (B, N, D). Softmax over the feature dimension (``dim=2``), each KL is
    ``nn.KLDivLoss(reduction='batchmean')`` applied to the 3-D tensors as they are (no reshape to
    (B*N, D)): the sum over clips and features divided by B only, i.e. N times the mean per-clip
    KL. No ``t**2`` factor (the reference has none). Defaults are train_kd_2.py's argparse
    defaults (t_app = t_mo = kd_alpha = kd_beta = 1). Needs equal clip counts and dims
    (student_dim == teacher_dim); ``parts``: ``fused_app``, ``fused_motion`` (unweighted KLs).
    """
    if student_dim != teacher_dim:
        raise ValueError(f"distillation loss 'fused': student clip features (B, N, {student_dim}) and teacher "
                         f"fused features (B, N, {teacher_dim}) must have the same dim")
    _positive("fused", t_app=t_app, t_mo=t_mo)
    _non_negative("fused", kd_alpha=kd_alpha, kd_beta=kd_beta)
    return FusedKD(t_app, t_mo, kd_alpha, kd_beta)


# ----------------------------------------------------------------------------- 2. logits (Hinton)


class LogitKD(KDLoss):
    """Hinton et al.'s soft-target distillation (see :func:`logits`)."""

    name = "logits"
    tasks = (OPEN_ENDED, MULTIPLE_CHOICE)

    def __init__(self, T: float = 4.0):
        super().__init__()
        self.T = float(T)

    def extra_repr(self) -> str:
        return f"T={self.T}"

    def for_task(self, task: str) -> KDLoss:
        """On a count (one output, no distribution to soften) logit KD is what it was before
        Hinton's softening: matching the teacher's output in L2 (Ba & Caruana 2014), i.e.
        :class:`LogitMSE`; T plays no part there."""
        return LogitMSE() if task == COUNT else super().for_task(task)

    def forward(self, student, teachers, answers):
        s = self.student(student, "logits")
        log_p = F.log_softmax(s / self.T, dim=1)

        def one(t_out):
            t = self.teacher(t_out, "logits")
            _same_shape(self.name, "logits", s, t, " (the same answer vocabulary is needed)")
            return {"kd": F.kl_div(log_p, F.softmax(t / self.T, dim=1), reduction="batchmean") * self.T ** 2}

        return self.mean_over_teachers(teachers, one)["kd"], {}


@LOSSES.register()
@_factory
def logits(student_dim: int = 768, teacher_dim: int = 768, *, T: float = 4.0) -> KDLoss:
    """Hinton KD: T^2-scaled KL between the teacher's and the student's softened answer distributions.

    Formula (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"; as
    mdistiller's ``kd_loss``)::

        T^2 * 1/B sum_b KL(softmax(z_t,b / T) || softmax(z_s,b / T))

    over the (B, A) ``logits`` (``batchmean``). The CE term and its weight are the runner's
    (``ce_weight``). Needs the same answer vocabulary. Default T = 4.
    """
    _positive("logits", T=T)
    return LogitKD(T)


class LogitMSE(KDLoss):
    """L2 logit matching (see :func:`logit_mse`)."""

    name = "logit-mse"

    def forward(self, student, teachers, answers):
        s = self.student(student, "logits")

        def one(t_out):
            t = self.teacher(t_out, "logits")
            _same_shape(self.name, "logits", s, t)
            return {"kd": F.mse_loss(s, t)}

        return self.mean_over_teachers(teachers, one)["kd"], {}


@LOSSES.register()
@_factory
def logit_mse(student_dim: int = 768, teacher_dim: int = 768) -> KDLoss:
    """L2 logit matching (Ba & Caruana 2014); on a count, MSE to the teacher's predicted count.

    Formula::

        1/(B A) sum_b,a (z_s,ba - z_t,ba)^2

    over the raw (B, A) ``logits`` (answer scores, candidate scores, or the (B, 1) count before
    HCRN's rounding), averaged over teachers. Every task: the count task's distillation loss, where
    softened distributions (``logits``' KL, ``dkd``) have nothing to soften; ``logits`` KD on a
    count task is this loss.
    """
    return LogitMSE()


# ----------------------------------------------------------------------------- 3. similarity (TeachText)


class SimilarityKD(KDLoss):
    """TeachText's similarity-matrix distillation (see :func:`similarity`)."""

    name = "similarity"

    def __init__(self, delta: float = 1.0, matrix: str = "cross", embedding: str = "joint"):
        super().__init__()
        self.delta, self.kind, self.embedding_key = float(delta), matrix, embedding

    def extra_repr(self) -> str:
        extra = f", embedding={self.embedding_key!r}" if self.kind == "self" else ""
        return f"delta={self.delta}, matrix={self.kind!r}{extra}"

    def matrix(self, out: dict, who: str) -> torch.Tensor:
        """(B, B): ``cross``: cosine of question i and video j (TeachText's query x video
        matrix); ``self``: cosine of sample i's and sample j's ``embedding``."""
        if self.kind == "cross":
            q = F.normalize(self.embedding(out, "question", who), dim=-1)
            v = F.normalize(self.embedding(out, "video", who), dim=-1)
            return q @ v.transpose(0, 1)
        e = F.normalize(self.embedding(out, self.embedding_key, who), dim=-1)
        return e @ e.transpose(0, 1)

    def forward(self, student, teachers, answers):
        teachers = self.check_teachers(teachers)
        s = self.matrix(student, "student")
        mats = [self.matrix(t, "teacher") for t in teachers]
        for m in mats:
            _same_shape(self.name, "similarity matrix", s, m, " (same batch needed)")
        target = mats[0] if len(mats) == 1 else torch.stack(mats).mean(0)
        return F.huber_loss(s, target, delta=self.delta), {}


#: the similarity matrices ``similarity`` can distil
SIMILARITY_MATRICES = ("cross", "self")


@LOSSES.register()
@_factory
def similarity(student_dim: int = 768, teacher_dim: int = 768, *, delta: float = 1.0, matrix: str = "cross",
               embedding: str | None = None) -> KDLoss:
    """TeachText: Huber loss between the student's batch question x video similarity matrix and the teachers' mean.

    Formula (TeachText, Croitoru et al., ICCV 2021; ``albanie/collaborative-experts``,
    ``trainer/trainer.py`` and ``model/model.py``)::

        matrix="cross" (default, TeachText's):  S_ij = cos(question_i, video_j)        (B, B)
        matrix="self"  (an adaptation):         S_ij = cos(e_i, e_j),  e = output[embedding]
        loss = mean_ij Huber_delta(S_s[i, j] - mean_k S_tk[i, j])

    TeachText distils the retrieval model's ``cross_view_conf_matrix`` (text embedding i against
    video embedding j of the batch): each teacher's query x video similarities, averaged over
    teachers, are the target of ``SmoothL1Loss(reduction="elementwise_mean")`` (Huber with delta
    1, mean over all B*B entries) on the student's matrix. In DualVGR the query is the question
    embedding (``question``) and the video the question-guided video embedding (``video``), so
    ``cross`` is that matrix of the batch (not symmetric). ``self`` keeps this harness's earlier
    adaptation: the self-similarity of one embedding per sample (``embedding``: joint =
    cat([video, question], -1), the default, or video, question, a clip feature), a symmetric
    matrix; ``embedding`` applies to ``self`` only. ``F.huber_loss`` equals SmoothL1 at delta 1
    (and is ``delta * SmoothL1(beta=delta)`` otherwise). Student and teacher dims may differ.
    """
    _positive("similarity", delta=delta)
    kind = _choice("similarity", "matrix", matrix, SIMILARITY_MATRICES)
    if embedding is not None and kind != "self":
        raise ValueError(f"distillation loss 'similarity': embedding={embedding!r} applies to matrix='self' only "
                         f"(matrix={kind!r} compares question and video embeddings)")
    return SimilarityKD(delta, kind, _choice("similarity", "embedding", embedding or "joint", EMBEDDING_KEYS))


# ----------------------------------------------------------------------------- 4. hint (FitNets)


class HintKD(KDLoss):
    """FitNets hint distillation (see :func:`hint`)."""

    name = "hint"

    def __init__(self, student_dim: int, teacher_dim: int, feature: str = "clip_fused"):
        super().__init__()
        self.feature = feature
        self.regressor = nn.Linear(student_dim, teacher_dim)
        nn.init.xavier_uniform_(self.regressor.weight)
        nn.init.zeros_(self.regressor.bias)

    def extra_repr(self) -> str:
        return f"feature={self.feature!r}"

    def forward(self, student, teachers, answers):
        s = self.student(student, self.feature)
        if s.shape[-1] != self.regressor.in_features:
            raise ValueError(f"distillation loss {self.name!r}: student {self.feature} has shape {tuple(s.shape)}, "
                             f"the regressor expects last dim student_dim={self.regressor.in_features}")
        r = self.regressor(s)

        def one(t_out):
            t = self.teacher(t_out, self.feature)
            _same_shape(self.name, f"{self.feature} (regressed)", r, t)
            return {"mse": F.mse_loss(r, t)}

        return self.mean_over_teachers(teachers, one)["mse"], {}


@LOSSES.register()
@_factory
def hint(student_dim: int = 768, teacher_dim: int = 768, *, feature: str = "clip_fused") -> KDLoss:
    """FitNets hint: MSE between a learned linear regression of a student feature and the teacher's feature.

    Formula (Romero et al., ICLR 2015, "FitNets: hints for thin deep nets")::

        mean((W x_s + b - x_t)^2)        x = output[feature], (B, ..., D)

    with ``W`` an ``nn.Linear(student_dim, teacher_dim)`` (xavier-uniform weight, zero bias)
    trained with the student; ``F.mse_loss`` (mean over all elements; the paper's 1/2 * squared
    L2 norm up to a constant factor). ``feature``: clip_fused (default), clip_app, clip_motion,
    video or question. Works with student_dim != teacher_dim.
    """
    return HintKD(int(student_dim), int(teacher_dim), _choice("hint", "feature", feature, FEATURE_KEYS))


# ----------------------------------------------------------------------------- 5. relational (RKD)


def _rkd_pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RKD's ``pdist(e, squared=False)``: Euclidean distances via the Gram matrix, clamped at
    ``eps`` before the square root, zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _rkd_normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over the positive entries (``d[d > 0].mean()`` in RKD),
    computed without boolean indexing (no host sync). The clamp in :func:`_rkd_pdist` makes every
    off-diagonal entry positive, so this is the mean over the off-diagonal pairs; the guards only
    matter for a batch of one (then the loss is 0 instead of NaN)."""
    d = _rkd_pdist(e)
    pos = (d > 0).sum().clamp(min=1)
    return d / (d.sum() / pos).clamp(min=1e-12)


def _rkd_angles(e: torch.Tensor) -> torch.Tensor:
    """RKD's angle potentials, flattened: ``cos`` of the angle at ``e_i`` between ``e_j`` and
    ``e_k``, ``<n(e_j - e_i), n(e_k - e_i)>`` for all (i, j, k); zero where j == i or k == i
    (F.normalize of a zero vector). Builds a (B, B, D) tensor, as the reference does."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    n = F.normalize(diff, p=2, dim=2)
    return torch.bmm(n, n.transpose(1, 2)).reshape(-1)


class RelationalKD(KDLoss):
    """Relational KD (see :func:`relational`)."""

    name = "relational"

    def __init__(self, w_dist: float = 1.0, w_angle: float = 2.0, embedding: str = "video"):
        super().__init__()
        self.w_dist, self.w_angle, self.embedding_key = float(w_dist), float(w_angle), embedding

    def extra_repr(self) -> str:
        return f"w_dist={self.w_dist}, w_angle={self.w_angle}, embedding={self.embedding_key!r}"

    def forward(self, student, teachers, answers):
        s = self.embedding(student, self.embedding_key, "student")
        s_dist = _rkd_normalised_distances(s) if self.w_dist else None
        s_angle = _rkd_angles(s) if self.w_angle else None

        def one(t_out):
            t = self.embedding(t_out, self.embedding_key, "teacher")
            self.same_batch(s, t, self.embedding_key)
            parts = {}
            if s_dist is not None:
                parts["rkd_dist"] = F.smooth_l1_loss(s_dist, _rkd_normalised_distances(t))
            if s_angle is not None:
                parts["rkd_angle"] = F.smooth_l1_loss(s_angle, _rkd_angles(t))
            return parts

        m = self.mean_over_teachers(teachers, one)
        loss = s.new_zeros(())
        if "rkd_dist" in m:
            loss = loss + self.w_dist * m["rkd_dist"]
        if "rkd_angle" in m:
            loss = loss + self.w_angle * m["rkd_angle"]
        return loss, {k: v.detach() for k, v in m.items()}


@LOSSES.register()
@_factory
def relational(student_dim: int = 768, teacher_dim: int = 768, *, w_dist: float = 1.0, w_angle: float = 2.0,
               embedding: str = "video") -> KDLoss:
    """RKD: distance-wise and angle-wise relational distillation on the batch's video embeddings.

    Formula (Park et al., CVPR 2019; ``lenscloth/RKD``, ``metric/loss.py`` ``RkdDistance`` and
    ``RKdAngle``)::

        d_ij = ||e_i - e_j|| / mean_{d>0} d          (distances from the Gram matrix, clamp 1e-12)
        L_dist  = mean_{i,j}   SmoothL1(d^s_ij - d^t_ij)                (over all B*B entries)
        a_ijk = <n(e_j - e_i), n(e_k - e_i)>           (n = L2 normalisation)
        L_angle = mean_{i,j,k} SmoothL1(a^s_ijk - a^t_ijk)              (over all B^3 entries)
        loss = w_dist * L_dist + w_angle * L_angle

    SmoothL1 with beta 1 (``reduction='elementwise_mean'``), including the zero diagonal / the
    degenerate triplets in the means, as the reference. Weights 1 and 2 are the official
    examples' ``--dist_ratio 1 --angle_ratio 2``. ``embedding``: video (default), question, joint
    or a clip feature (flattened per sample). The angle term builds (B, B, D) tensors.
    ``parts``: ``rkd_dist``, ``rkd_angle`` (unweighted). Works with student_dim != teacher_dim.
    """
    _non_negative("relational", w_dist=w_dist, w_angle=w_angle)
    return RelationalKD(w_dist, w_angle, _choice("relational", "embedding", embedding, EMBEDDING_KEYS))


# ----------------------------------------------------------------------------- 6. dkd (Decoupled KD)


class DecoupledKD(KDLoss):
    """Decoupled KD (see :func:`dkd`)."""

    name = "dkd"
    progress_aware = True
    tasks = (OPEN_ENDED, MULTIPLE_CHOICE)
    why_not = ("its target / non-target split needs class scores (one per answer or candidate); a count's "
               "output is one number (use logits, which is MSE to the teacher's count there, or logit-mse)")

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: float = DKD_WARMUP):
        super().__init__()
        self.alpha, self.beta, self.T, self.warmup = float(alpha), float(beta), float(T), float(warmup)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, T={self.T}, warmup={self.warmup}"

    def warmup_factor(self, epoch: int | None) -> float:
        """mdistiller's ``min(epoch / warmup, 1)`` with its 1-based epoch, i.e. ``(epoch + 1) /
        warmup`` for our 0-based one; 1 when ``warmup`` is 0 or no epoch is given (a direct call
        outside training). A Python float: no host sync."""
        if epoch is None or self.warmup <= 0:
            return 1.0
        return min((epoch + 1) / self.warmup, 1.0)

    def forward(self, student, teachers, answers, epoch: int | None = None):
        s = self.student(student, "logits")
        B, T = s.shape[0], self.T
        gt = torch.zeros_like(s).scatter_(1, answers.reshape(-1, 1).long(), 1.0).bool()
        other = ~gt
        p_s = F.softmax(s / T, dim=1)
        b_s = torch.cat([(p_s * gt).sum(1, keepdim=True), (p_s * other).sum(1, keepdim=True)], dim=1)
        log_b_s = torch.log(b_s)
        log_p_s2 = F.log_softmax(s / T - 1000.0 * gt, dim=1)

        def one(t_out):
            t = self.teacher(t_out, "logits")
            _same_shape(self.name, "logits", s, t, " (the same answer vocabulary is needed)")
            p_t = F.softmax(t / T, dim=1)
            b_t = torch.cat([(p_t * gt).sum(1, keepdim=True), (p_t * other).sum(1, keepdim=True)], dim=1)
            tckd = F.kl_div(log_b_s, b_t, reduction="sum") * T ** 2 / B
            nckd = F.kl_div(log_p_s2, F.softmax(t / T - 1000.0 * gt, dim=1), reduction="sum") * T ** 2 / B
            return {"dkd_tckd": tckd, "dkd_nckd": nckd}

        m = self.mean_over_teachers(teachers, one)
        loss = self.warmup_factor(epoch) * (self.alpha * m["dkd_tckd"] + self.beta * m["dkd_nckd"])
        return loss, {k: v.detach() for k, v in m.items()}


@LOSSES.register()
@_factory
def dkd(student_dim: int = 768, teacher_dim: int = 768, *, alpha: float = 1.0, beta: float = 8.0,
        T: float = 4.0, warmup: float = DKD_WARMUP) -> KDLoss:
    """Decoupled KD: alpha * target-class KD + beta * non-target-class KD, T^2-scaled, answer as target, linear warm-up.

    Formula (Zhao et al., CVPR 2022; ``megvii-research/mdistiller``, ``distillers/DKD.py``
    ``dkd_loss``)::

        b = [p_gt, 1 - p_gt] of p = softmax(z / T)            (binary target / rest)
        TCKD = T^2 / B * sum_b KL(b_t || b_s)                 (log of the summed probabilities)
        NCKD = T^2 / B * sum_b KL(softmax(z_t / T - 1000 m) || softmax(z_s / T - 1000 m))
        loss = min((epoch + 1) / warmup, 1) * (alpha * TCKD + beta * NCKD)     (epoch 0-based)

    with ``m`` the one-hot mask of the answer: as in mdistiller the target logit is pushed down by
    1000 (not removed), which gives it probability exp(-1000) = 0, i.e. the softmax over the
    non-target classes. The linear warm-up of the whole term is mdistiller's ``DKD.forward_train``
    (``min(epoch / WARMUP, 1)``, epochs counted from 1 there); ``warmup=0`` turns it off.

    Defaults: alpha 1, beta 8, T 4 (mdistiller's CIFAR-100 setting) and ``warmup`` 2 epochs
    (:data:`DKD_WARMUP`). mdistiller warms up over 20 of its 240 CIFAR-100 epochs (1/12 of the
    schedule, long before its first learning-rate step at 150) and uses 1 (no warm-up in effect)
    with ImageNet's beta 0.5; with beta 8 the NCKD term dominates the student's first updates, which
    the warm-up softens. The same share of DualVGR's 25-epoch schedule (lr halved every 10) is
    2 epochs: half weight in epoch 0, full weight from epoch 1 on. ``parts``: ``dkd_tckd``,
    ``dkd_nckd`` (unweighted, without the warm-up factor).
    """
    _positive("dkd", T=T)
    _non_negative("dkd", alpha=alpha, beta=beta, warmup=warmup)
    return DecoupledKD(alpha, beta, T, warmup)


# ----------------------------------------------------------------------------- 7. sp (Similarity-Preserving)


def _sp_gram(f: torch.Tensor) -> torch.Tensor:
    g = f @ f.t()
    return F.normalize(g, p=2, dim=1)


class SimilarityPreservingKD(KDLoss):
    """Similarity-preserving KD (see :func:`sp`)."""

    name = "sp"

    def __init__(self, feature: str = "clip_fused"):
        super().__init__()
        self.feature = feature

    def extra_repr(self) -> str:
        return f"feature={self.feature!r}"

    def forward(self, student, teachers, answers):
        s = self.embedding(student, self.feature, "student")
        g_s = _sp_gram(s)
        B = s.shape[0]

        def one(t_out):
            t = self.embedding(t_out, self.feature, "teacher")
            self.same_batch(s, t, self.feature)
            return {"sp": (_sp_gram(t) - g_s).pow(2).sum() / (B * B)}

        return self.mean_over_teachers(teachers, one)["sp"], {}


@LOSSES.register()
@_factory
def sp(student_dim: int = 768, teacher_dim: int = 768, *, feature: str = "clip_fused") -> KDLoss:
    """Similarity-preserving KD: squared distance between row-normalised batch Gram matrices of a feature.

    Formula (Tung & Mori, ICCV 2019; as mdistiller's ``similarity_loss``)::

        G = row_L2_normalise(F F^T),  F = output[feature].reshape(B, -1)     (B, B)
        loss = ||G_s - G_t||_F^2 / B^2

    ``feature``: clip_fused (default), clip_app, clip_motion, video, question or joint. Works with
    student_dim != teacher_dim.
    """
    return SimilarityPreservingKD(_choice("sp", "feature", feature, EMBEDDING_KEYS))


# ----------------------------------------------------------------------------- 8. pkt (Probabilistic KT)


def _pkt_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's conditional probabilities: cosine similarities (norm + eps in the denominator, NaN
    set to 0) mapped to [0, 1] by (c + 1) / 2 and normalised per row."""
    f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
    c = (f @ f.t() + 1.0) / 2.0
    return c / c.sum(dim=1, keepdim=True)


class ProbabilisticKT(KDLoss):
    """Probabilistic knowledge transfer (see :func:`pkt`)."""

    name = "pkt"

    def __init__(self, embedding: str = "video", eps: float = 1e-7):
        super().__init__()
        self.embedding_key, self.eps = embedding, float(eps)

    def extra_repr(self) -> str:
        return f"embedding={self.embedding_key!r}, eps={self.eps}"

    def forward(self, student, teachers, answers):
        s = self.embedding(student, self.embedding_key, "student")
        p_s = _pkt_probabilities(s, self.eps)

        def one(t_out):
            t = self.embedding(t_out, self.embedding_key, "teacher")
            self.same_batch(s, t, self.embedding_key)
            p_t = _pkt_probabilities(t, self.eps)
            return {"pkt": torch.mean(p_t * torch.log((p_t + self.eps) / (p_s + self.eps)))}

        return self.mean_over_teachers(teachers, one)["pkt"], {}


@LOSSES.register()
@_factory
def pkt(student_dim: int = 768, teacher_dim: int = 768, *, embedding: str = "video", eps: float = 1e-7) -> KDLoss:
    """PKT: KL between teacher and student cosine-similarity conditional distributions over the batch.

    Formula (Passalis & Tefas, ECCV 2018; ``passalis/probabilistic_kt`` ``nn/pkt.py``
    ``cosine_similarity_loss``, identical in mdistiller)::

        x = e / (||e|| + eps);  c_ij = (x_i . x_j + 1) / 2;  p_ij = c_ij / sum_j c_ij      (B, B)
        loss = mean_ij p^t_ij * log((p^t_ij + eps) / (p^s_ij + eps))

    (the mean over all B*B entries, as the official code; eps = 1e-7). ``embedding``: video
    (default), question, joint or a clip feature (flattened). Works with student_dim != teacher_dim.
    """
    _positive("pkt", eps=eps)
    return ProbabilisticKT(_choice("pkt", "embedding", embedding, EMBEDDING_KEYS), eps)


__all__ = ["KDLoss", "FusedKD", "LogitKD", "SimilarityKD", "HintKD", "RelationalKD", "DecoupledKD",
           "SimilarityPreservingKD", "ProbabilisticKT", "FEATURE_KEYS", "EMBEDDING_KEYS", "SIMILARITY_MATRICES",
           "DKD_WARMUP", "LogitMSE", "fused", "logits", "logit_mse",
           "similarity", "hint", "relational", "dkd", "sp", "pkt"]
