"""Where our DualVGR is formulated differently from the reference, it computes the same function.

Each test builds the straightforward (reference-style) formulation from the same parameters and
compares outputs and gradients, in float64.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import variants
from variants.dualvgr import MaskedBiLSTM, PunishGAT, QueryAttn, full_graph_adjacency, reverse_padded


@pytest.fixture(autouse=True)
def _f64():
    """float64 for these tests only (set per test, not at import, which would leak into other modules)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def packed_bilstm(lstm: nn.LSTM, x, lengths):
    """The reference: pack (lengths on the CPU), run, unpack, pad back to x.size(1)."""
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, (h, _) = lstm(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
    return out, torch.cat([h[0], h[1]], -1)


def copy_to_bidirectional(m: MaskedBiLSTM) -> nn.LSTM:
    ref = nn.LSTM(m.fwd.input_size, m.fwd.hidden_size, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(ref, name).copy_(getattr(m.fwd, name))
            getattr(ref, name + "_reverse").copy_(getattr(m.bwd, name))
    return ref


def test_reverse_padded_is_an_involution():
    x = torch.arange(2 * 5).view(2, 5, 1).double()
    lengths = torch.tensor([3, 5])
    r = reverse_padded(x, lengths)
    assert r[0, :, 0].tolist() == [2, 1, 0, 3, 4]
    assert r[1, :, 0].tolist() == [9, 8, 7, 6, 5]
    assert torch.equal(reverse_padded(r, lengths), x)


@pytest.mark.parametrize("B,L,lengths", [(4, 7, [7, 3, 1, 5]), (3, 4, [4, 4, 4]), (5, 9, [1, 2, 9, 3, 8])])
def test_masked_bilstm_equals_packed(B, L, lengths):
    torch.manual_seed(0)
    m = MaskedBiLSTM(6, 5)
    ref = copy_to_bidirectional(m)
    x = torch.randn(B, L, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    lengths = torch.tensor(lengths)
    out, h = m(x, lengths)
    out_r, h_r = packed_bilstm(ref, x_ref, lengths)
    torch.testing.assert_close(out, out_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, h_r, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(out)
    v = torch.randn_like(h)
    ((out * w).sum() + (h * v).sum()).backward()
    ((out_r * w).sum() + (h_r * v).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        torch.testing.assert_close(getattr(m.fwd, name).grad, getattr(ref, name).grad)
        torch.testing.assert_close(getattr(m.bwd, name).grad, getattr(ref, name + "_reverse").grad)


def direct_gat(gat: PunishGAT, x, adj, scores):
    """Reference punishGAT (eval mode, no dropout): per head, the (B, N, N, 2F) pair tensor."""
    B, N, _ = x.shape
    F_ = gat.head_dim
    heads = []
    for h in range(gat.heads):
        W = gat.W.weight[h * F_:(h + 1) * F_]
        b = gat.W.bias[h * F_:(h + 1) * F_]
        Wh = x @ W.t() + b
        rows = Wh.repeat(1, 1, N).view(B, N * N, F_)
        cols = Wh.repeat(1, N, 1)
        pairs = torch.cat([rows, cols], dim=2).view(B, N, N, 2 * F_)
        e = F.leaky_relu(pairs @ gat.a[h] + gat.a_bias[h], gat.alpha)
        att = torch.where(adj > 0, e, -9e15 * torch.ones_like(e))
        Wh = Wh * scores.expand(B, N, F_)
        heads.append(F.elu(torch.bmm(torch.softmax(att, -1), Wh)))
    return torch.cat(heads, dim=2)


@pytest.mark.parametrize("N", [4, 8])
def test_gat_decomposition_equals_pair_formula(N):
    torch.manual_seed(1)
    gat = PunishGAT(16, 4, heads=4).eval()
    with torch.no_grad():  # non-zero biases so the bias paths are checked too
        gat.W.bias.normal_()
        gat.a_bias.normal_()
    x = torch.randn(3, N, 16)
    scores = torch.sigmoid(torch.randn(3, N, 1))
    adj = full_graph_adjacency(N)
    adj_sparse = adj.clone()
    adj_sparse[0, 1:] = 0  # masking path
    for a in (adj, adj_sparse):
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        y1, y2 = gat(x1, a, scores), direct_gat(gat, x2, a, scores)
        torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(y1)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_gat_init_uses_per_head_xavier_bounds():
    gat = PunishGAT(768, 192)
    assert gat.W.weight.abs().max() <= (6 / (768 + 192)) ** 0.5
    assert gat.W.weight.abs().max() > 0.9 * (6 / (768 + 192)) ** 0.5
    assert gat.a.abs().max() <= (6 / (2 * 192 + 1)) ** 0.5
    assert not gat.W.bias.any() and not gat.a_bias.any()


def test_query_attention_mask_equals_loop():
    torch.manual_seed(2)
    qa = QueryAttn(8)
    words, dyn = torch.randn(4, 6, 5), torch.randn(4, 6, 8)
    lengths = torch.tensor([6, 2, 1, 4])
    emb, attn = qa(words, dyn, lengths)
    # reference: softmax over all positions, loop-built mask, renormalise with +1e-5
    raw = torch.softmax(qa.fc(F.normalize(qa.feat_enhance(dyn), dim=-1)).squeeze(2), dim=1)
    mask = torch.zeros(4, 6)
    for i in range(4):
        mask[i, :lengths[i]] = 1
    ref = raw * mask
    ref = ref / (ref.sum(1) + 1e-5).view(4, 1)
    torch.testing.assert_close(attn, ref)
    torch.testing.assert_close(emb, torch.bmm(ref.unsqueeze(1), words).squeeze(1))


def test_every_graph_layer_is_used_with_several_units():
    """Reference bug: GAT index i + j reuses modules when unit_layers and graph_layers are both > 1.
    With the fix, every GAT of a 2-unit, 2-layer model receives gradient from the training loss
    (the common graphs of earlier layers reach it only through the auxiliary losses, as in the
    reference)."""
    torch.manual_seed(3)
    m = variants.create("dualvgr", question_vocab=30, answer_vocab=7, vision_dim=12, module_dim=16,
                        word_dim=8, num_clips=3, unit_layers=2, graph_layers=2)
    out = m(torch.randn(4, 3, 2, 12), torch.randn(4, 3, 12), torch.randint(1, 30, (4, 5)), torch.tensor([5, 2, 1, 3]))
    assert len(out["common_app"]) == 4
    loss, _ = variants.loss_fn(variants.get_config("dualvgr"))(out, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    unit = m.visual_input_unit
    for name in ("appearance_GCN", "motion_GCN", "acGCN", "mcGCN"):
        for k, gat in enumerate(getattr(unit, name)):
            assert gat.W.weight.grad is not None and gat.W.weight.grad.abs().sum() > 0, f"{name}[{k}] unused"


def test_padding_does_not_change_the_model_output():
    """Extra padding columns must not change anything (the masks really mask)."""
    torch.manual_seed(4)
    m = variants.create("dualvgr", question_vocab=30, answer_vocab=7, vision_dim=12, module_dim=16,
                        word_dim=8, num_clips=3).eval()
    app, mot = torch.randn(3, 3, 2, 12), torch.randn(3, 3, 12)
    q = torch.randint(1, 30, (3, 5))
    lengths = torch.tensor([5, 2, 3])
    q = q * (torch.arange(5) < lengths.unsqueeze(1))
    q_padded = torch.cat([q, torch.zeros(3, 4, dtype=q.dtype)], 1)
    with torch.no_grad():
        a = m(app, mot, q, lengths)["logits"]
        b = m(app, mot, q_padded, lengths)["logits"]
    torch.testing.assert_close(a, b)
