"""The transformer family (variants/transformer.py): each SViTT mechanism against a small hand-computed case, the
blockwise sparse attention against dense attention with the same mask, FLOPs that count what is computed (node and
edge sparsity computing less, the SViTT-style variant >= 2x cheaper than its dense control at msvd size), and
every new variant trained through ``ablate.py run`` on the three synthetic tasks."""
from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import variants
from harness.data.sizes import SIZES
from harness.measurement import flops as F
from harness.model.inputs import random_inputs
from variants.transformer import (TransformerConfig, VideoTextTransformer, attention, block_pattern,
                                  block_sparse_attention, block_sparse_mask, expansion_frames, frame_indices,
                                  hash_scores, keep_top)

TINY = SIZES["tiny"].model_config()
NEW = ["transformer", "transformer-svitt", "transformer-svitt-expand"]
STUDENTS = [*variants.list("dualvgr-from-transformer-*"), *variants.list("transformer-from-dualvgr-*")]


# ----------------------------------------------------------------------------- edge sparsity


SCORES = torch.tensor([[.9, .1, .5, .2], [.3, .8, .1, .7], [.2, .6, .4, .1], [.5, .2, .9, .3]])


def test_block_pattern_is_the_local_window_then_the_best_non_local_random_blocks():
    # by hand: row i keeps block i, then the highest score among the other blocks
    assert block_pattern(4, 1, 1, SCORES).tolist() == [[0, 2], [1, 3], [2, 1], [3, 2]]
    # a window of 3 is cyclic (SViTT rolls the blocks): block 0's left neighbour is block 3
    assert block_pattern(4, 3, 0, SCORES).tolist() == [[3, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 0]]
    # two random blocks, sorted; the local ones never drawn even where their score is the highest
    assert block_pattern(4, 1, 2, SCORES).tolist() == [[0, 2, 3], [1, 0, 3], [2, 0, 1], [3, 0, 2]]


def test_block_sparse_mask_by_hand():
    # 4 tokens in blocks of 2; block 0 sees block 0, block 1 sees blocks 1 and 0; [CLS] (row/col 0) sees and is seen
    mask = block_sparse_mask(4, 2, torch.tensor([[0, 0], [1, 0]]))
    assert mask.int().tolist() == [[1, 1, 1, 1, 1],
                                   [1, 1, 1, 0, 0],
                                   [1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 1],
                                   [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("length,block,local,random", [(10, 3, 1, 1), (12, 4, 1, 1), (17, 2, 3, 2), (9, 3, 1, 0)])
def test_blockwise_sparse_attention_equals_dense_attention_with_the_same_mask(length, block, local, random):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 1 + length, 8, dtype=torch.float64) for _ in range(3))
    blocks = -(-length // block)
    pattern = block_pattern(blocks, local, random, torch.rand(blocks, blocks))
    sparse = block_sparse_attention(q, k, v, block, pattern)
    dense, _ = attention(q, k, v, mask=block_sparse_mask(length, block, pattern))
    torch.testing.assert_close(sparse, dense[:, :, 1:], rtol=1e-12, atol=1e-12)


def test_sparse_attention_by_hand_one_head_one_dim():
    # [CLS] + 2 tokens in blocks of 1, each token sees [CLS] and itself only: softmax over (q k_cls, q k_self)
    q = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 3, 1)
    k = torch.tensor([1.0, 0.5, -1.0]).view(1, 1, 3, 1)
    v = torch.tensor([10.0, 20.0, 30.0]).view(1, 1, 3, 1)
    out = block_sparse_attention(q, k, v, 1, torch.tensor([[0], [1]])).flatten().tolist()
    w1 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.5))  # token 1: scores 1*1 = 1 ([CLS]), 1*0.5 (itself)
    w2 = math.exp(2.0) / (math.exp(2.0) + math.exp(-2.0))  # token 2: 2*1, 2*-1
    assert out == pytest.approx([w1 * 10 + (1 - w1) * 20, w2 * 10 + (1 - w2) * 30])


