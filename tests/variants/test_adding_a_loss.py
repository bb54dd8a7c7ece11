"""docs/architecture.md's recipe for adding a distillation loss and a student that uses it, followed to the
letter: the loss is a registered factory (``functools``-wrapped by ``_factory`` or not), the variant
names it with empty ``params``, and every parameter of the loss is at once a setting of the variant
for ``--set`` and for a grid's ``[axes]``, ``[set]``, ``[[include]]`` and ``[[exclude]]``."""
from __future__ import annotations

import pytest
import torch.nn.functional as F

import variants
from harness.execution import grid as G
from harness.execution.grid import run_grid
from harness.runs.store import ResultsStore
from variants.kd_losses import KDLoss
from variants.losses import LOSSES
from variants.zoo import _student


class ScaledLogitMSE(KDLoss):
    name = "example-mse"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, student, teachers, answers):
        s = self.student(student, "logits")
        return self.mean_over_teachers(
            teachers, lambda t: {"kd": self.scale * F.mse_loss(s, self.teacher(t, "logits"))})["kd"], {}


def example_mse(student_dim: int = 768, teacher_dim: int = 768, *, scale: float = 1.0, on: str = "logits") -> KDLoss:
    """MSE between student and teacher logits, times ``scale`` (an example; ``on`` only shows a string parameter)."""
    return ScaledLogitMSE(scale)


def example_student_mse():
    """Student + the example loss from teacher-g4."""
    return _student({"name": "example-mse", "weight": 1.0, "params": {}})


@pytest.fixture
def registered():
    """Register the loss and the variant as docs/architecture.md says (decorators), and unregister them after:
    the registries are global and other tests list them."""
    LOSSES.register("example-mse")(example_mse)
    variants.register_variant("example-student-mse", tags=("student",))(example_student_mse)
    yield
    LOSSES._entries.pop("example-mse")
    variants.VARIANTS._entries.pop("example-student-mse")


def test_a_new_loss_parameter_is_a_setting_without_writing_it_into_the_variant(registered, tmp_path):
    assert variants.loss_params("example-mse") == {"scale": 1.0, "on": "logits"}
    assert ({"example-mse.scale", "example-mse.on", "example-mse.weight"}
            <= set(variants.settings("example-student-mse")))
    cfg = variants.get_config("example-student-mse", **{"example-mse.scale": 2.0})
    assert cfg.distill == [{"name": "example-mse", "weight": 1.0, "params": {"scale": 2.0}}]
    with pytest.raises(variants.ConfigError,
                       match=r"'example-mse' has no parameter 'scal' \(known: weight, scale, on\)"):
        variants.get_config("example-student-mse", **{"example-mse.scal": 2.0})
    with pytest.raises(variants.ConfigError, match=r"example-mse.scale = 'x' must be float"):
        variants.get_config("example-student-mse", **{"example-mse.scale": "x"})
    p = tmp_path / "g.toml"
    p.write_text('variants = ["example-student-mse"]\nseeds = [0]\n[axes]\n"example-mse.scale" = [0.5, 2.0]\n'
                 '[[exclude]]\n"example-mse.scale" = 0.5\n')
    assert [r.overrides for r in G.load(p).runs] == [{"example-mse.scale": 2.0}]


@pytest.mark.slow
def test_a_new_loss_and_student_run_in_a_grid(registered, tiny, tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('data = "synthetic:tiny"\nvariants = ["example-student-mse"]\nseeds = [0]\n'
                 '[train]\nepochs = 1\nbatch_size = 512\n[set]\nmodule_dim = 16\n'
                 '[axes]\n"example-mse.scale" = [0.5, 2.0]\n')
    store = ResultsStore(tmp_path / "results")
    res = run_grid(G.load(p), store, device="cpu")
    assert not res.failed and len(res.complete) == 2 and len(res.teachers_complete) == 1
    recs = store.records(variant="example-student-mse")
    assert sorted(r["variant_config"]["distill"][0]["params"]["scale"] for r in recs) == [0.5, 2.0]
    assert all(any(k.startswith("loss_") and "example" in k for k in r["history"][0]) for r in recs), \
        recs[0]["history"][0].keys()
