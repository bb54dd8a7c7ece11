"""Distillation losses (``variants/kd_losses.py``): each equals a direct (looped) implementation of
its paper / reference-code formula on fixed tensors, golden values pin them, gradients reach the
student only, several teachers average as specified, and bad parameters or shapes fail clearly."""
import math

import numpy as np

import pytest
import torch

import variants  # registers the variants and the distillation losses
import variants.kd_losses
from variants.losses import LOSSES

B, N, D, A = 4, 3, 6, 5
KEYS = ("logits", "clip_fused", "clip_app", "clip_motion", "video", "question")
ALL = ["dkd", "fused", "hint", "logit-mse", "logits", "pkt", "relational", "similarity", "sp"]


def outputs(seed, b=B, n=N, d=D, a=A, dtype=torch.float64, requires_grad=False):
    """A hand-built model-output dict (the keys of DualVGR.forward) of seeded random tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"logits": (b, a), "clip_fused": (b, n, d), "clip_app": (b, n, d), "clip_motion": (b, n, d),
              "video": (b, d), "question": (b, d)}
    out = {}
    for k, s in shapes.items():
        x = torch.randn(*s, generator=g, dtype=dtype)
        if k == "logits":
            x = 2.0 * x  # livelier answer distributions
        out[k] = x.requires_grad_(requires_grad)
    return out


ANSWERS = torch.tensor([0, 3, 1, 4])


def build(name, sd=D, td=D, **params):
    return LOSSES.get(name).fn(student_dim=sd, teacher_dim=td, **params)


def fixed_hint(sd=D, td=D):
    """A hint loss with a fixed (seeded) regressor, so its value can be pinned."""
    m = build("hint", sd, td).double()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        m.regressor.weight.copy_(0.4 * torch.randn(td, sd, generator=g, dtype=torch.float64))
        m.regressor.bias.copy_(0.1 * torch.randn(td, generator=g, dtype=torch.float64))
    return m


# ----------------------------------------------------------------------------- direct formulas
# Written from the papers / reference code with Python loops and scalars, independently of the
# vectorised implementations under test.


def softmax(xs, T=1.0):
    m = max(xs)
    ex = [math.exp((x - m) / T) for x in xs]
    z = sum(ex)
    return [e / z for e in ex]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def norm(u):
    return math.sqrt(dot(u, u))


def smooth_l1(x, beta=1.0):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def huber(x, delta=1.0):
    x = abs(x)
    return 0.5 * x * x if x <= delta else delta * (x - 0.5 * delta)


def flat(out, key):
    if key == "joint":
        return [v + q for v, q in zip(out["video"].tolist(), out["question"].tolist())]
    x = out[key].detach()
    return x.reshape(x.shape[0], -1).tolist()


def ref_fused(s, t, t_app=1.0, t_mo=1.0, kd_alpha=1.0, kd_beta=1.0):
    """train_kd_2.py: KLDivLoss(batchmean)(log_softmax(student_feat / t, dim=2),
    softmax(teacher_fused / t, dim=2)) on (B, N, D): KL summed over clips, divided by B."""
    fused, app, mo = (s_.detach().tolist() for s_ in (t["clip_fused"], s["clip_app"], s["clip_motion"]))
    nb = len(fused)
    l_app = sum(kl(softmax(fused[b][n], t_app), softmax(app[b][n], t_app))
                for b in range(nb) for n in range(len(fused[b]))) / nb
    l_mo = sum(kl(softmax(fused[b][n], t_mo), softmax(mo[b][n], t_mo))
               for b in range(nb) for n in range(len(fused[b]))) / nb
    return kd_alpha * l_app + kd_beta * l_mo, l_app, l_mo


def ref_logits(s, t, T=4.0):
    zs, zt = s["logits"].detach().tolist(), t["logits"].detach().tolist()
    return T * T * sum(kl(softmax(zt[b], T), softmax(zs[b], T)) for b in range(len(zs))) / len(zs)


def sim_matrix(out, key="joint"):
    """Self-similarity: cosine of sample i's and sample j's ``key`` embedding."""
    es = [[x / norm(e) for x in e] for e in flat(out, key)]
    return [[dot(ei, ej) for ej in es] for ei in es]


def cross_matrix(out):
    """TeachText's query x video matrix: cosine of question embedding i and video embedding j."""
    qs = [[x / norm(e) for x in e] for e in flat(out, "question")]
    vs = [[x / norm(e) for x in e] for e in flat(out, "video")]
    return [[dot(q, v) for v in vs] for q in qs]


