"""DualVGR's auxiliary losses: vectorised versions equal the reference's direct formulas, and
golden values on fixed tensors pin them."""
import pytest
import torch
import torch.nn.functional as F

import variants
from variants.losses import common_loss, dualvgr_loss, hsic_dependence


def ref_common_loss(emb1, emb2):
    """Reference utils.common_loss, verbatim in meaning."""
    emb1 = emb1 - torch.mean(emb1, dim=1, keepdim=True)
    emb2 = emb2 - torch.mean(emb2, dim=1, keepdim=True)
    emb1 = F.normalize(emb1, p=2, dim=2)
    emb2 = F.normalize(emb2, p=2, dim=2)
    cov1 = torch.bmm(emb1, emb1.transpose(1, 2))
    cov2 = torch.bmm(emb2, emb2.transpose(1, 2))
    return torch.mean((cov1 - cov2) ** 2)


def ref_hsic(emb1, emb2, dim):
    """Reference utils.loss_dependence: explicit centring matrix and a loop of traces."""
    R = torch.eye(dim, dtype=emb1.dtype) - (1 / dim) * torch.ones(dim, dim, dtype=emb1.dtype)
    K1 = torch.bmm(emb1, emb1.transpose(1, 2))
    K2 = torch.bmm(emb2, emb2.transpose(1, 2))
    ans = torch.bmm(torch.bmm(R.expand_as(K1), K1), torch.bmm(R.expand_as(K2), K2))
    total = 0
    for b in range(emb1.size(0)):
        total = total + torch.trace(ans[b])
    return total


def fixed(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 8, 16), (1, 16, 7)])
def test_hsic_equals_reference_loop(shape):
    a, b = fixed(shape, 0), fixed(shape, 1)
    torch.testing.assert_close(hsic_dependence(a, b), ref_hsic(a, b, shape[1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 8, 16)])
def test_common_loss_equals_reference(shape):
    a, b = fixed(shape, 2), fixed(shape, 3)
    torch.testing.assert_close(common_loss(a, b), ref_common_loss(a, b), rtol=1e-12, atol=1e-12)


def test_golden_values():
    """Values of the reference formulas on fixed tensors (computed once with the looped formulas
    above and pinned here)."""
    a, b = fixed((2, 3, 4), 0), fixed((2, 3, 4), 1)
    assert hsic_dependence(a, b).item() == pytest.approx(GOLDEN_HSIC, rel=1e-9)
    assert common_loss(a, b).item() == pytest.approx(GOLDEN_COMMON, rel=1e-9)


# pinned from ref_hsic / ref_common_loss on fixed((2, 3, 4), 0), fixed((2, 3, 4), 1)
GOLDEN_HSIC = 68.51086920262011
GOLDEN_COMMON = 0.24147705252412802


def test_hand_computed_cases():
    # identical inputs: common loss is exactly zero
    a = fixed((3, 4, 5), 4)
    assert common_loss(a, a).item() == pytest.approx(0.0, abs=1e-15)
    # one node pair per graph, N = 2: HSIC = trace(R K1 R K2) by hand
    e1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # K1 = I
    e2 = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]], dtype=torch.float64)  # K2 = [[2,0],[0,2]]
    # R = [[.5,-.5],[-.5,.5]]; R K1 = R; R K2 = 2R; trace(R 2R) = 2 trace(R) = 2
    assert hsic_dependence(e1, e2).item() == pytest.approx(2.0)


def test_dualvgr_loss_weights_and_averaging():
    torch.manual_seed(0)
    layers = 2
    out = {"logits": torch.randn(4, 6)}
    for k in ("specific_app", "common_app", "specific_motion", "common_motion"):
        out[k] = [torch.randn(4, 3, 5) for _ in range(layers)]
    y = torch.tensor([0, 1, 2, 3])
    total, parts = dualvgr_loss(out, y, alpha=0.7, beta=0.01)
    ce = F.cross_entropy(out["logits"], y)
    com = sum(ref_common_loss(out["common_app"][i], out["common_motion"][i]) for i in range(layers)) / layers
    dep = sum(ref_hsic(out["specific_app"][i], out["common_app"][i], 3)
              + ref_hsic(out["specific_motion"][i], out["common_motion"][i], 3) for i in range(layers)) / layers
    torch.testing.assert_close(total, ce + 0.7 * com + 0.01 * dep)
    torch.testing.assert_close(parts["ce"], ce)
    # question-only outputs: plain cross entropy
    total_q, _ = dualvgr_loss({"logits": out["logits"]}, y, alpha=1, beta=1)
    torch.testing.assert_close(total_q, ce)


