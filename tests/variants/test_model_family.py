"""A model family is one registered (model class, config class) pair (variants/families.py): a toy
family registered here, in the test, is configured, built, identified and trained in a grid as
DualVGR is, including as the teacher of a DualVGR student, and DualVGR's ids stay as they were."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import variants
from harness.execution import grid as G
from harness.runs import identity
from harness.training import plan as planning
from harness.execution.grid import run_grid
from harness.training.plan import RunSpec
from harness.runs.store import ResultsStore

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "run_ids.json"


@dataclass
class MeanPoolConfig:
    question_vocab: int = 100
    answer_vocab: int = 50
    vision_dim: int = 128
    motion_dim: int | None = None
    word_dim: int = 32
    num_clips: int = 4
    num_frames: int | None = None
    module_dim: int = 16
    scale: float = 1.0  # a setting DualVGR does not have

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"mean-pool config: scale must be > 0, got {self.scale!r}")


class MeanPool(nn.Module):
    """Toy family: mean-pooled question words, frames and clips, one linear layer each."""

    def __init__(self, cfg: MeanPoolConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embedding = nn.Embedding(cfg.question_vocab, cfg.word_dim)
        self.q = nn.Linear(cfg.word_dim, cfg.module_dim)
        self.v = nn.Linear(cfg.vision_dim + (cfg.motion_dim or cfg.vision_dim), cfg.module_dim)
        self.out = nn.Linear(2 * cfg.module_dim, cfg.answer_vocab)

    def forward(self, appearance, motion, questions, lengths):
        mask = (questions != 0).unsqueeze(-1).float()
        question = self.q((self.word_embedding(questions) * mask).sum(1) / mask.sum(1).clamp(min=1))
        video = self.v(torch.cat([appearance.mean((1, 2)), motion.mean(1)], -1)) * self.cfg.scale
        return {"logits": self.out(torch.cat([question, video], -1)), "question": question, "video": video}


def toy_mean():
    """Toy: the mean-pool model family (registered by the test)."""
    return {"arch": "toy-mean-pool", "model": {}, "loss": {}}


@pytest.fixture
def toy_family():
    """Register the family and a variant of it; unregister both after (the registries are global)."""
    variants.register_family("toy-mean-pool", MeanPool, MeanPoolConfig)
    variants.register_variant("toy-mean", tags=("sanity",))(toy_mean)
    yield
    variants.MODEL_FAMILIES._entries.pop("toy-mean-pool")
    variants.VARIANTS._entries.pop("toy-mean")


def test_a_registered_family_is_configured_built_and_identified_by_its_own_config(toy_family):
    cfg = variants.get_config("toy-mean", scale=2, module_dim=32)
    assert cfg.model_family.model is MeanPool and cfg.model["scale"] == 2 and "graph_layers" not in cfg.model
    # its config's fields, and the multiple-choice loss every variant takes (variants.tasks.MC_LOSSES)
    assert set(variants.settings("toy-mean")) == {*MeanPoolConfig.__dataclass_fields__, "mc_loss"}
    model = variants.build(cfg)
    assert isinstance(model, MeanPool) and model.cfg == MeanPoolConfig(scale=2, module_dim=32)
    out = model(torch.randn(2, 4, 3, 128), torch.randn(2, 4, 128), torch.tensor([[5, 6, 0], [7, 0, 0]]),
                torch.tensor([2, 1]))
    assert out["logits"].shape == (2, 50)
    with pytest.raises(variants.ConfigError, match="scale must be > 0"):
        variants.get_config("toy-mean", scale=-1.0)
    with pytest.raises(variants.ConfigError, match="has no setting 'graph_layers'"):
        variants.get_config("toy-mean", graph_layers=2)
    comp = identity.computation(cfg.to_dict(), "d", 0, RunSpec("toy-mean").resolved_train())
    assert comp["arch"] == "toy-mean-pool" and comp["model"]["scale"] == 2.0  # normalised to its default's type
    assert identity.run_id("toy-mean", comp) != identity.run_id(
        "toy-mean", identity.computation(variants.get_config("toy-mean").to_dict(), "d", 0,
                                         RunSpec("toy-mean").resolved_train()))
    # a DualVGR student's teacher may be of another family: model settings reach it where it has them
    assert variants.teacher_settings("toy-mean", {"module_dim": 32, "graph_layers": 2}) == {"module_dim": 32}
    from typer.testing import CliRunner

    import ablate

    listed = " ".join(CliRunner().invoke(ablate.app, ["list", "toy-*"]).output.replace("│", " ").split())
    assert "toy-mean-pool Toy family: mean-pooled question words" in listed  # the family and its description
    golden = json.loads(GOLDEN.read_text())["run_ids"]
    assert {k: v for k, v in planning.golden_run_ids()["run_ids"].items() if k != "toy-mean"} == golden


def test_a_family_config_must_have_the_data_settings_and_defaults():
    @dataclass
    class NoDims:
        module_dim: int = 8

    with pytest.raises(TypeError, match=r"lacks the settings \['question_vocab'"):
        variants.register_family("no-dims", MeanPool, NoDims)

    no_default = dataclasses.make_dataclass(
        "NoDefault", [("width", int), *[(k, object, None) for k in variants.families.REQUIRED_SETTINGS]])
    with pytest.raises(TypeError, match="'width' has no default"):
        variants.register_family("no-default", MeanPool, no_default)
    with pytest.raises(variants.UnknownNameError, match="unknown model family 'no-dims'"):
        variants.family("no-dims")


def test_teachers_of_different_widths_are_one_error_wherever_they_are_found():
    """The planner (teacher configs) and the training step (built teachers) ask one function."""
    from harness.model.step import make_objective

    cfg = variants.get_config("student-similarity-ens")
    narrow, wide = variants.create("teacher-g2", module_dim=16), variants.create("teacher-g3", module_dim=32)
    with pytest.raises(variants.ConfigError, match=r"different module_dim \[16, 32\]"):
        make_objective(cfg, [narrow, wide], torch.device("cpu"))
    with pytest.raises(variants.ConfigError, match=r"different module_dim \[16, 32\]"):
        variants.teacher_width(cfg, [narrow.cfg.module_dim, wide.cfg.module_dim])
    assert variants.teacher_width(cfg, [16, 16]) == 16 and variants.teacher_width(cfg, []) is None


@pytest.mark.slow
def test_a_toy_family_trains_in_a_grid_alone_and_as_a_teacher(toy_family, tiny, tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('data = "synthetic:tiny"\nvariants = ["toy-mean", "student-logits"]\nseeds = [0]\n'
                 '[train]\nepochs = 1\nbatch_size = 512\n[set]\nmodule_dim = 16\nteacher = "toy-mean"\n'
                 '[axes]\nscale = [0.5, 2.0]\n')
    grid = G.load(p)
    store = ResultsStore(tmp_path / "results")
    res = run_grid(grid, store, device="cpu")
    assert not res.failed and len(res.complete) == 3 and len(res.teachers_complete) == 1, res
    toys = store.records(variant="toy-mean")  # the grid's two and the student's teacher, at its default scale
    assert sorted(r["variant_config"]["model"]["scale"] for r in toys) == [0.5, 1.0, 2.0]
    assert all(r["variant_config"]["arch"] == "toy-mean-pool" and r["params"]["total"] > 0 for r in toys)
    student = store.records(variant="student-logits")[0]
    assert student["teachers"][0]["variant"] == "toy-mean"
    assert student["teacher_runs"][0] in {r["run_id"] for r in toys}