def test_evaluation_draws_a_fixed_pattern_training_a_random_one():
    a, b = hash_scores(8, 8, "cpu"), hash_scores(8, 8, "cpu")
    assert torch.equal(a, b) and ((a >= 0) & (a < 1)).all() and len(set(a.flatten().tolist())) == 64
    model = variants.create("transformer-svitt", **TINY)
    model.eval()
    p1, p2 = model.edge_pattern(20, 2, "cpu"), model.edge_pattern(20, 2, "cpu")
    assert p1[0] == 2 and torch.equal(p1[1], p2[1]) and p1[1].shape == (10, 3)
    assert model.edge_pattern(20, 5, "cpu")[1].shape == (4, 3)  # 4 blocks: each sees 3 of them
    assert model.edge_pattern(20, 7, "cpu") is None  # 3 blocks, 1 local + 2 random: dense is the same, cheaper


# ----------------------------------------------------------------------------- node sparsity


def test_keep_top_keeps_the_first_token_and_the_best_scored_in_order():
    x = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0]]).unsqueeze(-1)  # [CLS] then 4 tokens
    score = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    kept, idx = keep_top(x, score, 0.5)  # ceil(0.5 x 4) = 2: tokens 1 and 2 (scores .4, .3)
    assert kept.flatten().tolist() == [9.0, 2.0, 3.0] and idx.tolist() == [[1, 2]]
    kept, idx = keep_top(x, score, 0.6)  # ceil(2.4) = 3, kept in their order, not the score's
    assert kept.flatten().tolist() == [9.0, 2.0, 3.0, 4.0] and idx.tolist() == [[1, 2, 3]]


def test_video_node_sparsity_prunes_by_the_cls_attention_after_each_listed_layer():
    model = variants.create("transformer", **TINY, video_keep=0.5, video_drop_layers=[0, 2]).eval()
    app, mot, q, lengths = random_inputs(model.cfg.__dict__, 3, "cpu")
    seen = []
    for layer in model.video_layers:
        layer.register_forward_hook(lambda m, i, o: seen.append(int(o[0].shape[1])))
    out = model(app, mot, q, lengths)
    # 1 + 4 clips x (4 frames + 1 motion) = 21 tokens; layer 0 prunes to 1 + 10, layer 2 to 1 + 5
    assert seen == [21, 11, 11] + [6] and out["visual_tokens"].shape == (3, 5, 64)


def test_the_kept_tokens_are_those_the_cls_token_attends_to_most():
    torch.manual_seed(0)
    model = variants.create("transformer", **TINY, video_keep=0.25, video_drop_layers=[0]).eval()
    app, mot, q, lengths = random_inputs(model.cfg.__dict__, 2, "cpu")
    x, _ = model.visual_tokens(app, mot, None)
    after, first = model.video_layers[0](x)
    expected = first.mean(1)[:, 1:].topk(5, dim=1).indices.sort(dim=1).values  # ceil(0.25 x 20) = 5
    kept, idx = keep_top(after, first.mean(1)[:, 1:], 0.25)
    assert torch.equal(idx, expected) and torch.equal(kept[:, 1:], after[:, 1:].gather(
        1, expected.unsqueeze(-1).expand(-1, -1, 64)))


def test_multimodal_node_sparsity_computes_less_by_the_hand_counted_amount():
    """Pruning half of the 20 visual tokens (ceil(0.5 x 20) = 10 kept) after multimodal layer 0 removes from
    layer 1 the key/value projection of 10 tokens (10 x 64 x 128 MACs) and their scores and weighted sum for the
    13 text tokens (2 x 13 x 10 x 64): 98,560 MACs per sample."""
    macs = {}
    for keep in (1.0, 0.5):
        cfg = variants.get_config("transformer", **TINY, fusion_keep=keep)
        torch.manual_seed(0)
        macs[keep] = F.count_flops(variants.build(cfg), random_inputs(cfg.model, 2, "cpu"))["macs_per_sample"]
    assert macs[1.0] - macs[0.5] == 10 * 64 * 128 + 2 * 13 * 10 * 64


