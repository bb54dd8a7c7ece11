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

import harness.training.runner as R


# ----------------------------------------------------------------------------- resume (defect 1)


def _fake_run(tmp_path, dev: torch.device):
    """A :class:`harness.training.runner._Run` with just what ``_resume`` touches, its state saved on the CPU
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


# ----------------------------------------------------------------------------- fake CUDA (every variant)

from contextlib import contextmanager  # noqa: E402

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import variants  # noqa: E402
from harness.data.features import InMemoryFeatures  # noqa: E402
from harness.evaluation.evaluate import predict  # noqa: E402
from harness.measurement.measure import random_answers, random_inputs  # noqa: E402
from harness.data.synthetic import PRESETS  # noqa: E402
from harness.training.teacher_cache import TeacherOutputs  # noqa: E402

CUDA = torch.device("cuda:0")
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.copy.default}


class HostToDevice(TorchDispatchMode):
    """Records every copy from a CPU tensor to a CUDA one (``.to(device)``, ``copy_``): inside a
    forward it is a blocking host-to-device transfer every step (and illegal in a CUDA graph)."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _COPIES and isinstance(out, torch.Tensor) and out.device.type == "cuda":
            src = args[1] if func is not torch.ops.aten._to_copy.default else args[0]
            if isinstance(src, torch.Tensor) and src.device.type == "cpu":
                self.copies.append(f"{func}: {tuple(src.shape)} cpu -> {out.device}")
        return out


@contextmanager
def fake_cuda():
    """Tensors that claim ``cuda``, cuDNN off (its RNN asks the driver for a handle). Models are
    built under :func:`on_device` (CUDA as the default device); forwards run with the CPU as the
    default device, as in a real run, so that a tensor a forward makes without a device is a CPU one."""
    old = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.backends.cudnn.enabled = old


def on_device():
    return torch.device("cuda")


def _on_cuda(*tensors):
    made = [t() for t in tensors]  # drawn on the CPU with the harness's seeded generators, moved outside a forward
    return [m.to(CUDA) if isinstance(m, torch.Tensor) else tuple(x.to(CUDA) for x in m) for m in made]


def _forward_and_objective(name: str):
    """Build ``name`` (and its teachers) on fake CUDA, run forward and objective; returns the copies seen."""
    cfg = variants.get_config(name, **PRESETS["tiny"].model_config())
    with on_device():
        model = variants.build(cfg)
        teachers = [variants.create(t, **variants.teacher_settings(t, cfg.model)).eval().requires_grad_(False)
                    for t in cfg.teachers]
        objective = variants.objective(cfg, teacher_dim=teachers[0].cfg.module_dim if teachers else None)
    # a batch carries the streams the run's models read: a one-stream student distilled from a two-stream
    # teacher gets both (its own model reads one), as the loader gives them
    shape = {k: v for k, v in cfg.model.items() if k != "modality"} if teachers else cfg.model
    inputs, answers = _on_cuda(lambda: random_inputs(shape, 4, "cpu"), lambda: random_answers(cfg.model, 4, "cpu"))
    with HostToDevice() as watch:
        out = model(*inputs)
        t_outs = [t(*inputs) for t in teachers] if teachers else None
        loss, parts = objective(out, answers, t_outs, epoch=0)
    assert out["logits"].device == CUDA and loss.device == CUDA and loss.dtype == torch.float32, name
    assert all(v.device == CUDA for v in parts.values()), name
    return watch.copies


@pytest.mark.parametrize("name", variants.list())
@pytest.mark.slow
def test_every_variant_runs_on_fake_cuda_without_a_host_copy(name):
    """A tensor made on the CPU inside a forward or an objective either mixes devices (FakeTensorMode
    raises, as CUDA would) or is copied to the device every step (recorded)."""
    with fake_cuda():
        assert _forward_and_objective(name) == [], name


