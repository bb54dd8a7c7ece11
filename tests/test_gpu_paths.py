"""The CUDA paths, checked on a CPU-only machine (no GPU has been lent to this project).

Each test says what stands in for the GPU and why it catches the bug it is about:

* ``meta`` device: any device that is not the CPU. What must hold on CUDA (state loaded for a
  resume is put back with CPU RNG states) must hold for every non-CPU device, and ``meta``
  tensors are rejected by ``torch.set_rng_state`` exactly as CUDA tensors are.
* ``FakeTensorMode`` with ``torch.device("cuda")`` as the default device: tensors that claim
  ``cuda`` without a driver. Forwards, objectives, the teacher-output cache and evaluation run
  on them (the backward does not: autograd asks the driver for a context), and an op that mixes
  a fake-CUDA tensor with a CPU tensor raises, as it would on a GPU; a dispatch mode records
  every copy from the CPU to the device inside a forward (a blocking host-to-device copy).
"""
from __future__ import annotations

import types

import pytest
import torch
from rich.console import Console

import harness.runner as R


# ----------------------------------------------------------------------------- resume (defect 1)


def _fake_run(tmp_path, dev: torch.device):
    """A :class:`harness.runner._Run` with just what ``_resume`` touches, its state saved on the CPU
    as ``end_epoch`` saves it."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    state = {"model": model.state_dict(), "objective": {}, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_cuda": None,
             "history": [{"epoch": 0}], "best": {"acc": 1.0, "epoch": 0}, "epoch": 0, "train_time": 1.0,
             "train_samples": 8, "active_time": 2.0, "started_at": "now", "teacher_step_samples": 0,
             "cache_build_s": 0.0, "cache_builds": []}
    torch.save(state, tmp_path / "state.pt")
    run = object.__new__(R._Run)
    run.dev, run.state_path, run.model, run.teachers = dev, tmp_path / "state.pt", model, []
    run.step = types.SimpleNamespace(objective=torch.nn.Module(), optimizer=opt)
    run.sched, run.console = sched, Console(file=open("/dev/null", "w"))
    run.p = types.SimpleNamespace(run_id="r")
    return run, state


def test_resume_loads_the_state_on_the_cpu_whatever_the_device(tmp_path):
    """``map_location=self.dev`` put the saved RNG state on the GPU, where ``torch.set_rng_state``
    rejects it: every resume on CUDA failed. The run's device here is ``meta`` (not the CPU)."""
    run, state = _fake_run(tmp_path, torch.device("meta"))
    seen = []
    real = torch.set_rng_state
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_rng_state", lambda t: (seen.append(t), real(t)))
        R._Run._resume(run)
    assert seen and seen[0].device.type == "cpu" and seen[0].dtype == torch.uint8
    assert torch.equal(seen[0], state["rng_cpu"])
    assert run.state.next_epoch == 1 and run.state.train_samples == 8