def test_edge_sparsity_computes_only_the_scores_of_its_pattern():
    """At 8 clips x 2 frames (24 visual tokens, blocks of 3 = one clip), each block sees itself and 2 random
    blocks plus [CLS]: 8 x 3 x (1 + 9) scores per head-dim instead of 24 x 25, for the scores and again for the
    weighted sum; the [CLS] query's 25 are the same in both. Per layer and sample, 4 layers, width 64."""
    size = {**TINY, "num_clips": 8, "num_frames": 2}
    macs = {}
    for sparse in (False, True):
        cfg = variants.get_config("transformer", **size, edge_sparse=sparse, edge_random=2)
        torch.manual_seed(0)
        macs[sparse] = F.count_flops(variants.build(cfg), random_inputs(cfg.model, 2, "cpu"))["macs_per_sample"]
    assert macs[False] - macs[True] == 4 * 2 * 64 * (24 * 25 - 8 * 3 * 10)


@pytest.mark.slow
def test_svitt_is_at_least_twice_cheaper_than_its_dense_control_at_msvd_size():
    """FLOPs are deterministic: 8 clips x 16 frames, module_dim 768, the registered keep rates."""
    out = {}
    for name in ("transformer", "transformer-svitt", "transformer-svitt-expand"):
        cfg = variants.get_config(name, **SIZES["msvd"].model_config())
        torch.manual_seed(0)
        r = F.count_flops(variants.build(cfg), random_inputs(cfg.model, 1, "cpu"))
        assert r["unsupported_ops"] == {}, name
        out[name] = r["flops_per_sample"]
    assert out["transformer"] >= 2 * out["transformer-svitt"], out
    assert out["transformer-svitt-expand"] == out["transformer-svitt"]  # evaluation: every frame, final keep rate


# ----------------------------------------------------------------------------- temporal expansion


def test_expansion_frames_and_their_positions_by_hand():
    assert [expansion_frames(16, s, 3) for s in range(3)] == [4, 8, 16]  # SViTT's 4 -> 8 -> 16
    assert [expansion_frames(4, s, 3) for s in range(3)] == [1, 2, 4]
    assert frame_indices(16, 4, "cpu").tolist() == [2, 6, 10, 14]  # the middle of each 4-frame segment
    assert frame_indices(4, 1, "cpu").tolist() == [2]
    assert frame_indices(4, 4, "cpu").tolist() == [0, 1, 2, 3]


def test_the_expansion_schedule_follows_the_epoch_and_evaluation_reads_every_frame():
    model = variants.create("transformer-svitt-expand", **{**TINY, "num_frames": 16}).train()
    stages = []
    for epoch in range(6):
        model.set_epoch(epoch)
        stages.append(model.stage())
    assert stages == [(4, 0.7), (4, 0.7), (8, 0.6), (8, 0.6), (None, 0.5), (None, 0.5)]
    model.eval()
    assert model.stage() == (None, 0.5)
    model.train().set_epoch(None)  # not told the epoch (a benchmark's step): the last stage
    assert model.stage() == (None, 0.5)


def test_a_stage_reads_its_frames_at_their_own_positions():
    model = variants.create("transformer", **TINY).eval()
    app, mot, _, _ = random_inputs(model.cfg.__dict__, 2, "cpu")
    tokens, per_clip = model.visual_tokens(app, mot, 2)
    assert per_clip == 3 and tokens.shape == (2, 1 + 4 * 3, 64)
    # clip 0's first token is frame 1 (of 0..3: the middle of frames 0-1) with its own position embedding
    expected = model.app_proj(app[:, 0, 1]) + model.frame_pos[1] + model.type_emb[0]
    torch.testing.assert_close(tokens[:, 1], expected)


# ----------------------------------------------------------------------------- config and registry