def ref_similarity(s, ts, delta=1.0, key="joint", matrix="cross"):
    """TeachText: Huber (SmoothL1, delta 1) between the student's matrix and the element-wise
    mean of the teachers' matrices, averaged over all B*B entries; ``matrix="cross"``: question
    x video cosines (TeachText's), ``"self"``: self-similarity of the ``key`` embedding."""
    mat = cross_matrix if matrix == "cross" else (lambda out: sim_matrix(out, key))
    ss = mat(s)
    tms = [mat(t) for t in ts]
    nb = len(ss)
    total = 0.0
    for i in range(nb):
        for j in range(nb):
            target = sum(m[i][j] for m in tms) / len(tms)
            total += huber(ss[i][j] - target, delta)
    return total / (nb * nb)


def ref_hint(s, t, W, bias, key="clip_fused"):
    xs, xt = s[key].detach().reshape(-1, s[key].shape[-1]).tolist(), t[key].reshape(-1, t[key].shape[-1]).tolist()
    W, bias = W.tolist(), bias.tolist()
    total, count = 0.0, 0
    for x, y in zip(xs, xt):
        for k in range(len(W)):
            r = sum(W[k][d] * x[d] for d in range(len(x))) + bias[k]
            total += (r - y[k]) ** 2
            count += 1
    return total / count


def rkd_distances(e):
    nb = len(e)
    d = [[norm([a - b for a, b in zip(e[i], e[j])]) if i != j else 0.0 for j in range(nb)] for i in range(nb)]
    mean = sum(d[i][j] for i in range(nb) for j in range(nb) if i != j) / (nb * (nb - 1))
    return [[x / mean for x in row] for row in d]


def rkd_angles(e):
    nb = len(e)
    out = []
    for i in range(nb):
        for j in range(nb):
            for k in range(nb):
                if j == i or k == i:
                    out.append(0.0)  # normalize(0) = 0 in the reference
                    continue
                u = [a - b for a, b in zip(e[j], e[i])]
                w = [a - b for a, b in zip(e[k], e[i])]
                out.append(dot(u, w) / (norm(u) * norm(w)))
    return out


def ref_relational(s, t, w_dist=1.0, w_angle=2.0, key="video"):
    es, et = flat(s, key), flat(t, key)
    ds, dt = rkd_distances(es), rkd_distances(et)
    nb = len(es)
    l_dist = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(nb) for j in range(nb)) / nb ** 2
    l_angle = sum(smooth_l1(a - b) for a, b in zip(rkd_angles(es), rkd_angles(et))) / nb ** 3
    return w_dist * l_dist + w_angle * l_angle, l_dist, l_angle


def ref_dkd(s, t, answers, alpha=1.0, beta=8.0, T=4.0):
    """DKD as in the paper: TCKD = KL of the binary (target, rest) distributions, NCKD = KL of the
    distributions over the non-target classes only; both T^2-scaled, averaged over the batch."""
    zs, zt, y = s["logits"].detach().tolist(), t["logits"].detach().tolist(), answers.tolist()
    tckd = nckd = 0.0
    for b in range(len(zs)):
        ps, pt = softmax(zs[b], T), softmax(zt[b], T)
        g = y[b]
        tckd += kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        others = [c for c in range(len(zs[b])) if c != g]
        nckd += kl(softmax([zt[b][c] for c in others], T), softmax([zs[b][c] for c in others], T))
    tckd *= T * T / len(zs)
    nckd *= T * T / len(zs)
    return alpha * tckd + beta * nckd, tckd, nckd


def sp_gram(f):
    g = [[dot(a, b) for b in f] for a in f]
    return [[x / norm(row) for x in row] for row in g]


def ref_sp(s, t, key="clip_fused"):
    gs, gt = sp_gram(flat(s, key)), sp_gram(flat(t, key))
    nb = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(nb) for j in range(nb)) / nb ** 2


def pkt_probs(f, eps):
    x = [[v / (norm(e) + eps) for v in e] for e in f]
    c = [[(dot(a, b) + 1) / 2 for b in x] for a in x]
    return [[v / sum(row) for v in row] for row in c]


