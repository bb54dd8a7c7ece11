"""Where code runs: the device, the numeric precision, and the facts about the environment that a
record or a benchmark names (device name, git commit). One owner for these facts: the runner,
``measure``, ``bench.py`` and ``prepare`` import them from here. This module imports no other
module of the harness.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError

#: autocast dtype per precision name (fp32 and tf32: no autocast; they differ in the TF32 flags below)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "tf32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
#: the precisions a training run can use (fp16 needs loss scaling, which only benchmarks do)
TRAIN_PRECISIONS = ("fp32", "tf32", "bf16")
#: whether TF32 math is allowed on CUDA, for cuBLAS matmuls and cuDNN (the LSTMs), per precision: set
#: deliberately by :func:`apply_math_flags`, never left to PyTorch's defaults (matmul off, cuDNN on), so that
#: "fp32" is fp32 everywhere; bf16 runs its LSTMs in fp32 (:func:`lstm_precision`) with TF32 allowed
TF32: dict[str, bool] = {"fp32": False, "tf32": True, "bf16": True, "fp16": True}
#: set to 1 for deterministic CUDA kernels (cuBLAS workspace, deterministic algorithms where they exist)
DETERMINISTIC_ENV = "VQAKD_DETERMINISTIC"


class PrecisionError(HarnessError, ValueError):
    """A precision that is unknown, or that this device cannot run; the message says which and why."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None, ""): cuda when available, else cpu; a named CUDA device must exist here."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise HarnessError(f"device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HarnessError(f"device {device}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HarnessError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere. Only around timed regions:
    never inside a training step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def environment(device: torch.device | str) -> dict:
    """What a run id deliberately does not cover but can change the numbers: torch version, the
    threads used, the CPU model and the instruction set torch's kernels use (AVX-512 and AVX2
    kernels round differently), the device, determinism and matmul-precision flags; on CUDA the
    TF32 flags in force and the CUDA and cuDNN versions (None on the CPU, where they do not apply);
    and the load average (other work on the machine) when this is called."""
    device = torch.device(device)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device_name(device),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), **cuda_facts(device),
            "load_average": load_average()}


def cuda_facts(device: torch.device | str) -> dict:
    """TF32 flags (cuBLAS matmul, cuDNN) and CUDA / cuDNN versions on a CUDA device; all None elsewhere."""
    cuda = torch.device(device).type == "cuda"
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
            "cuda_version": torch.version.cuda if cuda else None,
            "cudnn_version": torch.backends.cudnn.version() if cuda else None}


#: environment facts that can change the numbers (a report lists them when its runs differ); not the load
NUMERIC_ENVIRONMENT = ("torch", "threads", "cpu", "cpu_capability", "device", "deterministic_algorithms",
                       "cudnn_deterministic", "cudnn_benchmark", "float32_matmul_precision", "tf32_matmul",
                       "tf32_cudnn", "cudnn_version")


def apply_math_flags(device: torch.device | str, precision: str = "fp32") -> dict:
    """Choose the numerics of this process for ``precision`` on ``device``, deliberately: on CUDA
    the TF32 flags of :data:`TF32`; everywhere, with ``VQAKD_DETERMINISTIC=1``, deterministic
    algorithms (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set, ``cudnn.deterministic``, no
    ``cudnn.benchmark``; ``warn_only``: an op without a deterministic kernel warns instead of
    failing). Returns what it set. The flags are process-wide: the runner and bench.py call this
    before each run or measurement."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    out = {}
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = TF32[precision]
        out["tf32"] = TF32[precision]
    if os.environ.get(DETERMINISTIC_ENV, "") == "1":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        out["deterministic"] = True
    return out


def lstm_precision(device: torch.device | str, precision: str) -> str:
    """The precision the recurrent layers (LSTMs: 88.5% of DualVGR's MACs) actually compute in.
    CUDA: autocast's cuDNN RNN wrapper casts to fp16 whatever the autocast dtype (ATen
    ``cudnn/AutocastRNN.cpp``), so under bf16 the model runs its LSTMs outside autocast, in fp32
    with TF32 (``variants.dualvgr.run_lstm``): ``tf32``; fp16 (with a GradScaler) stays ``fp16``;
    fp32 is ``fp32`` or ``tf32`` as the flags of :data:`TF32` say. CPU: oneDNN's LSTM in the
    autocast dtype (bf16, fp16), else fp32."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if torch.device(device).type == "cuda":
        return "fp16" if precision == "fp16" else ("tf32" if TF32[precision] else "fp32")
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32")