@pytest.mark.parametrize("setting,msg", [
    ({"edge_local": 2}, "edge_local must be odd"),
    ({"video_keep": 0.0}, r"video_keep must be in \(0, 1\]"),
    ({"video_drop_layers": [4]}, r"video_drop_layers must list layer indices in 0..3"),
    ({"expand_stages": 3}, "expand_keep must list one keep rate per stage before the last"),
    ({"heads": 3}, "module_dim 64 must be divisible by heads 3"),
])
def test_bad_settings_are_refused_naming_them(setting, msg):
    with pytest.raises(variants.ConfigError, match=msg):
        variants.get_config("transformer", **TINY, **setting)


def test_the_family_answers_every_task_and_gives_the_outputs_cross_family_losses_read():
    for task, shape in (("open-ended", (2, 50)), ("multiple-choice", (2, 5)), ("count", (2, 1))):
        cfg = variants.get_config("transformer-svitt", **TINY, task=task)
        model = variants.build(cfg).eval()
        assert isinstance(model, VideoTextTransformer) and isinstance(model.cfg, TransformerConfig)
        inputs = random_inputs(cfg.model, 2, "cpu")
        out = model(*inputs[:4], **dict(zip(variants.task(task).inputs, inputs[4:])))
        assert out["logits"].shape == shape and out["video"].shape == out["question"].shape == (2, 64)


def test_list_shows_the_family_and_its_variants():
    import ablate

    out = " ".join(CliRunner().invoke(ablate.app, ["list"]).output.replace("│", " ").split())
    assert "transformer Video-text transformer" in out
    for name in [*NEW, *STUDENTS]:
        assert name in out


# ----------------------------------------------------------------------------- trained through the CLI


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache):
    return tmp_path_factory.mktemp("transformer-results")


def _run(results, name: str, data: str, *extra: str, batch_size: int = 512):
    """``ablate.py run`` of a small model (module_dim 16, which a student's teachers get too): these tests check
    that each variant trains through the command, not its accuracy."""
    import ablate

    return CliRunner().invoke(ablate.app, ["run", name, "--data", data, "--epochs", "1", "--batch-size",
                                           str(batch_size), "--device", "cpu", "--results", str(results),
                                           "--set", "module_dim=16", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("data", ["synthetic:tiny", "synthetic:tiny-mc", "synthetic:tiny-count"])
@pytest.mark.parametrize("name", NEW)
def test_each_new_variant_trains_on_each_task(results, name, data):
    r = _run(results, name, data)
    assert r.exit_code == 0, r.output


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDENTS)
def test_each_cross_family_student_trains(results, name):
    # RKD's angle term costs O(batch^3), whatever the width: trained once, at batch 128
    # (transformer-from-dualvgr-relational, with the teacher-g4 it needs at that batch size); the other direction
    # reads the same embeddings through the distance term
    extra = ("--set", "relational.w_angle=0") if name == "dualvgr-from-transformer-relational" else ()
    batch = 128 if name == "transformer-from-dualvgr-relational" else 512
    r = _run(results, name, "synthetic:tiny", *extra, batch_size=batch)
    assert r.exit_code == 0, r.output
    from harness.runs.store import ResultsStore

    rec = ResultsStore(results).records(variant=name)[0]
    arch = {rec["variant_config"]["arch"], rec["teachers"][0]["variant"]}
    assert arch in ({"dualvgr", "transformer"}, {"transformer", "teacher-g4"}), arch


@pytest.mark.slow
def test_a_loss_reading_a_feature_the_other_family_lacks_is_refused_before_training(results):
    """student-hint reads clip_fused, (B, clips, D): a transformer teacher has none; one error line, nothing trains."""
    r = _run(results, "student-hint", "synthetic:tiny", "--set", "teacher=transformer")
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "no 'clip_fused'" in lines[0] and "(B, clips, D)" in lines[0], lines[0]
    assert "Traceback" not in r.output