def test_the_fake_cuda_check_catches_a_planted_mismatch_and_a_planted_copy(monkeypatch):
    """The test above fails when a forward makes a tensor on the CPU: the sparse-node adjacency as it
    was (built on the CPU and copied every forward), and a CPU tensor added to a CUDA one."""
    from variants.dualvgr import DualVGR, full_graph_adjacency

    def old_adjacency(self, app, mot):
        return full_graph_adjacency(app.shape[1]).to(app.device, app.dtype)  # the code before the fix

    with monkeypatch.context() as mp, fake_cuda():
        mp.setattr(DualVGR, "graph_adjacency", old_adjacency)
        assert any("cpu -> cuda" in c for c in _forward_and_objective("sparse-node"))
    real_forward = DualVGR.forward

    def planted(self, *args, **kw):
        out = real_forward(self, *args, **kw)
        return {**out, "logits": out["logits"] + torch.zeros(out["logits"].shape, device="cpu")}

    with monkeypatch.context() as mp, fake_cuda():
        mp.setattr(DualVGR, "forward", planted)
        with pytest.raises(Exception, match="(?i)device"):
            _forward_and_objective("dualvgr")


@pytest.mark.slow
def test_teacher_cache_gather_and_evaluation_on_fake_cuda(tiny):
    """A student's teacher outputs gathered for a batch (resident on the device, and streamed from
    host memory), and the evaluation loop over a split, stay on the device."""
    cfg = variants.get_config("dualvgr", **PRESETS["tiny"].model_config())
    with fake_cuda():
        n, answers = 10, cfg.model["answer_vocab"]
        resident = TeacherOutputs([{"logits": torch.randn(n, answers, device=CUDA)}], [{"logits": torch.float32}],
                                  CUDA, False)
        host = TeacherOutputs([{"logits": torch.randn(n, answers)}], [{"logits": torch.float32}], CUDA, True)
        index = torch.tensor([3, 1, 7], device=CUDA)
        for cache in (resident, host):
            (got,) = cache.gather(index)
            assert got["logits"].device == CUDA and got["logits"].shape == (3, answers)
        with on_device():
            model = variants.build(cfg)
        split = tiny.splits["val"].to(CUDA)
        features = tiny.features.to(CUDA) if isinstance(tiny.features, InMemoryFeatures) else tiny.features
        with HostToDevice() as watch:
            pred, means = predict(model, split, features, 64, CUDA)
        assert pred.shape == (len(split),) and means == {}  # dualvgr gives no output a metric averages
        # features and split resident: batches are built by indexing on the device; the one copy is the
        # pass's order of questions (drawn on the CPU from the seeded generator), once per pass, not per batch
        assert watch.copies == [f"aten._to_copy.default: ({len(split)},) cpu -> {CUDA}"]


# ----------------------------------------------------------------------------- precision, TF32 (defects 2, 9)

from harness import env  # noqa: E402
from harness.measurement import measure as M  # noqa: E402
from variants.dualvgr import run_lstm  # noqa: E402


def test_bf16_on_cuda_runs_the_lstms_outside_autocast_in_fp32(monkeypatch):
    """cuDNN's autocast RNN wrapper casts to fp16 whatever the autocast dtype: under CUDA bf16 autocast
    the LSTM must be called with autocast off and fp32 input. CUDA autocast cannot be entered without
    a GPU, so its state is what the test sets; the input is a fake CUDA tensor."""
    seen = []

    def lstm(x):
        seen.append((x.dtype, torch.is_autocast_enabled("cuda")))
        return x, None

    state = {"on": True, "dtype": torch.bfloat16}
    real_enabled = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda dev: state["dtype"])
    with fake_cuda():
        x = torch.randn(2, 3, 4, device=CUDA, dtype=torch.bfloat16)
        monkeypatch.setattr(torch, "is_autocast_enabled",
                            lambda *a: state["on"] if a == ("cuda",) else real_enabled(*a))
        run_lstm(lstm, x)
        state["dtype"] = torch.float16  # fp16 autocast (with a GradScaler): left to autocast
        run_lstm(lstm, x)
    assert seen[0][0] == torch.float32 and seen[1][0] == torch.bfloat16
    cpu = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    state["dtype"] = torch.bfloat16
    run_lstm(lstm, cpu)  # CPU: oneDNN's bf16 LSTM, as before
    assert seen[2][0] == torch.bfloat16


