"""Cost measurements of a variant: parameters, FLOPs, latency, throughput, peak memory, and the
throughput of the data layer. Used by ``bench.py`` (and by the runner).

Conventions (also in ``docs/benchmarks.md``):

* **MACs / FLOPs** (counted in :mod:`harness.measurement.flops`, re-exported here). ``macs_per_sample`` =
  multiply-accumulates of the matrix products of one eval forward (``mm``, ``addmm``, ``bmm``,
  ``matmul``, ``linear``, ``einsum`` and the gate matrix products of the recurrent layers), per
  sample; ``flops_per_sample`` = 2 x MACs. This is what ``torch.utils.flop_counter.FlopCounterMode``
  counts, and :func:`flops_crosscheck` checks the two counters agree. Elementwise, reduction and
  indexing ops (activations, gate nonlinearities, softmax, norms, BatchNorm, embedding look-ups,
  top-k...) are counted as zero on purpose (:data:`ZERO_FLOP_OPS` says why, op by op); any other op
  the counter meets and has no rule for is reported in ``unsupported_ops``, never silently dropped.
* **Timing.** CUDA: CUDA events after a warm-up, synchronising only around the timed region.
  CPU: ``time.perf_counter``. Latency is median / p90 / p99 over ``reps`` runs; throughput is
  ``reps x batch / total time`` of the same back-to-back runs.
* **Peak memory.** CUDA: ``torch.cuda.max_memory_allocated`` (tensors allocated by PyTorch on
  that device: weights, activations, gradients, optimizer state), reset before each measurement.
  CPU: peak resident set size of the **whole process** (Python, libraries, the model, the data;
  ``VmHWM`` / ``resource.getrusage(...).ru_maxrss``), reset before each measurement where Linux
  allows it (``/proc/self/clear_refs``), otherwise since the process started
  (``peak_mem_kind`` says which). A CPU training step's own memory (``peak_mem_mib_train_step``) is
  not read from the RSS, which a warmed-up step does not raise (it reuses pages its warm-up freed),
  but from the PyTorch profiler's memory accounting: the peak of the CPU tensor memory the step
  allocates and holds at once (``peak_mem_step_kind``
  ``cpu_profiler_tensor_peak``; memory a library allocates outside PyTorch's allocator, such as
  oneDNN's scratch space, is not in it).
* A quantity that cannot be measured (unsupported precision on the device, a failed compile...)
  is ``None`` with the reason under ``errors``; nothing is estimated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
import resource
import statistics
import sys
import time
from typing import Callable, Iterable

import torch
from torch import nn

from harness.env import (apply_math_flags, autocast, cuda_facts, device_name, lstm_precision, precision_problem,
    runs_sharing_device)
from harness.env import sync as _sync
from harness.measurement.flops import count_flops
from harness.model.inputs import param_counts, random_answers, random_inputs, split_inputs

# ----------------------------------------------------------------------------- timing helpers


def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[list[float], float]:
    """Per-call times in ms and the total wall time in s of ``reps`` back-to-back calls.
    CUDA: one pair of CUDA events per call, no synchronisation between calls; the total is the
    time from the first start event to the last end event. CPU: ``perf_counter``."""
    if device.type == "cuda":
        # events record on the current device's stream: made the measured device's (cuda:1 must not time cuda:0)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            torch.cuda.synchronize(device)
            for s, e in events:
                s.record(stream)
                fn()
                e.record(stream)
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in events], events[0][0].elapsed_time(events[-1][1]) / 1000
    times = []
    t_all = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return times, time.perf_counter() - t_all


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(sorted(times), n=100, method="inclusive")
    return statistics.median(times), q[89], q[98]


def default_warmup(device: torch.device | str) -> int:
    """Warm-up runs before timing: 10 on CUDA (kernel selection, allocator, clocks), 3 on CPU
    (first-call allocations only; keeps msvd-sized CPU runs short)."""
    return 10 if torch.device(device).type == "cuda" else 3


def maybe_compile(model: nn.Module, compile: bool) -> nn.Module:  # the name
    """``torch.compile(model)`` when asked (compilation happens during the warm-up runs)."""
    return torch.compile(model) if compile else model


#: how an inference figure was produced (bench rows' ``infer_path``)
INFER_PATHS = ("eager", "compile", "cuda-graph")


class CudaGraphError(ValueError):
    """A CUDA graph asked for where there is none (not a CUDA device)."""


def cuda_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """``fn`` (fixed shapes, fixed input tensors, no host sync) captured once in a CUDA graph;
    returns its replay. Warmed up on a side stream first, as capture requires."""
    if device.type != "cuda":
        raise CudaGraphError(f"a CUDA graph needs a CUDA device, not {device}")
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


@torch.no_grad()
def latency(model: nn.Module, inputs: tuple, *, warmup: int | None = None, reps: int = 50,
            precision: str = "fp32", compile: bool = False, path: str | None = None) -> dict:
    """Eval-forward latency in ms: median, p90, p99 over ``reps`` runs after ``warmup``, and the
    inference throughput ``infer_samples_per_s`` = reps x batch / total time of those runs.
    ``path``: ``eager``, ``compile`` (torch.compile; also ``compile=True``) or ``cuda-graph``
    (the forward captured once for these inputs' shape and replayed; CUDA only)."""
    dev = inputs[0].device
    path = path or ("compile" if compile else "eager")
    if path not in INFER_PATHS:
        raise ValueError(f"inference path {path!r} is not one of {', '.join(INFER_PATHS)}")
    warmup = default_warmup(dev) if warmup is None else warmup
    model.eval()
    run_model = maybe_compile(model, path == "compile")

    def fn():  # no autocast weight cache under a graph: its casts must be captured, not cached outside it
        with autocast(dev, precision, cache=path != "cuda-graph"):
            run_model(*inputs)

    run = cuda_graph(fn, dev) if path == "cuda-graph" else fn
    for _ in range(warmup):
        run()
    times, total = _timed(run, dev, reps)
    med, p90, p99 = _quantiles(times)
    batch = int(inputs[0].shape[0])
    return {"latency_ms_median": med, "latency_ms_p90": p90, "latency_ms_p99": p99, "reps": reps,
            "warmup": warmup, "infer_samples_per_s": reps * batch / total if total > 0 else None,
            "timer": "cuda_events" if dev.type == "cuda" else "perf_counter", "infer_path": path}


# ----------------------------------------------------------------------------- training step


def build_teachers(cfg, device, **settings) -> list[nn.Module]:
    """The variant's teachers (``cfg.teachers``), randomly initialised (cost only), in eval mode
    and frozen, on ``device``. Each gets the student's model settings its registration does not
    fix (:func:`variants.teacher_settings`: data dims, ``module_dim``), as in training, or
    ``settings`` when given."""
    import variants

    return [variants.create(t, **(settings or variants.teacher_settings(t, cfg.model))).to(device).eval()
            .requires_grad_(False) for t in cfg.teachers]


def make_train_step(cfg, model: nn.Module, teachers: list[nn.Module] | None = None, *, lr: float = 1e-4,
                    grad_clip: float | None = 12.0, precision: str = "fp32",
                    compile: bool = False) -> Callable[[tuple, torch.Tensor], torch.Tensor]:
    """The runner's own training step (:class:`harness.model.step.TrainStep`: forward in train mode,
    teacher outputs under ``no_grad``, the variant's objective, backward, grad-norm clip, Adam,
    fused on CUDA), as ``step(inputs, answers) -> loss`` (detached, on the device: no host sync).
    ``step.train_step`` is the TrainStep; fp16 on CUDA uses a GradScaler."""
    from harness.model.step import build_step

    ts = build_step(cfg, model, teachers, lr=lr, grad_clip=grad_clip, precision=precision,
                    forward=maybe_compile(model, True) if compile else None)

    def step(inputs: tuple, answers: torch.Tensor) -> torch.Tensor:
        base, extra = split_inputs(inputs, cfg.model)
        return ts(*base, answers, extra=extra).loss

    step.train_step = ts  # type: ignore[attr-defined]
    step.optimizer = ts.optimizer  # type: ignore[attr-defined]
    step.objective = ts.objective  # type: ignore[attr-defined]
    return step


def train_throughput(step: Callable[[tuple, torch.Tensor], torch.Tensor], inputs: tuple, answers: torch.Tensor, *,
                     warmup: int | None = None, reps: int = 20) -> dict:
    """Training-step time (median, p90 in ms) and ``train_samples_per_s`` = reps x batch / total
    time of ``reps`` back-to-back steps after ``warmup`` steps."""
    dev = inputs[0].device
    warmup = max(1, default_warmup(dev) // 2) if warmup is None else warmup
    for _ in range(warmup):
        step(inputs, answers)
    times, total = _timed(lambda: step(inputs, answers), dev, reps)
    med, p90, _ = _quantiles(times)
    batch = int(inputs[0].shape[0])
    return {"train_ms_median": med, "train_ms_p90": p90, "train_reps": reps,
            "train_samples_per_s": reps * batch / total if total > 0 else None}


# ----------------------------------------------------------------------------- peak memory


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak resident set size of the process in MiB: ``VmHWM`` where /proc exists, else
    ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2 ** 20 if sys.platform == "darwin" else ru / 1024


def _rss_mib() -> float | None:
    """The process's current resident set size in MiB (``VmRSS``), None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmRSS:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> dict:
    """Run ``fn`` once: ``peak`` (MiB), ``resident`` (what was allocated when the peak was reset,
    MiB: weights, optimizer state, inputs...), ``own`` = peak - resident (what ``fn`` itself added
    at its peak), and ``kind`` (what was measured).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (PyTorch tensors
    on that device, including the weights); resident: ``memory_allocated`` then. CPU: the
    process-wide peak RSS, reset first when the OS allows (kind ``cpu_process_peak_rss``;
    resident: the RSS then), else since process start (``cpu_process_peak_rss_since_start``: an
    upper bound that includes everything before; resident and own are then None)."""
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        resident = torch.cuda.memory_allocated(dev) / 2 ** 20
        fn()
        torch.cuda.synchronize(dev)
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2 ** 20, "cuda_max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        resident = _rss_mib() if reset else None
        fn()
        peak, kind = _peak_rss_mib(), "cpu_process_peak_rss" if reset else "cpu_process_peak_rss_since_start"
    return {"peak": peak, "resident": resident, "own": None if resident is None else peak - resident, "kind": kind}


#: what a CPU training step's own memory is (see the module docstring)
CPU_STEP_KIND = "cpu_profiler_tensor_peak"


@contextlib.contextmanager
def quiet_fd2():
    """Send file descriptor 2 to /dev/null (the profiler's native library logs its start and stop there)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def cpu_tensor_peak_mib(fn: Callable[[], object]) -> float:
    """Run ``fn`` once under the PyTorch profiler's memory accounting (``profile_memory``): the peak,
    in MiB, of the CPU tensor memory it allocated and had not yet freed (its allocations less its
    frees, in the order they happened; the profiler does not report freeing a block allocated
    before it started, so what ``fn`` frees of earlier tensors does not lower the figure). Its
    stderr is silenced meanwhile: the profiler's native library logs its start and stop there."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    total = peak = 0
    for _, n in events:
        total += n
        peak = max(peak, total)
    return peak / 2 ** 20


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str) -> tuple[float, str]:
    """(peak memory in MiB, what was measured) of :func:`peak_memory`."""
    m = peak_memory(fn, device)
    return m["peak"], m["kind"]


# ----------------------------------------------------------------------------- data layer


def data_throughput(data, batch_size: int, device: torch.device | str, *, split: str = "train",
                    passes: int = 1, features_on_device: bool = True) -> dict:
    """Samples/s that ``harness.data.dataset.iterate_batches`` delivers for a loaded data set, onto
    ``device``, over ``passes`` full passes of ``split`` (after one untimed batch).

    As in the runner, the split is moved to the device once, and in-memory features too when
    the device is CUDA and ``features_on_device`` (streaming features are read from the h5 files
    for every batch, then copied). Returns ``data_samples_per_s``, ``data_mode`` (memory or
    stream), ``data_batches``, ``data_seconds``."""
    from harness.data import dataset as D
    from harness.data.features import InMemoryFeatures

    dev = torch.device(device)
    s = data.splits[split].to(dev)
    feats = data.features
    if isinstance(feats, InMemoryFeatures) and dev.type == "cuda" and features_on_device:
        feats = feats.to(dev)
    next(iter(D.iterate_batches(s, feats, batch_size, device=dev)))  # open files, first allocations
    _sync(dev)
    n = batches = 0
    t = time.perf_counter()
    for _ in range(passes):
        for b in D.iterate_batches(s, feats, batch_size, device=dev):
            n += b.answers.shape[0]
            batches += 1
    _sync(dev)
    dt = time.perf_counter() - t
    return {"data_samples_per_s": n / dt if dt > 0 else None, "data_mode": "stream" if feats.streaming else "memory",
            "data_batches": batches, "data_seconds": dt, "batch_size": batch_size, "split": split}


# ----------------------------------------------------------------------------- one variant, all fields


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass
class _Bench:
    """What one variant's measurements share across batch sizes."""

    cfg: object
    model: nn.Module
    forward: nn.Module  # the model, or its compiled form
    teachers: list[nn.Module]
    device: torch.device
    precision: str
    compile: bool
    question_len: int
    infer_path: str = "eager"  # eager, compile or cuda-graph (INFER_PATHS)


def _base_record(b: _Bench, bs: int, params: dict, fl: dict, train: bool) -> dict:
    dev = b.device
    return {"variant": b.cfg.name, "model": dict(b.cfg.model), "device": str(dev), "device_name": device_name(dev),
            "gpu_name": gpu_name(dev), "torch_version": torch.__version__, "batch_size": bs,
            "precision": b.precision, "compile": b.compile, "infer_path": b.infer_path,
            "lstm_precision": lstm_precision(dev, b.precision), **cuda_facts(dev),
            "runs_sharing_device": runs_sharing_device(), "question_len": b.question_len,
            "params_total": params["total"], "params_trainable": params["trainable"],
            "params_by_module": params["by_module"], **fl,
            "latency_ms_median": None, "latency_ms_p90": None, "latency_ms_p99": None,
            "infer_samples_per_s": None, "train_samples_per_s": None, "train_ms_median": None,
            "peak_mem_mib_infer": None, "peak_mem_mib_train": None, "peak_mem_mib_train_step": None,
            "resident_mib_train": None, "peak_mem_kind": None, "peak_mem_step_kind": None,
            "teachers": list(b.cfg.teachers) if train else [],
            "threads": torch.get_num_threads() if dev.type == "cpu" else None}


def _measure_inference(b: _Bench, rec: dict, inputs: tuple, warmup: int | None, reps: int) -> None:
    """Latency on ``b.infer_path``; the peak memory of one eager forward (no teacher is built yet)."""
    rec.update(latency(b.forward, inputs, warmup=warmup, reps=reps, precision=b.precision,
                       path=b.infer_path if b.infer_path != "compile" else "eager"))
    rec["infer_path"] = b.infer_path

    def infer():
        with torch.no_grad(), autocast(b.device, b.precision):
            b.forward(*inputs)

    rec["peak_mem_mib_infer"], rec["peak_mem_kind"] = peak_memory_mib(infer, b.device)


def _measure_training(b: _Bench, rec: dict, inputs: tuple, warmup: int | None, reps: int, errors: dict) -> None:
    """Training-step throughput, and its peak memory: total, resident at the reset (weights, the
    teachers, optimizer state after the warm-up) and the step's own (``peak_mem_mib_train_step``)."""
    bs = int(inputs[0].shape[0])
    if bs < 2:  # BatchNorm1d in train mode needs more than one sample per batch
        raise ValueError("a training step needs batch size >= 2 (BatchNorm in train mode)")
    step = make_train_step(b.cfg, b.model, b.teachers, precision=b.precision, compile=b.compile)
    answers = random_answers(b.cfg.model, bs, b.device)
    rec.update(train_throughput(step, inputs, answers, warmup=warmup, reps=reps))
    m = peak_memory(lambda: step(inputs, answers), b.device)
    rec.update(peak_mem_mib_train=m["peak"], peak_mem_mib_train_step=m["own"], resident_mib_train=m["resident"])
    rec["peak_mem_kind"] = rec["peak_mem_kind"] or m["kind"]
    rec["peak_mem_step_kind"] = m["kind"]
    if b.device.type == "cpu":  # the RSS does not see a warmed-up step's own memory: the profiler's accounting
        rec["peak_mem_mib_train_step"], rec["peak_mem_step_kind"] = None, None
        try:
            rec["peak_mem_mib_train_step"] = cpu_tensor_peak_mib(lambda: step(inputs, answers))
            rec["peak_mem_step_kind"] = CPU_STEP_KIND
        except Exception as e:  # not measured: "-" with the reason, never the RSS difference
            errors["peak_mem_mib_train_step"] = f"{type(e).__name__}: {e}"


def _flops_or_error(cfg, model, dev, flops_batch_size: int, question_len: int, errors: dict) -> dict:
    """FLOPs counted once (fp32, at ``flops_batch_size``); a failure is recorded in ``errors``."""
    try:
        return count_flops(model, random_inputs(cfg.model, flops_batch_size, dev, question_len))
    except Exception as e:  # reported, not hidden
        errors["flops"] = f"{type(e).__name__}: {e}"
    return dict(_NO_FLOPS)


_NO_FLOPS = {"macs_per_sample": None, "flops_per_sample": None, "unsupported_ops": None,
             "macs_per_sample_by_module": None, "flops_batch_size": None}


def _run_part(b: _Bench, rec: dict, errors: dict, name: str, fn: Callable[[], None], problem: str | None,
              say: Callable[[str], None]) -> None:
    """One measurement of one record; one that cannot run or fails is recorded under ``errors``."""
    if problem:
        errors[name] = problem
        return
    say(f"{b.cfg.name} batch {rec['batch_size']}: {'latency' if name == 'latency' else 'training step'}")
    try:
        fn()
    except Exception as e:  # a measurement that fails is recorded as missing
        errors[name] = f"{type(e).__name__}: {e}"


def measure_variant(cfg, batch_sizes: Iterable[int], device: torch.device | str, *, precision: str = "fp32",
                    compile: bool = False, reps: int = 50, warmup: int | None = None,
                    train: bool = True, train_reps: int | None = None, flops: bool = True,
                    flops_batch_size: int = 2, question_len: int = 12,
                    teacher_settings: dict | None = None, on_progress: Callable[[str], None] | None = None,
                    cuda_graph: bool = False) -> list[dict]:
    """Every cost measurement of one variant config (``variants.get_config(...)``), one record
    per batch size (fields: docs/benchmarks.md). Parameters and FLOPs do not depend on the
    batch size or precision: counted once, in fp32, FLOPs at ``flops_batch_size`` and divided by
    it. The model is randomly initialised (costs only). Inference is measured at every batch size
    before a distilled student's teachers are built (with ``teacher_settings``, default
    :func:`variants.teacher_settings` of the student's), so its inference memory never holds
    them; then the training steps. ``cuda_graph``: latency from a CUDA graph captured per batch size."""
    import variants

    dev = torch.device(device)
    apply_math_flags(dev, precision)  # TF32 chosen for the precision (recorded in every row)
    say = on_progress or (lambda msg: None)
    torch.manual_seed(0)
    model = variants.build(cfg).to(dev)
    params, errors = param_counts(model), {}
    if flops:
        say(f"{cfg.name}: counting FLOPs")
    fl = _flops_or_error(cfg, model, dev, flops_batch_size, question_len, errors) if flops else dict(_NO_FLOPS)
    path = "cuda-graph" if cuda_graph else ("compile" if compile else "eager")
    b = _Bench(cfg, model, maybe_compile(model, compile), [], dev, precision, compile, question_len, path)
    problem = precision_problem(dev, precision)  # e.g. no bf16 LSTM on this CPU: say so, never time it
    rows = [(_base_record(b, bs, params, fl, train), dict(errors), random_inputs(cfg.model, bs, dev, question_len))
            for bs in batch_sizes]
    for rec, rec_err, inputs in rows:
        _run_part(b, rec, rec_err, "latency",
                  lambda rec=rec, inputs=inputs: _measure_inference(b, rec, inputs, warmup, reps),
                  problem, say)
    if train:
        b.teachers = build_teachers(cfg, dev, **(teacher_settings or {})) if cfg.teachers else []
        for rec, rec_err, inputs in rows:
            _run_part(b, rec, rec_err, "train", lambda rec=rec, inputs=inputs, rec_err=rec_err: _measure_training(
                b, rec, inputs, warmup, train_reps or max(5, reps // 5), rec_err), problem, say)
            model.zero_grad(set_to_none=True)
            _release(dev)
    for rec, rec_err, _ in rows:
        if rec_err:
            rec["errors"] = rec_err
    return [rec for rec, _, _ in rows]