def ref_pkt(s, t, key="video", eps=1e-7):
    ps, pt = pkt_probs(flat(s, key), eps), pkt_probs(flat(t, key), eps)
    nb = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(nb) for j in range(nb)) / nb ** 2


def reference(name, s, ts, answers=ANSWERS, module=None):
    """The direct formula for ``name`` with default parameters; mean over teachers except for
    similarity (mean matrix)."""
    if name == "similarity":
        return ref_similarity(s, ts)
    one = {
        "fused": lambda t: ref_fused(s, t)[0],
        "logits": lambda t: ref_logits(s, t),
        "hint": lambda t: ref_hint(s, t, module.regressor.weight.detach(), module.regressor.bias.detach()),
        "relational": lambda t: ref_relational(s, t)[0],
        "dkd": lambda t: ref_dkd(s, t, answers)[0],
        "sp": lambda t: ref_sp(s, t),
        "pkt": lambda t: ref_pkt(s, t),
        "logit-mse": lambda t: float(np.mean((s["logits"].numpy() - t["logits"].numpy()) ** 2)),
    }[name]
    return sum(one(t) for t in ts) / len(ts)


# ----------------------------------------------------------------------------- golden values

# Computed once with the direct formulas above (``reference``) on student outputs(0), teacher
# outputs(1) (float64, B=4, N=3, D=6, A=5, answers [0, 3, 1, 4], hint regressor from fixed_hint),
# and pinned here.
GOLDEN = {
    "logit-mse": 11.58978392895881,  # numpy: mean((2 randn - 2 randn)^2) over the (B, A) logits
    "dkd": 24.65256126384673,
    "fused": 4.361194614879003,
    "hint": 1.8676487329084464,
    "logits": 3.8385396615920664,
    "pkt": 0.024544379221883995,
    "relational": 0.19137808365907133,
    "similarity": 0.12751739635279943,  # matrix="cross" (the default): question x video
    "sp": 0.06456963078293183,
}
#: similarity with matrix="self" (the joint embedding's self-similarity, the earlier default), same tensors
GOLDEN_SIMILARITY_SELF = 0.1298216106159242


def make(name, sd=D, td=D, **params):
    return fixed_hint(sd, td) if name == "hint" and not params else build(name, sd, td, **params)


@pytest.mark.parametrize("name", ALL)
def test_equals_direct_formula_and_golden_value(name):
    s, t = outputs(0), outputs(1)
    m = make(name)
    value, _ = m(s, [t], ANSWERS)
    ref = reference(name, s, [t], module=m)
    assert value.item() == pytest.approx(ref, rel=1e-9, abs=1e-15)
    assert value.item() == pytest.approx(GOLDEN[name], rel=1e-9)


def test_registered_names():
    assert LOSSES.list() == ALL


def test_parts_are_the_unweighted_components():
    s, t = outputs(0), outputs(1)
    total, parts = build("fused", t_app=2.0, t_mo=0.5, kd_alpha=0.3, kd_beta=3.0)(s, [t], ANSWERS)
    ref, app, mo = ref_fused(s, t, 2.0, 0.5, 0.3, 3.0)
    assert total.item() == pytest.approx(ref, rel=1e-9)
    assert parts["fused_app"].item() == pytest.approx(app, rel=1e-9)
    assert parts["fused_motion"].item() == pytest.approx(mo, rel=1e-9)

    total, parts = build("relational", w_dist=0.5, w_angle=3.0)(s, [t], ANSWERS)
    ref, dist, angle = ref_relational(s, t, 0.5, 3.0)
    assert total.item() == pytest.approx(ref, rel=1e-9)
    assert parts["rkd_dist"].item() == pytest.approx(dist, rel=1e-9)
    assert parts["rkd_angle"].item() == pytest.approx(angle, rel=1e-9)

    total, parts = build("dkd", alpha=0.5, beta=2.0, T=2.0)(s, [t], ANSWERS)
    ref, tckd, nckd = ref_dkd(s, t, ANSWERS, 0.5, 2.0, 2.0)
    assert total.item() == pytest.approx(ref, rel=1e-9)
    assert parts["dkd_tckd"].item() == pytest.approx(tckd, rel=1e-9)
    assert parts["dkd_nckd"].item() == pytest.approx(nckd, rel=1e-9)