def test_lstm_precision_and_tf32_are_named():
    assert env.lstm_precision("cuda", "bf16") == "tf32" and env.lstm_precision("cuda", "fp32") == "fp32"
    assert env.lstm_precision("cuda", "tf32") == "tf32" and env.lstm_precision("cuda", "fp16") == "fp16"
    assert env.lstm_precision("cpu", "bf16") == "bf16" and env.lstm_precision("cpu", "fp32") == "fp32"
    assert env.precision_problem("cpu", "tf32") and env.precision_problem("cuda", "tf32") is None
    facts = env.environment("cpu")
    assert {"tf32_matmul", "tf32_cudnn", "cuda_version", "cudnn_version"} <= set(facts)
    assert facts["tf32_matmul"] is None  # not a CUDA run: the flags do not apply


def test_tf32_flags_are_set_for_the_precision_not_inherited():
    """PyTorch's defaults (cuBLAS TF32 off, cuDNN TF32 on) made "fp32" half TF32; each precision now sets both."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert env.apply_math_flags("cuda", "fp32") == {"tf32": False}
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        env.apply_math_flags("cuda", "tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert env.apply_math_flags("cpu", "fp32") == {}  # the CPU has no TF32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_deterministic_setting(monkeypatch):
    monkeypatch.setenv(env.DETERMINISTIC_ENV, "1")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        assert env.apply_math_flags("cpu", "fp32") == {"deterministic": True}
        assert torch.are_deterministic_algorithms_enabled() and env.environment("cpu")["deterministic_algorithms"]
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[2], old[3]


# ----------------------------------------------------------------------------- timing, memory (defects 3, 4, 5)


def test_cuda_events_record_on_the_measured_device(monkeypatch):
    """Events record on the current device's stream: timing cuda:1 from a process whose current
    device is cuda:0 timed an idle cuda:0. torch.cuda is replaced by a fake that tracks the current device."""
    current = {"dev": "cuda:0"}
    recorded = []

    @contextmanager
    def device(d):
        old, current["dev"] = current["dev"], str(torch.device(d))
        yield
        current["dev"] = old

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(stream.device if stream is not None else current["dev"])

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: types.SimpleNamespace(
        device=str(torch.device(d)) if d is not None else current["dev"]))
    times, total = M._timed(lambda: None, torch.device("cuda:1"), 3)
    assert len(times) == 3 and recorded and set(recorded) == {"cuda:1"}


def test_peak_memory_separates_the_steps_own_peak_from_what_was_resident():
    resident = torch.ones(32, 1 << 20)  # 128 MiB held before the measurement  # noqa: F841
    m = M.peak_memory(lambda: torch.ones(64, 1 << 20).sum(), "cpu")
    if m["kind"] != "cpu_process_peak_rss":
        pytest.skip("this OS cannot reset the peak RSS")
    assert m["resident"] >= 128 and m["own"] == pytest.approx(m["peak"] - m["resident"])
    assert 200 <= m["own"] <= 400, m  # the 256 MiB the step allocated, not the 128 MiB resident


@pytest.mark.slow
def test_a_students_inference_is_measured_before_its_teachers_exist(monkeypatch):
    """The inference peak memory of a student included its teacher's weights when training was also
    measured (teachers built before the batch-size loop): the same field depended on a flag."""
    order = []
    real_build, real_infer = M.build_teachers, M._measure_inference
    monkeypatch.setattr(M, "build_teachers", lambda *a, **k: (order.append("teachers"), real_build(*a, **k))[1])
    monkeypatch.setattr(M, "_measure_inference", lambda *a, **k: (order.append("infer"), real_infer(*a, **k))[1])
    cfg = variants.get_config("student-logits", **PRESETS["tiny"].model_config())
    recs = M.measure_variant(cfg, [2, 4], "cpu", reps=1, warmup=0, train_reps=1, flops=False)
    assert order == ["infer", "infer", "teachers"]
    for r in recs:
        assert r["train_samples_per_s"] and r["infer_path"] == "eager" and r["lstm_precision"] == "fp32"
        assert "peak_mem_mib_train_step" in r and r["runs_sharing_device"] == 1 and "errors" not in r


def test_cuda_graph_needs_cuda():
    with pytest.raises(M.CudaGraphError, match="needs a CUDA device"):
        M.cuda_graph(lambda: None, torch.device("cpu"))
    from typer.testing import CliRunner

    import bench

    r = CliRunner().invoke(bench.app, ["--device", "cpu", "--cuda-graph", "--config", "tiny", "--no-store"])
    assert r.exit_code == 2 and "--cuda-graph needs a CUDA device" in r.output


# ----------------------------------------------------------------------------- on a real GPU (scripts/gpu_check.py)

SMALL = {**PRESETS["tiny"].model_config()}


@pytest.mark.cuda
def test_cuda_resume_completes(tiny, tmp_path):
    """Defect 1 on the device itself: a run stopped after one epoch resumes on CUDA."""
    from harness.training.plan import RunPruned, RunSpec
    from harness.training.runner import train
    from harness.runs.store import ResultsStore

    store = ResultsStore(tmp_path / "results")
    s = RunSpec(variant="dualvgr", data="synthetic:tiny", seed=1, epochs=2, batch_size=128)
    with pytest.raises(RunPruned):  # stopped after its first epoch
        train(s, store, data=tiny, device="cuda", progress=False, on_epoch=lambda epoch, acc: True)
    rec = train(s, store, data=tiny, device="cuda", progress=False)
    assert rec["status"] == "complete" and rec["epochs_run"] == 2 and rec["environment"]["tf32_matmul"] is False
    assert rec["cost"]["peak_mem_mib_train_step"] > 0 and rec["cost"]["resident_mib_train"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.float32),
                                              ("fp16", torch.float16)])
def test_cuda_lstm_dtype_under_each_precision(precision, dtype):
    lstm = torch.nn.LSTM(8, 8, batch_first=True).cuda()
    x = torch.randn(2, 3, 8, device="cuda")
    with env.autocast("cuda", precision):
        out, _ = run_lstm(lstm, x)
    assert out.dtype == dtype, (precision, out.dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dualvgr", "sparse-node", "student-logits"])
def test_cuda_training_step_has_no_host_sync(name):
    from harness.model.step import build_step

    cfg = variants.get_config(name, **SMALL)
    dev = torch.device("cuda")
    model = variants.build(cfg).to(dev)
    teachers = M.build_teachers(cfg, dev)
    step = build_step(cfg, model, teachers)
    inputs = random_inputs(cfg.model, 8, dev)
    answers = random_answers(cfg.model, 8, dev)
    with torch.no_grad():
        t_outs = [t(*inputs) for t in teachers] if teachers else None  # the cache's gather gives these
    step(*inputs, answers, teacher_outputs=t_outs)  # first step: allocations, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*inputs, answers, teacher_outputs=t_outs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_latency():
    cfg = variants.get_config("dualvgr", **SMALL)
    model = variants.build(cfg).cuda()
    inputs = random_inputs(cfg.model, 4, "cuda")
    rec = M.latency(model, inputs, warmup=2, reps=5, path="cuda-graph")
    assert rec["infer_path"] == "cuda-graph" and rec["latency_ms_median"] > 0


@pytest.mark.slow
def test_teachers_are_dropped_once_the_cache_replaces_them(tiny, tmp_path, monkeypatch):
    """A student trained from the teacher-output cache no longer holds its teachers' weights (on a GPU they
    were resident through the whole run, and counted in its training memory)."""
    from harness.training.plan import RunSpec
    from harness.training.runner import train
    from harness.runs.store import ResultsStore

    seen = {}
    real = R._Run._epochs_then_record

    def after_setup(self, sinks):
        if not self.teacher_records:  # the teacher itself trains as usual
            return real(self, sinks)
        seen.update(teachers=list(self.teachers), step_teachers=list(self.step.teachers), cache=self.tcache)
        return {"status": "inspected"}

    monkeypatch.setattr(R._Run, "_epochs_then_record", after_setup)
    s = RunSpec(variant="student-logits", data="synthetic:tiny", seed=1, epochs=1, batch_size=512,
                overrides={"module_dim": 16})
    train(s, ResultsStore(tmp_path / "results"), data=tiny, device="cpu", progress=False)
    assert seen["cache"] is not None and seen["teachers"] == [] and seen["step_teachers"] == []
