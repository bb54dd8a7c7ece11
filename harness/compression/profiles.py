"""Where a compressed path's forward spends its time, summarised from a profiler: ONNX Runtime's own
(its per-node JSON events) for the ONNX Runtime paths, ``torch.profiler`` for the eager ones.

A summary says how long a forward took, how much of it went to the GEMM operators (the matrix
products and the fused LSTMs, int8 or fp32) and so the share outside them (everything else: element-wise
operators, softmax, reshapes and copies, quantising activations, the runtime's own overhead), the
heaviest operator types, and, for ONNX Runtime, the MACs its int8 and fp32 GEMM operators did, counted
from the shapes the profiler recorded: what a path's bound (:func:`harness.compression.compress.bound_ms`)
counts at the int8 rate is what that path actually ran in int8.
"""
from __future__ import annotations

import math
from collections import defaultdict

#: ONNX Runtime operators that multiply int8 matrices (the dynamically or statically quantised products)
ORT_INT8_GEMM = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
                           "DynamicQuantizeLSTM", "QAttention", "ConvInteger", "QLinearConv"})
#: ONNX Runtime operators that multiply fp32 matrices
ORT_FP32_GEMM = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "LSTM", "Conv", "FusedConv", "Attention"})
#: torch operators (self time) that multiply matrices, int8 or fp32: the BLAS / oneDNN / fbgemm calls and the
#: fused LSTMs (oneDNN's fp32 one, fbgemm's quantised one), whose element-wise gates are inside them
TORCH_GEMM = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
                        "aten::mkldnn_rnn_layer", "aten::mkldnn_linear", "aten::quantized_lstm",
                        "quantized::linear_dynamic", "quantized::linear", "quantized::linear_dynamic_fp16",
                        "aten::fbgemm_linear_int8_weight_fp32_activation"})
#: operator types listed in a summary, heaviest first
TOP_OPS = 6


def _shape(entry: dict) -> list[int]:
    """The dims of one ``input_type_shape`` / ``output_type_shape`` entry (``{"float": [..]}``)."""
    return [int(d) for d in next(iter(entry.values()), [])] if entry else []


def node_macs(op: str, inputs: list[dict], outputs: list[dict]) -> int:
    """The MACs one profiled GEMM node did, from its first input's and first output's shapes (a weight input
    may be recorded pre-packed, so its shape is not used): a product ``[..., M, K] x [K, N]`` -> ``[..., M, N]``
    did prod(output) x K; an LSTM over ``X [T, B, I]`` giving ``Y [T, D, B, H]`` did T·B·D·4H·(I + H)."""
    a, y = (_shape(inputs[0]) if inputs else []), (_shape(outputs[0]) if outputs else [])
    if not a or not y:
        return 0
    if "LSTM" in op:
        if len(a) != 3 or len(y) != 4:
            return 0
        t, b, i = a
        d, h = y[1], y[3]
        return t * b * d * 4 * h * (i + h)
    if "Conv" in op or op in ("Attention", "QAttention"):
        return 0  # not in these models; counted as GEMM time, not MACs
    m = y[-2] if len(y) >= 2 else 1
    k = a[-1] if len(a) < 2 or a[-2] == m else a[-2]  # Gemm / FusedMatMul may take A transposed
    return math.prod(y) * k


def summarize_ort(events: list[dict], skip_runs: int = 1) -> dict:
    """A summary of ONNX Runtime profiler events (the JSON list ``end_profiling`` writes) over the runs after
    the first ``skip_runs``: per run (means), the ``model_run`` ms, the GEMM operators' ms and MACs (int8 and
    fp32) and the share of the run outside the GEMMs, and the heaviest operator types."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[skip_runs:]
    if not runs:
        return {"tool": "onnxruntime profiler", "runs": 0}
    start = runs[0]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
             and e.get("ts", 0) >= start]
    per_op: dict[str, float] = defaultdict(float)
    macs = {"int8": 0, "fp32": 0}
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] += e["dur"]
        kind = "int8" if op in ORT_INT8_GEMM else "fp32" if op in ORT_FP32_GEMM else None
        if kind:
            macs[kind] += node_macs(op, e["args"].get("input_type_shape", []), e["args"].get("output_type_shape", []))
    n = len(runs)
    run_us = sum(e["dur"] for e in runs) / n  # a mean, as the operators' times are: their shares add up
    gemm_us = sum(v for op, v in per_op.items() if op in ORT_INT8_GEMM | ORT_FP32_GEMM) / n
    return {"tool": "onnxruntime profiler", "runs": n, "run_ms": run_us / 1000, "gemm_ms": gemm_us / 1000,
            "non_gemm_share": max(0.0, 1 - gemm_us / run_us) if run_us else None,
            "int8_gemm_macs": macs["int8"] // n, "fp32_gemm_macs": macs["fp32"] // n,
            "top_ops": _top({op: v / n / 1000 for op, v in per_op.items()}, run_us / 1000)}


def summarize_torch(key_averages, runs: int, run_ms: float) -> dict:
    """A summary of ``torch.profiler``'s ``key_averages()`` over ``runs`` forwards whose median wall time is
    ``run_ms``: the GEMM operators' self time per forward and the share of the forward outside them, and the
    heaviest operators by self time."""
    per_op = {e.key: e.self_cpu_time_total / runs / 1000 for e in key_averages}
    gemm_ms = sum(v for op, v in per_op.items() if op in TORCH_GEMM)
    return {"tool": "torch.profiler", "runs": runs, "run_ms": run_ms, "gemm_ms": gemm_ms,
            "non_gemm_share": max(0.0, 1 - gemm_ms / run_ms) if run_ms else None,
            "top_ops": _top(per_op, run_ms)}


def _top(per_op: dict[str, float], run_ms: float) -> list[dict]:
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    return [{"op": op, "ms": ms, "share": ms / run_ms if run_ms else None} for op, ms in ops]


def fmt_top(summary: dict, n: int = 3) -> str:
    """The heaviest operator types of a summary, as ``op 41%, op 12%``."""
    return ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in summary.get("top_ops", [])[:n]
                     if o.get("share") is not None)