def test_non_default_parameters_follow_the_formulas():
    s, t = outputs(2), outputs(3)
    v, _ = build("logits", T=1.5)(s, [t], ANSWERS)
    assert v.item() == pytest.approx(ref_logits(s, t, 1.5), rel=1e-9)
    v, _ = build("similarity", delta=0.05, matrix="self", embedding="video")(s, [t], ANSWERS)
    assert v.item() == pytest.approx(ref_similarity(s, [t], 0.05, "video", matrix="self"), rel=1e-9)
    v, _ = build("similarity", delta=0.05)(s, [t], ANSWERS)
    assert v.item() == pytest.approx(ref_similarity(s, [t], 0.05), rel=1e-9)
    v, _ = build("relational", embedding="joint")(s, [t], ANSWERS)
    assert v.item() == pytest.approx(ref_relational(s, t, key="joint")[0], rel=1e-9)
    v, _ = build("sp", feature="clip_app")(s, [t], ANSWERS)
    assert v.item() == pytest.approx(ref_sp(s, t, "clip_app"), rel=1e-9)
    v, _ = build("pkt", embedding="question")(s, [t], ANSWERS)
    assert v.item() == pytest.approx(ref_pkt(s, t, "question"), rel=1e-9)
    m = build("hint", feature="video").double()
    v, _ = m(s, [t], ANSWERS)
    assert v.item() == pytest.approx(ref_hint(s, t, m.regressor.weight.detach(), m.regressor.bias.detach(),
                                              "video"), rel=1e-9)


def test_fused_hand_computed_cases():
    m = build("fused")
    # identical teacher and student distributions: zero
    x = outputs(5)
    same = {"clip_app": x["clip_fused"], "clip_motion": x["clip_fused"]}
    assert m(same, [x], ANSWERS)[0].item() == pytest.approx(0.0, abs=1e-15)
    # D = 2: teacher features (0, 0) -> p_t = (1/2, 1/2); student appearance (ln 3, 0) ->
    # p_s = (3/4, 1/4); KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3) per clip. B = 2, N = 3:
    # batchmean sums the 6 clips and divides by B = 2 (not by B * N): 3/2 ln(4/3).
    teacher = {"clip_fused": torch.zeros(2, 3, 2, dtype=torch.float64)}
    app = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).expand(2, 3, 2)
    student = {"clip_app": app, "clip_motion": torch.zeros(2, 3, 2, dtype=torch.float64)}
    loss, parts = m(student, [teacher], ANSWERS[:2])
    assert loss.item() == pytest.approx(1.5 * math.log(4 / 3), rel=1e-12)
    assert parts["fused_motion"].item() == pytest.approx(0.0, abs=1e-15)
    # kd_alpha weights the appearance term; no t^2 factor: t_app = 2 halves the logits
    # -> p_s = softmax(ln 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1)
    m2 = build("fused", t_app=2.0, kd_alpha=0.5)
    q = math.sqrt(3) / (math.sqrt(3) + 1)
    per_clip = 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
    assert m2(student, [teacher], ANSWERS[:2])[0].item() == pytest.approx(0.5 * 6 * per_clip / 2, rel=1e-12)


def test_similarity_matrices_golden_and_hand_computed():
    s, t = outputs(0), outputs(1)
    self_ = build("similarity", matrix="self")
    assert self_(s, [t], ANSWERS)[0].item() == pytest.approx(ref_similarity(s, [t], matrix="self"), rel=1e-9)
    assert self_(s, [t], ANSWERS)[0].item() == pytest.approx(GOLDEN_SIMILARITY_SELF, rel=1e-9)
    # the default is TeachText's cross-modal matrix, not the self-similarity
    assert build("similarity")(s, [t], ANSWERS)[0].item() != pytest.approx(GOLDEN_SIMILARITY_SELF, rel=1e-3)
    # by hand, B = 2, D = 2. Student: questions (1, 0), (0, 1); videos (1, 0), (1, 1) -> cosines
    # [[1, 1/sqrt 2], [0, 1/sqrt 2]] (row: question, column: video; not symmetric). Teacher: the
    # identity. Huber (delta 1) of the differences 0, 1/sqrt 2, 0, 1/sqrt 2 - 1, mean of 4.
    f = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    student = {"question": f([[1.0, 0.0], [0.0, 1.0]]), "video": f([[1.0, 0.0], [1.0, 1.0]])}
    teacher = {"question": f([[1.0, 0.0], [0.0, 1.0]]), "video": f([[1.0, 0.0], [0.0, 1.0]])}
    r = 1 / math.sqrt(2)
    expected = (0.5 * r * r + 0.5 * (r - 1) ** 2) / 4
    assert build("similarity")(student, [teacher], ANSWERS[:2])[0].item() == pytest.approx(expected, rel=1e-12)
    m = build("similarity").matrix(student, "student")
    torch.testing.assert_close(m, f([[1.0, r], [0.0, r]]), rtol=1e-12, atol=1e-12)