#: set by a local grid's worker processes: how many runs share this process's device at once
SHARING_ENV = "VQAKD_RUNS_SHARING_DEVICE"


def runs_sharing_device() -> int:
    """How many runs train on this process's device at the same time (1 unless a local grid put
    several workers on one GPU: their throughput, wall time and device-seconds are then shared)."""
    try:
        return max(1, int(os.environ.get(SHARING_ENV, "1")))
    except ValueError:
        return 1


def git_commit() -> str | None:
    """The repository's commit, ``+dirty`` when tracked files have uncommitted changes; None outside git,
    and None where the repository around this code does not track it (an installed copy in a venv that
    lies inside some checkout: that checkout's commit says nothing of the code that ran)."""
    this = Path(__file__).resolve()
    here = this.parent.parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", this.name], cwd=this.parent,
                                 capture_output=True, text=True, timeout=10).returncode == 0
        if not tracked:
            return None
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- precision


def autocast(device: torch.device | str, precision: str = "fp32", cache: bool = True):
    """The autocast context for ``precision`` on ``device`` (fp32, tf32: a no-op). ``cache=False``
    for a forward captured in a CUDA graph (autocast's weight-cast cache must not outlive it)."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache)


@functools.lru_cache(maxsize=None)
def _probe_cpu(dtype_name: str) -> str | None:
    """Run a small LSTM + linear forward and backward under CPU autocast in ``dtype_name``; None
    when it works, else the error. oneDNN has no bf16 LSTM on CPUs without AVX-512 (BF16 or
    AVX512-core): e.g. AMD EPYC before Zen 4, where the LSTM raises at run time."""
    dtype = PRECISIONS[dtype_name]
    try:
        lstm = torch.nn.LSTM(4, 4, batch_first=True, bidirectional=True)
        lin = torch.nn.Linear(8, 2)
        x = torch.randn(2, 3, 4)
        with torch.autocast("cpu", dtype=dtype):
            y, _ = lstm(x)
            out = lin(y).float().sum()
        out.backward()
    except RuntimeError as e:
        first = (str(e).splitlines() or [""])[0].split(". ")[0]  # oneDNN's first sentence, not its advice
        return f"{type(e).__name__}: {first}"
    return None


def precision_problem(device: torch.device | str, precision: str) -> str | None:
    """Why ``precision`` cannot run on ``device`` (None when it can). Checked with a tiny probe
    on the CPU (cached per process); on CUDA, bf16 needs a GPU that supports it."""
    if precision not in PRECISIONS:
        return f"precision {precision!r} is not one of {', '.join(PRECISIONS)}"
    dev = torch.device(device)
    if precision == "tf32" and dev.type != "cuda":
        return f"precision tf32 is CUDA's TF32 math (Ampere and later); {dev.type} has none: use fp32"
    if PRECISIONS[precision] is None:
        return None
    if dev.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return f"{device_name(dev)} does not support bf16"
        return None
    if dev.type == "cpu":
        err = _probe_cpu(precision)
        if err is not None:
            return (f"{precision} autocast cannot run an LSTM on this CPU "
                    f"({platform.processor() or platform.machine()}): "
                    f"oneDNN needs AVX-512 for {precision} recurrent layers ({err}); use fp32 here, or a GPU")
    return None


def check_precision(device: torch.device | str, precision: str, *, train: bool = False) -> None:
    """Raise :class:`PrecisionError` up front when ``precision`` is unknown (for training: not one
    of :data:`TRAIN_PRECISIONS`) or cannot run on ``device``."""
    allowed = TRAIN_PRECISIONS if train else tuple(PRECISIONS)
    if precision not in allowed:
        raise PrecisionError(f"precision {precision!r} is not one of {', '.join(allowed)}")
    problem = precision_problem(device, precision)
    if problem:
        raise PrecisionError(problem)
