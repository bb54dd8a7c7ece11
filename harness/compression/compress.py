"""Compression beyond distillation: evaluation-time int8 quantisation and ONNX export of a trained
run, without retraining, and the CPU cost of each path beside the bound the machine allows.

Methods (:data:`METHODS`, a small registry; a method turns the run's fp32 model into a module whose
forward takes the model's inputs and returns ``{"logits": ...}``, so :mod:`harness.evaluation.evaluate`
evaluates it exactly as the runner evaluates the fp32 model):

* ``dynamic-int8``: ``torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear},
  dtype=torch.qint8)``: the LSTMs' and Linears' weights int8 (per tensor), activations quantised on
  the fly per batch; everything else (attention, graph matrix products, norms) stays fp32. CPU only.
* ``onnx``: ``torch.onnx.export`` (TorchScript exporter, opset :data:`OPSET`, batch, question
  length and candidates dynamic) of a wrapper returning the logits, run by ONNX Runtime's ``CPUExecutionProvider`` with
  this process's torch threads. A model that cannot be exported raises :class:`ExportError`
  naming the variant and the exporter's reason.
* ``ort-dynamic-int8``: that export quantised by ONNX Runtime's ``quantize_dynamic``: every MatMul by a
  weight int8 per channel, every LSTM ONNX Runtime's fused int8 LSTM; activations quantised on the fly.
* ``ort-static-int8``: that export quantised by ``quantize_static`` (QDQ; MatMul and Gemm, int8 weights
  per channel, uint8 activations whose ranges are calibrated on :data:`CALIBRATION_QUESTIONS` training
  questions, :func:`training_calibration`: never validation or test), then its LSTMs dynamically (ONNX
  Runtime has no static int8 LSTM).

Every ONNX Runtime path runs with :func:`session_options` (threads = torch's, sequential, every graph
optimisation). docs/compression.md says what each does, its bound and figures.

A compressed evaluation of a complete run is recorded beside it, never in place of it:
``runs/<run_id>/compressed/<method>/`` holds ``record.json`` (written last, atomically: the
evaluation is complete when it exists, so a killed one is redone and a complete one skipped),
``predictions_{test,val}.csv`` (the runner's format) and the compressed model (``model.onnx``,
``model-int8.pt``). Its record links the run (``run_id``, the SHA-1 of the ``best.pt`` it
compressed) and holds the per-type metrics of test and val, the evaluation-time ablations, the
agreement with the fp32 model on the test split (the share of predictions that agree, max |logit
difference|), the sizes on disk, and the CPU latency (batch 1 and 32) and memory of fp32 and the
compressed model, timed in turn in the same process (ratios of the same run, same machine).

Bounds (:func:`machine_rates`, :func:`ort_rates`, :func:`bound_ms`): the fp32 and int8 GEMM rates (the
faster of torch and ONNX Runtime) and the copy bandwidth this CPU reaches, measured in the same run, turn
a model's MACs and weight bytes into the least time a forward can take on each path, the MACs a path runs
in int8 (:func:`int8_macs`: counted from ONNX Runtime's profile for its paths) at the int8 rate, so a
latency can be read against what the machine allows; :func:`path_profile` says where the rest goes
(:mod:`harness.compression.profiles`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import tempfile
import time
import timeit
import warnings
from datetime import datetime, timezone
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import variants

from harness.data import dataset as D
from harness.runs import identity
from harness.env import environment, git_commit, load_average
from harness.errors import HarnessError
from variants.tasks import OPEN_ENDED

from harness.compression import profiles
from harness.evaluation.evaluate import ABLATIONS, evaluate
from harness.model.inputs import random_inputs
from harness.runs.record import task as record_task
from harness.measurement.measure import latency, peak_memory, quiet_fd2
from harness.runs.store import WEIGHTS, ResultsStore
from harness.files import atomic_output, atomic_torch_save, atomic_write_json, file_digest, locked

#: the ONNX opset exported: 17 (ONNX 1.12, 2022) is the newest opset of the TorchScript exporter's
#: complete LSTM support that every onnxruntime >= 1.16 runs; nothing in these models needs a newer one
OPSET = 17
#: where a run's compressed evaluations live, under its directory
COMPRESSED = "compressed"
#: a compressed evaluation's record version
VERSION = 1
#: batch sizes of the CPU latency, and timed forwards per batch size (after a warm-up)
LATENCY_BATCHES = (1, 32)
LATENCY_REPS = {1: 30, 32: 10}
_INPUTS = ("appearance", "motion", "questions", "lengths")


class CompressError(HarnessError):
    """A compressed evaluation that cannot be done (unknown method, incomplete run, damaged
    weights, other data): the message names the run or the method and what is wrong."""


class ExportError(CompressError):
    """A model that cannot be exported or run by ONNX Runtime: the message names the variant and
    the exporter's (or runtime's) reason."""


@dataclasses.dataclass
class Compressed:
    """A compressed model: ``module(appearance, motion, questions, lengths) -> {"logits": ...}``,
    its file (written in the evaluation's directory), size on disk, and facts about it."""

    module: nn.Module
    file: Path
    size_bytes: int
    info: dict


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Model inputs a static quantisation calibrates its activation ranges on: where they come from
    (``source``: the split, ``train``, or ``random inputs`` where no data set is at hand, as in
    ``bench.py --compress``, whose timing the scales do not change), the question ids drawn and the
    batches, each ``{input name: array}`` as ONNX Runtime is fed."""

    source: str
    question_ids: tuple
    batches: tuple[dict[str, np.ndarray], ...]

    def describe(self) -> dict:
        """What a record says of it: the split, how many questions, their ids."""
        return {"source": self.source, "questions": sum(len(next(iter(b.values()))) for b in self.batches),
                "question_ids": [int(q) if isinstance(q, (int, np.integer)) else str(q) for q in self.question_ids]}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    #: (fp32 model, config, dir, calibration or None) -> Compressed
    build: Callable[[nn.Module, variants.VariantConfig, Path, "Calibration | None"], Compressed]
    #: whether ``build`` calibrates on inputs (:class:`Calibration`): :func:`compress_run` draws them from the
    #: run's training questions only
    calibrated: bool = False
    #: a torch path whose nn.LSTM and nn.Linear run in int8 (its bound counts their MACs at the int8 rate);
    #: an ONNX Runtime path's int8 MACs are counted from its profile instead (:func:`path_profile`)
    torch_int8: bool = False


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    METHODS[method.name] = method


def check_methods(names, where: str) -> tuple[str, ...]:
    """``names`` as a tuple of registered methods, each once; otherwise a CompressError naming ``where``."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CompressError(f"{where}: expected a list of method names, got {names!r} (known: {', '.join(METHODS)})")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise CompressError(f"{where}: unknown compression method(s) {', '.join(map(repr, unknown))} "
                            f"(known: {', '.join(METHODS)})")
    if len(set(names)) != len(names):
        raise CompressError(f"{where}: a method is named twice in {list(names)!r}")
    return tuple(names)