def test_dkd_warmup_follows_the_epoch():
    """mdistiller: min(epoch / warmup, 1) with 1-based epochs = min((epoch + 1) / warmup, 1) here."""
    s, t = outputs(0), outputs(1)
    full = ref_dkd(s, t, ANSWERS)[0]
    m = build("dkd")  # default warm-up: 2 epochs
    assert m.progress_aware and m.warmup == 2.0
    assert m(s, [t], ANSWERS, epoch=0)[0].item() == pytest.approx(0.5 * full, rel=1e-9)
    assert m(s, [t], ANSWERS, epoch=1)[0].item() == pytest.approx(full, rel=1e-9)
    assert m(s, [t], ANSWERS, epoch=24)[0].item() == pytest.approx(full, rel=1e-9)
    assert m(s, [t], ANSWERS)[0].item() == pytest.approx(full, rel=1e-9)  # no epoch: full weight
    m5 = build("dkd", warmup=5)
    assert [round(m5.warmup_factor(e), 12) for e in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert build("dkd", warmup=0)(s, [t], ANSWERS, epoch=0)[0].item() == pytest.approx(full, rel=1e-9)
    # the unweighted parts do not carry the factor
    _, parts = m(s, [t], ANSWERS, epoch=0)
    assert parts["dkd_tckd"].item() == pytest.approx(ref_dkd(s, t, ANSWERS)[1], rel=1e-9)


def test_objective_routes_the_epoch_to_progress_aware_losses_only():
    from variants.losses import Objective

    s, t = outputs(0), outputs(1)
    obj = Objective({}, [{"name": "dkd", "weight": 2.0}, {"name": "logits", "weight": 1.0}], student_dim=D,
                    teacher_dim=D)
    ce = torch.nn.functional.cross_entropy(s["logits"], ANSWERS).item()
    dkd_full, logit = ref_dkd(s, t, ANSWERS)[0], ref_logits(s, t)
    for epoch, factor in ((0, 0.5), (1, 1.0), (7, 1.0)):
        total, parts = obj(s, ANSWERS, [t], epoch=epoch)
        assert total.item() == pytest.approx(ce + 2.0 * factor * dkd_full + logit, rel=1e-9)
        assert parts["kd_logits"].item() == pytest.approx(logit, rel=1e-9)
    assert not build("logits").progress_aware  # called without the epoch


def test_hand_computed_zero_cases():
    x = outputs(6)
    for name in ("logits", "similarity", "relational", "dkd", "sp", "pkt", "logit-mse"):
        assert build(name)(x, [x], ANSWERS)[0].item() == pytest.approx(0.0, abs=1e-12), name


# ----------------------------------------------------------------------------- gradients

USES = {"fused": ("clip_app", "clip_motion"), "logits": ("logits",), "similarity": ("video", "question"),
        "hint": ("clip_fused",), "relational": ("video",), "dkd": ("logits",), "sp": ("clip_fused",),
        "pkt": ("video",), "logit-mse": ("logits",)}


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_the_student_only(name):
    s = outputs(7, requires_grad=True)
    teachers = [outputs(8, requires_grad=True), outputs(9, requires_grad=True)]
    m = make(name)
    loss, parts = m(s, teachers, ANSWERS)
    loss.backward()
    for key in USES[name]:
        assert s[key].grad is not None and s[key].grad.abs().sum() > 0, key
    for t in teachers:
        for key in KEYS:
            assert t[key].grad is None, key
    if name == "hint":
        assert m.regressor.weight.grad.abs().sum() > 0
    assert all(not v.requires_grad and v.dim() == 0 for v in parts.values())


# ----------------------------------------------------------------------------- registry / defaults


@pytest.mark.parametrize("name", LOSSES.list())
def test_every_loss_builds_with_defaults_and_gives_a_finite_scalar(name):
    entry = LOSSES.get(name)
    assert entry.description.strip()
    m = entry.fn(student_dim=D, teacher_dim=D)
    assert isinstance(m, variants.kd_losses.KDLoss)
    s, t = outputs(10, dtype=torch.float32), outputs(11, dtype=torch.float32)
    loss, parts = m(s, [t], ANSWERS)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert isinstance(parts, dict)
    for k, v in parts.items():
        assert isinstance(k, str) and v.dim() == 0 and not v.requires_grad and torch.isfinite(v)


@pytest.mark.parametrize("name", ALL)
def test_several_teachers_mean(name):
    s, t1, t2 = outputs(12), outputs(13), outputs(14)
    m = make(name)
    both, parts = m(s, [t1, t2], ANSWERS)
    one1, parts1 = m(s, [t1], ANSWERS)
    one2, parts2 = m(s, [t2], ANSWERS)
    assert both.item() == pytest.approx(reference(name, s, [t1, t2], module=m), rel=1e-9)
    if name == "similarity":
        # TeachText: against the mean matrix, not the mean of the per-teacher losses
        assert both.item() != pytest.approx((one1.item() + one2.item()) / 2, rel=1e-6)
    else:
        assert both.item() == pytest.approx((one1.item() + one2.item()) / 2, rel=1e-9)
        for k in parts:
            assert parts[k].item() == pytest.approx((parts1[k].item() + parts2[k].item()) / 2, rel=1e-9)


def test_similarity_several_teachers_is_the_mean_matrix():
    s, t1, t2 = outputs(15), outputs(16), outputs(17)
    m = build("similarity")
    value, _ = m(s, [t1, t2], ANSWERS)
    mean_matrix = (m.matrix(t1, "teacher") + m.matrix(t2, "teacher")) / 2
    direct = torch.nn.functional.smooth_l1_loss(m.matrix(s, "student"), mean_matrix)
    assert value.item() == pytest.approx(direct.item(), rel=1e-12)
    assert value.item() == pytest.approx(ref_similarity(s, [t1, t2]), rel=1e-9)


# ----------------------------------------------------------------------------- dims and errors


@pytest.mark.parametrize("name", ["hint", "relational", "similarity", "sp", "pkt"])
def test_student_and_teacher_dims_may_differ(name):
    s, t = outputs(18, d=D), outputs(19, d=10)
    m = make(name, sd=D, td=10)
    loss, _ = m(s, [t], ANSWERS)
    assert torch.isfinite(loss)
    if name == "hint":
        assert m.regressor.weight.shape == (10, D)
        assert loss.item() == pytest.approx(ref_hint(s, t, m.regressor.weight.detach(), m.regressor.bias.detach()),
                                            rel=1e-9)
    else:
        assert loss.item() == pytest.approx(reference(name, s, [t]), rel=1e-9)


@pytest.mark.parametrize("name, key, s_shape, t_shape", [
    ("fused", "clip_app", (4, 3, 6), (4, 3, 10)),
    ("logits", "logits", (4, 5), (4, 7)),
    ("dkd", "logits", (4, 5), (4, 7)),
])
def test_needs_equal_shapes(name, key, s_shape, t_shape):
    s, t = outputs(20, d=6, a=5), outputs(21, d=10, a=7)
    with pytest.raises(ValueError) as e:
        build(name)(s, [t], ANSWERS)
    msg = str(e.value)
    assert repr(name) in msg and str(s_shape) in msg and str(t_shape) in msg
    if name == "fused":  # caught when built, too
        with pytest.raises(ValueError, match="'fused'.*6.*10"):
            build("fused", sd=6, td=10)
        # different clip counts (e.g. node sparsity in the student)
        with pytest.raises(ValueError, match=r"\(4, 2, 6\).*\(4, 3, 6\)"):
            build("fused")(outputs(22, n=2), [outputs(23, n=3)], ANSWERS)


@pytest.mark.parametrize("name", ALL)
def test_unknown_parameter_names_the_loss_and_the_key(name):
    with pytest.raises(TypeError, match=f"'{name}'.*'bogus_key'"):
        build(name, bogus_key=1.0)


@pytest.mark.parametrize("name, params, key", [
    ("hint", {"feature": "logits"}, "feature"),
    ("sp", {"feature": "nope"}, "feature"),
    ("similarity", {"matrix": "self", "embedding": "nope"}, "embedding"),
    ("similarity", {"embedding": "video"}, "embedding"),  # embedding belongs to matrix="self"
    ("similarity", {"matrix": "diagonal"}, "matrix"),
    ("dkd", {"warmup": -1}, "warmup"),
    ("relational", {"embedding": "nope"}, "embedding"),
    ("pkt", {"embedding": "nope"}, "embedding"),
    ("logits", {"T": 0}, "T"),
    ("dkd", {"T": -1.0}, "T"),
    ("fused", {"t_app": 0.0}, "t_app"),
    ("fused", {"kd_beta": "x"}, "kd_beta"),
    ("similarity", {"delta": 0}, "delta"),
    ("relational", {"w_angle": -1}, "w_angle"),
])
def test_bad_parameter_value_names_the_loss_and_the_key(name, params, key):
    with pytest.raises(ValueError, match=f"'{name}'.*{key}"):
        build(name, **params)


def test_objective_reports_a_bad_parameter():
    from variants.losses import Objective

    with pytest.raises(ValueError, match="featur"):
        Objective({}, [{"name": "hint", "params": {"featur": "video"}}], student_dim=D, teacher_dim=D)


@pytest.mark.parametrize("name", ALL)
def test_no_teacher_is_an_error(name):
    with pytest.raises(ValueError, match=f"'{name}'.*teacher"):
        make(name)(outputs(24), [], ANSWERS)


def test_missing_output_is_named():
    s = outputs(25)
    del s["clip_app"]
    with pytest.raises(ValueError, match="'fused'.*student.*'clip_app'"):
        build("fused")(s, [outputs(26)], ANSWERS)


# ----------------------------------------------------------------------------- the real model


def test_smoke_with_tiny_dualvgr_models():
    torch.manual_seed(0)
    kw = dict(question_vocab=30, answer_vocab=7, vision_dim=12, module_dim=16, word_dim=8, num_clips=3)
    student = variants.create("dualvgr", **kw)
    teacher = variants.create("dualvgr", **kw).eval().requires_grad_(False)
    b = 4
    app, mot = torch.randn(b, 3, 2, 12), torch.randn(b, 3, 12)
    q, lengths = torch.randint(1, 30, (b, 5)), torch.tensor([5, 3, 4, 2])
    answers = torch.tensor([0, 6, 2, 3])
    with torch.no_grad():
        t_out = teacher(app, mot, q, lengths)
    for name in LOSSES.list():
        student.zero_grad(set_to_none=True)
        s_out = student(app, mot, q, lengths)
        loss, _ = LOSSES.get(name).fn(student_dim=16, teacher_dim=16)(s_out, [t_out], answers)
        assert torch.isfinite(loss), name
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
        assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.cuda
def test_no_host_sync_on_cuda():
    dev = torch.device("cuda")
    s = {k: v.to(dev).float().requires_grad_() for k, v in outputs(27).items()}
    t = {k: v.to(dev).float() for k, v in outputs(28).items()}
    answers = ANSWERS.to(dev)
    modules = {name: build(name).to(dev) for name in LOSSES.list()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _name, m in modules.items():
            loss, parts = m(s, [t, t], answers)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- tasks


def test_logit_kd_on_a_count_is_l2_to_the_teachers_output():
    from variants.kd_losses import LogitMSE
    m = build("logits").for_task("count")
    assert isinstance(m, LogitMSE)
    s, t = outputs(0, a=1), outputs(1, a=1)
    value, _ = m(s, [t], ANSWERS)
    assert value.item() == pytest.approx(float(np.mean((s["logits"].numpy() - t["logits"].numpy()) ** 2)), rel=1e-12)


@pytest.mark.parametrize("name,task", [("dkd", "count")])
def test_a_loss_without_meaning_for_a_task_names_both(name, task):
    with pytest.raises(ValueError, match=f"{name}.*{task}"):
        build(name).for_task(task)


def test_a_student_with_dkd_on_a_count_set_fails_when_configured():
    obj_ok = variants.Objective({}, [{"name": "logits", "weight": 1.0}], 16, 16, task="multiple-choice")
    assert obj_ok.kd[0].name == "logits"
    with pytest.raises(ValueError, match="'dkd' has no meaning for the count task"):
        variants.Objective({}, [{"name": "dkd", "weight": 1.0}], 16, 16, task="count")
