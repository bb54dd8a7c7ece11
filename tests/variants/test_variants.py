"""The variant registry: teachers, students, autoencoder and sparse variants."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.data.synthetic import PRESETS
from harness.data import dataset as D
from harness.training.plan import RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore

TINY = PRESETS["tiny"].model_config()


def test_registry_lookup_and_wildcards():
    assert variants.list("teacher-g*") == ["teacher-g2", "teacher-g3", "teacher-g4"]
    assert "student-fused" in variants.list("student-*")
    assert variants.describe("teacher-g4").startswith("Teacher: DualVGR with 4 graph layers")
    with pytest.raises(KeyError, match="unknown variant 'teacher-g5'.*did you mean"):
        variants.get_config("teacher-g5")
    with pytest.raises(KeyError, match="no setting 'graph_layer'"):
        variants.get_config("dualvgr", graph_layer=2)
    cfg = variants.get_config("teacher-g4", module_dim=32, alpha=0.5)
    assert cfg.model["graph_layers"] == 4 and cfg.model["module_dim"] == 32 and cfg.loss["alpha"] == 0.5


def test_student_settings_are_overridable():
    cfg = variants.get_config("student-logits", **{"logits.T": 2.0, "logits.weight": 0.5, "teacher": "teacher-g2"})
    assert cfg.teachers == ["teacher-g2"]
    assert cfg.distill == [{"name": "logits", "weight": 0.5, "params": {"T": 2.0}}]
    with pytest.raises(KeyError, match="distillation settings: logits.<param>, teacher"):
        variants.get_config("student-logits", **{"fused.t_app": 2.0})
    with pytest.raises(KeyError, match="unknown variant 'teacher-x'"):
        variants.get_config("student-logits", teacher="teacher-x")


def test_vqakd_student_uses_vqakd_defaults():
    cfg = variants.get_config("student-fused")
    assert cfg.teachers == ["teacher-g4"] and cfg.model["graph_layers"] == 1
    assert cfg.loss["alpha"] == 100.0 and cfg.loss["beta"] == 1e-6
    assert cfg.distill[0]["params"] == {"t_app": 1.0, "t_mo": 1.0, "kd_alpha": 1.0, "kd_beta": 1.0}


@pytest.mark.parametrize("name", variants.list())
def test_every_variant_trains_a_few_steps(name, tiny):
    torch.manual_seed(0)
    cfg = variants.get_config(name, **TINY)
    model = variants.build(cfg)
    teachers = [variants.create(t, **TINY).eval().requires_grad_(False) for t in cfg.teachers]
    objective = variants.objective(cfg, teacher_dim=TINY["module_dim"])
    opt = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=1e-3)
    batches = D.iterate_batches(tiny.splits["train"], tiny.features, 16, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for t in teachers for p in t.parameters()]
    for _, b in zip(range(3), batches):
        out = model(b.appearance, b.motion, b.questions, b.lengths)
        with torch.no_grad():
            t_outs = [t(b.appearance, b.motion, b.questions, b.lengths) for t in teachers]
        loss, parts = objective(out, b.answers, t_outs)
        assert torch.isfinite(loss), (name, parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [p for t in teachers for p in t.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # teachers stay frozen
    assert all(p.grad is None for p in after)


def flops(model, batch=2):
    cfg = model.cfg
    x = (torch.randn(batch, cfg.num_clips, cfg.num_frames or 4, cfg.vision_dim),
         torch.randn(batch, cfg.num_clips, cfg.vision_dim),
         torch.randint(1, cfg.question_vocab, (batch, 6)), torch.tensor([6, 3][:batch]))
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(*x)
    return fc.get_total_flops()


def test_node_sparsity_flops_fall_with_keep_ratio():
    dims = {**TINY, "num_clips": 10}
    counts = [flops(variants.create("sparse-node", keep_ratio=r, **dims)) for r in (1.0, 0.7, 0.4)]
    assert counts[0] > counts[1] > counts[2] > 0
    assert counts[0] == flops(variants.create("dualvgr", **dims))  # keep 1.0 is the reference model


def test_node_sparsity_keeps_the_most_relevant_clips_in_order():
    torch.manual_seed(0)
    m = variants.create("sparse-node", **{**TINY, "num_clips": 5}).eval()
    out = m(torch.randn(3, 5, 4, 128), torch.randn(3, 5, 128), torch.randint(1, 100, (3, 6)), torch.tensor([6, 2, 4]))
    kept = out["kept_clips"]
    assert kept.shape == (3, 3) and out["clip_fused"].shape == (3, 3, 64)
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # temporal order


def test_edge_sparsity_adjacency():
    m = variants.create("sparse-edge", **{**TINY, "num_clips": 6})
    app = torch.randn(2, 6, 64)
    adj = m.graph_adjacency(app, app)
    assert adj.shape == (6, 6) and adj.sum(1).tolist() == [3.0] * 6
    assert adj[0].nonzero().flatten().tolist() == [0, 1, 2] and adj[3].nonzero().flatten().tolist() == [2, 3, 4]
    mf = variants.create("sparse-edge-feature", **{**TINY, "num_clips": 6})
    adj_f = mf.graph_adjacency(app, app)
    assert adj_f.shape == (2, 6, 6) and torch.all(adj_f.sum(2) == 3) and torch.all(adj_f.diagonal(dim1=1, dim2=2) == 1)


def test_autoencoder_two_stage_trains_only_reconstruction_first():
    torch.manual_seed(0)
    cfg = variants.get_config("autoencoder-2stage", **TINY, ae_pretrain_steps=1)
    model, objective = variants.build(cfg), variants.objective(cfg)
    x = (torch.randn(4, 4, 4, 128), torch.randn(4, 4, 128), torch.randint(1, 100, (4, 5)), torch.tensor([5, 2, 3, 1]))
    y = torch.tensor([1, 2, 3, 4])
    for stage in (1, 2):
        model.zero_grad()
        out = model(*x)
        loss, parts = objective(out, y)
        loss.backward()
        cls_grad = model.output_unit.classifier[-1].weight.grad.abs().sum()
        dec_grad = model.appearance_decoder[0].weight.grad.abs().sum()
        assert dec_grad > 0
        if stage == 1:
            assert cls_grad == 0 and torch.equal(loss, parts["recon"])
        else:
            assert cls_grad > 0 and loss > parts["recon"]


@pytest.mark.slow
def test_teacher_and_every_student_complete_through_the_runner(tiny, tmp_path):
    """teacher-g4, the plain student and each distilled student run through the runner; each
    teacher is trained once and reused; the store shows which teacher each student used. A path test: every
    run is small (module_dim 16, which the students' teachers get too), one epoch at batch 512."""
    store = ResultsStore(tmp_path)
    names = ["teacher-g4", "student", *[n for n in variants.list("student-*")]]
    small = {"module_dim": 16}
    # RKD's angle term costs O(batch^3): it is checked against its reference in tests/variants/test_kd_losses.py
    # and trained by tests/variants/test_transformer.py (batch 128)
    light = {"student-relational": {"relational.w_angle": 0.0}}
    recs = {n: train(RunSpec(n, seed=3, epochs=1, batch_size=512, overrides={**small, **light.get(n, {})}), store,
                     data=tiny, device="cpu", progress=False) for n in names}
    teacher_run = {r["variant"]: r["run_id"] for r in store.records() if r["variant"].startswith("teacher-")}
    assert sorted(teacher_run) == ["teacher-g2", "teacher-g3", "teacher-g4"]
    assert len(store.records(variant="teacher-g4")) == 1  # trained once, reused by every student
    assert recs["teacher-g4"]["run_id"] == teacher_run["teacher-g4"]
    assert all(r["variant_config"]["model"]["module_dim"] == 16 for r in store.records())  # the teachers' too
    assert recs["student"]["teacher_runs"] == []
    student_params = recs["student"]["params"]["total"]
    for n in names[2:]:
        cfg = variants.get_config(n)
        assert recs[n]["teacher_runs"] == [teacher_run[t] for t in cfg.teachers], n
        assert recs[n]["teachers"][0]["variant"] == cfg.teachers[0]
        # the student alone, as the plain student: no teacher, no hint regressor, no projection counted
        assert recs[n]["params"]["total"] == student_params, n
        for d in cfg.distill:
            assert f"loss_kd_{d['name']}" in recs[n]["history"][0]
    df = store.to_frame()
    assert len(df) == len(names) + 2  # + teacher-g2, teacher-g3 (for the ensemble student)
    row = df.set_index("variant").loc["student-similarity-ens"]
    assert row["teachers"] == "teacher-g2,teacher-g3,teacher-g4"
    assert row["teacher_runs"] == ",".join(teacher_run[t] for t in ("teacher-g2", "teacher-g3", "teacher-g4"))


@pytest.mark.slow
def test_records_have_sanity_ablations_and_reconstruction(tiny, tmp_path):
    store = ResultsStore(tmp_path)
    rec = train(RunSpec("autoencoder", epochs=1, batch_size=512, overrides={"module_dim": 16}), store, data=tiny,
                device="cpu", progress=False)
    m = rec["metrics"]
    assert set(m["ablations"]) == {"shuffle_video", "zero_appearance", "zero_motion"}
    assert m["test"]["recon_mse"] > 0 and "loss_recon" in rec["history"][0]


def test_every_variant_has_a_family_and_the_reference_models_are_named():
    from variants.zoo import FAMILIES

    for name in variants.list():
        assert variants.VARIANTS.get(name).family in FAMILIES, name
    assert variants.VARIANTS.get("dualvgr-u2").family == "baseline"
    assert variants.VARIANTS.get("student-logits").family == "student"
    assert "official DualVGR train.py" in variants.describe("dualvgr-u2")
    assert "as published" not in variants.describe("dualvgr").lower()
    assert variants.get_config("dualvgr-u2").model["unit_layers"] == 2
    assert variants.get_config("student-similarity").distill[0]["params"] == {}  # the loss's default: cross