# ----------------------------------------------------------------------------- the methods


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LSTMs and Linears dynamically quantised to int8 (CPU, eval)."""
    with warnings.catch_warnings():  # torch.ao's deprecation notice (torchao): the API still ships
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.LSTM, nn.Linear},
                                                      dtype=torch.qint8)


def _dynamic_int8(model: nn.Module, cfg: variants.VariantConfig, out_dir: Path, calibration=None) -> Compressed:
    q = quantize_int8(model)
    path = out_dir / "model-int8.pt"
    digest = atomic_torch_save(path, q.state_dict())
    kinds = sorted({type(m).__name__ for m in q.modules() if "quantized" in type(m).__module__})
    return Compressed(q, path, digest["nbytes"], {"quantized_modules": kinds,
                                                  "engine": torch.backends.quantized.engine,
                                                  "weights": "int8 per tensor", "activations": "quantised per batch"})


class _Logits(nn.Module):
    """The model's logits alone: what is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):  # appearance, motion, questions, lengths, then the task's inputs
        return self.model(*inputs)["logits"]


def _ort(method: str = "onnx"):
    """onnxruntime, or an ExportError saying how ``method`` needs it and how to install it."""
    try:
        import onnx  # noqa: F401 - torch.onnx.export writes through it
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"the {method} method needs the onnx and onnxruntime packages ({e}): "
                          "pip install -e '.[compress]'") from None
    return onnxruntime


