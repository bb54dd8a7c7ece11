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

from .errors import HarnessError

#: autocast dtype per precision name (fp32: no autocast; TF32 matmuls are allowed on CUDA)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the precisions a training run can use (fp16 needs loss scaling, which only benchmarks do)
TRAIN_PRECISIONS = ("fp32", "bf16")


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
    kernels round differently), the device, determinism and matmul-precision flags; and the load
    average (other work on the machine) when this is called."""
    device = torch.device(device)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device_name(device),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "load_average": load_average()}


#: environment facts that can change the numbers (a report lists them when its runs differ); not the load
NUMERIC_ENVIRONMENT = ("torch", "threads", "cpu", "cpu_capability", "device", "deterministic_algorithms",
                       "cudnn_deterministic", "cudnn_benchmark", "float32_matmul_precision")


def git_commit() -> str | None:
    """The repository's commit, ``+dirty`` when tracked files have uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent.parent
    try:
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


def autocast(device: torch.device | str, precision: str = "fp32"):
    """The autocast context for ``precision`` on ``device`` (fp32: a no-op)."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


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
    if PRECISIONS[precision] is None:
        return None
    dev = torch.device(device)
    if dev.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return f"{device_name(dev)} does not support bf16"
        return None
    if dev.type == "cpu":
        err = _probe_cpu(precision)
        if err is not None:
            return (f"{precision} autocast cannot run an LSTM on this CPU ({platform.processor() or platform.machine()}): "
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
