"""pytest-benchmark timings of the main variants (eval forward, training step) and of the data
layer, on CPU at small sizes. The project's pytest config passes --benchmark-disable, so in the
default suite each runs once as a plain test; docs/benchmarks.md shows how to time them for
real and compare against a saved baseline."""
from __future__ import annotations

import pytest
import torch

import variants
from harness.measurement import measure as M

SMALL = dict(question_vocab=100, answer_vocab=50, vision_dim=128, module_dim=64, word_dim=32, num_clips=4,
             num_frames=4)
MAIN = ["dualvgr", "teacher-g4", "student-fused", "question-only"]
BATCH = 16


def _setup(name: str):
    cfg = variants.get_config(name, **SMALL)
    torch.manual_seed(0)
    model = variants.build(cfg)
    return cfg, model, M.random_inputs(cfg.model, BATCH, "cpu")


@pytest.mark.parametrize("name", MAIN)
def test_forward(benchmark, name):
    cfg, model, inputs = _setup(name)
    model.eval()

    def forward():
        with torch.no_grad():
            return model(*inputs)["logits"]

    logits = benchmark(forward)
    assert logits.shape == (BATCH, SMALL["answer_vocab"])


@pytest.mark.parametrize("name", MAIN)
def test_train_step(benchmark, name):
    cfg, model, inputs = _setup(name)
    teachers = M.build_teachers(cfg, "cpu")  # student-fused: teacher-g4, frozen
    step = M.make_train_step(cfg, model, teachers)
    answers = M.random_answers(cfg.model, BATCH, "cpu")
    step(inputs, answers)  # first step allocates Adam's state
    loss = benchmark(step, inputs, answers)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_iterate_batches(benchmark, data_cache, mode):
    """One pass of harness.data.dataset.iterate_batches over the tiny synthetic train split."""
    from harness.data import dataset as D

    data = D.load("synthetic:tiny", mode=mode)
    split, features = data.splits["train"], data.features

    def one_pass():
        n = 0
        for b in D.iterate_batches(split, features, 64, shuffle=True, generator=torch.Generator().manual_seed(0)):
            n += b.answers.shape[0]
        return n

    assert benchmark(one_pass) == len(split)