def session_options(ort, threads: int | None = None, profile_prefix: str | None = None):
    """ONNX Runtime's session options for every ONNX Runtime path: ``threads`` intra-op threads (this
    process's torch threads when None: the same cores as the torch paths and the GEMM rates of the bound),
    one inter-op thread, operators run one after another (sequential: these graphs are a chain, a parallel
    executor only adds scheduling), every graph optimisation (ORT_ENABLE_ALL: node fusions, the int8
    products fused with their quantisation, weights pre-packed); with ``profile_prefix``, profiling on."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: the quantised graphs' notes on unused initialisers are not news
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def session_facts(ort, threads: int | None = None) -> dict:
    """What a record says of how ONNX Runtime ran a path."""
    return {"onnxruntime": ort.__version__, "provider": "CPUExecutionProvider",
            "intra_op_threads": threads or torch.get_num_threads(), "inter_op_threads": 1, "execution": "sequential",
            "graph_optimization": "ORT_ENABLE_ALL"}


class OrtModule(nn.Module):
    """An exported model run by ONNX Runtime's CPU provider (:func:`session_options`), called like the model
    (CPU tensors in, ``{"logits": ...}`` out) so that :mod:`harness.evaluation.evaluate` and
    :mod:`harness.measurement.measure` use it as is."""

    def __init__(self, path: Path, names: tuple[str, ...] = _INPUTS, threads: int | None = None):
        super().__init__()
        ort = _ort()
        self.path, self.threads = Path(path), threads
        self.order = names  # the model's positional inputs, by name
        self.session = ort.InferenceSession(str(path), session_options(ort, threads),
                                            providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def feeds(self, inputs: tuple, named: dict | None = None) -> dict[str, np.ndarray]:
        # positional in the model's order, or by name as harness.evaluation.evaluate passes a task's inputs
        # (candidates); fed by name: the exporter drops the inputs a model ignores (question-only: the video)
        given = {**dict(zip(self.order, inputs)), **(named or {})}
        return {n: t.detach().cpu().numpy() for n, t in given.items() if n in self.names}

    def forward(self, *inputs, **named):
        return {"logits": torch.from_numpy(self.session.run(None, self.feeds(inputs, named))[0])}

    def profile(self, inputs: tuple, reps: int = 5) -> dict:
        """ONNX Runtime's profile of ``reps`` runs on ``inputs`` (after one unprofiled-in-the-summary warm-up
        run), in a session of its own with the same options, summarised (:func:`profiles.summarize_ort`)."""
        import json
        import tempfile

        ort = _ort()
        with tempfile.TemporaryDirectory() as tmp:
            session = ort.InferenceSession(str(self.path), session_options(ort, self.threads, f"{tmp}/ort"),
                                           providers=["CPUExecutionProvider"])
            feeds = self.feeds(inputs)
            for _ in range(reps + 1):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        return profiles.summarize_ort(events, skip_runs=1)


def input_names(cfg_model: dict) -> tuple[str, ...]:
    """The model's positional inputs by name: the video, the question, then its task's inputs
    (:mod:`variants.tasks`)."""
    return _INPUTS + tuple(variants.task(cfg_model.get("task", OPEN_ENDED)).inputs)


def export_onnx(model: nn.Module, variant: str, path: Path, cfg_model: dict) -> None:
    """Export ``model``'s logits to ``path`` (atomically), batch axis dynamic; ExportError names
    the variant and the exporter's reason when it cannot."""
    example = random_inputs(cfg_model, 2, "cpu")
    axes = {k: {0: "batch"} for k in (*input_names(cfg_model), "logits")}
    axes.update(questions={0: "batch", 1: "words"}, candidates={0: "batch", 1: "candidates", 2: "candidate_words"},
                candidate_lengths={0: "batch", 1: "candidates"})
    axes = {k: v for k, v in axes.items() if k in (*input_names(cfg_model), "logits")}
    try:
        with atomic_output(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on LSTM batch sizes: the agreement checks it
            torch.onnx.export(_Logits(copy.deepcopy(model).cpu().eval()), example, str(tmp), opset_version=OPSET,
                              dynamo=False, input_names=list(input_names(cfg_model)), output_names=["logits"],
                              dynamic_axes=axes)
    except HarnessError:
        raise
    except Exception as e:  # any exporter failure becomes one message naming the variant
        raise ExportError(f"{variant} cannot be exported to ONNX (opset {OPSET}, TorchScript exporter): "
                          f"{type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _runnable(path: Path, cfg: variants.VariantConfig) -> OrtModule:
    """``path`` in an :class:`OrtModule`, run once on another batch size and question length than the export's;
    ExportError naming the variant when ONNX Runtime cannot."""
    probe = random_inputs(cfg.model, 3, "cpu", question_len=7, seed=1)
    try:
        module = OrtModule(path, input_names(cfg.model))
        module(*probe)
    except Exception as e:  # onnxruntime's own error types, named in the message
        raise ExportError(f"{cfg.name}: ONNX Runtime cannot run {path}: {type(e).__name__}: {_first_line(e)}") from None
    return module


def _onnx(model: nn.Module, cfg: variants.VariantConfig, out_dir: Path, calibration=None) -> Compressed:
    ort = _ort()
    path = out_dir / "model.onnx"
    export_onnx(model, cfg.name, path, cfg.model)
    return Compressed(_runnable(path, cfg), path, path.stat().st_size,
                      {"opset": OPSET, "exporter": "torchscript", **session_facts(ort)})


#: training questions a static int8 quantisation calibrates its activation ranges on (a few hundred: min/max
#: ranges settle within that many), drawn at random (seed 0) from the training split only, in batches of
CALIBRATION_QUESTIONS = 256
CALIBRATION_BATCH = 32


def _calibration_batches(split: D.SplitData, features: D.Features, cfg_model: dict, batch_size: int) -> tuple:
    names = input_names(cfg_model)
    return tuple({k: t.numpy() for k, t in zip(names, (b.appearance, b.motion, b.questions, b.lengths,
                                                        *(b.extra[n] for n in names[4:])))}
                 for b in D.iterate_batches(split, features, batch_size, device="cpu"))


def training_calibration(data: D.VideoQAData, cfg_model: dict, questions: int = CALIBRATION_QUESTIONS,
                         batch_size: int = CALIBRATION_BATCH, seed: int = 0) -> Calibration:
    """``questions`` training questions (all of them when fewer) drawn at random with ``seed``, as model
    inputs: the only split this reads is ``train`` (never validation or test, whose accuracy the compressed
    model is then measured on)."""
    split = data.splits["train"]
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:questions].sort().values
    sub = D.SplitData("train", **{f: getattr(split, f)[idx] for f in ("questions", "lengths", "video_rows", "answers",
                                                                     "qtypes")},
                      question_ids=split.question_ids[idx.numpy()], video_ids=split.video_ids[idx.numpy()],
                      extra={k: v[idx] for k, v in split.extra.items()})
    return Calibration("train", tuple(sub.question_ids.tolist()),
                       _calibration_batches(sub, data.features, cfg_model, batch_size))


def random_calibration(cfg_model: dict, questions: int = 64, batch_size: int = CALIBRATION_BATCH) -> Calibration:
    """Random inputs shaped like the data (no question ids): what ``bench.py --compress`` calibrates on, where
    there is no data set; the scales they give change the latency of a static int8 model, not its kernels."""
    names = input_names(cfg_model)
    return Calibration("random inputs", (), tuple(
        {k: t.numpy() for k, t in zip(names, random_inputs(cfg_model, batch_size, "cpu", seed=s))}
        for s in range(-(-questions // batch_size))))


def _quantization(method: str):
    """onnxruntime.quantization, or an ExportError saying how to install it."""
    _ort(method)
    from onnxruntime import quantization

    return quantization


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantiser gives its advice through the root logger (pre-processing, Gemm biases that are
    not constant) and warnings: not the user's to act on."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


#: ONNX Runtime's int8 weights in 7 bits ([-64, 64]; its quantisers' ``reduce_range``). On x86 CPUs with AVX2 or
#: AVX-512 but no VNNI, MLAS multiplies uint8 activations by int8 weights with VPMADDUBSW, which adds two products
#: into a saturating int16: 255 * 127 * 2 overflows it, 255 * 64 * 2 does not. With full-range weights a model
#: quantised anywhere loses accuracy wherever it runs on such a CPU: measured on a 2-core AVX2 EPYC, a tiny-size
#: DualVGR agreed with fp32 on 62% (dynamic) and 59% (static) of 300 test questions, 96% and 95% with 7-bit
#: weights (tests/compression/test_compress.py). On VNNI CPUs the seventh bit only costs weight precision.
WEIGHTS_7BIT = True
WEIGHT_RANGE = " (7-bit range: no int16 saturation without VNNI)"


def _quantized_ops(path: Path) -> dict[str, int]:
    """The int8 operators of a quantised graph (and its quantising ones), by type."""
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {op: n for op, n in sorted(ops.items())
            if op in profiles.ORT_INT8_GEMM or op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")}


def _quantize_lstms(q, src: Path, dst: Path) -> None:
    """``src``'s LSTMs dynamically quantised into ``dst`` (ONNX Runtime's DynamicQuantizeLSTM: int8 W and R, one
    scale per direction, not per output channel: the quantiser's per-channel mode rewrites the shape of a weight in
    place, which breaks a second LSTM sharing it, as a multiple-choice model's question encoder does for the
    candidates)."""
    q.quantize_dynamic(src, dst, op_types_to_quantize=["LSTM"], per_channel=False, weight_type=q.QuantType.QInt8,
                       reduce_range=WEIGHTS_7BIT)


def _ort_dynamic_int8(model: nn.Module, cfg: variants.VariantConfig, out_dir: Path, calibration=None) -> Compressed:
    q = _quantization("ort-dynamic-int8")
    path = out_dir / "model-int8.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        fp32, mm = Path(tmp) / "model.onnx", Path(tmp) / "matmul-int8.onnx"
        export_onnx(model, cfg.name, fp32, cfg.model)
        with _quiet_quantizer():
            q.quantize_dynamic(fp32, mm, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=WEIGHTS_7BIT,
                               weight_type=q.QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
            with atomic_output(path) as out:
                _quantize_lstms(q, mm, out)
    return Compressed(_runnable(path, cfg), path, path.stat().st_size, {
        "opset": OPSET, "quantizer": "onnxruntime.quantization.quantize_dynamic", "quantized_ops": _quantized_ops(path),
        "weights": f"int8{WEIGHT_RANGE} (MatMul: per channel; LSTM W and R: per direction)",
        "activations": "uint8, quantised on the fly per run", **session_facts(_ort())})


def _ort_static_int8(model: nn.Module, cfg: variants.VariantConfig, out_dir: Path,
                     calibration: Calibration | None = None) -> Compressed:
    q = _quantization("ort-static-int8")
    if calibration is None or not calibration.batches:
        raise CompressError(f"{cfg.name}: ort-static-int8 calibrates on questions: none given")
    path = out_dir / "model-int8-static.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        fp32, qdq = Path(tmp) / "model.onnx", Path(tmp) / "qdq.onnx"
        export_onnx(model, cfg.name, fp32, cfg.model)
        wanted = {i.name for i in _ort().InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()}
        batches = iter([{k: v for k, v in b.items() if k in wanted} for b in calibration.batches])
        reader = type("Reader", (q.CalibrationDataReader,), {"get_next": lambda self: next(batches, None)})()
        with _quiet_quantizer():
            q.quantize_static(fp32, qdq, reader, quant_format=q.QuantFormat.QDQ,
                              op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=WEIGHTS_7BIT,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax, extra_options={"MatMulConstBOnly": True})
            with atomic_output(path) as out:  # ONNX Runtime has no static int8 LSTM: its dynamic one
                _quantize_lstms(q, qdq, out)
    return Compressed(_runnable(path, cfg), path, path.stat().st_size, {
        "opset": OPSET, "quantizer": "onnxruntime.quantization.quantize_static (QDQ, MinMax) then quantize_dynamic "
        "(LSTM)", "quantized_ops": _quantized_ops(path), "calibration": calibration.describe(),
        "weights": f"int8{WEIGHT_RANGE} (MatMul / Gemm: per channel; LSTM W and R: per direction)",
        "activations": "MatMul / Gemm inputs uint8 with calibrated scales; LSTM inputs "
        "quantised on the fly (ONNX Runtime has no static int8 LSTM)", **session_facts(_ort())})

register(Method("dynamic-int8", "LSTM and Linear weights int8, activations quantised on the fly (CPU)", _dynamic_int8,
                torch_int8=True))
register(Method("onnx", f"ONNX export (opset {OPSET}) run by ONNX Runtime's CPU provider", _onnx))
register(Method("ort-dynamic-int8", "the ONNX export quantised by ONNX Runtime: MatMul and LSTM weights int8 per "
                "channel, activations quantised on the fly, run by its CPU provider", _ort_dynamic_int8))
register(Method("ort-static-int8", f"the ONNX export quantised by ONNX Runtime, MatMul and Gemm statically (int8 "
                f"weights per channel, activation scales calibrated on {CALIBRATION_QUESTIONS} training "
                "questions), its LSTMs dynamically (ONNX Runtime has no static int8 LSTM)", _ort_static_int8,
                calibrated=True))


# ----------------------------------------------------------------------------- where evaluations live


def key(run_id: str, method: str) -> str:
    """A compressed evaluation's key: ``store.run_dir(key)`` is its directory, so whatever reads a
    run's predictions by id (:mod:`harness.report.statistics`) reads a compressed one by this key."""
    return f"{run_id}/{COMPRESSED}/{method}"


def directory(store: ResultsStore, run_id: str, method: str) -> Path:
    return store.run_dir(key(run_id, method))  # runs/<run_id>/compressed/<method>


def read(store: ResultsStore, run_id: str, method: str, run_record: dict | None = None) -> dict | None:
    """The complete compressed evaluation of a run by a method, or None: none, unreadable, or made
    from other weights than the run's recorded ``best.pt`` (a retrained run)."""
    try:
        rec = store._load(directory(store, run_id, method) / store.RECORD)
    except (OSError, ValueError):
        return None
    if rec is None or rec.get("status") != "complete":
        return None
    run_record = run_record or (store.read_record(run_id) if store.is_complete(run_id) else None)
    want = ((run_record or {}).get("weights") or {}).get(WEIGHTS)
    return rec if want is None or rec.get("run_weights") == want else None


def read_all(store: ResultsStore, run_record: dict) -> dict[str, dict]:
    """Method -> complete compressed evaluation of one run (the registered methods it has)."""
    return {m: r for m in METHODS if (r := read(store, run_record["run_id"], m, run_record)) is not None}


# ----------------------------------------------------------------------------- evaluating


def fp32_model(store: ResultsStore, record: dict) -> nn.Module:
    """A complete run's best weights in its model, on the CPU, in eval mode (weights only, no code
    unpickled); CompressError when they are missing or damaged."""
    run_id = record["run_id"]
    problem = store.weights_problem(run_id, record)
    if problem:
        raise CompressError(f"{run_id}: cannot compress: {problem}")
    model = variants.build(variants.VariantConfig(**record["variant_config"]))
    model.load_state_dict(torch.load(store.run_dir(run_id) / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def agreement(ref: nn.Module, other: nn.Module, split: D.SplitData, features: D.Features,
              batch_size: int, task: str = OPEN_ENDED) -> tuple[dict, np.ndarray]:
    """How far ``other`` is from ``ref`` on a split: the share of questions whose prediction (the
    task's: argmax over answers or candidates, a rounded count) agrees and the largest |logit
    difference| (fp32), and ``ref``'s predictions."""
    read = variants.task(task).predict
    names = variants.task(task).inputs
    same = torch.zeros((), dtype=torch.long)
    worst = torch.zeros(())
    preds = []
    for b in D.iterate_batches(split, features, batch_size, device="cpu"):
        inputs = (b.appearance, b.motion, b.questions, b.lengths, *(b.extra[k] for k in names))
        a, o = ref(*inputs)["logits"].float(), other(*inputs)["logits"].float()
        same += (read(a) == read(o)).sum()
        worst = torch.maximum(worst, (a - o).abs().max())
        preds.append(read(a))
    return {"n": len(split), "prediction_agreement": int(same) / len(split),
            "max_abs_logit_diff": float(worst)}, torch.cat(preds).numpy()


def _evaluations(module: nn.Module, data: D.VideoQAData, batch_size: int, task: str) -> tuple[dict, dict]:
    """Test and val metrics, the test ablations (:mod:`harness.evaluation.evaluate`, as the runner does) and
    the predictions of test and val."""
    cpu = torch.device("cpu")

    def ev(split, **kw):
        return evaluate(module, data.splits[split], data.features, data.type_names, batch_size, cpu, task=task, **kw)

    (test, pred_test), (val, pred_val) = ev("test"), ev("val")
    ablations = {a: ev("test", ablation=a)[0] for a in ABLATIONS}
    return {"test": test, "val": val, "ablations": ablations}, {"test": pred_test, "val": pred_val}


#: timing rounds: the paths compared are timed in turn, a share of the repetitions each round, so that
#: load that comes and goes on a shared machine falls on all of them alike
ROUNDS = 3


def interleaved_latency(modules: dict[str, nn.Module], inputs: tuple, reps: int, rounds: int = ROUNDS,
                        warmup: int | None = None) -> dict[str, dict]:
    """Eval latency (ms) of each module on the same inputs, timed in turn over ``rounds`` rounds of
    ``ceil(reps / rounds)`` forwards (:func:`harness.measurement.measure.latency`; warm-up in the first round
    only): per module the median and p90 of its round medians and p90s, and the reps in all."""
    per = -(-reps // rounds)
    times: dict[str, list[dict]] = {name: [] for name in modules}
    for r in range(rounds):
        for name, m in modules.items():
            times[name].append(latency(m, inputs, reps=per, warmup=warmup if r == 0 else 0))
    return {name: {"latency_ms_median": float(np.median([t["latency_ms_median"] for t in ts])),
                   "latency_ms_p90": float(np.median([t["latency_ms_p90"] for t in ts])),
                   "reps": per * rounds, "rounds": rounds, "warmup": ts[0]["warmup"]} for name, ts in times.items()}


def cpu_costs(ref: nn.Module, other: nn.Module, cfg_model: dict,
              batches: tuple[int, ...] = LATENCY_BATCHES, reps: dict[int, int] | None = None) -> dict:
    """CPU latency of ``ref`` (fp32 eager) and ``other`` at each batch size, timed in turn on the same
    inputs (:func:`interleaved_latency`), and the memory of one forward at the largest batch (process
    RSS: its peak, and what the forward added to what was resident; 0 when it fitted in pages already held)."""
    reps = reps or LATENCY_REPS
    out: dict = {"threads": torch.get_num_threads(), "load_average": [load_average()], "latency": {}}
    for bs in batches:
        out["latency"][str(bs)] = interleaved_latency({"fp32": ref, "compressed": other},
                                                      random_inputs(cfg_model, bs, "cpu"), reps.get(bs, 10))
    inputs = random_inputs(cfg_model, max(batches), "cpu")
    out["memory_mib"] = {"batch_size": max(batches)}
    for name, m in (("fp32", ref), ("compressed", other)):
        with torch.no_grad():
            mem = peak_memory(lambda m=m: m(*inputs), "cpu")
        out["memory_mib"].update({name: {"own": mem["own"], "peak": mem["peak"]}, "kind": mem["kind"]})
    out["load_average"].append(load_average())
    return out


def _load_data(record: dict, data: D.VideoQAData | None) -> D.VideoQAData:
    """The run's data set (loaded from its spec when not given), checked to be the one it was trained on."""
    want = record["data"]["id"]
    data = data or D.load(record["data"]["spec"])
    if data.data_id != want:
        raise CompressError(f"{record['run_id']}: trained on data set {want}, but {record['data']['spec']!r} is now "
                            f"{data.data_id} (features or questions changed): its compressed evaluation would not "
                            f"pair with its fp32 predictions")
    return data


def compress_run(store: ResultsStore, run_id: str, method: str, data: D.VideoQAData | None = None, *,
                 force: bool = False, say: Callable[[str], None] = lambda msg: None) -> dict:
    """Evaluate a complete run compressed by ``method`` (:data:`METHODS`), without retraining, and
    record it in ``runs/<run_id>/compressed/<method>/``; the run's own files are only read. A
    complete evaluation of the same weights is returned as is (unless ``force``)."""
    check_methods([method], "compression method")
    if not store.is_complete(run_id):
        raise CompressError(f"{run_id}: not a complete run in {store.root}: nothing to compress")
    record = store.read_record(run_id)
    if not force and (done := read(store, run_id, method, record)) is not None:
        return done
    out_dir = directory(store, run_id, method)
    with locked(out_dir / ".lock"):  # one process per evaluation; one that waited finds it done
        if not force and (done := read(store, run_id, method, record)) is not None:
            return done
        say(f"{run_id}: {method}: compressing and evaluating on the CPU")
        return _compress_locked(store, record, method, _load_data(record, data), out_dir)


def _compress_locked(store: ResultsStore, record: dict, method: str, data: D.VideoQAData, out_dir: Path) -> dict:
    from harness.training.runner import write_predictions  # the runner's predictions format, one writer

    t0 = time.perf_counter()
    cfg = variants.VariantConfig(**record["variant_config"])
    model = fp32_model(store, record)
    calibration = training_calibration(data, cfg.model) if METHODS[method].calibrated else None
    comp = METHODS[method].build(model, cfg, out_dir, calibration)
    batch = max(int(record.get("train_config", {}).get("batch_size", 64)), 256)  # the runner's eval batch
    task = record_task(record)
    metrics, preds = _evaluations(comp.module, data, batch, task)
    agree, ref_pred = agreement(model, comp.module, data.splits["test"], data.features, batch, task)
    for split in ("test", "val"):
        write_predictions(out_dir / f"predictions_{split}.csv", data, split, {"pred_best": preds[split]})
    rec = {"kind": "compressed-evaluation", "version": VERSION, "status": "complete", "run_id": record["run_id"],
           "variant": record["variant"], "seed": record["seed"], "method": method,
           "method_description": METHODS[method].description, "method_info": comp.info,
           "run_weights": record["weights"][WEIGHTS], "data": {k: record["data"][k] for k in ("spec", "id", "name")},
           "metrics": metrics, "agreement": {"split": "test", **agree,
                                             "fp32_reproduced": _reproduced(store, record, ref_pred)},
           "fp32_test_recorded": record["metrics"]["test"]["overall"],
           "size": {"file": comp.file.name, "bytes": comp.size_bytes,
                    "fp32_bytes": file_digest(store.run_dir(record["run_id"]) / WEIGHTS)["nbytes"]},
           "cpu": cpu_costs(model, comp.module, cfg.model)}
    rec.update(_provenance(time.perf_counter() - t0))
    atomic_write_json(out_dir / store.RECORD, rec)
    return rec


def _reproduced(store: ResultsStore, record: dict, ref_pred: np.ndarray) -> float | None:
    """The share of test questions where the fp32 model's prediction now equals the run's recorded
    prediction (1.0 on the machine that trained it; less elsewhere: other kernels), None without it."""
    import pandas as pd

    path = store.run_dir(record["run_id"]) / "predictions_test.csv"
    try:
        recorded = pd.read_csv(path)["pred_best"].to_numpy()
    except (OSError, KeyError, ValueError):
        return None
    return float((recorded == ref_pred).mean()) if len(recorded) == len(ref_pred) else None


def _provenance(seconds: float) -> dict:
    return {"environment": environment("cpu"), "torch_version": torch.__version__, "git_commit": git_commit(),
            "code": {"fingerprint": identity.code_fingerprint()}, "seconds": seconds,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def compress_runs(store: ResultsStore, run_ids: list[str], methods: tuple[str, ...], *, force: bool = False,
                  say: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """Every method on every complete run among ``run_ids``, one at a time (the CPU latency is
    timed alone), each data set loaded once; returns the failures (``run_id``, ``method``,
    ``reason``): a model that cannot be exported is named and the others go on."""
    failures, loaded = [], {}
    for rid in (r for r in run_ids if store.is_complete(r)):
        record = store.read_record(rid)
        for method in methods:
            try:
                if force or read(store, rid, method, record) is None:
                    spec = record["data"]["spec"]
                    loaded[spec] = loaded.get(spec) or _load_data(record, None)
                    compress_run(store, rid, method, loaded[spec], force=force, say=say)
                else:
                    say(f"{record['variant']} seed {record['seed']} {method}: already complete ({rid}), not "
                        "evaluated again (--force redoes it)")
            except CompressError as e:  # the caller says it (ablate.py: one error line each)
                failures.append({"run_id": rid, "variant": record["variant"], "method": method, "reason": str(e)})
    return failures


# ----------------------------------------------------------------------------- what the machine allows


def _fastest_s(fn: Callable[[], object], reps: int) -> float:
    fn()  # first-call allocations
    return min(timeit.repeat(fn, number=1, repeat=reps))


def machine_rates(n: int = 2048, reps: int = 5, copy_mib: int = 256) -> dict:
    """What this CPU reaches with this process's threads, fastest of ``reps``: the fp32 GEMM rate
    (an n x n x n matmul), the int8 GEMM rate (the same product through a dynamically quantised
    Linear: fbgemm's int8 kernel as the int8 path runs it, the input's quantisation included), both
    in FLOP/s (2 per MAC), and the copy bandwidth (bytes read + written per second by a
    ``copy_mib`` MiB tensor copy)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    lin = nn.Sequential(nn.Linear(n, n, bias=False))
    qlin = quantize_int8(lin)
    src = torch.ones(copy_mib * 2 ** 18)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    with torch.no_grad():
        fp32 = 2 * n ** 3 / _fastest_s(lambda: a @ b, reps)
        int8 = 2 * n ** 3 / _fastest_s(lambda: qlin(a), reps)
    copy = 2 * src.nbytes / _fastest_s(lambda: dst.copy_(src), reps)
    return {"fp32_gemm_flops": fp32, "int8_gemm_flops": int8, "copy_bytes_per_s": copy, "gemm_n": n,
            "copy_mib": copy_mib, "threads": torch.get_num_threads()}


def ort_rates(rates: dict, n: int = 2048, reps: int = 5) -> dict:
    """``rates`` (:func:`machine_rates`) with ONNX Runtime's own GEMM rates beside torch's: an n x n x n product
    through a one-MatMul graph in fp32 and dynamically quantised to int8 (MLAS's kernels, the input's
    quantisation included), with the session options of its paths; ``fp32_gemm_flops`` and
    ``int8_gemm_flops`` become the faster of the two engines (the least time this machine allows), each
    engine's kept as ``torch_*`` and ``ort_*``. ``rates`` as they are when onnxruntime is missing."""
    try:
        ort, q = _ort(), _quantization("ort-dynamic-int8")
    except ExportError:
        return rates
    out = dict(rates, torch_fp32_gemm_flops=rates["fp32_gemm_flops"], torch_int8_gemm_flops=rates["int8_gemm_flops"])
    lin = nn.Linear(n, n, bias=False).eval()
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).numpy()
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        fp32, int8 = Path(tmp) / "mm.onnx", Path(tmp) / "mm-int8.onnx"
        torch.onnx.export(lin, (torch.from_numpy(a),), str(fp32), dynamo=False, input_names=["a"], opset_version=OPSET)
        as_matmul(fp32)
        q.quantize_dynamic(fp32, int8, op_types_to_quantize=["MatMul"], weight_type=q.QuantType.QInt8,
                           reduce_range=WEIGHTS_7BIT)
        for kind, path in (("fp32", fp32), ("int8", int8)):
            session = ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])
            out[f"ort_{kind}_gemm_flops"] = 2 * n ** 3 / _fastest_s(lambda s=session: s.run(None, {"a": a}), reps)
            out[f"{kind}_gemm_flops"] = max(out[f"torch_{kind}_gemm_flops"], out[f"ort_{kind}_gemm_flops"])
    return out


def as_matmul(path: Path) -> None:
    """A one-Gemm graph (a 2-D Linear's export) rewritten as a MatMul by its transposed weight, in place: the
    operator ONNX Runtime's dynamic quantisation turns into its int8 product."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    node, init = m.graph.node[-1], m.graph.initializer[0]
    if node.op_type == "Gemm":
        w = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), init.name))
        node.CopyFrom(onnx.helper.make_node("MatMul", [node.input[0], init.name], list(node.output), node.name))
        onnx.save(m, str(path))


def quantized_macs(model: nn.Module, cfg_model: dict) -> tuple[int, int]:
    """(MACs per sample of the whole eval forward, of them those in the nn.LSTM and nn.Linear
    modules: what dynamic int8 runs in int8), counted by :mod:`harness.measurement.flops`."""
    from harness.measurement.flops import count_flops, flop_analysis

    inputs = random_inputs(cfg_model, 2, "cpu")
    total = count_flops(model, inputs)["macs_per_sample"]
    by_module = flop_analysis(model, inputs).by_module()
    q = sum(by_module.get(f"model.{name}", 0) for name, m in model.named_modules()
            if isinstance(m, (nn.LSTM, nn.Linear)))
    return int(total), int(q // 2)


def path_profile(module: nn.Module, inputs: tuple, reps: int = 5) -> dict:
    """Where one path's forward on ``inputs`` spends its time (:mod:`harness.compression.profiles`): ONNX
    Runtime's profiler for an :class:`OrtModule` (with the MACs its int8 and fp32 GEMM operators did),
    ``torch.profiler`` over ``reps`` forwards otherwise (after one warm-up)."""
    if isinstance(module, OrtModule):
        return module.profile(inputs, reps)
    times = []
    with torch.no_grad():
        module(*inputs)
        with quiet_fd2(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                t0 = time.perf_counter()
                module(*inputs)
                times.append(time.perf_counter() - t0)
    return profiles.summarize_torch(prof.key_averages(), reps, 1000 * float(np.median(times)))


def int8_macs(method: str | None, macs: tuple[int, int], profile: dict, batch: int) -> int:
    """The MACs per sample a path runs in int8: a torch int8 method's (:attr:`Method.torch_int8`) nn.LSTM and
    nn.Linear MACs, an ONNX Runtime path's int8 GEMM MACs as its profile at ``batch`` counted them (at most
    the model's), none for fp32 eager (``method`` None) and the others."""
    if method is not None and METHODS[method].torch_int8:
        return macs[1]
    return min(macs[0], int(profile.get("int8_gemm_macs", 0)) // batch)


def bound_ms(path: str, batch: int, macs: tuple[int, int], weight_bytes: int, rates: dict) -> dict:
    """The least time a forward of ``batch`` samples can take on ``path`` (``fp32``, or ``int8``:
    the quantised MACs at the int8 rate, the rest at the fp32 rate; ``macs``: (all, int8) per sample,
    the int8 ones what that path runs in int8, :func:`int8_macs`): its compute at the measured GEMM
    rates, and reading its weights once at the measured bandwidth; the bound is the larger."""
    total, q = macs
    if path == "int8":
        compute = 2 * batch * (q / rates["int8_gemm_flops"] + (total - q) / rates["fp32_gemm_flops"])
    else:
        compute = 2 * batch * total / rates["fp32_gemm_flops"]
    memory = weight_bytes / rates["copy_bytes_per_s"]
    return {"compute_ms": 1000 * compute, "memory_ms": 1000 * memory, "bound_ms": 1000 * max(compute, memory)}