def test_registered_dualvgr_uses_reference_weights():
    cfg = variants.get_config("dualvgr")
    assert cfg.loss == {"alpha": 1.0, "beta": 1e-8}


# ----------------------------------------------------------------------------- precision
# Under bf16 autocast the model's outputs are bf16. The objective computes every loss in fp32 from
# them (autocast off, .float() first), so its values equal the fp32 computation on the same
# bf16-rounded outputs. The outputs come from Linear layers run under CPU autocast (this CPU may
# not run bf16 LSTMs, so not from DualVGR itself).

B_, N_, D_, A_ = 16, 4, 32, 40


def bf16_outputs(seed: int) -> dict:
    """A model-output dict with every key the objective and the distillation losses read, made
    by Linear layers under bf16 autocast (so bf16 tensors, with autograd to fp32 leaves)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B_, N_, D_, generator=g)
    head = {k: torch.nn.Linear(D_, A_ if k == "logits" else D_) for k in
            ("logits", "clip_fused", "clip_app", "clip_motion", "video", "question", "common_app", "common_motion",
             "specific_app", "specific_motion", "decoder")}
    for m in head.values():
        for p in m.parameters():
            p.data = 0.3 * torch.randn(p.shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = {k: head[k](x) for k in ("clip_fused", "clip_app", "clip_motion")}
        out["logits"] = 3.0 * head["logits"](x.mean(1))
        out["video"], out["question"] = head["video"](x.mean(1)), head["question"](x[:, 0])
        for k in ("common_app", "common_motion", "specific_app", "specific_motion"):
            out[k] = [head[k](x), head[k](x.flip(1))]  # two graph layers
        recon = head["decoder"](out["clip_app"])
        out["recon_loss"] = F.mse_loss(recon, x)  # as DualVGR.forward does (autocast runs mse_loss in fp32)
        out["_recon_bf16"] = recon
    return out


def all_losses_objective():
    from variants.losses import LOSSES, Objective

    torch.manual_seed(0)  # the hint regressor's initialisation
    return Objective({"alpha": 1.0, "beta": 1e-3, "recon_weight": 1.0},
                     [{"name": n, "weight": 1.0} for n in LOSSES.list()], student_dim=D_, teacher_dim=D_)


@pytest.mark.capability
def test_bf16_mode_losses_equal_fp32_on_the_same_outputs():
    from variants.losses import to_fp32

    s, t = bf16_outputs(0), bf16_outputs(1)
    assert s["logits"].dtype == torch.bfloat16 and s["common_app"][0].dtype == torch.bfloat16
    answers = torch.randint(0, A_, (B_,), generator=torch.Generator().manual_seed(2))
    obj = all_losses_objective()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = obj(s, answers, [t], epoch=3)
    ref_total, ref_parts = obj(to_fp32(s), answers, [to_fp32(t)], epoch=3)  # fp32, no autocast
    assert total.dtype == torch.float32
    assert set(parts) == set(ref_parts) and {"ce", "common", "hsic", "recon", "kd_similarity", "kd_pkt"} <= set(parts)
    for k in ref_parts:
        assert parts[k].dtype == torch.float32, k
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=1e-5, atol=0, msg=k)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
    # the reconstruction term: autocast computes mse_loss in fp32 from the bf16 reconstruction
    x = torch.randn(B_, N_, D_, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s["recon_loss"], F.mse_loss(s["_recon_bf16"].float(), x), rtol=1e-6, atol=0)
    total.backward()  # gradients reach the bf16 graph's fp32 leaves


@pytest.mark.capability
def test_without_the_fp32_objective_bf16_losses_are_off():
    """What the test above guards against: the same losses computed in bf16 (the modules called
    directly under autocast on the bf16 outputs) differ from fp32 by far more than 1e-5."""
    from variants.losses import to_fp32

    s, t = bf16_outputs(0), bf16_outputs(1)
    answers = torch.randint(0, A_, (B_,), generator=torch.Generator().manual_seed(2))
    obj = all_losses_objective()
    worst = 0.0
    for _name, module in zip(obj.kd_names, obj.kd):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(s, [t], answers)[0]
        ref = module(to_fp32(s), [to_fp32(t)], answers)[0]
        worst = max(worst, abs(low.float().item() - ref.item()) / abs(ref.item()))
    assert worst > 1e-3
