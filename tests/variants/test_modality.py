"""One-modality students (TeachText's modality reduction, variants/modality.py): the missing stream is not
read from disk, not computed and not counted in FLOPs; its parameters and FLOPs are the two-stream
model's less exactly the missing branch and the fusion; the CLI trains one on a set whose other
stream is unusable; the report sets it beside its two-stream reference."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ablate
import variants
from harness.data import dataset as D
from harness.data import layout as L
from harness.errors import DataError
from harness.measurement.flops import flop_analysis
from harness.model.inputs import param_counts, random_inputs
from harness.training.plan import RunSpec, feature_modalities

SMALL = dict(question_vocab=50, answer_vocab=20, vision_dim=16, module_dim=32, word_dim=12, num_clips=4, num_frames=3)
#: DualVGR's modules of each stream's branch (its input unit, and in its reasoning unit: query punishment,
#: specific and common graphs, graph attention); the fusion (visualfusion) is DualVGR's only, with two streams
BRANCH = {"appearance": ["visual_appearance_input_unit", "visual_input_unit.queryPunish_appear",
                         "visual_input_unit.appearance_GCN", "visual_input_unit.acGCN",
                         "visual_input_unit.attention_appearance"],
          "motion": ["visual_motion_input_unit", "visual_input_unit.queryPunish_motion", "visual_input_unit.motion_GCN",
                     "visual_input_unit.mcGCN", "visual_input_unit.attention_motion"]}
OTHER = {"appearance": "motion", "motion": "appearance"}


def _models(modality: str, **over):
    two = variants.get_config("student", **SMALL, **over)
    one = variants.get_config(f"modality-{modality}", **SMALL, **over)
    return two, one, variants.build(two), variants.build(one)


@pytest.mark.parametrize("modality", ["appearance", "motion"])
def test_parameters_are_the_two_stream_models_less_the_missing_branch_and_the_fusion(modality):
    _, _, two, one = _models(modality)
    mods = dict(two.named_modules())
    missing = sum(p.numel() for name in [*BRANCH[OTHER[modality]], "visual_input_unit.visualfusion"]
                  for p in mods[name].parameters())
    assert param_counts(one)["total"] == param_counts(two)["total"] - missing
    # every module it keeps has DualVGR's name and shape
    two_shapes = {k: v.shape for k, v in two.state_dict().items()}
    assert all(two_shapes[k] == v.shape for k, v in one.state_dict().items())


@pytest.mark.parametrize("modality", ["appearance", "motion"])
def test_flops_are_the_two_stream_models_less_what_the_missing_branch_and_the_fusion_cost(modality):
    two_cfg, one_cfg, two, one = _models(modality)
    inputs = random_inputs(two_cfg.model, 4, "cpu")
    with torch.no_grad():
        full = flop_analysis(two.eval(), inputs)
        total, by_module = full.total(), full.by_module()
        mine = flop_analysis(one.eval(), random_inputs(one_cfg.model, 4, "cpu")).total()
    branch = sum(by_module[f"model.{name}"] for name in [*BRANCH[OTHER[modality]], "visual_input_unit.visualfusion"])
    assert branch > 0 and mine == total - branch
    # the one-stream inputs carry an empty tensor for the missing stream, as the loader gives it
    app, mot = random_inputs(one_cfg.model, 4, "cpu")[:2]
    assert (mot if modality == "appearance" else app).numel() == 0


@pytest.mark.parametrize("modality", ["appearance", "motion"])
def test_the_missing_stream_is_never_touched(modality):
    _, one_cfg, _, one = _models(modality)
    one.eval()
    app, mot, q, lens = random_inputs(one_cfg.model, 3, "cpu", seed=1)
    full = random_inputs({**SMALL}, 3, "cpu", seed=1)
    poisoned = (full[0].fill_(float("nan")), mot) if modality == "motion" else (app, full[1].fill_(float("nan")))
    with torch.no_grad():
        a = one(*poisoned, q, lens)["logits"]
        b = one(app, mot, q, lens)["logits"]
    assert torch.isfinite(a).all() and torch.equal(a, b)
    out = one(app, mot, q, lens)
    key = "app" if modality == "appearance" else "motion"
    assert {f"clip_{key}", f"specific_{key}", f"common_{key}"} <= set(out)
    assert not {k for k in out if k.endswith("_motion" if key == "app" else "_app")}


def test_the_streams_a_run_reads_are_its_models_and_its_teachers():
    assert variants.modalities(variants.get_config("modality-appearance")) == ("appearance",)
    assert variants.modalities(variants.get_config("modality-motion")) == ("motion",)
    assert variants.modalities(variants.get_config("question-only")) == ()
    assert feature_modalities(RunSpec("modality-appearance")) == ("appearance",)
    assert feature_modalities(RunSpec("modality-motion")) == ("motion",)
    # distilled from a two-stream teacher: the run reads both (for the teacher), the student's model one
    assert feature_modalities(RunSpec("modality-appearance-kd")) == ("appearance", "motion")
    assert feature_modalities(RunSpec("dualvgr")) == ("appearance", "motion")
    with pytest.raises(variants.ConfigError, match="modality must be one of appearance, motion"):
        variants.get_config("modality-appearance", modality="audio")
    with pytest.raises(variants.ConfigError, match="keep_ratio = 0.5 is not built for one stream"):
        variants.get_config("modality-appearance", keep_ratio=0.5)


@pytest.fixture(scope="module")
def nan_motion(tiny, tmp_path_factory):
    """A copy of the tiny set whose motion features are all NaN (the file, its ids and shape intact)."""
    dst = tmp_path_factory.mktemp("nan-motion") / "tiny"
    shutil.copytree(tiny.paths.vocab.parent, dst, ignore=shutil.ignore_patterns(".vqakd-fingerprints.json"))
    motion = next(dst.glob("*_motion_feat.h5"))
    with h5py.File(motion, "r+") as f:
        f[L.MOTION_KEY][...] = np.nan
    return dst


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_one_stream_load_never_reads_the_other_streams_features(nan_motion, mode):
    with pytest.raises(DataError, match="NaN or Inf"):
        D.load(nan_motion, mode=mode)  # both streams: the motion file is read, and refused
    data = D.load(nan_motion, mode=mode, modalities=("appearance",))
    assert data.features.modalities == ("appearance",)
    assert data.info.dims == D.load(nan_motion, mode="none").info.dims  # shapes from the file's metadata
    app, mot = data.features.gather(torch.tensor([0, 2, 2]))
    f = data.features
    assert app.shape == (3, f.num_clips, f.num_frames, f.vision_dim) and torch.isfinite(app).all()
    assert mot.shape == (3, 0) and f.motion_dim == data.info.dims.get("motion_dim", f.vision_dim)


@pytest.mark.slow
def test_the_cli_trains_an_appearance_only_student_on_a_set_whose_motion_is_unusable(nan_motion, tmp_path):
    res = CliRunner().invoke(ablate.app, ["run", "modality-appearance", "--data", str(nan_motion), "--epochs", "1",
                                          "--batch-size", "512", "--device", "cpu", "--set", "module_dim=16",
                                          "--results", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    assert "modality-appearance" in res.output
    res = CliRunner().invoke(ablate.app, ["run", "student", "--data", str(nan_motion), "--epochs", "1",
                                          "--results", str(tmp_path / "results")])
    assert res.exit_code == 2 and "error:" in res.output and "NaN or Inf" in res.output  # a user error, one line
